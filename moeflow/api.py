"""The public engine: open a checkpoint under an expert budget, then logits / generate / stream."""

from __future__ import annotations

import asyncio
import enum
import inspect
import os
from collections.abc import Awaitable, Callable, Generator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import torch

from moeflow.config import EngineConfig, MemoryPlan
from moeflow.errors import EngineClosed, InvalidRequest
from moeflow.generate import GenerationMixin
from moeflow.models.generation import GenerationConfig, load_generation_config
from moeflow.request import GenerationResult, Prompt, StreamStep, prompt_ids
from moeflow.runtime.loop_thread import LoopThread
from moeflow.runtime.sampling import SamplingParams, TokenLogprob, integer_value
from moeflow.runtime.stepper import StepBatcher
from moeflow.session import Session, open_session
from moeflow.stats import EngineStats

__all__ = ["Engine", "EngineState", "GenerationResult", "SamplingParams", "StreamStep", "TokenLogprob"]

T = TypeVar("T")


class EngineState(enum.Enum):
    CREATED = "created"
    OPENING = "opening"
    READY = "ready"
    CLOSING = "closing"
    CLOSED = "closed"
    FAILED = "failed"


class Engine(GenerationMixin):
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
        self._generation = GenerationConfig()  # the checkpoint's generation_config.json, read at open

    # ---- lifecycle -------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        expert_budget: int | float | str | None = None,
        host_budget: int | float | str | None = None,
        device: Literal["auto", "cpu", "cuda", "sim"] = "auto",
        prefetch: Literal["auto", "predictor", "none", "last-token", "gate-lookahead", "eam", "expertflow"] = "auto",
        policy: Literal["lru", "lfu", "mrs", "hobbit", "shallow", "predicted"] = "lru",
        prefetch_depth: int = 2,
        prefetch_width: int | None = None,
        max_speculative_loads: int | None = None,
        budget_split: Literal["pooled", "plec"] = "pooled",
        predictor_dir: str | os.PathLike[str] | None = None,
        dtype: str | torch.dtype | None = None,
        direct_io: Literal["auto", "require", "never"] = "auto",
        io_workers: int = 4,
        io_chunk: int | str = 4 << 20,
        store_dir: str | os.PathLike[str] | None = None,
        store_mode: Literal["auto", "never", "rebuild"] = "auto",
        prefill_chunk: int = 512,
        max_batch_sequences: int = 64,
        batch_order: Literal["fifo", "regroup"] = "fifo",
        regroup_max_wait: int = 4,
        kv_budget: int | str | None = None,
        memory_reserve: int | str | None = None,
        verify_checksums: bool = True,
        progress: bool = False,
        threads: int | None = None,
        precision: str | None = None,
        group_size: int | None = None,
        miss_precision: str | None = None,
        miss_thresholds: tuple[float, float] = (0.6, 0.9),
        low_precision_share: float = 0.25,
        sim_bandwidth_gbps: float = 25.0,
        sim_latency_us: float = 10.0,
        miss_compute: Literal["copy", "cpu", "auto"] = "copy",
        cpu_layers: int | str = 0,
    ) -> Engine:
        """An engine for the checkpoint at `path`, opened on `async with` or `await`. The options
        are checked now (ConfigError naming the bad value; TypeError for an unknown name):

        expert_budget: fast-tier bytes for experts: bytes, "2GiB", a fraction in (0, 1], "25%", or
            "auto" (what the device has free, minus memory_reserve); None: every expert.
        host_budget: on a GPU, pinned host memory for experts (same forms, no "auto"); None: all.
        device: "cpu", "cuda", "auto" (cuda when available) or "sim" (a simulated GPU, for tests).
        prefetch: the expert predictor; "auto": expertflow when a trained one is present, else
            gate-lookahead; "predictor" is "auto"; "none" turns prefetching off.
        policy: the fast tier's eviction policy.
        prefetch_depth: MoE layers ahead the predictor looks.
        prefetch_width: guesses loaded for the next layer (None: top-k + 1 where 2k+1 experts fit in
            one io_chunk, else the model's top-k).
        max_speculative_loads: speculative loads in flight at once (None: 2k+1 where they fit in one
            io_chunk, else the model's top-k).
        budget_split: "pooled" (one budget for all layers) or "plec" (per-layer shares in
            proportion to smoothed demand, ExpertFlow's PLEC).
        predictor_dir: where a trained routing predictor lives (None: the model folder).
        dtype: compute dtype, "float32", "bfloat16" or "float16" (None: the checkpoint's).
        direct_io: read the store with O_DIRECT: "auto" (where it works), "require" or "never".
        io_workers: read threads of the transfer engine.
        io_chunk: largest part of one read (a multiple of 4 KiB): a demand read waits for one part.
        store_dir: where the expert store goes (None: beside the checkpoint, or the user cache).
        store_mode: "auto" (reuse or convert), "never" (refuse to convert) or "rebuild".
        prefill_chunk: tokens per forward pass (and per step); bounds a long prompt's memory.
        max_batch_sequences: sequences one step runs together (continuous batching).
        batch_order: which waiting sequences a full step takes: "fifo" or "regroup" (by routing).
        regroup_max_wait: steps a sequence regrouping passes over may wait at most.
        kv_budget: bytes of KV cache for all admitted requests (None: no bound, or a share of
            memory_reserve under expert_budget="auto").
        memory_reserve: under expert_budget="auto", bytes kept free for KV cache and activations
            (None: 10% of free memory, at least 1 GiB).
        verify_checksums: check expert blobs' checksums as they are read from the store.
        progress: show a progress bar while converting the store.
        threads: torch compute threads (None: torch's default), at most the CPU count.
        precision: the expert store's precision, e.g. "int8", "int4-g64" (None: the compute dtype).
        group_size: quantization group size (None: the precision's default).
        miss_precision: a low-precision copy run for unimportant misses (HOBBIT; None: exact only).
        miss_thresholds: (T1, T2) on the cumulative gate weight that pick the low-precision copy.
        low_precision_share: share of expert_budget given to the low-precision cache, in (0, 1).
        sim_bandwidth_gbps: device="sim": its copy engine's bandwidth.
        sim_latency_us: device="sim": its per-copy latency.
        miss_compute: GPU/sim: where a missing expert runs: "copy" (wait for it), "cpu" (compute it
            on the CPU from its pinned host copy) or "auto" (a cost model picks per expert).
        cpu_layers: GPU/sim: MoE layers whose experts always run on the CPU: the first N, or
            indices such as "0-3,7" (llama.cpp's --n-cpu-moe).
        """
        options = {name: value for name, value in locals().items() if name not in ("cls", "path")}
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
        try:
            self._generation = load_generation_config(session.checkpoint.path)
        except BaseException:
            await session.aclose()
            raise
        session.transfers.bind_loop()  # completions wake this loop; using it from another one raises
        self._step_lock = asyncio.Lock()
        self._batcher = StepBatcher(
            session.runner, self._step_lock, max_tokens=self.config.prefill_chunk,
            max_sequences=self.config.max_batch_sequences, kv_budget=session.kv_budget,
            kv_bytes_per_token=session.runner.kv_bytes_per_token(), snapshot=session.counters_snapshot,
            end_step=session.end_step, max_wait=self.config.regroup_max_wait,
            resident=(lambda: session.runner.route_bits(session.cache.resident()))
            if self.config.batch_order == "regroup" else None,
            kv_bytes_per_sequence=session.runner.kv_bytes_per_sequence(),
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

    @property
    def generation_config(self) -> GenerationConfig:
        """The checkpoint's generation_config.json: EOS ids and the sampling defaults a request
        gets for the values it leaves unset (None)."""
        self.session  # noqa: B018  (EngineClosed unless ready)
        return self._generation

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation: generation_config.json's, then config.json's (transformers'
        generate uses the former; both end it here, so neither file's EOS is missed)."""
        return tuple(dict.fromkeys((*self.generation_config.eos_token_ids, *self.session.arch.eos_token_ids)))

    # ---- requests --------------------------------------------------------------------------
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. The tokenizer's own post-processor adds what the model expects
        (a BOS, say) unless add_special_tokens=False: for a prompt already holding them, such as
        a rendered chat template."""
        tok = self.session.tokenizer
        if tok is None:
            raise InvalidRequest(f"{self.path} has no tokenizer.json: pass token ids instead of text")
        return list(tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str | None:
        tok = self.session.tokenizer
        return None if tok is None else tok.decode(list(ids))

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        return prompt_ids(prompt, self.encode, self.session.arch.vocab_size)

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

    # ---- introspection ---------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """Counters since open: hits, misses, prefetches, bytes loaded, stall time, blocks in use, ..."""
        batcher = self._batcher
        steps = {} if batcher is None else {
            "batch_steps": batcher.steps, "split_steps": batcher.split_steps, "sent_ahead": batcher.sent_ahead,
            "early_loads": batcher.early_loads,
        }
        return self.session.stats(requests=self._requests, **steps)

