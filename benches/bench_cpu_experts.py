"""CPU expert compute paths per store precision: microseconds per expert call at 1, 4 and 16 token rows.

    python benches/bench_cpu_experts.py [--shapes 2048x1024,4096x3584] [--tokens 1,4,16] [--reps 5]
                                        [--threads N]

What a miss computed on the CPU (runtime/cpu_experts.py) costs, for each way torch can run it here,
and for moeflow's own CPU kernels (runtime/cpu_bf16.py):
- `bf16_linear`: the baseline, plain torch F.linear (down(silu(gate(x)) * up(x))) on the bf16
  weights as stored (oneDNN's bf16 matmul where the CPU has AVX512-BF16/AMX, else torch's fallback);
- `bf16_moeflow`, `int8_moeflow`, `int4_moeflow`: moeflow's kernels on the same bf16 weights and
  quantized experts (what the engine runs where torch lacks native bf16); the quantized ones give
  the dequantizing reference's bits (max_err_vs_dequant 0);
- `fp32_upcast`: the same bf16 weights upcast to float32 on every call, then F.linear in float32;
- `int8_dequant` / `int4_dequant`: the store's quantized expert (group 64) through the dequantizing
  reference (runtime/reference.py quantized_expert_ffn: dequantize to bf16, then torch's F.linear);
- `int4_repack`: what the engine runs for int4 stores where moeflow's kernels are off
  (runtime/cpu_quant.py): torch's own
  CPU int4 matmul (aten._weight_int4pack_mm_for_cpu) on the store's codes repacked on every call
  (a few byte operations, no float pass), the store's zero points folded into its float zeros;
- `int4_tinygemm`: the same kernel on weights repacked once (the bound a kept repacked copy of each
  expert would reach, at the cost of that copy; notes.int4_repack_us is the one-time repack).
  Both report their maximum error against int4_dequant (max_err_vs_dequant, relative to the
  output's max).
Each figure is the median of --reps timed calls after a warm-up, on the same weights in the same
run (`us`; `us_min` the fastest call, steadier on a shared machine); `vs_bf16_linear` is the
baseline's median over the path's (above 1: faster). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moeflow import _core  # noqa: E402
from moeflow.runtime import cpu_bf16, cpu_quant  # noqa: E402
from moeflow.runtime.layers import silu_mlp  # noqa: E402
from moeflow.runtime.reference import quantized_expert_ffn  # noqa: E402
from moeflow.store.quant import quantize, unpack  # noqa: E402

GROUP = 64


def _time(fn: Callable[[], torch.Tensor], reps: int) -> tuple[float, float]:
    """(median, fastest) seconds of `reps` calls after a warm-up call."""
    fn()  # warm-up: first touch, oneDNN's primitive cache
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), min(times)


def _quantized(w: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    q, scale, zero = quantize(w, bits, GROUP)
    return {"q": q, "scale": scale, "zero": zero}


def _expert_tensors(gate_up: torch.Tensor, down: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, w in (("gate_up", gate_up), ("down", down)):
        for part, t in _quantized(w, bits).items():
            out[f"{name}.{part}"] = t
    return out


def _tinygemm(w: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The store's int4 codes repacked for aten._weight_int4pack_mm_for_cpu: it computes
    w = (q - 8) * scale + z, ours (q - zero) * scale, so z = (8 - zero) * scale."""
    codes = unpack(w[f"{name}.q"], 4).to(torch.int32)  # [N, K]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    scale = w[f"{name}.scale"].float()  # [N, K / g]
    z = (8.0 - w[f"{name}.zero"].float()) * scale
    scale_zeros = torch.stack([scale, z], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [K/g, N, 2]
    return packed, scale_zeros


def _int4_mm(x: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed[0], GROUP, packed[1])


def torch_only(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """fn with moeflow's CPU kernels off: torch's own products."""
    def run(x: torch.Tensor) -> torch.Tensor:
        saved, cpu_bf16.ENABLED = cpu_bf16.ENABLED, False
        try:
            return fn(x)
        finally:
            cpu_bf16.ENABLED = saved
    return run


def bench_shape(hidden: int, inter: int, tokens: list[int], reps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    gate_up = (torch.randn(2 * inter, hidden) / hidden**0.5).to(torch.bfloat16)
    down = (torch.randn(hidden, inter) / inter**0.5).to(torch.bfloat16)
    int8 = _expert_tensors(gate_up, down, 8)
    int4 = _expert_tensors(gate_up, down, 4)
    paths: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "bf16_linear": torch_only(lambda x: silu_mlp(x, gate_up, down)),
        "fp32_upcast": lambda x: silu_mlp(x.float(), gate_up.float(), down.float()).to(x.dtype),
        "int8_dequant": torch_only(lambda x: quantized_expert_ffn(x, int8, 8, GROUP)),
        "int4_dequant": torch_only(lambda x: quantized_expert_ffn(x, int4, 4, GROUP)),
    }
    if _core.bf16_linear_available():
        def bf16_moeflow(x: torch.Tensor) -> torch.Tensor:
            gate, up = cpu_bf16.linear(x, gate_up).chunk(2, dim=-1)
            return cpu_bf16.linear(F.silu(gate) * up, down)

        paths["bf16_moeflow"] = bf16_moeflow
        paths["int8_moeflow"] = lambda x: cpu_bf16.minmax_expert_ffn(x, int8, 8, GROUP)
        paths["int4_moeflow"] = lambda x: cpu_bf16.minmax_expert_ffn(x, int4, 4, GROUP)
    if cpu_quant.available():
        paths["int4_repack"] = lambda x: cpu_quant.int4_expert_ffn(x, int4, GROUP)
    notes: dict[str, str] = {}
    try:
        started = time.perf_counter()
        gu4, dn4 = _tinygemm(int4, "gate_up"), _tinygemm(int4, "down")
        notes["int4_repack_us"] = f"{(time.perf_counter() - started) * 1e6:.0f}"  # once per expert, not per call

        def tinygemm(x: torch.Tensor) -> torch.Tensor:
            gate, up = _int4_mm(x, gu4).chunk(2, dim=-1)
            return _int4_mm(F.silu(gate) * up, dn4)

        paths["int4_tinygemm"] = tinygemm
    except (RuntimeError, AttributeError) as e:  # not in this torch build, or not for this CPU
        notes["int4_tinygemm"] = f"unavailable: {type(e).__name__}: {str(e)[:160]}"
    rows: dict[str, Any] = {}
    with torch.inference_mode():
        for n in tokens:
            x = torch.randn(n, hidden).to(torch.bfloat16)
            per: dict[str, Any] = {}
            for name, fn in paths.items():
                median, fastest = _time(functools.partial(fn, x), reps)
                per[name] = {"us": median * 1e6, "us_min": fastest * 1e6}
            base = per["bf16_linear"]["us"]
            for name in per:
                per[name]["vs_bf16_linear"] = base / per[name]["us"]
            want = paths["int4_dequant"](x).float()
            for name in ("int4_repack", "int4_tinygemm", "int4_moeflow"):
                if name in per:
                    got = paths[name](x).float()
                    per[name]["max_err_vs_dequant"] = ((got - want).abs().max() / want.abs().max()).item()
            rows[str(n)] = per
    weight_bytes = {"bf16": 3 * hidden * inter * 2, "int8": sum(t.nbytes for t in int8.values()),
                    "int4": sum(t.nbytes for t in int4.values())}
    return {"shape": f"{hidden}x{inter}", "weight_bytes": weight_bytes, "tokens": rows, **({"notes": notes} if notes else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="2048x1024,4096x3584", help="hidden x expert intermediate, comma-separated")
    ap.add_argument("--tokens", default="1,4,16", help="token rows per call, comma-separated")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per figure (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tokens = [int(t) for t in args.tokens.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    results = [bench_shape(h, i, tokens, args.reps) for h, i in shapes]
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    print(json.dumps({"bench": "cpu_experts", "cpu": cpu, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "shapes": results}))


if __name__ == "__main__":
    main()
