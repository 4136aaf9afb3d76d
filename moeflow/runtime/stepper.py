"""Continuous batching: every request's next tokens wait here, and each step runs them all as one pass.

A request hands its sequence's new ids (a prompt, or the token it just sampled) to `run` and
awaits the outcome: the next token when it gave a sampler, else the logits. One loop task forms
each step from what is waiting: decode tokens first, in arrival order, then prompts in arrival
order, each cut into the passes it would run alone (`ModelRunner.next_pass`: the same
arithmetic batched or alone), as many whole passes as fit `max_tokens` tokens (the first
always runs: a long prompt is spread over several steps and never stalls the running streams),
and at most `max_sequences` sequences. Before it forms a step the loop yields once, so the streams that have just received a
token have queued their next one. After the pass, the greedy sequences' tokens come back in one
read, then `end_step` closes the step; each request gets the step's counters (shared with the
requests batched with it), its wall time and its device reads.

A `resident` callback turns on token regrouping (scheduling/regroup.py): a step takes the
decode tokens that waited `max_wait` steps, then prompt passes (so every admitted sequence
runs, more than one step takes, and the step can choose among them), then the decode tokens
whose sequences' recent routing paths need the fewest experts beyond those resident and those
of the others chosen. Without it, decode tokens go first in arrival order, then prompts (so at
most `max_sequences` sequences run at once). A regrouped step whose decode tokens are in part
predicted (their last routing path) to need only resident experts splits: those go ahead as a
step of their own while the others' missing experts load (loads issued before the first step
computes, so the copies overlap it; with no room for any, the step does not split), and the
others run as the very next step (they wait one step more, never longer). `split_steps`,
`sent_ahead` and `early_loads` count it.

Admission is separate: `admit(tokens)` waits until the sequence's KV cache (prompt plus new
tokens, at `kv_bytes_per_token`) fits in `kv_budget` next to those already admitted, so when
memory is full new requests queue instead of failing; `release` returns the room.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moeflow.errors import InvalidRequest
from moeflow.memory.entries import DEMAND, CacheCounters, PrefetchPlan
from moeflow.runtime.runner import ModelRunner, Part, Sequence
from moeflow.runtime.sampling import Sampler
from moeflow.scheduling.regroup import Candidate, overdue, regroup, resident_first, route_keys
from moeflow.stats import counter_delta


@dataclass
class StepOutcome:
    """A request's share of the steps that ran its ids: the token (with a sampler) or the logits
    ([1, V] or [len(ids), V] on the compute device), the counters' change, wall seconds and
    blocking device reads of those steps."""

    token: int | None
    logits: torch.Tensor | None
    delta: dict[str, float]
    seconds: float
    host_syncs: int


@dataclass(eq=False)
class _Waiting:
    seq: Sequence
    ids: list[int]  # not yet run
    all_logits: bool
    sampler: Sampler | None
    future: asyncio.Future[StepOutcome]
    rows: list[torch.Tensor] = field(default_factory=list)  # all_logits: the rows of earlier chunks
    trace_mark: int = 0  # the sequence's trace length when it arrived (chunks' routes are joined)
    since: int = 0  # the batcher's step count when it arrived (its wait, for regrouping)
    delta: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    host_syncs: int = 0


_Pass = tuple[_Waiting, list[int], bool]  # a step's share of a request: its ids this pass, is it the last


@dataclass(frozen=True)
class StepRecord:
    """What one step ran: sequences, tokens, wall seconds (token readback included)."""

    sequences: int
    tokens: int
    seconds: float


class StepBatcher:
    """Forms and runs the engine's steps; `lock` is held while a step runs (other users of the
    runner, e.g. scoring, take it too). `snapshot` reads the cache counters, `end_step` closes a
    step after its tokens were read back."""

    def __init__(self, runner: ModelRunner, lock: asyncio.Lock, *, max_tokens: int, max_sequences: int,
                 kv_budget: int | None = None, kv_bytes_per_token: int = 0,
                 snapshot: Callable[[], CacheCounters] | None = None, end_step: Callable[[], None] | None = None,
                 on_step: Callable[[StepRecord], None] | None = None,
                 resident: Callable[[], int] | None = None, max_wait: int = 4, resident_first: bool = True,
                 kv_bytes_per_sequence: int = 0) -> None:
        if max_tokens < 1 or max_sequences < 1:
            raise ValueError(f"max_tokens={max_tokens}, max_sequences={max_sequences}: must be >= 1")
        self.runner = runner
        self.lock = lock
        self.max_tokens = max_tokens
        self.max_sequences = max_sequences
        self.kv_budget = kv_budget
        self.kv_bytes_per_token = kv_bytes_per_token
        self.kv_bytes_per_sequence = kv_bytes_per_sequence  # fixed-size state (Gated DeltaNet), per sequence
        self.snapshot = snapshot
        self.end_step = end_step
        self.on_step = on_step
        # Token regrouping (scheduling/regroup.py) when more decode tokens wait than a step takes:
        # `resident` gives the resident experts' bit mask; None runs them in arrival order.
        self.resident = resident
        self.max_wait = max_wait
        self.resident_first = resident_first  # split regrouped steps (see the module docs)
        runner.track_routes = runner.track_routes or resident is not None
        self._decode: deque[_Waiting] = deque()  # one token each
        self._prefill: deque[_Waiting] = deque()
        self._behind: list[_Pass] = []  # the second half of a split step: the next step
        self.split_steps = 0  # regrouped steps split into resident-first and the rest
        self.sent_ahead = 0  # decode tokens those splits ran first
        self.early_loads = 0  # loads those splits started for the tokens kept behind
        self._loop_task: asyncio.Task[None] | None = None
        self._kv_reserved = 0
        self._admission = asyncio.Condition()
        self.steps = 0
        self.running: set[int] = set()  # id() of the sequences in the step now running
        self._closed: BaseException | None = None

    # ---- admission -------------------------------------------------------------------------
    def kv_bytes(self, tokens: int) -> int:
        return tokens * self.kv_bytes_per_token + self.kv_bytes_per_sequence

    async def admit(self, tokens: int) -> int:
        """Wait until `tokens` positions of KV cache fit the budget; returns the bytes reserved
        (give them to `release`). A request larger than the whole budget is refused."""
        need = self.kv_bytes(tokens)
        if self.kv_budget is not None and need > self.kv_budget:
            raise InvalidRequest(f"the request needs {tokens} positions of KV cache ({need} bytes), more than "
                                 f"kv_budget={self.kv_budget} bytes holds; shorten it or raise kv_budget")
        async with self._admission:
            await self._admission.wait_for(lambda: self.kv_budget is None or
                                           self._kv_reserved + need <= self.kv_budget)
            self._kv_reserved += need
        return need

    async def release(self, reserved: int) -> None:
        async with self._admission:
            self._kv_reserved -= reserved
            self._admission.notify_all()

    @property
    def kv_reserved(self) -> int:
        return self._kv_reserved

    @property
    def waiting(self) -> int:
        """Sequences with tokens queued for a coming step."""
        return len(self._decode) + len(self._prefill) + len(self._behind)

    # ---- steps -----------------------------------------------------------------------------
    async def run(self, seq: Sequence, ids: list[int], *, sampler: Sampler | None = None,
                  all_logits: bool = False) -> StepOutcome:
        """seq's new ids through the coming steps, together with every other waiting sequence's
        tokens: the next token picked by `sampler`, or (without one) the logits."""
        if self._closed is not None:
            raise self._closed
        if not ids:
            raise InvalidRequest("no token ids to run")
        if sampler is not None and all_logits:
            raise ValueError("a step either samples a token or returns all logits")
        future: asyncio.Future[StepOutcome] = asyncio.get_running_loop().create_future()
        entry = _Waiting(seq, list(ids), all_logits, sampler, future, trace_mark=len(seq.trace or ()),
                         since=self.steps)
        (self._decode if len(ids) == 1 and not all_logits else self._prefill).append(entry)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._loop(), name="moeflow-steps")
        try:
            return await future
        except asyncio.CancelledError:
            self._forget(entry)
            raise

    def close(self, error: BaseException) -> None:
        """Refuse new work with `error` and fail every request still waiting for a step with it."""
        self._closed = error
        behind, self._behind = self._behind, []
        for entry in [e for e, _, _ in behind] + list(self._decode) + list(self._prefill):
            if not entry.future.done():
                entry.future.set_exception(error)
        self._decode.clear()
        self._prefill.clear()

    async def finish(self, seq: Sequence) -> None:
        """End seq (cancel its prefetches) once no running step still uses it: a request
        cancelled mid-step finishes after that step."""
        if id(seq) in self.running:
            async with self.lock:  # held by the running step
                pass
        seq.finish()

    def _forget(self, entry: _Waiting) -> None:
        for queue in (self._decode, self._prefill):
            if entry in queue:
                queue.remove(entry)
        self._behind = [b for b in self._behind if b[0] is not entry]

    def _take(self) -> list[_Pass]:
        """The next step: (entry, ids this pass, is its last pass)."""
        if self._behind:  # the rest of a split step
            behind, self._behind = self._behind, []
            return behind
        batch: list[_Pass] = []
        if self.resident is None:  # arrival order: decode tokens first, then prompts
            while self._decode and len(batch) < min(self.max_tokens, self.max_sequences):
                entry = self._decode.popleft()
                batch.append((entry, entry.ids, True))
            self._take_prompts(batch, self.max_tokens - len(batch))
            return batch
        # Regrouping: the decodes that waited max_wait steps, then prompts (so every admitted
        # sequence is running and the step can choose among them), then the decodes that add
        # the fewest experts to what is resident and already chosen.
        waiting = list(self._decode)
        candidates = [Candidate(self.steps - e.since, e.seq.route) for e in waiting]
        due = set(overdue(candidates, min(self.max_tokens, self.max_sequences), self.max_wait))
        batch.extend((waiting[i], waiting[i].ids, True) for i in sorted(due))
        self._take_prompts(batch, self.max_tokens - len(batch))
        rest = [i for i in range(len(waiting)) if i not in due]
        slots = min(self.max_tokens - sum(len(ids) for _, ids, _ in batch), self.max_sequences - len(batch))
        picked: set[int] = set()
        if slots > 0:
            covered = self.resident()
            for e, _, _ in batch:
                covered |= e.seq.route
            picked = {rest[j] for j in regroup([candidates[i] for i in rest], slots, covered, self.max_wait)}
        batch.extend((waiting[i], waiting[i].ids, True) for i in rest if i in picked)
        self._decode = deque(waiting[i] for i in rest if i not in picked)
        return self._split(batch)

    def _split(self, batch: list[_Pass]) -> list[_Pass]:
        """The decode tokens of `batch` predicted to need only resident experts, when the others
        need misses: those misses start loading now, nearest layer first, so the copies overlap
        the first step's compute, and the others are kept as the next step. They are early demand
        loads (the next step needs them): unlike a speculative prefetch they may evict an expert
        used a step ago, by sequences not in this step (those step later), but never one this
        step's sequences need (protected), and they stop at the first that finds no room. When
        none can start (the step's own experts fill the budget) the step does not split."""
        if not self.resident_first or self.resident is None:
            return batch
        resident = self.resident()
        routes = [e.seq.route if len(ids) == 1 and last and not e.all_logits else 0 for e, ids, last in batch]
        ahead = set(resident_first(routes, resident))
        if not ahead or len(ahead) == len(batch):
            return batch
        needed = misses = 0
        for i, route in enumerate(routes):
            needed |= route
            if i not in ahead:
                misses |= route
        experts = self.runner.num_experts
        started = self.runner.cache.apply(PrefetchPlan(
            loads=[(key, DEMAND) for key in route_keys(misses & ~resident, experts)],
            protect=set(route_keys(needed & resident, experts))))
        if not started:  # no room to load while the first group runs: two steps would only cost more
            return batch
        self.early_loads += len(started)
        self._behind = [b for i, b in enumerate(batch) if i not in ahead]
        self.split_steps += 1
        self.sent_ahead += len(ahead)
        return [b for i, b in enumerate(batch) if i in ahead]

    def _take_prompts(self, batch: list[_Pass], budget: int) -> None:
        """Add prompt passes to the step, in arrival order, within `budget` tokens. A prompt's
        passes are the ones it runs alone (runner.next_pass), whole or not at all in this step;
        the first prompt waiting always gets its pass (so a step may pass max_tokens by its
        decode tokens), later ones fill the room that is left."""
        chunks = 0
        for entry in list(self._prefill):
            if len(batch) >= self.max_sequences:
                break
            room = self.runner.next_pass(entry.seq, len(entry.ids))
            if chunks and room > budget:
                continue
            chunk, rest = entry.ids[:room], entry.ids[room:]
            entry.ids = rest
            if not rest:
                self._prefill.remove(entry)
            batch.append((entry, chunk, not rest))
            budget -= len(chunk)
            chunks += 1

    async def _loop(self) -> None:
        while self._decode or self._prefill or self._behind:
            await asyncio.sleep(0)  # the streams that just got a token queue their next one
            async with self.lock:
                batch = [(e, ids, last) for e, ids, last in self._take() if not e.future.done()]
                if not batch:
                    continue
                self.running = {id(e.seq) for e, _, _ in batch}
                try:
                    outcomes = await self._step(batch)
                except Exception as exc:  # the step failed: so did every request in it
                    for e, _, _ in batch:
                        self._forget(e)
                        if not e.future.done():
                            e.future.set_exception(exc)
                    continue
                finally:
                    self.running = set()
            for e, outcome in outcomes:
                if not e.future.done():
                    e.future.set_result(outcome)

    async def _step(self, batch: list[_Pass]) -> list[tuple[_Waiting, StepOutcome]]:
        """One pass, the tokens of the requests it completes, and its accounting."""
        device = self.runner.device
        before = self.snapshot() if self.snapshot is not None else None
        syncs = device.host_syncs
        started = time.perf_counter()
        parts = [Part(e.seq, ids, all_logits=e.all_logits, head=last or e.all_logits) for e, ids, last in batch]
        results = await self.runner.forward_parts(parts)
        done = [(e, logits) for (e, _, last), logits in zip(batch, results, strict=True) if last]
        tokens = self._pick([(e, logits) for e, logits in done if e.sampler is not None])
        if self.end_step is not None:
            self.end_step()
        seconds = time.perf_counter() - started
        delta = counter_delta(self.snapshot(), before) if self.snapshot is not None and before is not None else {}
        step_syncs = device.host_syncs - syncs
        self.steps += 1
        if self.on_step is not None:
            self.on_step(StepRecord(len(batch), sum(len(ids) for _, ids, _ in batch), seconds))
        for (e, _, _), logits in zip(batch, results, strict=True):
            e.seconds += seconds
            e.host_syncs += step_syncs
            for name, value in delta.items():
                e.delta[name] = e.delta.get(name, 0) + value
            if logits is not None and e.all_logits:
                e.rows.append(logits)
        outcomes = []
        for e, logits in done:
            e.seq.join_trace(e.trace_mark)  # a prompt run in several passes is one trace step
            assert logits is not None
            if e.sampler is not None:
                outcome = StepOutcome(tokens[id(e)], None, e.delta, e.seconds, e.host_syncs)
            else:
                rows = e.rows if e.all_logits else [logits]
                outcome = StepOutcome(None, rows[0] if len(rows) == 1 else torch.cat(rows), e.delta, e.seconds,
                                      e.host_syncs)
            outcomes.append((e, outcome))
        return outcomes

    def _pick(self, sampled: list[tuple[_Waiting, torch.Tensor | None]]) -> dict[int, int]:
        """Each sampling request's next token: the greedy ones' in one device read (argmax of
        their stacked last rows), the others from their own host copy and generator."""
        device = self.runner.device
        tokens: dict[int, int] = {}
        greedy = [(e, logits) for e, logits in sampled if e.sampler is not None and e.sampler.params.greedy]
        if greedy:
            rows = torch.cat([logits[-1:] for _, logits in greedy if logits is not None])
            with torch.inference_mode():
                (picked,) = device.readback(torch.argmax(rows, dim=-1))
            for (e, _), token in zip(greedy, picked, strict=True):
                tokens[id(e)] = int(token)
        for e, logits in sampled:
            if id(e) not in tokens and e.sampler is not None and logits is not None:
                tokens[id(e)] = e.sampler(device.host_tensor(logits[-1]))
        return tokens

