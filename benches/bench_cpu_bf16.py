"""bf16 products on the CPU: moeflow's kernel (runtime/cpu_bf16.py) against torch's bf16
F.linear and against float32 F.linear on weights upcast per call, at 1-64 rows.

    python benches/bench_cpu_bf16.py [--rows 1,4,16,64] [--reps 10] [--threads 1]

Shapes: an expert's gate_up and down products of OLMoE (2048x1024), Qwen3-30B-A3B (2048x768),
DeepSeek-V2-Lite (2048x1408) and the trained olmoe-stdlib model (benches/models). The three paths
alternate within each rep and the medians are kept. Prints one JSON line: per shape and rows,
microseconds of each path, `vs_torch` (torch bf16 time over the kernel's) and `vs_upcast`, the
kernel's largest error relative to the float64 product, and `invariant` (every row of the batch
the same bits as computed alone).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeflow import _core  # noqa: E402
from moeflow.runtime import cpu_bf16  # noqa: E402

SHAPES = {  # name: (hidden, expert intermediate)
    "olmoe": (2048, 1024),
    "qwen3_30b_a3b": (2048, 768),
    "deepseek_v2_lite": (2048, 1408),
    "olmoe_stdlib": (192, 128),
}


def timed(fn: Callable[[], object], reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,4,16,64")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    if not _core.bf16_linear_available():
        raise SystemExit("bench_cpu_bf16: this CPU lacks AVX2 and FMA, which the kernel needs")
    torch.set_num_threads(args.threads)
    cpu_bf16.ENABLED = True
    g = torch.Generator().manual_seed(0)
    results = []
    with torch.inference_mode():
        for name in args.shapes.split(","):
            hidden, inter = SHAPES[name]
            for label, (n, k) in (("gate_up", (2 * inter, hidden)), ("down", (hidden, inter))):
                w = (torch.randn(n, k, generator=g) * k ** -0.5).bfloat16()
                for rows in (int(r) for r in args.rows.split(",")):
                    x = torch.randn(rows, k, generator=g).bfloat16()
                    paths = {
                        "torch_bf16": lambda: F.linear(x, w),
                        "upcast_fp32": lambda: F.linear(x.float(), w.float()).bfloat16(),
                        "moeflow": lambda: cpu_bf16.linear(x, w),
                    }
                    times: dict[str, list[float]] = {p: [] for p in paths}
                    for fn in paths.values():
                        fn()  # warm-up
                    for _ in range(args.reps):
                        for p, fn in paths.items():
                            times[p] += timed(fn, 1)
                    us = {p: statistics.median(t) * 1e6 for p, t in times.items()}
                    y = cpu_bf16.linear(x, w)
                    exact = F.linear(x.double(), w.double())
                    err = ((y.double() - exact).abs().max() / exact.abs().max()).item()
                    invariant = all(torch.equal(cpu_bf16.linear(x[i:i + 1], w), y[i:i + 1]) for i in range(rows))
                    results.append({
                        "shape": name, "matrix": label, "n": n, "k": k, "rows": rows,
                        "torch_bf16_us": round(us["torch_bf16"], 1), "upcast_fp32_us": round(us["upcast_fp32"], 1),
                        "moeflow_us": round(us["moeflow"], 1),
                        "vs_torch": round(us["torch_bf16"] / us["moeflow"], 2),
                        "vs_upcast": round(us["upcast_fp32"] / us["moeflow"], 2),
                        "max_rel_err": float(f"{err:.3g}"), "invariant": invariant,
                    })
    ratios = [r["vs_torch"] for r in results]
    print(json.dumps({
        "bench": "cpu_bf16", "threads": args.threads, "reps": args.reps,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "torch_native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "min_vs_torch": min(ratios), "median_vs_torch": statistics.median(ratios),
        "one_row_vs_torch": statistics.median(r["vs_torch"] for r in results if r["rows"] == 1),
        "all_invariant": all(r["invariant"] for r in results),
        "results": results, "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
