"""Continuous batching: every request's next tokens wait here, and each step runs them all as one pass.

A request hands its sequence's new ids (a prompt, or the token it just sampled) to `run` and
awaits the logits. One loop task forms each step from what is waiting: decode tokens first, in
arrival order, then prompts in arrival order, cut into chunks so that a step carries at most
`max_tokens` tokens (a long prompt is spread over several steps and never stalls the running
streams) and at most `max_sequences` sequences. Before it forms a step the loop yields once, so
the streams that have just received a token have queued their next one.

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
from moeflow.runtime.batch import Part, forward_parts
from moeflow.runtime.runner import ModelRunner, Sequence


@dataclass(eq=False)
class _Waiting:
    seq: Sequence
    ids: list[int]  # not yet run
    all_logits: bool
    future: asyncio.Future[torch.Tensor]
    rows: list[torch.Tensor] = field(default_factory=list)  # all_logits: the rows of earlier chunks
    trace_mark: int = 0  # the sequence's trace length when it arrived (chunks' routes are joined)
    passes: int = 0


@dataclass(frozen=True)
class StepRecord:
    """What one step ran: sequences, tokens, wall seconds (token readbacks are the requests')."""

    sequences: int
    tokens: int
    seconds: float


class StepBatcher:
    """Forms and runs the engine's steps; `lock` is held while a pass runs (other users of the
    runner, e.g. scoring, take it too)."""

    def __init__(self, runner: ModelRunner, lock: asyncio.Lock, *, max_tokens: int, max_sequences: int,
                 kv_budget: int | None = None, kv_bytes_per_token: int = 0,
                 on_step: Callable[[StepRecord], None] | None = None) -> None:
        if max_tokens < 1 or max_sequences < 1:
            raise ValueError(f"max_tokens={max_tokens}, max_sequences={max_sequences}: must be >= 1")
        self.runner = runner
        self.lock = lock
        self.max_tokens = max_tokens
        self.max_sequences = max_sequences
        self.kv_budget = kv_budget
        self.kv_bytes_per_token = kv_bytes_per_token
        self.on_step = on_step
        self._decode: deque[_Waiting] = deque()  # one token each
        self._prefill: deque[_Waiting] = deque()
        self._loop_task: asyncio.Task[None] | None = None
        self._kv_reserved = 0
        self._admission = asyncio.Condition()
        self.steps = 0
        self.running: set[int] = set()  # id() of the sequences in the pass now running

    # ---- admission -------------------------------------------------------------------------
    def kv_bytes(self, tokens: int) -> int:
        return tokens * self.kv_bytes_per_token

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
        return len(self._decode) + len(self._prefill)

    # ---- steps -----------------------------------------------------------------------------
    async def run(self, seq: Sequence, ids: list[int], *, all_logits: bool = False) -> torch.Tensor:
        """Logits for seq's new ids ([1, V], or [len(ids), V] with all_logits), computed in the
        coming steps together with every other waiting sequence's tokens."""
        if not ids:
            raise InvalidRequest("no token ids to run")
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        entry = _Waiting(seq, list(ids), all_logits, future, trace_mark=len(seq.trace or ()))
        (self._decode if len(ids) == 1 and not all_logits else self._prefill).append(entry)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._loop(), name="moeflow-steps")
        try:
            return await future
        except asyncio.CancelledError:
            self._forget(entry)
            raise

    async def finish(self, seq: Sequence) -> None:
        """End seq (cancel its prefetches) once no running pass still uses it: a request
        cancelled mid-pass finishes after that pass."""
        if id(seq) in self.running:
            async with self.lock:  # held by the running pass
                pass
        seq.finish()

    def _forget(self, entry: _Waiting) -> None:
        for queue in (self._decode, self._prefill):
            if entry in queue:
                queue.remove(entry)

    def _take(self) -> list[tuple[_Waiting, list[int], bool]]:
        """The next step: (entry, ids this pass, is its last pass)."""
        batch: list[tuple[_Waiting, list[int], bool]] = []
        budget = self.max_tokens
        while self._decode and budget > 0 and len(batch) < self.max_sequences:
            entry = self._decode.popleft()
            batch.append((entry, entry.ids, True))
            budget -= 1
        for entry in list(self._prefill):
            if budget <= 0 or len(batch) >= self.max_sequences:
                break
            room = min(budget, self.runner._pass_tokens(entry.seq.length + min(len(entry.ids), budget)))
            chunk, rest = entry.ids[:room], entry.ids[room:]
            entry.ids = rest
            if not rest:
                self._prefill.remove(entry)
            batch.append((entry, chunk, not rest))
            budget -= len(chunk)
        return batch

    async def _loop(self) -> None:
        while self._decode or self._prefill:
            await asyncio.sleep(0)  # the streams that just got a token queue their next one
            async with self.lock:
                batch = [(e, ids, last) for e, ids, last in self._take() if not e.future.done()]
                if not batch:
                    continue
                parts = [Part(e.seq, ids, all_logits=e.all_logits, head=last or e.all_logits)
                         for e, ids, last in batch]
                self.running = {id(e.seq) for e, _, _ in batch}
                started = time.perf_counter()
                try:
                    results = await forward_parts(self.runner, parts)
                except Exception as exc:  # the pass failed: so did every request in it
                    for e, _, _ in batch:
                        self._forget(e)
                        if not e.future.done():
                            e.future.set_exception(exc)
                    continue
                finally:
                    self.running = set()
                self.steps += 1
                if self.on_step is not None:
                    self.on_step(StepRecord(len(batch), sum(len(ids) for _, ids, _ in batch),
                                            time.perf_counter() - started))
            for (e, _, last), logits in zip(batch, results, strict=True):
                e.passes += 1
                if logits is not None and e.all_logits:
                    e.rows.append(logits)
                if not last or e.future.done():
                    continue
                _join_trace(e)
                assert logits is not None
                e.future.set_result(torch.cat(e.rows) if e.all_logits and len(e.rows) > 1 else
                                    e.rows[0] if e.all_logits else logits)


def _join_trace(entry: _Waiting) -> None:
    """A prompt run in several passes is one trace step, as if run at once."""
    trace = entry.seq.trace
    if trace is None or entry.passes < 2:
        return
    parts = trace[entry.trace_mark:]
    del trace[entry.trace_mark:]
    trace.append({layer: torch.cat([p[layer] for p in parts]) for layer in parts[0]})
