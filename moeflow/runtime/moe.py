"""The MoE layer executor: route, run each selected expert once on its tokens, combine in a fixed order."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeflow.memory.cache import USABLE_STATES, ExpertCache
from moeflow.memory.fetch import LayerFetch
from moeflow.runtime import reference
from moeflow.runtime.layers import silu_mlp
from moeflow.runtime.model import Layer, SharedMLP
from moeflow.store.layout import ExpertView

# T = tokens of the step, K = experts per token, H = hidden, E = experts in the layer.


_SLOTS: dict[torch.device, list[torch.Tensor]] = {}  # index tensors of one-token steps, made once


def _slots(device: torch.device) -> list[torch.Tensor]:
    slots = _SLOTS.get(device)
    if slots is None:
        slots = _SLOTS[device] = [torch.tensor([i], device=device) for i in range(64)]
    return slots


@dataclass(frozen=True)
class Routing:
    """One layer's routing for a step: what the router chose, grouped by expert."""

    ids: torch.Tensor  # [T, K] int64
    weights: torch.Tensor  # [T, K]
    experts: list[int]  # distinct experts, ascending
    tokens: dict[int, torch.Tensor]  # expert -> token indices [n]
    slots: dict[int, torch.Tensor]  # expert -> which of the K picks [n]

    @staticmethod
    def group(ids: torch.Tensor, weights: torch.Tensor) -> Routing:
        t, k = ids.shape
        if t == 1:
            chosen = ids[0].tolist()  # on a GPU: the one synchronization of a layer
            experts = sorted(chosen)
            index = _slots(ids.device)
            slots = {e: index[chosen.index(e)] for e in experts}
            return Routing(ids, weights, experts, {e: index[0] for e in experts}, slots)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat).tolist()
        tokens, slots, experts, start = {}, {}, [], 0
        for e, n in enumerate(counts):
            if n:
                sel = order[start : start + n]
                tokens[e], slots[e] = sel // k, sel % k
                experts.append(e)
                start += n
        return Routing(ids, weights, experts, tokens, slots)


def shared_mlp(mlp: SharedMLP, x: torch.Tensor) -> torch.Tensor:
    out = silu_mlp(x, mlp.gate_up, mlp.down)
    if mlp.gate is not None:
        out = torch.sigmoid(F.linear(x, mlp.gate)) * out
    return out


def expert_ffn(weights: ExpertView, x: torch.Tensor) -> torch.Tensor:
    """One expert on its tokens x [n, H], float or quantized (dequantized on the fly)."""
    if weights.bits == 16:
        return silu_mlp(x, weights["gate_up"], weights["down"])
    if x.is_cuda:
        from moeflow.runtime import gpu

        if x.shape[0] <= 8:  # decode: the fused kernel reads each weight once
            ones = torch.ones(x.shape[0], device=x.device)
            return gpu.expert_ffn_decode(weights.tensors, x, ones, weights.bits, weights.group).to(x.dtype)
        offsets = [0, x.shape[0]]
        return gpu.grouped_expert_ffn(x, offsets, [weights.tensors], weights.bits, weights.group).to(x.dtype)
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
    """Per expert, the smallest HOBBIT unimportance over the tokens routed to it."""
    w = routing.weights.float()
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-20)  # [T, K]
    order = torch.argsort(w, dim=-1, descending=True)
    ranked = w.gather(-1, order)
    s = torch.empty_like(w).scatter_(-1, order, torch.cumsum(ranked, -1) - ranked)
    return {e: float(s[routing.tokens[e], routing.slots[e]].min()) for e in routing.experts}


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


async def _run_fetch(
    fetch: LayerFetch,
    x: torch.Tensor,
    routing: Routing,
    outputs: dict[int, torch.Tensor],
    wide: Callable[[int], AbstractContextManager[None]],
) -> None:
    fetch.start()
    try:
        while (item := await fetch.next()) is not None:
            e, weights = item
            idx = routing.tokens[e]
            w = routing.weights[idx, routing.slots[e], None]  # [n, 1]
            with wide(weights.nbytes):
                out = expert_ffn(weights, x[idx])
            outputs[e] = (out * w).to(x.dtype)
            fetch.release(e)
    finally:
        fetch.close()


async def run_moe(
    layer: Layer,
    x: torch.Tensor,
    routing: Routing,
    cache: ExpertCache,
    wide: Callable[[int], AbstractContextManager[None]] = lambda nbytes: nullcontext(),
    miss: MissPrecision | None = None,
    counters: PrecisionCounters | None = None,
) -> torch.Tensor:
    """The routed-experts output of `layer` for x [T, H] (plus its shared expert).

    Experts run in whatever order they become available, but their outputs are summed in
    ascending expert order, so the result is the same bits at every budget and prefetch
    (unless `miss` allows low-precision copies and skips)."""
    outputs: dict[int, torch.Tensor] = {}
    # Settle the loads that finished since the event loop last looked (all caches share one
    # transfer engine) before anything classifies experts: a finished prefetch is resident,
    # a hit, and never degraded to a low-precision copy or skipped.
    cache.transfers.poll()
    if miss is None:
        await _run_fetch(LayerFetch(cache, layer.index, routing.experts), x, routing, outputs, wide)
    else:
        high, low, skipped = _split_by_precision(layer.index, routing, cache, miss)
        high_fetch = LayerFetch(cache, layer.index, high)
        low_fetch = LayerFetch(miss.low_cache, layer.index, low)
        low_fetch.start()  # low copies load while the high-precision experts run
        try:
            await _run_fetch(high_fetch, x, routing, outputs, wide)
            await _run_fetch(low_fetch, x, routing, outputs, wide)
        finally:
            low_fetch.close()
        for e in low:
            cache.policy.on_low_precision_use((layer.index, e))
        if counters is not None:
            counters.low_precision_uses += len(low)
            counters.skipped_experts += len(skipped)
    out = torch.zeros_like(x)
    if x.shape[0] == 1:
        for e in routing.experts:
            if e in outputs:
                out += outputs[e]
    else:
        for e in routing.experts:
            if e in outputs:
                out.index_add_(0, routing.tokens[e], outputs[e])
    if layer.mlp is not None:
        with wide(layer.mlp.nbytes):
            out = out + shared_mlp(layer.mlp, x)
    return out
