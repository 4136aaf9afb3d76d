"""Routing traces: what the router chose for every token of recorded runs (`moeflow trace`).

A trace file is JSON lines: a header {"format": "moeflow.routing-trace", "version": 1, "model": ...,
"moe_layers": [...], "num_experts": E, "top_k": K}, then one record per sequence:
{"prompt": [ids], "generated": [ids], "prefill": {layer: [[e...] per prompt token]},
 "decode": [{layer: [e...]} per generated token that was fed back]}.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeflow.errors import MoeflowError

FORMAT = "moeflow.routing-trace"


class TraceError(MoeflowError):
    """A trace file is missing, malformed, or from another model."""


@dataclass(frozen=True)
class TraceHeader:
    model: str
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": 1, "model": self.model, "moe_layers": list(self.moe_layers),
                "num_experts": self.num_experts, "top_k": self.top_k}


@dataclass
class SequenceTrace:
    prompt: list[int]
    generated: list[int] = field(default_factory=list)
    prefill: dict[int, list[list[int]]] = field(default_factory=dict)
    decode: list[dict[int, list[int]]] = field(default_factory=list)  # per decode step, one token each

    @staticmethod
    def from_steps(prompt: list[int], generated: list[int], steps: list[dict[int, torch.Tensor]]) -> SequenceTrace:
        t = SequenceTrace(list(prompt), list(generated))
        if steps:
            t.prefill = {layer: ids.tolist() for layer, ids in steps[0].items()}
            t.decode = [{layer: ids[0].tolist() for layer, ids in step.items()} for step in steps[1:]]
        return t

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "generated": self.generated,
                "prefill": {str(k): v for k, v in self.prefill.items()},
                "decode": [{str(k): v for k, v in step.items()} for step in self.decode]}

    @staticmethod
    def from_json(d: dict[str, Any]) -> SequenceTrace:
        return SequenceTrace(
            [int(x) for x in d["prompt"]],
            [int(x) for x in d["generated"]],
            {int(k): v for k, v in d.get("prefill", {}).items()},
            [{int(k): v for k, v in step.items()} for step in d.get("decode", [])],
        )

    def layer_route(self, layer: int) -> list[list[int]]:
        """Every token's experts at `layer`, prompt then generated, in order."""
        return list(self.prefill.get(layer, [])) + [step[layer] for step in self.decode if layer in step]


def write_trace(path: str | os.PathLike[str], header: TraceHeader, sequences: list[SequenceTrace]) -> None:
    tmp = Path(f"{path}.tmp")
    with tmp.open("w") as f:
        f.write(json.dumps(header.to_json()) + "\n")
        for seq in sequences:
            f.write(json.dumps(seq.to_json()) + "\n")
    tmp.replace(path)


def read_trace(path: str | os.PathLike[str]) -> tuple[TraceHeader, list[SequenceTrace]]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise TraceError(f"{path}: cannot read trace ({e.strerror})") from e
    try:
        head = json.loads(lines[0])
        if head.get("format") != FORMAT:
            raise ValueError(f"format {head.get('format')!r}")
        header = TraceHeader(str(head["model"]), tuple(head["moe_layers"]), int(head["num_experts"]), int(head["top_k"]))
        return header, [SequenceTrace.from_json(json.loads(line)) for line in lines[1:] if line.strip()]
    except (IndexError, ValueError, KeyError, TypeError) as e:
        raise TraceError(f"{path}: not a routing trace ({e})") from e

