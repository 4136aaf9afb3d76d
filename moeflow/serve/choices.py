"""The choices of one request: each generation's text pieces (with their tokens' logprobs) as the engine makes
them, merged across choices in the order they come; closing the merge cancels every choice."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moeflow.serve.metrics import ServerMetrics
from moeflow.serve.protocol import CompletionRequest

if TYPE_CHECKING:
    from moeflow.api import Engine, StreamStep
    from moeflow.models.generation import GenerationConfig


@dataclass
class Choice:
    """One of a request's prompts x n generations: index = prompt_index * n + i, as vLLM numbers them."""

    index: int
    prompt_index: int
    ids: list[int]  # the prompt's tokens
    seed: int | None  # seed + i: choice i of every prompt draws as choice i of that prompt alone
    max_tokens: int
    tokens: int = 0
    finish_reason: str | None = None  # None while running
    text: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Piece:
    """Text a choice produced, and the logprobs of the tokens that made it (when asked for)."""

    text: str
    logprobs: tuple[Any, ...] = ()  # moeflow.runtime.sampling.TokenLogprob


def sampling_args(req: CompletionRequest, seed: int | None, defaults: GenerationConfig) -> dict[str, Any]:
    """The engine's keyword arguments for one choice. An unset field takes the checkpoint's
    generation_config.json value when it has one, as vLLM serves it (do_sample aside: the API
    samples), and temperature otherwise the API's default, 1.0."""
    temperature = req.temperature if req.temperature is not None else defaults.temperature
    top_k = req.top_k if req.top_k is not None else defaults.top_k
    return {"temperature": 1.0 if temperature is None else temperature,
            "top_k": top_k or None,  # the file's 0: no top-k
            "top_p": req.top_p if req.top_p is not None else defaults.top_p,
            "min_p": req.min_p if req.min_p is not None else defaults.min_p, "seed": seed,
            "repetition_penalty": req.repetition_penalty,  # None: the engine reads the file's
            "presence_penalty": req.presence_penalty or 0.0, "frequency_penalty": req.frequency_penalty or 0.0}


def step_text(step: StreamStep, marker: tuple[int, str] | None) -> str:
    """The text a step shows; `marker` (id, text) is a special token the text must keep although
    decoding skips special tokens: Mistral's [TOOL_CALLS], which the tool parser looks for (vLLM
    decodes with skip_special_tokens=False for that parser)."""
    if marker is not None and step.token == marker[0]:
        return marker[1] + step.text
    return step.text


async def pieces(engine: Engine, choice: Choice, req: CompletionRequest, metrics: ServerMetrics,
                 stop: tuple[str, ...], marker: tuple[int, str] | None = None) -> AsyncGenerator[Piece, None]:
    """One choice's text as it is generated, cut before a stop string (which ends the request)."""
    steps = engine.stream_steps(choice.ids, choice.max_tokens, stop=list(stop), logprobs=req.logprobs,
                                stop_at_eos=not req.ignore_eos, **sampling_args(req, choice.seed, engine.generation_config))
    try:
        async with contextlib.aclosing(steps):  # type: ignore[type-var]  # leaving early (client gone) ends the request
            async for step in steps:
                choice.tokens += 1
                text = step_text(step, marker)
                if text or step.logprob is not None:
                    choice.text.append(text)
                    yield Piece(text, () if step.logprob is None else (step.logprob,))
                if step.finish_reason is not None:
                    choice.finish_reason = "length" if step.finish_reason == "length" else "stop"
    finally:
        metrics.completion_tokens.inc(choice.tokens)
        metrics.finished.labels(choice.finish_reason or "cancelled").inc()


class Merged:
    """(choice index, piece) as any choice produces it, (index, None) when it ends. Choices beyond
    the first run as tasks kept here until they end, so none is collected mid-run."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, runs: list[AsyncGenerator[Piece, None]]) -> AsyncGenerator[tuple[int, Piece | None], None]:
        if len(runs) == 1:
            async with contextlib.aclosing(runs[0]) as run:
                async for piece in run:
                    yield 0, piece
            yield 0, None
            return
        queue: asyncio.Queue[tuple[int, Piece | None | Exception]] = asyncio.Queue()

        async def pump(index: int, run: AsyncGenerator[Piece, None]) -> None:
            try:
                async with contextlib.aclosing(run):
                    async for piece in run:
                        queue.put_nowait((index, piece))
                queue.put_nowait((index, None))
            except Exception as e:  # handed to the reader, which raises it
                queue.put_nowait((index, e))

        tasks = [asyncio.create_task(pump(i, run)) for i, run in enumerate(runs)]
        for task in tasks:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            running = len(tasks)
            while running:
                index, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                running -= item is None
                yield index, item
        finally:
            for task in tasks:  # a cancelled pump closes its engine stream, freeing KV and pins
                task.cancel()
