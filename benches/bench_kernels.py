"""The CUDA expert kernels against torch, per model shape and precision: one JSON line per kernel and shape.

    python benches/bench_kernels.py [--shapes mixtral,olmoe,qwen3_30b_a3b,deepseek_v2_lite]
                                    [--precisions bf16,int8,int4] [--reps 20] [--quick]
    python benches/bench_kernels.py --tune [--quick] [--shapes ...] [--precisions int8,int4,int2]
                                    [--dtypes bfloat16,float16] [--table FILE]

Kernels (runtime/gpu.py launching kernels/*.cu), each against a torch baseline in the same run:
- `decode_expert`: one expert, one token; baseline torch's bf16 F.linear (cuBLAS) on the same
  expert: down(silu(gate(x)) * up(x)).
- `decode_layer`: a layer's top-k experts for one token, summed; baseline the torch bf16 loop over
  the same experts.
  Both run twice, `kernel_source` naming the kernel: kernels/moe_decode.cu (what the engine runs,
  all of a layer's experts in one launch per phase; the goals are its) and kernels/expert_ffn.cu
  (the per-expert kernel with atomics it replaced); for int8/int4, last in the shape's lines, a
  third time through kernels/moe_decode_kslice.cu (the decode candidate a kernel table may pick).
- `prefill`: 8 experts x 64 rows, one launch per phase, through kernels/grouped_mma.cu (tensor
  cores, what the engine runs; the goals are its) and grouped_ffn.cu (the fp32 tiles it replaced);
  baseline the torch bf16 per-expert loop, and torch._grouped_mm on the bf16 weights where torch
  has it (`grouped_mm_us`, reported beside the loop).

Fields: `us` (median of --reps timed calls, CUDA events, after a warm-up), `weight_gbps` (the
kernel's weight bytes, as stored in that precision, per second), `tflops`, `baseline_us`,
`vs_baseline` (baseline / kernel: above 1 the kernel is faster), `kernels_only_us` (decode_expert
of moe_decode.cu: its two launches alone, built once, so `us` minus it is the host's share),
`max_err` (max |kernel - reference|
/ max |reference|, the reference being runtime/reference.py in float32 on the same weights), and
`goal` / `goal_met` where issue 13 sets one (int4 decode 2.5x, int8 1.6x, bf16 decode layer 1.0x,
prefill 0.8x, int4 prefill 0.7x), and `table_path`: the path the device's measured kernel table
(runtime/kernel_choice.py) chooses for an expert of the line's shape, precision and rows per expert
(the engine's choice), or "untuned" where there is no table or no entry (float experts never have one). The weights cycle through enough copies to exceed twice the L2
cache, so no figure is an L2 hit. Without a GPU it prints {"gpu": false} and exits 0.

--tune measures that table instead (runtime/kernel_tune.py): every path of a min-max expert
(moe_decode.cu, grouped_mma.cu, dequant.cu + torch's SiLU MLP, moe_decode_kslice.cu) at every
row bucket (1 to 512+), per shape, precision (default int8,int4; int2 too) and activation dtype
(default bfloat16), checked
against the reference, the fastest within tolerance chosen; written (atomically, after each
entry) to $MOEFLOW_CACHE/kernels-<device>.json, or --table FILE, which the engine reads at open.
One JSON line per entry ("bench": "kernel_table"), its times and errors per path and bucket.
--quick: 5 reps after 2 warm-up calls (else --reps after 3); --budget-s S: no entry starts after S
seconds (bench_gpu.py --all bounds it so).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeflow.runtime import kernel_tune  # noqa: E402
from moeflow.runtime.layers import silu_mlp  # noqa: E402

# name: (hidden, expert intermediate, experts per token)
SHAPES: dict[str, tuple[int, int, int]] = {
    "mixtral": (4096, 14336, 2),
    "olmoe": (2048, 1024, 8),
    "qwen3_30b_a3b": (2048, 768, 8),
    "deepseek_v2_lite": (2048, 1408, 6),
}
BITS = {"bf16": 16, "int8": 8, "int4": 4}
TUNE_BITS = {"int8": 8, "int4": 4, "int2": 2}  # the min-max precisions a kernel table covers
GROUP = 64
PREFILL_EXPERTS, PREFILL_ROWS = 8, 64
GOALS: dict[tuple[str, str], float] = {
    ("decode_expert", "int4"): 2.5,
    ("decode_expert", "int8"): 1.6,
    ("decode_layer", "bf16"): 1.0,
    ("prefill", "bf16"): 0.8,
    ("prefill", "int8"): 0.8,
    ("prefill", "int4"): 0.7,
}


@dataclass
class Expert:
    """One expert's weights: bf16 (the baseline's) and as the kernel reads them."""

    gate_up: torch.Tensor  # [2I, H] bf16
    down: torch.Tensor  # [H, I] bf16
    stored: dict[str, torch.Tensor]  # the store's tensors in the measured precision
    nbytes: int  # of `stored`


def make_expert(hidden: int, inter: int, precision: str, device: torch.device, seed: int) -> Expert:
    from moeflow.store import quant

    g = torch.Generator(device=device).manual_seed(seed)
    gate_up = (torch.randn(2 * inter, hidden, generator=g, device=device) / hidden**0.5).to(torch.bfloat16)
    down = (torch.randn(hidden, inter, generator=g, device=device) / inter**0.5).to(torch.bfloat16)
    bits = BITS[precision]
    if bits == 16:
        stored = {"gate_up": gate_up, "down": down}
    else:
        stored = {}
        for name, w in (("gate_up", gate_up), ("down", down)):
            stored[f"{name}.q"], stored[f"{name}.scale"], stored[f"{name}.zero"] = quant.quantize(w, bits, GROUP)
    return Expert(gate_up, down, stored, sum(t.nbytes for t in stored.values()))


def copies_past_l2(set_bytes: int, l2_bytes: int) -> int:
    """How many copies of a working set make the cycle at least twice the L2 cache."""
    return max(1, math.ceil(2 * l2_bytes / max(set_bytes, 1)))


def reference_ffn(x: torch.Tensor, e: Expert, precision: str) -> torch.Tensor:
    """runtime/reference.py in float32 on the weights the kernel reads."""
    from moeflow.runtime import reference

    if BITS[precision] == 16:
        return silu_mlp(x.float(), e.gate_up.float(), e.down.float())
    return reference.quantized_expert_ffn(x.float(), e.stored, BITS[precision], GROUP)


def grouped_mm_ffn(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """The experts' SiLU MLPs on x [R, H] sorted by expert through torch._grouped_mm: gate_up
    [E, H, 2I] and down [E, I, H] (transposed views of the stacked weights), ends [E] int32 the
    cumulative row counts."""
    gate, up = torch._grouped_mm(x, gate_up, offs=ends).chunk(2, dim=-1)
    return torch._grouped_mm(torch.nn.functional.silu(gate) * up, down, offs=ends)


def max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-30))


def time_us(fn: Callable[[int], Any], reps: int, copies: int) -> float:
    """Median microseconds of fn(i) over `reps` calls, i cycling through the weight copies: the
    tuner's timer (CUDA events on the current stream, each call synchronized, what a decode step
    pays; wall clock on the CPU emulator of the kernels), after min(copies, 3) warm-up calls."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return kernel_tune.time_us(fn, copies, reps, min(copies, 3), device)


def record(shape: str, hidden: int, inter: int, kernel: str, precision: str, tokens: int, experts: int, us: float,
           weight_bytes: int, baseline: str, baseline_us: float, err: float, with_goal: bool = True,
           **extra: Any) -> dict[str, Any]:
    """One JSON line: the kernel's figures, derived rates, the ratio against its baseline and the
    goal. `tokens` is the rows each of the `experts` computes (decode: 1; prefill: its 64 rows)."""
    flops = 2 * tokens * 3 * hidden * inter * experts
    line: dict[str, Any] = {
        "bench": "kernels", "shape": shape, "hidden": hidden, "inter": inter, "kernel": kernel,
        "precision": precision, "tokens": tokens, "experts": experts, "us": round(us, 2),
        "weight_gbps": round(weight_bytes / (us * 1e-6) / 1e9, 1), "tflops": round(flops / (us * 1e-6) / 1e12, 3),
        "baseline": baseline, "baseline_us": round(baseline_us, 2), "vs_baseline": round(baseline_us / us, 3),
        "max_err": err, **extra,
    }
    line["table_path"] = table_path(hidden, inter, precision, tokens)
    goal = GOALS.get((kernel, precision)) if with_goal else None
    if goal is not None:
        line["goal"], line["goal_met"] = goal, line["vs_baseline"] >= goal
    return line


def table_path(hidden: int, inter: int, precision: str, rows: int) -> str:
    """The installed kernel table's path for an expert of this shape on `rows` rows (bfloat16
    activations, as every line here), or "untuned"."""
    from moeflow.runtime import kernel_choice

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    bits = BITS[precision]
    found = None if bits == 16 else kernel_choice.lookup(device, bits, GROUP, hidden, inter, torch.bfloat16, rows)
    return found or "untuned"


def tune(shapes: list[str], precisions: list[str], dtypes: list[str], reps: int, warmup: int,
         table: Path | None, budget_s: float | None = None, device: torch.device | None = None) -> int:
    """--tune: the kernel table of this GPU (`device`: tests pass the CPU, whose kernels are
    emulated), one JSON line per entry; the number of entries that failed."""
    from moeflow.runtime import kernel_choice

    device = device or torch.device("cuda", torch.cuda.current_device())
    name = kernel_choice.device_name(device)
    names: dict[tuple[Any, Any], str] = {SHAPES[s][:2]: s for s in shapes}

    def emit(line: dict[str, Any]) -> None:
        shape = names.get((line.get("hidden"), line.get("inter")))
        print(json.dumps({"bench": "kernel_table", "device": name, "shape": shape, **line}), flush=True)

    by_size = sorted(shapes, key=lambda s: SHAPES[s][0] * SHAPES[s][1])  # within a budget the small ones first
    _, failed = kernel_tune.tune([SHAPES[s][:2] for s in by_size], [TUNE_BITS[p] for p in precisions], GROUP,
                                 [kernel_choice.DTYPES[d] for d in dtypes], device, reps, warmup, table, emit,
                                 budget_s)
    return failed


def bench_shape(shape: str, precision: str, reps: int, device: torch.device) -> list[dict[str, Any]]:
    from moeflow.runtime import gpu, gpu_decode, gpu_mma

    hidden, inter, top_k = SHAPES[shape]
    bits = BITS[precision]
    n_experts = max(top_k, PREFILL_EXPERTS)
    one = make_expert(hidden, inter, precision, device, 0)
    per_set = (one.nbytes + 3 * hidden * inter * 2) * n_experts  # kernel's and baseline's weights
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    copies = min(copies_past_l2(per_set, l2), 8)
    sets = [[one if c == 0 and e == 0 else make_expert(hidden, inter, precision, device, 1 + c * n_experts + e)
             for e in range(n_experts)] for c in range(copies)]
    g = torch.Generator(device=device).manual_seed(7)
    x1 = torch.randn(1, hidden, generator=g, device=device).to(torch.bfloat16)
    ones = torch.ones(1, dtype=torch.float32, device=device)
    lines = []

    # one expert, one token; then a layer's top-k experts for one token, summed. Each through
    # kernels/moe_decode.cu (what the engine runs; the goals are its) and expert_ffn.cu (the kernel
    # it replaced, `kernel_source` below), against torch in the same run.
    xk = x1.expand(top_k, hidden).contiguous()  # the token once per expert, rows sorted by expert
    layer_offsets = list(range(top_k + 1))

    def v2_one(i: int) -> torch.Tensor:
        return gpu_decode.expert_rows(x1, [0, 1], [sets[i][0].stored], bits, GROUP)

    def v1_one(i: int) -> torch.Tensor:
        return gpu.expert_ffn_decode(sets[i][0].stored, x1, ones, bits, GROUP)

    def torch_one(i: int) -> torch.Tensor:
        return silu_mlp(x1, sets[i][0].gate_up, sets[i][0].down)

    def v2_layer(i: int) -> torch.Tensor:
        return gpu_decode.expert_rows(xk, layer_offsets, [e.stored for e in sets[i][:top_k]], bits, GROUP).sum(0)

    def v1_layer(i: int) -> torch.Tensor:
        out = torch.zeros(1, hidden, dtype=torch.float32, device=device)
        for e in sets[i][:top_k]:
            gpu.expert_ffn_decode(e.stored, x1, ones, bits, GROUP, out=out)
        return out

    def torch_layer(i: int) -> torch.Tensor:
        out = torch.zeros(1, hidden, dtype=torch.bfloat16, device=device)
        for e in sets[i][:top_k]:
            out += silu_mlp(x1, e.gate_up, e.down)
        return out

    want_one = reference_ffn(x1, one, precision)
    want_layer = sum(reference_ffn(x1, e, precision) for e in sets[0][:top_k])
    assert isinstance(want_layer, torch.Tensor)
    base_one, base_layer = time_us(torch_one, reps, copies), time_us(torch_layer, reps, copies)
    # the engine's two decode launches alone, built once: the kernels' time without the host work
    launches, alive = [], []  # the launches hold raw pointers: their tensors must outlive them
    for c in range(copies):
        lc = [gpu.launcher(sets[c][0].stored, bits, GROUP)]
        a = gpu.grouped_args(x1, [0, 1], lc, None)
        h, y = torch.empty(1, inter, device=device), torch.empty(1, hidden, device=device)
        alive.append((a, h, y))
        launches.append(gpu_decode.decode_launches(a.x, a.offsets, lc, a.table, h, a.row_weight, y)
                        if gpu_decode.fits(lc, a.x) else ())

    def launches_only(i: int) -> None:
        for launch in launches[i]:
            gpu.run(launch, device)

    kernels_only = {"kernels_only_us": round(time_us(launches_only, reps, copies), 2)} if launches[0] else {}
    for source, one_fn, layer_fn in (("moe_decode.cu", v2_one, v2_layer), ("expert_ffn.cu", v1_one, v1_layer)):
        lines.append(record(shape, hidden, inter, "decode_expert", precision, 1, 1, time_us(one_fn, reps, copies),
                            one.nbytes, "torch_bf16_linear", base_one, max_err(one_fn(0), want_one),
                            kernel_source=source, with_goal=source == "moe_decode.cu",
                            **(kernels_only if source == "moe_decode.cu" else {})))
        lines.append(record(shape, hidden, inter, "decode_layer", precision, 1, top_k,
                            time_us(layer_fn, reps, copies), one.nbytes * top_k, "torch_bf16_loop", base_layer,
                            max_err(layer_fn(0).view(1, -1), want_layer), kernel_source=source,
                            with_goal=source == "moe_decode.cu"))

    # prefill: PREFILL_EXPERTS experts x PREFILL_ROWS rows, one grouped launch per phase
    rows = PREFILL_EXPERTS * PREFILL_ROWS
    xp = (torch.randn(rows, hidden, generator=g, device=device) / 2).to(torch.bfloat16)
    offsets = [e * PREFILL_ROWS for e in range(PREFILL_EXPERTS + 1)]

    def mma_prefill(i: int) -> torch.Tensor:
        return gpu_mma.grouped_expert_ffn(xp, offsets, [e.stored for e in sets[i][:PREFILL_EXPERTS]], bits, GROUP)

    def v1_prefill(i: int) -> torch.Tensor:
        return gpu.grouped_expert_ffn(xp, offsets, [e.stored for e in sets[i][:PREFILL_EXPERTS]], bits, GROUP)

    def torch_prefill(i: int) -> torch.Tensor:
        out = torch.empty_like(xp)
        for k, e in enumerate(sets[i][:PREFILL_EXPERTS]):
            lo, hi = offsets[k], offsets[k + 1]
            out[lo:hi] = silu_mlp(xp[lo:hi], e.gate_up, e.down)
        return out

    want = torch.cat([reference_ffn(xp[offsets[k]:offsets[k + 1]], e, precision)
                      for k, e in enumerate(sets[0][:PREFILL_EXPERTS])])
    extra: dict[str, Any] = {}
    if hasattr(torch, "_grouped_mm"):
        ends = torch.tensor(offsets[1:], dtype=torch.int32, device=device)
        # [G, K, N] views of the stacked [G, N, K] weights: column-major, as _grouped_mm takes them
        stacked = [(torch.stack([e.gate_up for e in s[:PREFILL_EXPERTS]]).transpose(1, 2),
                    torch.stack([e.down for e in s[:PREFILL_EXPERTS]]).transpose(1, 2)) for s in sets]

        def torch_grouped(i: int) -> torch.Tensor:
            return grouped_mm_ffn(xp, *stacked[i], ends)

        try:
            extra["grouped_mm_err"] = max_err(torch_grouped(0), torch_prefill(0))
            extra["grouped_mm_us"] = round(time_us(torch_grouped, reps, copies), 2)
        except (RuntimeError, TypeError) as e:  # not for this GPU or this torch
            extra["grouped_mm"] = f"unavailable: {type(e).__name__}: {str(e)[:120]}"
    base_prefill = time_us(torch_prefill, reps, copies)
    for source, fn in (("grouped_mma.cu", mma_prefill), ("grouped_ffn.cu", v1_prefill)):
        lines.append(record(shape, hidden, inter, "prefill", precision, PREFILL_ROWS, PREFILL_EXPERTS,
                            time_us(fn, reps, copies), one.nbytes * PREFILL_EXPERTS, "torch_bf16_loop", base_prefill,
                            max_err(fn(0), want), kernel_source=source, with_goal=source == "grouped_mma.cu",
                            **(extra if source == "grouped_mma.cu" else {})))
    lines += kslice_lines(shape, precision, reps, copies, sets, x1, xk, want_one, want_layer, base_one, base_layer)
    del sets
    torch.cuda.empty_cache()
    return lines


def kslice_lines(shape: str, precision: str, reps: int, copies: int, sets: list[list[Expert]], x1: torch.Tensor,
                 xk: torch.Tensor, want_one: torch.Tensor, want_layer: torch.Tensor, base_one: float,
                 base_layer: float) -> list[dict[str, Any]]:
    """kernels/moe_decode_kslice.cu, the decode candidate a kernel table may pick
    (runtime/gpu_kslice.py): moe_decode.cu's two decode lines and its kernels-only time, against
    the same baselines, where it takes the shape (quantized; the goals stay the engine's kernel's)."""
    from moeflow.runtime import gpu, gpu_kslice

    hidden, inter, top_k = SHAPES[shape]
    bits = BITS[precision]
    if bits == 16 or not gpu_kslice.shape_fits(bits, GROUP, hidden, inter):
        return []
    device = x1.device
    offsets = list(range(top_k + 1))

    def one(i: int) -> torch.Tensor:
        return gpu_kslice.expert_rows(x1, [0, 1], [sets[i][0].stored], bits, GROUP)

    def layer(i: int) -> torch.Tensor:
        return gpu_kslice.expert_rows(xk, offsets, [e.stored for e in sets[i][:top_k]], bits, GROUP).sum(0)

    launches, alive = [], []  # the launches hold raw pointers: their tensors must outlive them
    for c in range(copies):
        lc = [gpu.launcher(sets[c][0].stored, bits, GROUP)]
        a = gpu.grouped_args(x1, [0, 1], lc, None)
        h, y = torch.empty(1, inter, device=device), torch.empty(1, hidden, device=device)
        alive.append((a, h, y))
        launches.append(gpu_kslice.decode_launches(a.x, a.offsets, lc, a.table, h, a.row_weight, y, a.longest)
                        if gpu_kslice.fits(lc, a.x) else ())

    def launches_only(i: int) -> None:
        for launch in launches[i]:
            gpu.run(launch, device)

    only = {"kernels_only_us": round(time_us(launches_only, reps, copies), 2)} if launches[0] else {}
    nbytes = sets[0][0].nbytes
    source = "moe_decode_kslice.cu"
    return [record(shape, hidden, inter, "decode_expert", precision, 1, 1, time_us(one, reps, copies), nbytes,
                   "torch_bf16_linear", base_one, max_err(one(0), want_one), kernel_source=source, with_goal=False,
                   **only),
            record(shape, hidden, inter, "decode_layer", precision, 1, top_k, time_us(layer, reps, copies),
                   nbytes * top_k, "torch_bf16_loop", base_layer, max_err(layer(0).view(1, -1), want_layer),
                   kernel_source=source, with_goal=False)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--precisions", default=None,
                    help="comma-separated: " + ", ".join(BITS) + " (--tune: " + ", ".join(TUNE_BITS) +
                         "; default int8,int4)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="5 reps")
    ap.add_argument("--tune", action="store_true", help="measure this GPU's kernel table (runtime/kernel_tune.py)")
    ap.add_argument("--dtypes", default="bfloat16", help="--tune: activation dtypes, bfloat16 and/or float16")
    ap.add_argument("--table", type=Path, default=None,
                    help="--tune: write here rather than $MOEFLOW_CACHE/kernels-<device>.json")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="--tune: start no entry after this many seconds (the rest are reported skipped)")
    args = ap.parse_args(argv)
    known = TUNE_BITS if args.tune else BITS
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    precisions = [p.strip() for p in (args.precisions or ("int8,int4" if args.tune else ",".join(BITS))).split(",")
                  if p.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = ([s for s in shapes if s not in SHAPES] + [p for p in precisions if p not in known] +
               [d for d in dtypes if d not in ("bfloat16", "float16")])
    if unknown:
        ap.error(f"unknown shape, precision or dtype: {', '.join(unknown)}")
    if not torch.cuda.is_available():
        print(json.dumps({"bench": "kernels", "gpu": False, "reason": "no CUDA device: the kernels need one"}))
        return 0
    if args.tune:
        reps, warmup = (5, 2) if args.quick else (args.reps, 3)
        return 1 if tune(shapes, precisions, dtypes, reps, warmup, args.table, args.budget_s) else 0
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    reps = 5 if args.quick else args.reps
    from moeflow.errors import KernelTableError
    from moeflow.runtime import kernel_choice

    try:  # the engine's choice, reported beside each line (table_path)
        kernel_choice.open_for(device)
    except KernelTableError as e:
        print(json.dumps({"bench": "kernels", "device": name, "table_error": str(e)[:400]}), flush=True)
    failed = 0
    with torch.inference_mode():
        for shape in shapes:
            for precision in precisions:
                try:
                    for line in bench_shape(shape, precision, reps, device):
                        print(json.dumps({"device": name, **line}), flush=True)
                except Exception as e:  # one shape's failure is reported; the others still run
                    failed += 1
                    print(json.dumps({"bench": "kernels", "device": name, "shape": shape, "precision": precision,
                                      "error": f"{type(e).__name__}: {e}"[:400]}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
