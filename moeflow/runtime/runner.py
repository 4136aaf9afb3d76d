"""The step loop: run one sequence's new tokens through every layer, awaiting experts as they arrive."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeflow.memory.cache import ExpertCache
from moeflow.memory.device import ComputeDevice
from moeflow.runtime.layers import KVCache, rms_norm, silu_mlp
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

    @property
    def length(self) -> int:
        return self.kv[0].length

    def reserve(self, positions: int) -> None:
        """Allocate every layer's KV cache for `positions` positions at once."""
        for cache in self.kv:
            cache.reserve(positions)

    def finish(self) -> None:
        if self.schedule is not None:
            self.cache.apply(self.schedule.finish())
            self.schedule = None


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

    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one position of one sequence takes, over all layers."""
        return sum(layer.attention.new_cache(self.model.dtype).bytes_per_position for layer in self.model.layers)

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
        narrow = len(ids) == 1 and self.model.device.type == "cpu"
        if narrow:
            self.threads.narrow()  # decode: see runtime/threads.py
        try:
            with torch.inference_mode():
                if len(ids) > 1 and len(ids) > self.pass_tokens(seq.length + len(ids)):
                    return await self._chunked(seq, ids, all_logits)
                logits = await self._forward(seq, ids, all_logits)
                assert logits is not None
                return logits
        finally:
            if narrow:
                self.threads.restore()

    def pass_tokens(self, positions: int) -> int:
        """Tokens one pass may carry when its keys reach `positions` (at least one)."""
        return max(1, min(self.prefill_chunk, self.scores_budget // (4 * self.heads * positions)))

    async def _chunked(self, seq: Sequence, ids: list[int], all_logits: bool) -> torch.Tensor:
        rows: list[torch.Tensor] = []
        steps = len(seq.trace) if seq.trace is not None else 0
        start = 0
        while start < len(ids):
            end = min(len(ids), start + self.pass_tokens(seq.length + self.prefill_chunk))
            logits = await self._forward(seq, ids[start:end], all_logits, head=all_logits or end == len(ids))
            if logits is not None:
                rows.append(logits)
            start = end
        if seq.trace is not None:  # one trace step per forward call, as unchunked: join the chunks'
            parts = seq.trace[steps:]
            del seq.trace[steps:]
            seq.trace.append({layer: torch.cat([p[layer] for p in parts]) for layer in parts[0]})
        return torch.cat(rows) if len(rows) > 1 else rows[0]

    async def _forward(self, seq: Sequence, ids: list[int], all_logits: bool,
                       head: bool = True) -> torch.Tensor | None:
        """One pass over ids; head=False (a prompt chunk before the last) skips the lm_head."""
        m = self.model
        wide = self.threads.wide
        cache = self.cache
        schedule = seq.schedule
        cache.begin_step()
        if schedule is not None:
            schedule.started(cache.apply(schedule.begin_step(ids)))
        routes: dict[int, torch.Tensor] | None = {} if seq.trace is not None else None
        h = F.embedding(torch.tensor(ids, device=m.device), m.embed)  # [T, H]
        for layer in m.layers:
            h = h + layer.attention(rms_norm(h, layer.input_norm, self.eps), seq.kv[layer.index])
            x = rms_norm(h, layer.post_norm, self.eps)
            if layer.router is None:
                assert layer.mlp is not None
                with wide(layer.mlp.nbytes):
                    h = h + silu_mlp(x, layer.mlp.gate_up, layer.mlp.down)
                continue
            logits = layer.router.logits(x)  # [T, E]
            expert_ids, weights = layer.router.select(logits, x.dtype)  # [T, K]
            cache.on_route(layer.index, logits)
            guess = schedule.guess(layer.index, x) if schedule is not None else None
            # the layer's one blocking read: the router's choice and the predictor's guess
            host_ids, host_weights, host_guess = self.device.readback(expert_ids, weights, guess)
            routing = Routing.group(expert_ids, weights, host_ids, host_weights)
            if schedule is not None:
                plan = schedule.on_route(layer.index, host_ids, host_guess, set(routing.experts))
                if plan.loads or plan.cancel or plan.quotas is not None:
                    schedule.started(cache.apply(plan))
            if routes is not None:
                routes[layer.index] = torch.tensor(host_ids)  # host copy: traces never read the device
            h = await run_moe(layer, x, routing, cache, wide, self.miss, self.precision_counters, residual=h)
        if routes is not None and seq.trace is not None:
            seq.trace.append(routes)
        if not head:
            return None
        if not all_logits:
            h = h[-1:]
        with wide(m.lm_head.nbytes):
            return F.linear(rms_norm(h, m.final_norm, self.eps), m.lm_head).float()


def pick_token(sampler: Sampler, logits: torch.Tensor, device: ComputeDevice) -> int:
    """The next token from the last position's logits [V], read back once: greedy picks on the
    device and reads one id; sampling reads the row and draws on the host (its generator)."""
    if sampler.params.greedy:
        with torch.inference_mode():
            (token,) = device.readback(torch.argmax(logits))
        assert isinstance(token, int)
        return token
    return sampler(device.host_tensor(logits))
