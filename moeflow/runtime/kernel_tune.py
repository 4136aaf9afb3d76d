"""Measuring the table of runtime/kernel_choice.py: every path of a min-max expert timed per
(device, bits, group, hidden, inter, dtype, row bucket), each checked against the torch reference.

`python benches/bench_kernels.py --tune [--quick]` runs it on the GPU. Per bucket, every path
runs on the bucket's upper edge of rows (BUCKETS); its error is max |path - reference| / max
|reference|, the reference being runtime/reference.py in float32 on the same weights; its time
the median of `reps` calls after `warmup` ones, CUDA events around each call and the call
synchronized (what a step pays, host work included), the weights cycling through enough copies
to exceed twice the L2 cache (a prefill's experts are not in L2). The fastest path within
TOLERANCE is chosen. The table is rewritten (atomically) after every entry, so a run stopped
part way leaves a valid table of what it measured. On the CPU (the kernels' emulator, tests) the
clock is the wall clock: the times mean nothing there, the mechanism is the same.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from moeflow.errors import KernelTableError
from moeflow.runtime import kernel_choice, reference
from moeflow.runtime.kernel_choice import BUCKETS, DTYPE_NAMES, FORMAT, PATHS, VERSION, Tensors

# R = rows of a bucket, H = hidden, I = expert intermediate.

# Relative max error past which a path is broken, never chosen: the paths differ from the float32
# reference at the rounding of their 16-bit outputs (~4e-3 in bfloat16 on an H200), far below it.
TOLERANCE = 2e-2
MAX_COPIES = 32


def make_experts(hidden: int, inter: int, bits: int, group: int, copies: int, device: torch.device,
                 seed: int = 0) -> list[Tensors]:
    """`copies` random experts as a store block's views hold them (store/quant.py's codes)."""
    from moeflow.store import quant

    gen = torch.Generator(device=device).manual_seed(seed)
    experts = []
    for _ in range(copies):
        w: Tensors = {}
        for name, (rows, cols) in (("gate_up", (2 * inter, hidden)), ("down", (hidden, inter))):
            dense = torch.randn(rows, cols, generator=gen, device=device) / cols**0.5
            w[f"{name}.q"], w[f"{name}.scale"], w[f"{name}.zero"] = quant.quantize(dense, bits, group)
        experts.append(w)
    return experts


def copies_for(device: torch.device, expert_bytes: int) -> int:
    """Weight copies whose cycle is at least twice the L2 cache (1 on the CPU)."""
    if device.type != "cuda":
        return 1
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(1, min(MAX_COPIES, math.ceil(2 * l2 / max(expert_bytes, 1))))


def time_us(fn: Callable[[int], Any], copies: int, reps: int, warmup: int, device: torch.device) -> float:
    """Median microseconds of fn(i) over `reps` calls, i cycling through the copies."""
    for i in range(warmup):
        fn(i % copies)  # module load, cuBLAS heuristics, launcher tables, allocator blocks
    times = []
    if device.type != "cuda":
        for r in range(reps):
            started = time.perf_counter()
            fn(r % copies)
            times.append((time.perf_counter() - started) * 1e6)
        return statistics.median(times)
    torch.cuda.synchronize(device)
    for r in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(r % copies)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).abs().max() / want.abs().max().clamp(min=1e-30))


def measure(hidden: int, inter: int, bits: int, group: int, dtype: torch.dtype, device: torch.device, reps: int,
            warmup: int, paths: Iterable[str] = tuple(PATHS)) -> dict[str, Any]:
    """One table entry: every path at every bucket, timed and checked; the fastest within
    TOLERANCE chosen. RuntimeError where no path is within it at some bucket (nothing to choose)."""
    names = list(paths)
    first = make_experts(hidden, inter, bits, group, 1, device)
    copies = copies_for(device, sum(t.nbytes for t in first[0].values()))
    experts = first + make_experts(hidden, inter, bits, group, copies - 1, device, seed=1)
    gen = torch.Generator(device=device).manual_seed(7)
    us: dict[str, list[float | None]] = {n: [] for n in names}
    errs: dict[str, list[float | None]] = {n: [] for n in names}
    failures: dict[str, str] = {}
    chosen = []
    for rows in BUCKETS:
        x = (torch.randn(rows, hidden, generator=gen, device=device) / 2).to(dtype)  # [R, H]
        want = reference.quantized_expert_ffn(x.float(), experts[0], bits, group)
        best: tuple[float, str] | None = None
        for name in names:
            fn = PATHS[name]

            def call(i: int, fn: Callable[[Tensors, int, int, torch.Tensor], torch.Tensor] = fn) -> torch.Tensor:
                return fn(experts[i], bits, group, x)

            try:
                err = max_err(call(0), want)
                t = time_us(call, copies, reps, warmup, device)
            except Exception as e:  # a path that cannot run this shape is reported and never chosen
                failures.setdefault(name, f"{type(e).__name__}: {e}"[:300])
                us[name].append(None)
                errs[name].append(None)
                continue
            us[name].append(round(t, 3))
            errs[name].append(err if math.isfinite(err) else None)
            if math.isfinite(err) and err <= TOLERANCE and (best is None or t < best[0]):
                best = (t, name)
        if best is None:
            raise RuntimeError(f"int{bits} g{group} {hidden}x{inter} {DTYPE_NAMES[dtype]} at {rows} rows: no path "
                               f"within {TOLERANCE} of the reference (errors {({n: errs[n][-1] for n in names})}, "
                               f"failures {failures})")
        chosen.append(best[1])
    entry: dict[str, Any] = {"kind": "minmax", "bits": bits, "group": group, "hidden": hidden, "inter": inter,
                             "dtype": DTYPE_NAMES[dtype], "paths": chosen, "us": us, "max_err": errs,
                             "copies": copies, "reps": reps}
    if failures:
        entry["failures"] = failures
    return entry


def _key(entry: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(entry[k] for k in ("bits", "group", "hidden", "inter", "dtype"))


def _start(file: Path, name: str) -> tuple[dict[str, Any], str | None]:
    """The table to add to: the file's where it is valid and of this device, else a new one (and why)."""
    fresh = {"format": FORMAT, "version": VERSION, "device": name, "buckets": list(BUCKETS), "entries": []}
    if not file.exists():
        return fresh, None
    try:
        table = kernel_choice.load(file)
    except KernelTableError as e:
        return fresh, f"replacing an unreadable table: {e}"
    if table.device != name:
        return fresh, f"replacing a table of {table.device!r}"
    import json

    return json.loads(file.read_text()), None


def tune(shapes: Iterable[tuple[int, int]], bits: Iterable[int], group: int, dtypes: Iterable[torch.dtype],
         device: torch.device, reps: int, warmup: int, file: Path | None = None,
         emit: Callable[[dict[str, Any]], None] = lambda line: None,
         budget_s: float | None = None) -> tuple[Path, int]:
    """Measure every (dtype, shape, bits), in that order, on `device` into its table file
    (kernel_choice.table_file unless given), entries replacing the file's for the same key and the
    rest kept. `emit` gets each entry (or {"error": ...}, {"skipped": ...}) as it is written. With
    `budget_s`, no entry starts after that many seconds: the rest are reported skipped (a bounded
    GPU run ends on its own rather than being killed). Returns the file and the number that failed."""
    name = kernel_choice.device_name(device)
    file = file if file is not None else kernel_choice.table_file(name)
    doc, note = _start(file, name)
    if note:
        emit({"note": note, "table": str(file)})
    failed = 0
    stop = None if budget_s is None else time.perf_counter() + budget_s
    for dtype in dtypes:
        for hidden, inter in shapes:
            for b in bits:
                if stop is not None and time.perf_counter() > stop:
                    emit({"skipped": f"past the {budget_s} s budget", "bits": b, "group": group, "hidden": hidden,
                          "inter": inter, "dtype": DTYPE_NAMES[dtype]})
                    continue
                try:
                    with torch.inference_mode():
                        entry = measure(hidden, inter, b, group, dtype, device, reps, warmup)
                except Exception as e:  # one shape's failure is reported; the others are still measured
                    failed += 1
                    emit({"error": f"{type(e).__name__}: {e}"[:600], "bits": b, "group": group, "hidden": hidden,
                          "inter": inter, "dtype": DTYPE_NAMES[dtype]})
                    continue
                doc["entries"] = [e for e in doc["entries"] if _key(e) != _key(entry)] + [entry]
                doc["torch"] = torch.__version__
                doc["tuned_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
                kernel_choice.write(file, doc)
                emit({**entry, "table": str(file)})
    return file, failed
