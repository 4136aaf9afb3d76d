"""The MoE layer executor: route, run each selected expert once on its tokens, combine in a fixed order."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from moeflow.memory.cache import USABLE_STATES, ExpertCache
from moeflow.memory.fetch import LayerFetch
from moeflow.runtime import cpu_bf16, cpu_quant, reference
from moeflow.runtime.cpu_bf16 import linear
from moeflow.runtime.layers import silu_mlp
from moeflow.runtime.model import Layer, SharedMLP
from moeflow.store.layout import ExpertView

if TYPE_CHECKING:
    from moeflow.runtime.cpu_experts import CpuExperts

# T = tokens of the step, K = experts per token, H = hidden, E = experts in the layer.


_SLOTS: dict[torch.device, list[torch.Tensor]] = {}  # index tensors of one-token steps, made once


def _slots(device: torch.device) -> list[torch.Tensor]:
    slots = _SLOTS.get(device)
    if slots is None:
        slots = _SLOTS[device] = [torch.tensor([i], device=device) for i in range(64)]
    return slots


@dataclass(frozen=True)
class Routing:
    """One layer's routing for a step: what the router chose, grouped by expert.

    Built from the host's copy of the router's choice (read back once per layer), so grouping
    costs no device work nor further synchronisation."""

    ids: torch.Tensor  # [T, K] int64, on the compute device
    weights: torch.Tensor  # [T, K], on the compute device
    experts: list[int]  # distinct experts, ascending
    tokens: dict[int, torch.Tensor]  # expert -> token indices [n]
    slots: dict[int, torch.Tensor]  # expert -> which of the K picks [n]
    host_ids: list[list[int]]  # [T, K] host copy of `ids`
    host_weights: list[list[float]]  # [T, K] host copy of `weights`
    host_slots: dict[int, int] | None = None  # one token: expert -> which of the K picks (host)
    columns: tuple[torch.Tensor, ...] | None = None  # one token: the K combine weights, [1] views of `weights`
    scale_input: bool = False  # Llama-4: the weight scales the expert's input rows, not its output

    @staticmethod
    def group(ids: torch.Tensor, weights: torch.Tensor, host_ids: list[list[int]],
              host_weights: list[list[float]]) -> Routing:
        t, k = ids.shape
        index = _slots(ids.device)
        if t == 1:
            picks = sorted(zip(host_ids[0], range(k)))  # (expert, slot), experts ascending
            experts = [e for e, _ in picks]
            slots = {e: index[slot] for e, slot in picks}
            first = index[0]
            return Routing(ids, weights, experts, dict.fromkeys(experts, first), slots, host_ids, host_weights,
                           dict(picks), weights.unbind(1))  # one unbind: ~2 us, a slice per expert ~2 us each
        flat = [e for row in host_ids for e in row]
        order = sorted(range(len(flat)), key=flat.__getitem__)  # stable: tokens ascending per expert
        order_t = torch.tensor(order, device=ids.device)
        tokens, slots, experts, start = {}, {}, [], 0
        while start < len(order):
            e = flat[order[start]]
            end = start
            while end < len(order) and flat[order[end]] == e:
                end += 1
            sel = order_t[start:end]
            tokens[e], slots[e] = sel // k, sel % k
            experts.append(e)
            start = end
        return Routing(ids, weights, experts, tokens, slots, host_ids, host_weights)

    def on_host(self) -> Routing:
        """The same routing on CPU tensors, built from the host lists (no device read): for
        experts computed on the CPU while the step runs on a GPU."""
        if self.ids.device.type == "cpu":
            return self
        ids = torch.tensor(self.host_ids, dtype=self.ids.dtype)
        weights = torch.tensor(self.host_weights, dtype=self.weights.dtype)  # exact: read from this dtype
        return replace(Routing.group(ids, weights, self.host_ids, self.host_weights), scale_input=self.scale_input)


def shared_mlp(mlp: SharedMLP, x: torch.Tensor) -> torch.Tensor:
    out = silu_mlp(x, mlp.gate_up, mlp.down)
    if mlp.gate is not None:
        out = torch.sigmoid(linear(x, mlp.gate)) * out
    return out


def clamped_swiglu_ffn(x: torch.Tensor, w: ExpertView, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's expert as transformers' GptOssExperts computes it: gate_up(x) + bias (gate rows
    stacked above up rows here), gate clamped above at limit, up to [-limit, limit],
    (up + 1) * gate * sigmoid(gate * alpha), then down + bias."""
    gate_up, gate_up_bias, down, down_bias = (_in(w[n], x) for n in ("gate_up", "gate_up_bias", "down", "down_bias"))
    gate, up = linear(x, gate_up, gate_up_bias).chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return linear((up + 1) * (gate * torch.sigmoid(gate * alpha)), down, down_bias)


def _in(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A float expert weight in x's dtype: a store may keep another float dtype than the compute
    (precision="bfloat16" with dtype="float32" halves the experts' bytes); cast per use, except
    where runtime/cpu_bf16.py's kernel takes the bf16 weight with float32 rows as they are."""
    if weight.dtype == x.dtype or cpu_bf16.takes_float32(weight, x):
        return weight
    return weight.to(x.dtype)


DECODE_ROWS = 16  # an expert's rows up to which the GPU takes the decode kernel rather than the grouped one


def expert_ffn(weights: ExpertView, x: torch.Tensor) -> torch.Tensor:
    """One expert on its tokens x [n, H], float or quantized (dequantized on the fly)."""
    if weights.kind == "mxfp4":  # GPT-OSS's native experts: clamped SwiGLU with biases, or SiLU
        if gpu_kernels(x) and x.dtype in (torch.bfloat16, torch.float16):
            from moeflow.runtime import mxfp4_gpu

            return mxfp4_gpu.expert_ffn(weights.tensors, x, weights.swiglu).to(x.dtype)
        if cpu_bf16.ENABLED and x.dtype is torch.bfloat16 and not x.is_cuda:  # decoded in registers (cpu_bf16.py)
            return cpu_bf16.mxfp4_expert_ffn(x, weights.tensors, weights.swiglu)
        return reference.mxfp4_expert_ffn(x, weights.tensors, weights.swiglu)
    if weights.swiglu is not None:
        # GPT-OSS in a float store (biases, clamped SwiGLU): no CUDA kernel computes it, so every
        # device takes this torch path (min-max codecs refuse it; MXFP4 has its kernel above)
        return clamped_swiglu_ffn(x, weights, *weights.swiglu)
    if weights.kind == "dense":
        return silu_mlp(x, _in(weights["gate_up"], x), _in(weights["down"], x))
    if weights.kind == "fp8":  # FP8 checkpoints' experts as published: e4m3 codes, 128x128 block scales
        if gpu_kernels(x):
            from moeflow.runtime import gpu

            return gpu.fp8_expert_ffn(weights.tensors, x)
        return reference.fp8_expert_ffn(x, weights.tensors)
    if weights.kind != "minmax":
        raise ValueError(f"no expert FFN computes {weights.kind} experts")
    if gpu_kernels(x):
        from moeflow.runtime import gpu_decode, gpu_mma, kernel_choice

        if kernel_choice.TABLES:  # a table measured on the device picks the path (runtime/kernel_choice.py)
            return kernel_choice.expert_ffn(weights, x)
        offsets = [0, x.shape[0]]
        if x.shape[0] <= DECODE_ROWS:  # decode: kernels/moe_decode.cu reads each weight once per 8 rows
            return gpu_decode.expert_rows(x, offsets, [weights.tensors], weights.bits, weights.group).to(x.dtype)
        # prefill: tensor cores (kernels/grouped_mma.cu)
        return gpu_mma.grouped_expert_ffn(x, offsets, [weights.tensors], weights.bits, weights.group).to(x.dtype)
    if cpu_bf16.minmax_takes(weights.tensors, weights.bits, weights.group, x):  # codes decoded in registers
        return cpu_bf16.minmax_expert_ffn(x, weights.tensors, weights.bits, weights.group)
    if weights.bits in (4, 2) and cpu_quant.available() and cpu_quant.fits(weights.tensors, weights.group, x.dtype):
        return cpu_quant.int4_expert_ffn(x, weights.tensors, weights.group, weights.bits)  # torch's int4 kernel
    return reference.quantized_expert_ffn(x, weights.tensors, weights.bits, weights.group)


@dataclass(frozen=True)
class MissPrecision:
    """HOBBIT: on a miss, an expert whose unimportance s (the summed normalized gate weight of
    the token's experts ranked above it) is <= t1 is loaded in high precision, t1 < s <= t2 runs
    a low-precision copy, s > t2 is skipped. The top-1 expert (s = 0) is always high precision."""

    t1: float
    t2: float
    low_cache: ExpertCache


@dataclass
class PrecisionCounters:
    low_precision_uses: int = 0
    skipped_experts: int = 0


def unimportance(routing: Routing) -> dict[int, float]:
    """Per expert, the smallest HOBBIT unimportance over the tokens routed to it: the summed
    normalized weight of the token's experts ranked above it (host lists: no device reads)."""
    best: dict[int, float] = {}
    for ids, weights in zip(routing.host_ids, routing.host_weights, strict=True):
        total = max(sum(weights), 1e-20)
        above = 0.0
        for i in sorted(range(len(ids)), key=lambda i: -weights[i]):
            e = ids[i]
            best[e] = min(best.get(e, above), above)
            above += weights[i] / total
    return best


def _split_by_precision(
    layer: int, routing: Routing, cache: ExpertCache, miss: MissPrecision
) -> tuple[list[int], list[int], list[int]]:
    """(high, low, skipped) experts of a layer; only misses are ever degraded."""
    s = unimportance(routing)
    high, low, skipped = [], [], []
    for e in routing.experts:
        key = (layer, e)
        if cache.state(key) in USABLE_STATES or s[e] <= miss.t1:
            high.append(e)
        elif miss.low_cache.state(key) in USABLE_STATES or s[e] <= miss.t2:
            low.append(e)
        else:
            skipped.append(e)
    return high, low, skipped


def _rows_and_weight(routing: Routing, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e's token rows of x [n, H] and their combine weights [n, 1] ([1] for one token)."""
    if routing.host_slots is not None and routing.columns is not None:  # one token: x is its row
        return x, routing.columns[routing.host_slots[e]]  # a [1] view: the same product as a [1, 1] one
    idx = routing.tokens[e]
    return x[idx], routing.weights[idx, routing.slots[e], None]


def layer_launch(routing: Routing, resident: list[ExpertView], x: torch.Tensor,
                 wide: Callable[[int], AbstractContextManager[None]]) -> dict[int, torch.Tensor] | None:
    """A decode step's resident quantized experts all in one launch per phase
    (kernels/moe_decode.cu, or moe_decode_kslice.cu where the kernel table picks it for each of
    them) rather than one per expert, or None where that does not apply (not
    the GPU kernels, other encodings, more rows than decode, Llama-4's input scaling). Each
    expert's output is rounded and weighted exactly as expert_out does it, and the kernel's rows
    do not depend on each other, so the result is the same bits as running them one by one."""
    if routing.scale_input or not gpu_kernels(x):
        return None
    first = resident[0]
    if any(w.kind != "minmax" or w.bits != first.bits or w.group != first.group for w in resident):
        return None
    parts = [_rows_and_weight(routing, e, x) for e in routing.experts]
    from moeflow.runtime import gpu_decode, gpu_kslice, kernel_choice

    launch = gpu_decode.expert_rows
    if kernel_choice.TABLES:  # one launch only where each expert alone would take that decode kernel too
        chosen = {kernel_choice.choose(w, rows) for w, (rows, _) in zip(resident, parts)}
        if chosen == {kernel_choice.KSLICE}:  # the table's decode candidate (kernels/moe_decode_kslice.cu)
            launch = gpu_kslice.expert_rows
        elif chosen != {kernel_choice.DECODE}:
            return None
    elif any(rows.shape[0] > DECODE_ROWS for rows, _ in parts):
        return None

    offsets = [0]
    for rows, _ in parts:
        offsets.append(offsets[-1] + rows.shape[0])
    with wide(sum(w.nbytes for w in resident)):
        y = launch(torch.cat([rows for rows, _ in parts]), offsets, [w.tensors for w in resident], first.bits,
                   first.group)
    return {e: (y[offsets[i]:offsets[i + 1]].to(x.dtype) * w).to(x.dtype)
            for i, (e, (_, w)) in enumerate(zip(routing.experts, parts))}


def gpu_kernels(x: torch.Tensor) -> bool:
    """Whether quantized (min-max, MXFP4, FP8) experts on x run through the CUDA kernels: the one
    switch, which the tests point at the CPU emulator (tests/emu) to run the GPU path's kernels
    and wiring on a machine without one."""
    return x.is_cuda


def expert_out(routing: Routing, e: int, weights: ExpertView, x: torch.Tensor,
               wide: Callable[[int], AbstractContextManager[None]],
               ffn: Callable[[ExpertView, torch.Tensor], torch.Tensor] = expert_ffn) -> torch.Tensor:
    """Expert e's output on its tokens, scaled by their combine weights, [n, H], to be summed by
    `_combine`. Every token gets the same arithmetic whatever else runs in its step (batch
    invariance: a request's tokens do not depend on what it is batched with); one token only
    skips the gathers, taking views of the same values. `ffn`: how the expert is computed (a
    GPU's CPU experts may take a faster CPU path, see runtime/cpu_experts.py)."""
    rows, w = _rows_and_weight(routing, e, x)
    if routing.scale_input:  # Llama-4 weights the input (transformers: x * score, in x's dtype)
        with wide(weights.nbytes):
            return ffn(weights, (rows * w).to(x.dtype)).to(x.dtype)
    with wide(weights.nbytes):
        out = ffn(weights, rows)
    out = out * w
    return out if out.dtype is x.dtype else out.to(x.dtype)  # .to of the same dtype still costs a call


def _combine(residual: torch.Tensor, routing: Routing,
             outputs: dict[int, torch.Tensor]) -> torch.Tensor:
    """residual + the experts' scaled outputs, added in ascending expert order: the same
    arithmetic whatever order they ran in, so every budget and prefetch gives the same bits.
    Consumes `residual` (the step's own tensor)."""
    acc = residual
    one = routing.host_slots is not None  # one token: its row is acc itself (the same elementwise add)
    for e in routing.experts:
        if e in outputs:
            if one:
                acc.add_(outputs[e])
            else:
                acc.index_add_(0, routing.tokens[e], outputs[e])
    return acc


async def _run_fetch(
    fetch: LayerFetch,
    x: torch.Tensor,
    routing: Routing,
    outputs: dict[int, torch.Tensor],
    wide: Callable[[int], AbstractContextManager[None]],
) -> None:
    """Run the (started) fetch's experts as they become usable; each is released once run,
    making room for the rest of the layer."""
    while (item := await fetch.next()) is not None:
        e, weights = item
        outputs[e] = expert_out(routing, e, weights, x, wide)
        fetch.release(e)


async def run_moe(
    layer: Layer,
    x: torch.Tensor,
    routing: Routing,
    cache: ExpertCache,
    wide: Callable[[int], AbstractContextManager[None]] = lambda nbytes: nullcontext(),
    miss: MissPrecision | None = None,
    counters: PrecisionCounters | None = None,
    residual: torch.Tensor | None = None,
    cpu: CpuExperts | None = None,
    prefetch: Callable[[], None] | None = None,
) -> torch.Tensor:
    """residual + the routed-experts output of `layer` for x [T, H] (plus its shared expert);
    `residual` (default zeros) is the step's own tensor and is consumed. `prefetch` issues the
    speculative loads for the coming layers: called once this layer's demand loads are queued
    (ahead of them on the device), before any of its experts run.

    Experts run in whatever order they become available, but their outputs are summed in
    ascending expert order, so the result is the same bits at every budget and prefetch
    (unless `miss` allows low-precision copies and skips). With `cpu`, some misses run on the
    CPU from their host home meanwhile (see runtime/cpu_experts.py); their outputs join the same sum."""
    outputs: dict[int, torch.Tensor] = {}
    index = layer.index
    if layer.router is not None and layer.router.spec.scale_input and not routing.scale_input:
        routing = replace(routing, scale_input=True)
    if residual is None:
        residual = torch.zeros_like(x)
    resident = cache.take_resident(index, routing.experts) if miss is None else None
    if resident is not None:  # every expert landed: run them now, no waiting, no task switch
        try:  # (prefetch inside: a failing load still releases the experts taken)
            if prefetch is not None:
                prefetch()
            launched = layer_launch(routing, resident, x, wide)
            if launched is not None:
                outputs = launched
            else:
                for e, weights in zip(routing.experts, resident, strict=True):
                    outputs[e] = expert_out(routing, e, weights, x, wide)
            out = _combine(residual, routing, outputs)
        finally:
            for e in routing.experts:
                cache.release((index, e))
            cache.fence_released()  # after the last compute that reads them is queued
    else:
        # Settle the loads that finished since the event loop last looked (all caches share
        # one transfer engine) before anything classifies experts: a finished prefetch is
        # resident, a hit, and never degraded to a low-precision copy or skipped.
        cache.transfers.poll()
        if cpu is not None:
            out = await _run_placed(index, x, routing, cache, wide, miss, counters, residual, cpu, prefetch)
        elif miss is None:
            fetch = cache.fetch(index, routing.experts)
            try:
                fetch.start()
                if prefetch is not None:
                    prefetch()
                await _run_fetch(fetch, x, routing, outputs, wide)
                out = _combine(residual, routing, outputs)
            finally:
                fetch.close()
        else:
            high, low, skipped = _split_by_precision(index, routing, cache, miss)
            high_fetch = cache.fetch(index, high)
            low_fetch = miss.low_cache.fetch(index, low)
            try:
                high_fetch.start()
                low_fetch.start()  # low copies load while the high-precision experts run
                if prefetch is not None:
                    prefetch()
                await _run_fetch(high_fetch, x, routing, outputs, wide)
                await _run_fetch(low_fetch, x, routing, outputs, wide)
                out = _combine(residual, routing, outputs)
            finally:
                high_fetch.close()
                low_fetch.close()
            for e in low:
                cache.note_low_precision((index, e))
            if counters is not None:
                counters.low_precision_uses += len(low)
                counters.skipped_experts += len(skipped)
    if layer.mlp is not None:
        with wide(layer.mlp.nbytes):
            out = out + shared_mlp(layer.mlp, x)
    return out


async def _run_placed(
    index: int,
    x: torch.Tensor,
    routing: Routing,
    cache: ExpertCache,
    wide: Callable[[int], AbstractContextManager[None]],
    miss: MissPrecision | None,
    counters: PrecisionCounters | None,
    residual: torch.Tensor,
    cpu: CpuExperts,
    prefetch: Callable[[], None] | None = None,
) -> torch.Tensor:
    """A layer whose misses may run on the CPU: the CPU's experts start on its worker first, then
    the device runs the rest as they land (HOBBIT's low copies too), then the CPU's outputs are
    collected; everything is summed by `_combine` in ascending expert order."""
    outputs: dict[int, torch.Tensor] = {}
    if miss is not None and index not in cpu.layers:
        high, low, skipped = _split_by_precision(index, routing, cache, miss)
    else:
        high, low, skipped = list(routing.experts), [], []
    on_cpu = cpu.choose(index, routing, cache, high, low, miss.low_cache if miss is not None else None)
    if on_cpu:
        chosen = set(on_cpu)
        high = [e for e in high if e not in chosen]
        low = [e for e in low if e not in chosen]
    jobs = cpu.start(index, on_cpu, routing, x, wide, expert_out)
    high_fetch = cache.fetch(index, high)
    low_fetch = miss.low_cache.fetch(index, low) if miss is not None else None
    try:
        high_fetch.start()
        if low_fetch is not None:
            low_fetch.start()  # low copies load while the high-precision experts run
        if prefetch is not None:
            prefetch()
        await _run_fetch(high_fetch, x, routing, outputs, wide)
        if low_fetch is not None:
            await _run_fetch(low_fetch, x, routing, outputs, wide)
        for job in jobs:
            outputs[job.key[1]] = await cpu.result(job, x.device)
        out = _combine(residual, routing, outputs)
    finally:
        high_fetch.close()
        if low_fetch is not None:
            low_fetch.close()
        await cpu.settle(jobs)  # an error or a cancel: no host block stays pinned
    if miss is not None:
        for e in low:
            cache.note_low_precision((index, e))
        if counters is not None:
            counters.low_precision_uses += len(low)
            counters.skipped_experts += len(skipped)
    return out
