"""The step loop: run one sequence's new tokens through every layer, awaiting experts as they arrive."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeflow.memory.cache import ExpertCache
from moeflow.runtime.layers import KVCache, rms_norm, silu_mlp
from moeflow.runtime.model import DenseModel
from moeflow.runtime.moe import MissPrecision, PrecisionCounters, Routing, run_moe
from moeflow.runtime.threads import ThreadPlan
from moeflow.scheduling.scheduler import Scheduler, SequenceSchedule

# T = new tokens, H = hidden, V = vocabulary, K = experts per token.


class Sequence:
    """One request's state: its KV caches, its prefetch schedule, optionally its routing trace."""

    def __init__(self, model: DenseModel, schedule: SequenceSchedule | None, record: bool) -> None:
        self.kv: list[KVCache] = [layer.attention.new_cache(model.dtype) for layer in model.layers]
        self.schedule = schedule
        # per step: {layer: [T, K] expert ids}, when recording a routing trace
        self.trace: list[dict[int, torch.Tensor]] | None = [] if record else None

    @property
    def length(self) -> int:
        return self.kv[0].length

    def finish(self) -> None:
        if self.schedule is not None:
            self.schedule.finish()
            self.schedule = None


class ModelRunner:
    """Executes forward steps; experts come from the cache, everything else is resident."""

    def __init__(
        self,
        model: DenseModel,
        cache: ExpertCache,
        scheduler: Scheduler | None = None,
        miss: MissPrecision | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.scheduler = scheduler
        self.miss = miss
        self.precision_counters = PrecisionCounters()
        self.eps = model.arch.rms_norm_eps
        self.threads = ThreadPlan()

    def new_sequence(self, prompt: list[int], *, record: bool = False) -> Sequence:
        schedule = self.scheduler.track(prompt) if self.scheduler is not None else None
        return Sequence(self.model, schedule, record)

    async def forward(self, seq: Sequence, ids: torch.Tensor, *, all_logits: bool = False) -> torch.Tensor:
        """Logits (float32) for the new token ids [T]: [T, V] if all_logits else [1, V] (the last)."""
        ids = ids.to(self.model.device)
        if ids.shape[0] == 1 and ids.device.type == "cpu":
            self.threads.narrow()  # decode: see runtime/threads.py
        try:
            return await self._forward(seq, ids, all_logits)
        finally:
            self.threads.restore()

    async def _forward(self, seq: Sequence, ids: torch.Tensor, all_logits: bool) -> torch.Tensor:
        m = self.model
        wide = self.threads.wide
        schedule = seq.schedule
        policy = self.cache.policy
        policy.on_token()
        self.cache.begin_step()
        if schedule is not None:
            schedule.begin_step(ids.tolist())
        routes: dict[int, torch.Tensor] | None = {} if seq.trace is not None else None
        h = F.embedding(ids, m.embed)  # [T, H]
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
            policy.on_route(layer.index, logits)
            routing = Routing.group(expert_ids, weights)
            if schedule is not None:
                schedule.on_route(layer.index, x, expert_ids, set(routing.experts))
            if routes is not None:
                routes[layer.index] = expert_ids
            h = h + await run_moe(layer, x, routing, self.cache, wide, self.miss, self.precision_counters)
        if routes is not None and seq.trace is not None:
            seq.trace.append(routes)
        if not all_logits:
            h = h[-1:]
        with wide(m.lm_head.nbytes):
            return F.linear(rms_norm(h, m.final_norm, self.eps), m.lm_head).float()
