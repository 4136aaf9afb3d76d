"""The prefetch scheduler: turns predictions into prefetch plans, corrects them when routers disagree.

It decides and the expert cache executes: every hook returns a plain `PrefetchPlan` (loads with
priorities, cancellations, quotas) that the runner hands to `ExpertCache.apply`.

While layer L computes, experts predicted for the next `depth` MoE layers are requested at
prefetch priority (nearest layer and likeliest expert first). When L's router has chosen, L's
prefetches that turned out useless are cancelled if still queued, and the misses are left to the
layer's demand loads. A prefetch never evicts an expert the current layer needs nor one
predicted for a nearer layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moeflow import _core
from moeflow.memory.entries import PrefetchPlan
from moeflow.memory.policies import ExpertKey
from moeflow.scheduling.metrics import PredictionMetrics
from moeflow.scheduling.predictors import Guess, Prediction, Predictor, SequencePredictor


def speculation(top_k: int, block_bytes: int, io_chunk: int) -> tuple[int, int]:
    """The default (next-layer width, speculative loads in flight) for experts of `block_bytes`.

    While the predictor's k+1 guesses for the next layer and its k for the one after fit in one
    I/O part (`io_chunk`: what a demand read may wait behind anyway), all of them are loaded:
    the (k+1)-th guess catches misses the top-k miss, and the whole speculation costs a demand
    read no more than one part would (README: prefetch; on the trained model at 50%, stall
    0.49-0.77x of prefetch='none' against 0.94-1.27x with top-k alone). Larger experts keep
    both at top_k: each extra guess would cost a part of link time and more waste."""
    if (2 * top_k + 1) * block_bytes <= io_chunk:
        return top_k + 1, 2 * top_k + 1
    return top_k, top_k


@dataclass
class _Pending:
    """Predictions for one target layer: the latest (what prefetching uses) and, for the
    metrics, the top-k predicted at each distance and during the previous token."""

    experts: list[tuple[int, float]]
    distance: int
    history: dict[int, set[int]] = field(default_factory=dict)
    next_token: set[int] | None = None


class Scheduler:
    """Shared by all sequences of an engine; `track(prompt)` gives one sequence's schedule."""

    def __init__(
        self,
        predictor: Predictor,
        slots: int,
        moe_layers: tuple[int, ...],
        top_k: int,
        depth: int,
        *,
        split_budget: bool = False,
        next_width: int | None = None,
        max_speculative: int | None = None,
        experts_total: int | None = None,
    ) -> None:
        self.predictor = predictor
        self.slots = slots  # experts the fast tier holds (PLEC splits them)
        self.experts_total = experts_total  # of every MoE layer (None: not known, assume they do not all fit)
        self.moe_layers = moe_layers
        self.position = {layer: i for i, layer in enumerate(moe_layers)}
        self.top_k = top_k
        self.depth = depth
        self.metrics = PredictionMetrics(depth)
        self.live: list[SequenceSchedule] = []
        self.split_budget = split_budget
        self.demand = dict.fromkeys(moe_layers, float(top_k))
        self.next_width = next_width or top_k
        # Speculative reads in flight delay the demand reads behind them: the session sets
        # the width and this cap from the experts' size (`speculation`).
        self.max_speculative = max_speculative or top_k

    @property
    def active(self) -> bool:
        """False when it can never ask for anything useful: no predictor, or a fast tier that
        holds every expert (each stays once loaded, so a guess could only ever find it there),
        and no per-layer quotas. The runner then skips its hooks on the hot path."""
        if self.split_budget:
            return True
        fits = self.experts_total is not None and self.slots >= self.experts_total
        return self.predictor.name != "none" and not fits

    def track(self, prompt: list[int]) -> SequenceSchedule:
        schedule = SequenceSchedule(self, self.predictor.track(prompt))
        self.live.append(schedule)
        return schedule

    def upcoming(self, key: ExpertKey) -> tuple[int, float] | None:
        """(MoE layers until some live sequence is predicted to use `key`, its score), or None."""
        best: tuple[int, float] | None = None
        for schedule in self.live:
            found = schedule.upcoming(key)
            if found is not None and (best is None or found[0] < best[0] or (found[0] == best[0] and found[1] > best[1])):
                best = found
        return best

    def observe_demand(self, layer: int, experts: int) -> dict[int, int] | None:
        """PLEC: per-layer slots in proportion to (smoothed) demand, at least top_k each."""
        if not self.split_budget:
            return None
        self.demand[layer] = 0.9 * self.demand[layer] + 0.1 * experts
        total = sum(self.demand.values())
        return {lay: max(self.top_k, round(self.slots * d / total)) for lay, d in self.demand.items()}


class SequenceSchedule:
    def __init__(self, scheduler: Scheduler, predictor: SequencePredictor) -> None:
        self.s = scheduler
        self.predictor = predictor
        self.pending: dict[int, _Pending] = {}
        self.prefetched: dict[int, set[int]] = {}  # target layer -> experts we asked for
        self.position = -1  # MoE position of the last routed layer in this step (-1: step start)

    # ---- hooks called by the runner ------------------------------------------------------------
    def begin_step(self, ids: list[int]) -> PrefetchPlan:
        self.position = -1
        for pending in self.pending.values():  # what is left was predicted during the previous token
            pending.next_token = {e for e, _ in pending.experts[: self.s.top_k]}
        self._merge(self.predictor.begin_step(ids), from_position=-1)
        return self._prefetch(current=None, tokens=len(ids))

    def started(self, keys: set[ExpertKey]) -> None:
        """The cache started these loads of the last plan (what `_correct` may cancel later)."""
        for layer, e in keys:
            self.prefetched.setdefault(layer, set()).add(e)

    def guess(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """The predictor's device work on layer `layer`'s gate input x [T, H], to be read back
        together with the router's choice (the layer's one device read)."""
        return self.predictor.guess(layer, x)

    def on_route(self, layer: int, ids: list[list[int]], guess: Guess, actual: set[int]) -> PrefetchPlan:
        """Layer `layer` has routed to ids [T][K] (host lists), the distinct experts `actual`
        (before they run); `guess` is the host copy of `guess`'s tensor."""
        s = self.s
        pending = self.pending.pop(layer, None)
        if pending is not None and len(ids) == 1:  # per-token metrics: decode steps only
            for distance, predicted in pending.history.items():
                s.metrics.record(distance, predicted, actual)
            if pending.next_token is not None:
                s.metrics.record_next_token(pending.next_token, actual)
        cancel = self._correct(layer, actual)
        quotas = s.observe_demand(layer, len(actual))
        self.position = s.position[layer]
        self._merge(self.predictor.after_route(layer, ids, guess), from_position=self.position)
        plan = self._prefetch(current=(layer, actual), tokens=len(ids))
        plan.cancel, plan.quotas = cancel, quotas
        return plan

    def upcoming(self, key: ExpertKey) -> tuple[int, float] | None:
        pending = self.pending.get(key[0])
        if pending is None:
            return None
        for e, score in pending.experts:
            if e == key[1]:
                return self._distance(self.position, key[0])[0], score
        return None

    def finish(self) -> PrefetchPlan:
        """The sequence ended: cancel what it alone still has queued."""
        if self in self.s.live:
            self.s.live.remove(self)
        plan = PrefetchPlan()
        for layer, experts in self.prefetched.items():
            for e in experts:
                if self.s.upcoming((layer, e)) is None:  # no other live sequence expects it
                    plan.cancel.append((layer, e))
        self.prefetched.clear()
        finish = getattr(self.predictor, "finish", None)
        if finish is not None:
            finish()
        return plan

    # ---- internals -------------------------------------------------------------------------
    def _distance(self, from_position: int, target: int) -> tuple[int, bool]:
        """MoE layers from `from_position` to `target`; wraps into the next token when needed."""
        n = len(self.s.moe_layers)
        p = self.s.position[target]
        if p > from_position:
            return p - from_position, False
        return n - from_position + p, True

    def _merge(self, prediction: Prediction, from_position: int) -> None:
        for target, experts in prediction.items():
            if not experts:
                continue
            distance, wraps = self._distance(from_position, target)
            if wraps and not self.s.predictor.wraps:
                continue
            pending = self.pending.get(target)
            if pending is None:
                pending = self.pending[target] = _Pending(experts, distance)
            pending.experts, pending.distance = experts, distance
            pending.history[distance] = {e for e, _ in experts[: self.s.top_k]}

    def _correct(self, layer: int, actual: set[int]) -> list[ExpertKey]:
        """This layer's useless prefetches: the cache cancels those not yet moved."""
        asked = self.prefetched.pop(layer, set())
        return [(layer, e) for e in sorted(asked - actual)]

    def _prefetch(self, current: tuple[int, set[int]] | None, tokens: int = 1) -> PrefetchPlan:
        s = self.s
        n = len(s.moe_layers)
        plan = PrefetchPlan(max_speculative=s.max_speculative)
        if current is not None:
            plan.protect.update((current[0], e) for e in current[1])
        start = self.position
        for step in range(1, s.depth + 1):
            pos = start + step
            if pos >= n and not s.predictor.wraps:
                break
            target = s.moe_layers[pos % n]
            pending = self.pending.get(target)
            if pending is None:
                continue
            priority = _core.PRIORITY_PREFETCH if step == 1 else _core.PRIORITY_BACKGROUND
            # the next layer: `next_width` guesses (a prefill's: every expert its tokens
            # vote for); farther layers: the top-k
            if step == 1:
                take = len(pending.experts) if tokens > 1 else s.next_width
            else:
                take = s.top_k
            for e, _score in pending.experts[:take]:
                key = (target, e)
                plan.loads.append((key, priority))
        return plan
