"""The public engine: open a checkpoint under an expert budget, then logits / generate / stream."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, overload

import torch

from moeflow.scheduling.traces import SequenceTrace
from moeflow.config import EngineConfig, MemoryPlan
from moeflow.errors import EngineClosed, InvalidRequest
from moeflow.runtime.loop_thread import LoopThread
from moeflow.runtime.sampling import Sampler, SamplingParams, integer_value
from moeflow.runtime.stepper import StepBatcher
from moeflow.session import Session, open_session
from moeflow.stats import EngineStats, RequestStats

__all__ = ["Engine", "EngineState", "GenerationResult"]

T = TypeVar("T")


class EngineState(enum.Enum):
    CREATED = "created"
    OPENING = "opening"
    READY = "ready"
    CLOSING = "closing"
    CLOSED = "closed"
    FAILED = "failed"


@dataclass(frozen=True)
class GenerationResult:
    tokens: list[int]  # generated token ids (the prompt excluded)
    prompt_tokens: list[int]
    text: str | None  # decoded tokens, when the checkpoint has a tokenizer
    finish_reason: str  # "length" | "eos"
    stats: RequestStats


class Engine:
    """A model opened under an expert budget. Use as `async with Engine.open(path, ...) as eng:`.

    Concurrent `generate` / `stream` calls are batched: each step runs the next token of every
    running request, plus chunks of new prompts, through each layer in one pass, so one load of
    an expert serves every token routed to it (continuous batching, `runtime/stepper.py`). Each
    request keeps its own KV cache and sampler and gets the tokens it would get alone.

    The steps run on the engine's own thread and event loop (`runtime/loop_thread.py`): the
    caller's loop only submits and awaits, so it keeps serving its other tasks while a step
    computes, and a cancelled request ends at the next step boundary. An Engine may be used from
    any event loop or thread; `call` runs code on the engine thread where it must touch the
    session's internals (the cache, the runner).
    """

    def __init__(self, path: str | os.PathLike[str], config: EngineConfig) -> None:
        self.path = Path(path)
        self.config = config
        self.state = EngineState.CREATED
        self._session: Session | None = None
        self._step_lock = asyncio.Lock()
        self._requests = 0
        self._active = 0
        self._batcher: StepBatcher | None = None
        self._core: LoopThread | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str], **options: Any) -> Engine:
        """Validate options now (TypeError for unknown names, ConfigError for bad values);
        the checkpoint is opened on `async with` or `await`."""
        return cls(path, EngineConfig.from_user(**options))

    async def start(self) -> Engine:
        if self.state is not EngineState.CREATED:
            raise EngineClosed(f"engine for {self.path} cannot start from state {self.state.value}")
        self.state = EngineState.OPENING
        self._core = core = LoopThread("moeflow-engine")
        try:
            self._session = await core.call(self._open())
        except BaseException:
            self.state = EngineState.FAILED
            await core.stop()
            raise
        self.state = EngineState.READY
        return self

    async def _open(self) -> Session:
        """On the engine thread: the session, and the step batcher (its locks live on this loop)."""
        session = await open_session(self.path, self.config)
        session.transfers.bind_loop()  # completions wake this loop; using it from another one raises
        self._step_lock = asyncio.Lock()
        self._batcher = StepBatcher(
            session.runner, self._step_lock, max_tokens=self.config.prefill_chunk,
            max_sequences=self.config.max_batch_sequences, kv_budget=session.kv_budget,
            kv_bytes_per_token=session.runner.kv_bytes_per_token(), snapshot=session.counters_snapshot,
            end_step=session.end_step, max_wait=self.config.regroup_max_wait,
            resident=(lambda: session.runner.route_bits(session.cache.resident()))
            if self.config.batch_order == "regroup" else None,
        )
        return session

    def __await__(self) -> Generator[Any, None, Engine]:
        return self.start().__await__()

    async def __aenter__(self) -> Engine:
        if self.state is EngineState.CREATED:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Fail the requests still waiting with EngineClosed, close the session (transfers
        drained, pinned memory freed) and stop the engine thread. Idempotent."""
        if self.state in (EngineState.CLOSED, EngineState.CLOSING):
            return
        self.state = EngineState.CLOSING
        core = self._core
        try:
            if core is not None and self._session is not None:
                await core.call(self._close())
        finally:
            self.state = EngineState.CLOSED
            if core is not None:
                await core.stop()

    async def _close(self) -> None:
        if self._batcher is not None:
            self._batcher.close(EngineClosed(f"engine for {self.path} was closed while the request waited"))
        async with self._step_lock:
            if self._session is not None:
                await self._session.aclose()

    @overload
    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T: ...

    @overload
    async def call(self, fn: Callable[..., T], *args: Any) -> T: ...

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on the engine thread (awaited there if it returns an awaitable): the way
        for tests, benchmarks and embedders to touch `session` internals (cache, runner,
        transfers), which belong to the engine's loop."""

        async def run() -> Any:
            out = fn(*args)
            if inspect.isawaitable(out):
                return await out
            return out

        return await self._engine_thread().call(run())

    def _engine_thread(self) -> LoopThread:
        if self.state is not EngineState.READY or self._core is None:
            raise EngineClosed(f"engine for {self.path} is {self.state.value}, not ready")
        return self._core

    @property
    def session(self) -> Session:
        if self.state is not EngineState.READY or self._session is None:
            raise EngineClosed(f"engine for {self.path} is {self.state.value}, not ready")
        return self._session

    @property
    def plan(self) -> MemoryPlan:
        return self.session.plan

    # ---- requests --------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        tok = self.session.tokenizer
        if tok is None:
            raise InvalidRequest(f"{self.path} has no tokenizer.json: pass token ids instead of text")
        return list(tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str | None:
        tok = self.session.tokenizer
        return None if tok is None else tok.decode(list(ids))

    def _prompt_ids(self, prompt: str | Sequence[int] | torch.Tensor) -> list[int]:
        """The prompt as plain ints, each checked against the vocabulary. numpy and torch integer
        scalars are ids; a float (or a float tensor) is refused, never rounded."""
        if isinstance(prompt, str):
            ids = self.encode(prompt)
            if not ids:
                raise InvalidRequest("empty prompt: it encodes to no tokens")
            return ids
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1:
                raise InvalidRequest(f"token ids must be a 1-D tensor, got shape {list(prompt.shape)}")
            if prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
                raise InvalidRequest(f"token ids must be an integer tensor, got {prompt.dtype}: ids are never rounded")
            prompt = prompt.tolist()
        prompt = list(prompt)  # a numpy array has no truth value
        if not prompt:
            raise InvalidRequest("empty prompt: give at least one token")
        vocab = self.session.arch.vocab_size
        ids = []
        for pos, value in enumerate(prompt):
            try:
                i = integer_value(value)
            except TypeError as e:
                raise InvalidRequest(
                    f"token id {value!r} at position {pos} is {e}: token ids are integers (never rounded)"
                ) from None
            if not 0 <= i < vocab:
                raise InvalidRequest(f"token id {i!r} out of range [0, {vocab}) at position {pos}")
            ids.append(i)
        return ids

    def _check_length(self, prompt: int, max_new_tokens: int = 0) -> None:
        """Refuse, before any compute, a request whose positions would pass the model's context."""
        limit = self.session.arch.max_position_embeddings
        if prompt + max_new_tokens > limit:
            asked = f"a prompt of {prompt} tokens"
            if max_new_tokens:
                asked += f" + max_new_tokens={max_new_tokens} = {prompt + max_new_tokens} positions"
            raise InvalidRequest(
                f"{asked} exceeds the model's context of {limit} tokens (max_position_embeddings in "
                f"{self.path / 'config.json'}): shorten the prompt or lower max_new_tokens"
            )

    def _checked(self, prompt: str | Sequence[int] | torch.Tensor, max_new_tokens: int) -> tuple[list[int], int]:
        """The prompt's ids and max_new_tokens, checked on the caller's side before any compute."""
        try:
            max_new_tokens = integer_value(max_new_tokens)
        except TypeError as e:
            raise InvalidRequest(f"max_new_tokens={max_new_tokens!r}: must be a positive integer, got {e}") from None
        if max_new_tokens <= 0:
            raise InvalidRequest(f"max_new_tokens={max_new_tokens!r}: must be a positive integer")
        ids = self._prompt_ids(prompt)
        self._check_length(len(ids), max_new_tokens)
        return ids, max_new_tokens

    async def logits(self, token_ids: str | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Prefill logits [len, vocab] (float32) for a fresh sequence."""
        ids = self._prompt_ids(token_ids)
        self._check_length(len(ids))
        return await self._engine_thread().call(self._logits(ids))

    async def _logits(self, ids: list[int]) -> torch.Tensor:
        session = self.session
        seq = session.runner.new_sequence(ids)
        try:
            async with self._step_lock:
                logits = await session.runner.forward(seq, ids, all_logits=True)
                out = session.compute.host_tensor(logits)
                session.end_step()
                return out
        finally:
            seq.finish()

    async def score(self, token_ids: str | Sequence[int] | torch.Tensor, *, stepwise: bool = False) -> torch.Tensor:
        """Teacher-forced logits [len, vocab] (float32) of a fresh sequence: position i holds the
        prediction of token i + 1. stepwise=True feeds one token per step, as decoding does (so
        misses, prefetches and low-precision fallbacks happen as they would while generating)."""
        if not stepwise:
            return await self.logits(token_ids)
        ids = self._prompt_ids(token_ids)
        self._check_length(len(ids))
        return await self._engine_thread().call(self._score_stepwise(ids))

    async def _score_stepwise(self, ids: list[int]) -> torch.Tensor:
        session = self.session
        seq = session.runner.new_sequence(ids[:1])
        rows = []
        try:
            for tok in ids:
                async with self._step_lock:
                    rows.append(session.compute.host_tensor(await session.runner.forward(seq, [tok])))
                    session.end_step()
        finally:
            seq.finish()
        return torch.cat(rows)

    async def generate(
        self,
        prompt: str | Sequence[int] | torch.Tensor,
        max_new_tokens: int = 32,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_at_eos: bool = True,
    ) -> GenerationResult:
        """Generate up to `max_new_tokens` tokens. Raises InvalidRequest for a bad prompt or length."""
        params = SamplingParams(temperature, top_k, top_p, seed)
        ids, max_new_tokens = self._checked(prompt, max_new_tokens)
        return await self._engine_thread().call(self._generate(_Request(ids), max_new_tokens, params, stop_at_eos))

    async def _generate(self, request: _Request, max_new_tokens: int, params: SamplingParams,
                        stop: bool) -> GenerationResult:
        tokens = [tok async for tok in self._run(request, max_new_tokens, params, stop)]
        return GenerationResult(
            tokens=tokens,
            prompt_tokens=request.prompt,
            text=self.decode(tokens),
            finish_reason=request.finish_reason,
            stats=request.stats.freeze(len(tokens)),
        )

    async def stream(
        self,
        prompt: str | Sequence[int] | torch.Tensor,
        max_new_tokens: int = 32,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_at_eos: bool = True,
    ) -> AsyncIterator[int]:
        """Yield generated token ids one at a time, as the engine produces them."""
        params = SamplingParams(temperature, top_k, top_p, seed)
        ids, max_new_tokens = self._checked(prompt, max_new_tokens)
        tokens = self._engine_thread().stream(self._run(_Request(ids), max_new_tokens, params, stop_at_eos))
        async with contextlib.aclosing(tokens):  # a consumer that stops early still ends the sequence
            async for tok in tokens:
                yield tok

    async def _run(self, request: _Request, max_new_tokens: int, params: SamplingParams, stop: bool,
                   record: bool = False) -> AsyncGenerator[int, None]:
        """On the engine thread: one request's tokens, step by step, batched with the others'."""
        session = self.session
        batcher = self._batcher
        assert batcher is not None
        ids = request.prompt
        self._requests += 1
        sampler = Sampler(params)
        positions = len(ids) + max_new_tokens
        reserved = await batcher.admit(positions)  # waits while the KV budget is full
        seq = None
        try:
            if self._active == 0:
                session.cache.begin_request()
            self._active += 1
            seq = session.runner.new_sequence(ids, record=record)
            if batcher.kv_budget is not None:
                seq.reserve(positions)  # its cache occupies what was admitted, no more
            eos = set(session.arch.eos_token_ids) if stop else set()
            step_input = ids
            for _ in range(max_new_tokens):
                # The step's time includes its tokens' readback; its counters are shared with the
                # requests batched with it.
                outcome = await batcher.run(seq, step_input, sampler=sampler)
                assert outcome.token is not None
                request.stats.add_delta(outcome.delta, outcome.seconds, outcome.host_syncs)
                session.tokens_generated += 1
                yield outcome.token
                if outcome.token in eos:
                    request.finish_reason = "eos"
                    return
                step_input = [outcome.token]
        finally:
            if seq is not None:
                self._active -= 1
                await batcher.finish(seq)
                request.trace = seq.trace
            await batcher.release(reserved)

    async def generate_batch(
        self,
        prompts: Sequence[str | Sequence[int] | torch.Tensor],
        max_new_tokens: int = 32,
        *,
        concurrency: int | None = None,
        **sampling: Any,
    ) -> list[GenerationResult]:
        """One result per prompt, in order, all running as one continuous batch (at most
        `concurrency` at a time if given). A refused prompt raises and cancels the others; for
        per-prompt errors use a job file (`moeflow.jobs.run_jobs`)."""
        from moeflow.jobs import generate_batch

        return await generate_batch(self, prompts, max_new_tokens, concurrency=concurrency, **sampling)

    async def trace(self, prompt: str | Sequence[int] | torch.Tensor, max_new_tokens: int = 32) -> SequenceTrace:
        """Greedy-generate and record the router's choices for every token (for predictors)."""
        ids, max_new_tokens = self._checked(prompt, max_new_tokens)
        return await self._engine_thread().call(self._trace(_Request(ids), max_new_tokens))

    async def _trace(self, request: _Request, max_new_tokens: int) -> SequenceTrace:
        tokens = [tok async for tok in self._run(request, max_new_tokens, SamplingParams(), True, record=True)]
        return SequenceTrace.from_steps(request.prompt, tokens, request.trace or [])

    # ---- introspection ---------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """Counters since open: hits, misses, prefetches, bytes loaded, stall time, blocks in use, ..."""
        return self.session.stats(requests=self._requests)


class _Request:
    def __init__(self, prompt: list[int]) -> None:
        self.prompt = prompt
        self.finish_reason = "length"
        self.stats = RequestStats.builder()
        self.trace: list[dict[int, torch.Tensor]] | None = None
