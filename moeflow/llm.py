"""`moeflow.LLM`: a synchronous face over an Engine for scripts and notebooks, in the manner of vLLM's LLM.

    from moeflow import LLM
    with LLM("path/to/checkpoint", expert_budget="25%") as llm:
        for result in llm.generate(["def fib(n):", "import os"], max_new_tokens=64):
            print(result.text)

The calls run on an event loop in a background thread, so this works where a loop is already
running (Jupyter) and from plain scripts alike; every call blocks until its results are ready,
and Ctrl-C while waiting cancels the requests it started.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import torch

from moeflow.api import Engine, GenerationResult
from moeflow.errors import InvalidRequest, MoeflowError
from moeflow.jobs import Job, JobSummary, generate_batch, run_job, run_jobs
from moeflow.runtime.loop_thread import LoopThread
from moeflow.stats import EngineStats

T = TypeVar("T")
Prompt = str | Sequence[int] | torch.Tensor


def _as_prompts(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (text, token ids, a 1-d tensor) or a sequence of them, as a list."""
    if isinstance(prompts, str) or (isinstance(prompts, torch.Tensor) and prompts.dim() <= 1):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]  # type: ignore[list-item]
    if isinstance(prompts, (Sequence, torch.Tensor)):
        return list(prompts)
    raise InvalidRequest(f"prompts: expected text, token ids or a list of them, got {type(prompts).__name__}")


class LLM:
    """A moeflow Engine behind blocking calls. Options are Engine.open's (expert_budget, device, ...)."""

    def __init__(self, model: str | os.PathLike[str], **options: Any) -> None:
        self._thread = LoopThread("moeflow-llm")
        self._engine: Engine | None = None
        try:
            self._engine = self._run(Engine.open(model, **options).start())
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._thread.run(coro)  # Ctrl-C: the requests this call started end at their next step

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise InvalidRequest("this LLM is closed")
        return self._engine

    def generate(self, prompts: Prompt | Sequence[Prompt], max_new_tokens: int = 32, *,
                 concurrency: int | None = None, **params: Any) -> list[GenerationResult]:
        """One result per prompt, in order. Sampling parameters (temperature, top_k, top_p, seed,
        stop_at_eos) apply to every prompt; all run at once unless `concurrency` bounds them."""
        batch = _as_prompts(prompts)
        return self._run(generate_batch(self.engine, batch, max_new_tokens, concurrency=concurrency, **params))

    def run(self, jobs: Sequence[Job], *, concurrency: int | None = None,
            **defaults: Any) -> list[GenerationResult | MoeflowError]:
        """Each job's result, in order, or the typed error that refused it (the others still run)."""
        engine = self.engine
        gate = asyncio.Semaphore(concurrency or max(1, len(jobs)))

        async def one(job: Job) -> GenerationResult | MoeflowError:
            async with gate:
                outcome: GenerationResult | MoeflowError = await run_job(engine, job, defaults)
                return outcome

        async def every() -> list[GenerationResult | MoeflowError]:
            return list(await asyncio.gather(*(one(job) for job in jobs)))

        return self._run(every())

    def run_file(self, input_path: str | os.PathLike[str], output_path: str | os.PathLike[str], *,
                 concurrency: int = 8, **defaults: Any) -> JobSummary:
        """A JSONL job file (see moeflow.jobs): results appended as they finish, resumable."""
        return self._run(run_jobs(self.engine, input_path, output_path, concurrency=concurrency, defaults=defaults))

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def close(self) -> None:
        """Close the engine and stop its thread; idempotent."""
        engine, self._engine = self._engine, None
        try:
            if engine is not None:
                self._run(engine.aclose())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._thread.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
