"""The MoE layer executor: route, run each selected expert once on its tokens, combine in a fixed order."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeflow.memory.cache import ExpertCache
from moeflow.memory.fetch import LayerFetch
from moeflow.runtime import reference
from moeflow.runtime.layers import silu_mlp
from moeflow.runtime.model import Layer, SharedMLP
from moeflow.store.layout import ExpertView

# T = tokens of the step, K = experts per token, H = hidden, E = experts in the layer.


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
            chosen = ids[0].tolist()
            zero = torch.zeros(1, dtype=torch.long)
            experts = sorted(set(chosen))
            slots = {e: torch.tensor([chosen.index(e)]) for e in experts}
            return Routing(ids, weights, experts, {e: zero for e in experts}, slots)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=int(flat.max()) + 1).tolist()
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
    return reference.quantized_expert_ffn(x, weights.tensors, weights.bits, weights.group)


async def run_moe(
    layer: Layer,
    x: torch.Tensor,
    routing: Routing,
    cache: ExpertCache,
    wide: Callable[[], AbstractContextManager[None]] = nullcontext,
) -> torch.Tensor:
    """The routed-experts output of `layer` for x [T, H] (plus its shared expert).

    Experts run in whatever order they become available, but their outputs are summed in
    ascending expert order, so the result is the same bits at every budget and prefetch."""
    outputs: dict[int, torch.Tensor] = {}
    fetch = LayerFetch(cache, layer.index, routing.experts)
    fetch.start()
    try:
        while (item := await fetch.next()) is not None:
            e, weights = item
            idx = routing.tokens[e]
            w = routing.weights[idx, routing.slots[e], None]  # [n, 1]
            with wide():
                out = expert_ffn(weights, x[idx])
            outputs[e] = (out * w).to(x.dtype)
            fetch.release(e)
    finally:
        fetch.close()
    out = torch.zeros_like(x)
    if x.shape[0] == 1:
        for e in routing.experts:
            out += outputs[e]
    else:
        for e in routing.experts:
            out.index_add_(0, routing.tokens[e], outputs[e])
    if layer.mlp is not None:
        with wide():
            out = out + shared_mlp(layer.mlp, x)
    return out
