"""Decode of an int4 store on the CPU, three ways in the same run: moeflow's kernel decoding the
codes in registers (runtime/cpu_bf16.py, the engine's path on CPUs without native bf16), torch's
int4 kernel on per-call repacked codes (runtime/cpu_quant.py, the path elsewhere), and the
dequantizing reference.

    python benches/bench_cpu_int4.py [--size small] [--new-tokens 24] [--rounds 3]

A small Mixtral synthesized locally (bf16), its store converted to int4 (group 64), full budget,
device cpu; the paths alternate round by round on one open engine (the switches are
cpu_bf16.ENABLED and cpu_quant.available). Prints one JSON line: median tokens/s of each, the
ratios, whether torch's int4 kernel's greedy tokens agree with the reference's (they differ only
in float rounding), and whether moeflow's kernel gives the reference's tokens (its products are
the reference's bits for bf16 rows).
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
from moeflow.runtime import cpu_bf16, cpu_quant  # noqa: E402


async def run(path: Path, new_tokens: int, rounds: int) -> dict[str, object]:
    real_available, real_enabled = cpu_quant.available, cpu_bf16.ENABLED
    # path -> (moeflow's kernel on, torch's int4 kernel on)
    paths = {"dequant": (False, False), "torch_int4": (False, True), "moeflow": (True, False)}
    if not real_enabled:  # this CPU has native bf16 (or the kernel is switched off): two paths
        del paths["moeflow"]
    speeds: dict[str, list[float]] = {p: [] for p in paths}
    tokens: dict[str, list[int]] = {}
    prompt = list(range(1, 17))
    async with Engine.open(path, precision="int4", device="cpu", expert_budget=1.0) as eng:
        try:
            for _ in range(rounds):
                for name, (ours, int4_on) in paths.items():
                    cpu_bf16.ENABLED = ours
                    cpu_quant.available = (lambda on=int4_on: on and real_available())  # type: ignore[misc]
                    started = time.perf_counter()
                    out = await eng.generate(prompt, new_tokens)
                    speeds[name].append(new_tokens / (time.perf_counter() - started))
                    tokens[name] = out.tokens
        finally:
            cpu_quant.available = real_available
            cpu_bf16.ENABLED = real_enabled
    median = {name: statistics.median(s) for name, s in speeds.items()}
    fast, slow = median["torch_int4"], median["dequant"]
    line: dict[str, object] = {
        "bench": "cpu_int4", "int4_kernel_tokens_per_second": round(fast, 3),
        "dequant_reference_tokens_per_second": round(slow, 3), "ratio": round(fast / slow, 3),
        "same_tokens": tokens["torch_int4"] == tokens["dequant"]}
    if "moeflow" in median:
        line.update({"moeflow_kernel_tokens_per_second": round(median["moeflow"], 3),
                     "moeflow_vs_torch_int4": round(median["moeflow"] / fast, 3),
                     "moeflow_vs_dequant": round(median["moeflow"] / slow, 3),
                     "moeflow_same_tokens_as_reference": tokens["moeflow"] == tokens["dequant"]})
    return {**line, "rounds": rounds, "new_tokens": new_tokens, "threads": torch.get_num_threads()}


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
