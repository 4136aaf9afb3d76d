"""Decode of an int4 store on the CPU: torch's int4 kernel on per-call repacked codes
(runtime/cpu_quant.py, the engine's path) against the dequantizing reference, in the same run.

    python benches/bench_cpu_int4.py [--size small] [--new-tokens 24] [--rounds 3]

A small Mixtral synthesized locally (bf16), its store converted to int4 (group 64), full budget,
device cpu; the two paths alternate round by round on one open engine (the switch is
cpu_quant.available). Prints one JSON line: median tokens/s of each, their ratio, and whether
the two paths' greedy tokens agree (they differ only in float rounding).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeflow import Engine  # noqa: E402
from moeflow.models.synth import synthesize  # noqa: E402
from moeflow.runtime import cpu_quant  # noqa: E402


async def run(path: Path, new_tokens: int, rounds: int) -> dict[str, object]:
    real = cpu_quant.available
    speeds: dict[bool, list[float]] = {True: [], False: []}
    tokens: dict[bool, list[int]] = {}
    prompt = list(range(1, 17))
    async with Engine.open(path, precision="int4", device="cpu", expert_budget=1.0) as eng:
        try:
            for _ in range(rounds):
                for fast in (False, True):
                    cpu_quant.available = (lambda on=fast: on and real())  # type: ignore[misc]
                    started = time.perf_counter()
                    out = await eng.generate(prompt, new_tokens)
                    speeds[fast].append(new_tokens / (time.perf_counter() - started))
                    tokens[fast] = out.tokens
        finally:
            cpu_quant.available = real  # type: ignore[method-assign]
    fast, slow = statistics.median(speeds[True]), statistics.median(speeds[False])
    return {"bench": "cpu_int4", "int4_kernel_tokens_per_second": round(fast, 3),
            "dequant_reference_tokens_per_second": round(slow, 3), "ratio": round(fast / slow, 3),
            "same_tokens": tokens[True] == tokens[False], "rounds": rounds, "new_tokens": new_tokens,
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="small", choices=("tiny", "small"))
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not cpu_quant.available():
        print(json.dumps({"bench": "cpu_int4", "skipped": "this torch has no CPU int4 kernel"}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mixtral"
        synthesize(path, "mixtral", args.size, dtype=torch.bfloat16)
        line = asyncio.run(run(path, args.new_tokens, args.rounds))
    print(json.dumps({"size": args.size, **line}))


if __name__ == "__main__":
    main()
