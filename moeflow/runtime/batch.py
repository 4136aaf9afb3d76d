"""One forward pass over several sequences at once: attention per sequence, each expert once per layer for all.

The tokens of every part (a sequence's decode token, or a chunk of its prompt) are stacked into
one [T, H] activation. Norms, routers, dense MLPs and the lm_head run once on all of them;
attention runs per part against its own KV cache; each MoE layer groups all T tokens by expert,
so one load of an expert serves every token routed to it. Each sequence's prefetch schedule
sees its own rows (its ids, its gate inputs, its routing), and the predictors' guesses are read
back with the router's choice in the layer's one blocking read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeflow.runtime.layers import rms_norm, silu_mlp
from moeflow.runtime.moe import Routing, run_moe
from moeflow.runtime.runner import ModelRunner, Sequence

# T = tokens of all parts, H = hidden, V = vocabulary, K = experts per token.


@dataclass
class Part:
    """A sequence's share of a batched pass: its new token ids, and which logits it wants."""

    seq: Sequence
    ids: list[int]
    all_logits: bool = False  # [len(ids), V] instead of the last row's [1, V]
    head: bool = True  # False: a prompt chunk before the last, whose logits nobody reads


async def forward_parts(runner: ModelRunner, parts: list[Part]) -> list[torch.Tensor | None]:
    """Logits (float32, on the compute device) per part, None where `head` is False. The
    parts' sequences must be distinct; each part must fit one pass (the caller chunks prompts)."""
    if not parts or len({id(p.seq) for p in parts}) != len(parts):
        raise ValueError("forward_parts: give one part per sequence, at least one")
    narrow = len(parts) == 1 and len(parts[0].ids) == 1 and runner.model.device.type == "cpu"
    if narrow:
        runner.threads.narrow()  # one decode token: see runtime/threads.py
    try:
        with torch.inference_mode():
            return await _forward_parts(runner, parts)
    finally:
        if narrow:
            runner.threads.restore()


async def _forward_parts(runner: ModelRunner, parts: list[Part]) -> list[torch.Tensor | None]:
    m, cache, device = runner.model, runner.cache, runner.device
    wide = runner.threads.wide
    bounds: list[tuple[int, int]] = []
    flat: list[int] = []
    for p in parts:
        bounds.append((len(flat), len(flat) + len(p.ids)))
        flat.extend(p.ids)
    cache.begin_step()
    scheduled = [(i, p.seq.schedule) for i, p in enumerate(parts) if p.seq.schedule is not None]
    for i, schedule in scheduled:
        schedule.started(cache.apply(schedule.begin_step(parts[i].ids)))
    traced = [i for i, p in enumerate(parts) if p.seq.trace is not None]
    routes: list[dict[int, torch.Tensor]] = [{} for _ in parts]
    h = F.embedding(torch.tensor(flat, device=m.device), m.embed)  # [T, H]
    for layer in m.layers:
        normed = rms_norm(h, layer.input_norm, runner.eps)
        if len(parts) == 1:
            attended = layer.attention(normed, parts[0].seq.kv[layer.index])
        else:
            attended = torch.cat([layer.attention(normed[a:b], p.seq.kv[layer.index])
                                  for p, (a, b) in zip(parts, bounds, strict=True)])
        h = h + attended
        x = rms_norm(h, layer.post_norm, runner.eps)
        if layer.router is None:
            assert layer.mlp is not None
            with wide(layer.mlp.nbytes):
                h = h + silu_mlp(x, layer.mlp.gate_up, layer.mlp.down)
            continue
        logits = layer.router.logits(x)  # [T, E]
        expert_ids, weights = layer.router.select(logits, x.dtype)  # [T, K]
        cache.on_route(layer.index, logits)
        guesses = [schedule.guess(layer.index, x[bounds[i][0]:bounds[i][1]]) for i, schedule in scheduled]
        # the layer's one blocking read: the router's choice and every predictor's guess
        host_ids, host_weights, *host_guesses = device.readback(expert_ids, weights, *guesses)
        routing = Routing.group(expert_ids, weights, host_ids, host_weights)
        for (i, schedule), host_guess in zip(scheduled, host_guesses, strict=True):
            a, b = bounds[i]
            mine = host_ids[a:b]
            plan = schedule.on_route(layer.index, mine, host_guess, {e for row in mine for e in row})
            if plan.loads or plan.cancel or plan.quotas is not None:
                schedule.started(cache.apply(plan))
        for i in traced:
            a, b = bounds[i]
            routes[i][layer.index] = torch.tensor(host_ids[a:b])  # host copy: traces never read the device
        h = await run_moe(layer, x, routing, cache, wide, runner.miss, runner.precision_counters, residual=h)
    for i in traced:
        trace = parts[i].seq.trace
        assert trace is not None
        trace.append(routes[i])
    rows: list[torch.Tensor] = []
    spans: list[tuple[int, int] | None] = []
    for p, (a, b) in zip(parts, bounds, strict=True):
        if not p.head:
            spans.append(None)
            continue
        start = sum(r.shape[0] for r in rows)
        rows.append(h[a:b] if p.all_logits else h[b - 1:b])
        spans.append((start, start + rows[-1].shape[0]))
    if not rows:
        return [None] * len(parts)
    picked = rows[0] if len(rows) == 1 else torch.cat(rows)
    with wide(m.lm_head.nbytes):
        out = F.linear(rms_norm(picked, m.final_norm, runner.eps), m.lm_head).float()
    return [None if span is None else out[span[0]:span[1]] for span in spans]
