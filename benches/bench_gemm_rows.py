"""How a CPU's matrix product scales with rows, per dtype: why batching amortizes or not.

    python benches/bench_gemm_rows.py [--shape 192x576] [--threads 1]

Times F.linear of [rows, in] x [in, out] for 1 and 64 rows in bfloat16 and float32 (medians of
200 calls after a warm-up) and prints one JSON line: microseconds per call, and
`rows64_vs_rows1` (a batched step's product costs that many single-token products; 64 would be
no amortization at all). On a CPU without bf16 dot-product instructions torch's bf16 product
costs in proportion to its rows; float32 amortizes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def per_call(x: torch.Tensor, w: torch.Tensor, calls: int = 200) -> float:
    for _ in range(5):
        F.linear(x, w)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        F.linear(x, w)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="192x576", help="in x out features (default: the trained model's q/k/v)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n_in, n_out = (int(v) for v in args.shape.split("x"))
    out: dict[str, object] = {"shape": args.shape, "threads": args.threads}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        w = torch.randn(n_out, n_in, dtype=dtype)
        one, many = (per_call(torch.randn(rows, n_in, dtype=dtype), w) for rows in (1, 64))
        out[name] = {"rows1_us": round(one, 1), "rows64_us": round(many, 1), "rows64_vs_rows1": round(many / one, 2)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
