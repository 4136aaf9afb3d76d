"""The forward pass: one or several sequences' new tokens through every layer, awaiting experts as they arrive."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeflow.memory.cache import ExpertCache
from moeflow.memory.entries import PrefetchPlan
from moeflow.memory.device import ComputeDevice
from moeflow.runtime.cpu_experts import CpuExperts
from moeflow.runtime.cpu_bf16 import linear
from moeflow.runtime.layers import GQAAttention, KVCache, norm, silu_mlp
from moeflow.runtime.model import DenseModel
from moeflow.runtime.moe import MissPrecision, PrecisionCounters, Routing, run_moe
from moeflow.runtime.sampling import Sampler
from moeflow.runtime.threads import ThreadPlan
from moeflow.scheduling.scheduler import Scheduler, SequenceSchedule

# T = new tokens, H = hidden, V = vocabulary, K = experts per token.

# Bytes of float32 attention scores [N, T, S] one prefill pass may hold (SDPA's math path
# materializes them): only prompts of many thousand tokens get passes below prefill_chunk.
SCORES_BUDGET = 1 << 30


class Sequence:
    """One request's state: its KV caches, its prefetch schedule, optionally its routing trace."""

    def __init__(self, model: DenseModel, cache: ExpertCache, schedule: SequenceSchedule | None,
                 record: bool) -> None:
        self.kv: list[KVCache] = [layer.attention.new_cache(model.dtype) for layer in model.layers]
        self.cache = cache
        self.schedule = schedule
        # per step: {layer: [T, K] expert ids}, when recording a routing trace
        self.trace: list[dict[int, torch.Tensor]] | None = [] if record else None
        self.route = 0  # the experts its last token used, bit (layer * experts + expert): see scheduling/regroup.py

    @property
    def length(self) -> int:
        return self.kv[0].length

    def reserve(self, positions: int) -> None:
        """Allocate every layer's KV cache for `positions` positions at once."""
        for cache in self.kv:
            cache.reserve(positions)

    def join_trace(self, mark: int) -> None:
        """The trace steps recorded since `mark` (one per pass of a prompt run in several) become
        one step, as if the prompt had run at once."""
        if self.trace is None or len(self.trace) - mark < 2:
            return
        parts = self.trace[mark:]
        del self.trace[mark:]
        self.trace.append({layer: torch.cat([p[layer] for p in parts]) for layer in parts[0]})

    def finish(self) -> None:
        if self.schedule is not None:
            self.cache.apply(self.schedule.finish())
            self.schedule = None
        for cache in self.kv:  # fixed-size state (Gated DeltaNet) is freed when the sequence ends or is cancelled
            free = getattr(cache, "free", None)
            if free is not None:
                free()


@dataclass
class Part:
    """A sequence's share of a batched pass: its new token ids, and which logits it wants."""

    seq: Sequence
    ids: list[int]
    all_logits: bool = False  # [len(ids), V] instead of the last row's [1, V]
    head: bool = True  # False: a prompt chunk before the last, whose logits nobody reads


class ModelRunner:
    """Executes forward steps; experts come from the cache, everything else is resident.

    A step reads device results back at one point per MoE layer (the router's choice: the
    experts to fetch) and never for dense layers; `device.readback` counts them."""

    def __init__(
        self,
        model: DenseModel,
        cache: ExpertCache,
        device: ComputeDevice,
        scheduler: Scheduler | None = None,
        miss: MissPrecision | None = None,
        prefill_chunk: int = 512,
        scores_budget: int = SCORES_BUDGET,
    ) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        self.scheduler = scheduler
        self.miss = miss
        self.prefill_chunk = prefill_chunk
        self.scores_budget = scores_budget
        self.heads = model.arch.attention.num_heads
        self.precision_counters = PrecisionCounters()
        self.eps = model.arch.rms_norm_eps
        self.threads = ThreadPlan()
        self.track_routes = False  # keep each sequence's recent routing path (for token regrouping)
        self.num_experts = model.arch.num_experts
        self.cpu_experts: CpuExperts | None = None  # misses computed on the CPU (miss_compute, cpu_layers)

    def route_bits(self, keys: Iterable[tuple[int, int]]) -> int:
        """(layer, expert) keys as a routing-path bit mask (see Sequence.route)."""
        bits = 0
        for layer, e in keys:
            bits |= 1 << (layer * self.num_experts + e)
        return bits

    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one position of one sequence takes, over all layers."""
        return sum(layer.attention.new_cache(self.model.dtype).bytes_per_position for layer in self.model.layers)

    def kv_bytes_per_sequence(self) -> int:
        """Bytes of per-sequence state whatever its length (Gated DeltaNet's recurrent and conv
        state), over all layers: admission counts it against kv_budget beside the KV cache."""
        caches = [layer.attention.new_cache(self.model.dtype) for layer in self.model.layers]
        return sum(getattr(cache, "bytes_fixed", 0) for cache in caches)

    def new_sequence(self, prompt: list[int], *, record: bool = False) -> Sequence:
        active = self.scheduler is not None and self.scheduler.active
        schedule = self.scheduler.track(prompt) if self.scheduler is not None and active else None
        return Sequence(self.model, self.cache, schedule, record)

    async def forward(self, seq: Sequence, ids: list[int], *, all_logits: bool = False) -> torch.Tensor:
        """Logits (float32, on the compute device) for the new token ids: [T, V] if all_logits
        else [1, V] (the last). Many ids run as consecutive passes (each attends to the cache
        the ones before filled) of at most `prefill_chunk` tokens, fewer where one pass's
        attention scores [N, chunk, S] would pass `scores_budget` bytes: a prompt's mask,
        scores and activations stay bounded whatever its length."""
        with self._mode(narrow=len(ids) == 1):
            if len(ids) > 1 and len(ids) > self.pass_tokens(seq.length + len(ids)):
                return await self._chunked(seq, ids, all_logits)
            (logits,) = await self._pass([Part(seq, ids, all_logits)])
            assert logits is not None
            return logits

    @contextmanager
    def _mode(self, narrow: bool) -> Iterator[None]:
        """inference_mode for a step; on the CPU, decode steps (narrow) run on one thread (see
        runtime/threads.py)."""
        narrow = narrow and self.model.device.type == "cpu"
        if narrow:
            self.threads.narrow()
        try:
            with torch.inference_mode():
                yield
        finally:
            if narrow:
                self.threads.restore()

    def pass_tokens(self, positions: int) -> int:
        """Tokens one pass may carry when its keys reach `positions` (at least one)."""
        return max(1, min(self.prefill_chunk, self.scores_budget // (4 * self.heads * positions)))

    def next_pass(self, seq: Sequence, remaining: int) -> int:
        """How many of seq's `remaining` new ids its next pass takes: all of them if they fit one
        pass, else a chunk of the bounded size. `forward` and the step batcher cut prompts with
        this one rule, so a prompt runs as the same passes (with the same arithmetic: attention
        over a chunk rounds differently from attention over the whole prompt) batched or alone."""
        if remaining <= self.pass_tokens(seq.length + remaining):
            return remaining
        return min(remaining, self.pass_tokens(seq.length + self.prefill_chunk))

    async def _chunked(self, seq: Sequence, ids: list[int], all_logits: bool) -> torch.Tensor:
        rows: list[torch.Tensor] = []
        mark = len(seq.trace) if seq.trace is not None else 0
        start = 0
        while start < len(ids):
            end = start + self.next_pass(seq, len(ids) - start)
            (logits,) = await self._pass([Part(seq, ids[start:end], all_logits, head=all_logits or end == len(ids))])
            if logits is not None:
                rows.append(logits)
            start = end
        seq.join_trace(mark)  # one trace step per forward call, as unchunked
        return torch.cat(rows) if len(rows) > 1 else rows[0]

    async def forward_parts(self, parts: list[Part]) -> list[torch.Tensor | None]:
        """Several sequences in one pass: logits (float32, on the compute device) per part, None
        where `head` is False. Norms, routers, dense MLPs and the lm_head run once on all tokens;
        attention runs per part against its own KV cache; each MoE layer groups all tokens by
        expert, so one load of an expert serves every token routed to it. Each sequence's prefetch
        schedule sees its own rows, and the predictors' guesses come back with the router's
        choice in the layer's one blocking read. Parts must name distinct sequences and fit one
        pass each (the caller chunks prompts: `next_pass`)."""
        if not parts or len({id(p.seq) for p in parts}) != len(parts):
            raise ValueError("forward_parts: give one part per sequence, at least one")
        with self._mode(narrow=len(parts) > 1 or len(parts[0].ids) == 1):  # decode tokens, one or a batch
            return await self._pass(parts)

    async def _pass(self, parts: list[Part]) -> list[torch.Tensor | None]:
        """One pass over every part's ids: see `forward_parts`."""
        m, cache, device = self.model, self.cache, self.device
        wide = self.threads.wide
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
        paths = [0] * len(parts)
        h = F.embedding(torch.tensor(flat, device=m.device), m.embed)  # [T, H]
        for layer in m.layers:
            normed = norm(h, layer.input_norm, layer.input_norm_bias, self.eps)
            attention = layer.attention
            if len(parts) == 1:
                attended = attention(normed, parts[0].seq.kv[layer.index])
            elif isinstance(attention, GQAAttention):  # projections once for every sequence's rows
                qkv = attention.project(normed)
                attended = attention.output(torch.cat([attention.core(qkv[a:b], p.seq.kv[layer.index])
                                                       for p, (a, b) in zip(parts, bounds, strict=True)]))
            else:
                attended = torch.cat([attention(normed[a:b], p.seq.kv[layer.index])
                                      for p, (a, b) in zip(parts, bounds, strict=True)])
            h = h + attended
            x = norm(h, layer.post_norm, layer.post_norm_bias, self.eps)
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
            speculative: list[tuple[SequenceSchedule, PrefetchPlan]] = []
            for (i, schedule), host_guess in zip(scheduled, host_guesses, strict=True):
                a, b = bounds[i]
                mine = host_ids[a:b]
                plan = schedule.on_route(layer.index, mine, host_guess, {e for row in mine for e in row})
                if plan.cancel or plan.quotas is not None:  # now: cancelling frees the queue for the demand reads
                    cache.settle(plan)
                if plan.loads:
                    speculative.append((schedule, plan))
            for i in traced:
                a, b = bounds[i]
                routes[i][layer.index] = torch.tensor(host_ids[a:b])  # host copy: traces never read the device
            if self.track_routes:
                base = layer.index * self.num_experts
                for i, (_, b) in enumerate(bounds):
                    for e in host_ids[b - 1]:
                        paths[i] |= 1 << (base + e)
            # the speculative loads for the coming layers go in once this layer's demand loads
            # have: a device that serves reads in order (a disk queue, a copy stream) then
            # never makes the layer wait behind a guess
            h = await run_moe(layer, x, routing, cache, wide, self.miss, self.precision_counters, residual=h,
                              cpu=self.cpu_experts, prefetch=_applier(cache, speculative) if speculative else None)
        if self.track_routes:
            for p, path in zip(parts, paths, strict=True):
                p.seq.route = path
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
            out = linear(norm(picked, m.final_norm, m.final_norm_bias, self.eps), m.lm_head, m.lm_head_bias).float()
        return [None if span is None else out[span[0]:span[1]] for span in spans]


def _applier(cache: ExpertCache, plans: list[tuple[SequenceSchedule, PrefetchPlan]]) -> Callable[[], None]:
    def apply() -> None:
        for schedule, plan in plans:
            schedule.started(cache.load(plan))
    return apply


def pick_token(sampler: Sampler, logits: torch.Tensor, device: ComputeDevice) -> int:
    """The next token from the last position's logits [V], read back once: greedy picks on the
    device and reads one id; sampling reads the row and draws on the host (its generator)."""
    if sampler.params.greedy:
        with torch.inference_mode():
            (token,) = device.readback(torch.argmax(logits))
        assert isinstance(token, int)
        return token
    return sampler(device.host_tensor(logits))
