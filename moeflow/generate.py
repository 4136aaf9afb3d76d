"""Engine's generation methods (generate, stream, stream_steps, stream_text, generate_batch,
trace): a request's sampling resolved against the model's defaults, run step by step on the
engine thread, and turned into tokens, text and logprobs."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from moeflow.errors import InvalidRequest
from moeflow.request import GenerationResult, Prompt, Request, StreamStep, steps, stop_strings
from moeflow.runtime.sampling import Sampler, SamplingParams
from moeflow.scheduling.traces import SequenceTrace
from moeflow.text import TextStream

if TYPE_CHECKING:
    from moeflow.models.generation import GenerationConfig
    from moeflow.runtime.loop_thread import LoopThread
    from moeflow.runtime.stepper import StepBatcher
    from moeflow.session import Session


class _Plan:
    """A checked request, ready for the engine thread."""

    def __init__(self, ids: list[int], max_new_tokens: int, params: SamplingParams, stop: tuple[str, ...],
                 stop_at_eos: bool) -> None:
        self.ids, self.max_new_tokens, self.params, self.stop, self.stop_at_eos = (
            ids, max_new_tokens, params, stop, stop_at_eos)


class GenerationMixin:
    """Sampling keywords, the same for generate / stream / stream_steps / stream_text (and
    generate_batch, which passes them on):

    temperature, top_k, top_p, min_p, repetition_penalty: None (the default) takes the value of
        the checkpoint's generation_config.json (greedy unless it says do_sample: true, as in
        transformers); see SamplingParams for the meaning of each.
    seed: the request's own generator seed (None: a fresh one).
    presence_penalty, frequency_penalty: OpenAI's, over generated tokens, in [-2, 2].
    stop: a string or strings; generation ends when the text contains one, and the text is cut
        before it (finish_reason "stop"). Needs the checkpoint's tokenizer.
    logprobs: None (none), 0 (each token's logprob) or k <= 20 (also the k most likely tokens'):
        log_softmax of the model's raw logits (before penalties and temperature), as vLLM.
    stop_at_eos: end at an EOS id (generation_config.json's or config.json's).
    """

    if TYPE_CHECKING:
        @property
        def session(self) -> Session: ...
        _batcher: StepBatcher | None
        _requests: int
        _active: int
        _generation: GenerationConfig

        def _engine_thread(self) -> LoopThread: ...
        def _checked(self, prompt: Prompt, max_new_tokens: int) -> tuple[list[int], int]: ...
        @property
        def eos_token_ids(self) -> tuple[int, ...]: ...

    def _plan(self, prompt: Prompt, max_new_tokens: int, stop: str | Sequence[str] | None, stop_at_eos: bool,
              **sampling: Any) -> _Plan:
        """Everything checked on the caller's side, before any compute."""
        params = SamplingParams(**self._generation.sampling(**sampling))
        stops = stop_strings(stop)
        ids, max_new_tokens = self._checked(prompt, max_new_tokens)
        if stops and self.session.tokenizer is None:
            raise InvalidRequest(f"stop={stop!r}: stop strings need the checkpoint's tokenizer.json, which "
                                 f"{self.session.checkpoint.path} lacks")
        return _Plan(ids, max_new_tokens, params, stops, stop_at_eos)

    async def generate(
        self, prompt: Prompt, max_new_tokens: int = 32, *,
        temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
        seed: int | None = None, min_p: float | None = None, repetition_penalty: float | None = None,
        presence_penalty: float = 0.0, frequency_penalty: float = 0.0, stop: str | Sequence[str] | None = None,
        logprobs: int | None = None, stop_at_eos: bool = True,
    ) -> GenerationResult:
        """Generate up to `max_new_tokens` tokens (sampling keywords: see GenerationMixin).
        Raises InvalidRequest for a bad prompt, length or sampling value."""
        plan = self._plan(prompt, max_new_tokens, stop, stop_at_eos, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed, min_p=min_p, repetition_penalty=repetition_penalty,
                          presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, logprobs=logprobs)
        return await self._engine_thread().call(self._generate(plan))

    async def _generate(self, plan: _Plan) -> GenerationResult:
        request = Request(plan.ids)
        tokenizer = self.session.tokenizer
        text = TextStream(tokenizer, plan.stop) if tokenizer is not None else None
        out = [step async for step in self._steps(request, plan, text)]
        return GenerationResult(
            tokens=[s.token for s in out],
            prompt_tokens=request.prompt,
            text=None if text is None else text.text,
            finish_reason=out[-1].finish_reason or "length",
            stats=request.stats.freeze(len(out)),
            logprobs=None if plan.params.logprobs is None else [s.logprob for s in out if s.logprob is not None],
        )

    async def stream_steps(
        self, prompt: Prompt, max_new_tokens: int = 32, *,
        temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
        seed: int | None = None, min_p: float | None = None, repetition_penalty: float | None = None,
        presence_penalty: float = 0.0, frequency_penalty: float = 0.0, stop: str | Sequence[str] | None = None,
        logprobs: int | None = None, stop_at_eos: bool = True,
    ) -> AsyncIterator[StreamStep]:
        """Each generated token as a StreamStep (token, text delta, logprob, and finish_reason on
        the last), as the engine produces it; the text is decoded incrementally and never splits
        a character. Leaving the loop early ends the request at its next step."""
        plan = self._plan(prompt, max_new_tokens, stop, stop_at_eos, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed, min_p=min_p, repetition_penalty=repetition_penalty,
                          presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, logprobs=logprobs)
        tokenizer = self.session.tokenizer
        text = TextStream(tokenizer, plan.stop) if tokenizer is not None else None
        async with contextlib.aclosing(self._stream(plan, text)) as out:  # leaving early ends the request
            async for step in out:
                yield step

    async def stream_text(
        self, prompt: Prompt, max_new_tokens: int = 32, *,
        temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
        seed: int | None = None, min_p: float | None = None, repetition_penalty: float | None = None,
        presence_penalty: float = 0.0, frequency_penalty: float = 0.0, stop: str | Sequence[str] | None = None,
        stop_at_eos: bool = True,
    ) -> AsyncIterator[str]:
        """The generated text in pieces as it becomes final (never a broken character, never the
        start of a stop string that may yet complete). Needs the checkpoint's tokenizer."""
        if self.session.tokenizer is None:
            raise InvalidRequest(f"stream_text needs the checkpoint's tokenizer.json, which "
                                 f"{self.session.checkpoint.path} lacks: use stream or stream_steps")
        out = self.stream_steps(
            prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, min_p=min_p,
            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, stop=stop, stop_at_eos=stop_at_eos)
        async with contextlib.aclosing(out):  # type: ignore[type-var]  # an async generator
            async for step in out:
                if step.text:
                    yield step.text

    async def stream(
        self, prompt: Prompt, max_new_tokens: int = 32, *,
        temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
        seed: int | None = None, min_p: float | None = None, repetition_penalty: float | None = None,
        presence_penalty: float = 0.0, frequency_penalty: float = 0.0, stop: str | Sequence[str] | None = None,
        stop_at_eos: bool = True,
    ) -> AsyncIterator[int]:
        """Yield generated token ids one at a time, as the engine produces them."""
        plan = self._plan(prompt, max_new_tokens, stop, stop_at_eos, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed, min_p=min_p, repetition_penalty=repetition_penalty,
                          presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
        tokenizer = self.session.tokenizer
        # ids alone need no text, unless stop strings must be found in it
        text = TextStream(tokenizer, plan.stop) if tokenizer is not None and plan.stop else None
        async with contextlib.aclosing(self._stream(plan, text)) as out:
            async for step in out:
                yield step.token

    async def _stream(self, plan: _Plan, text: TextStream | None) -> AsyncGenerator[StreamStep, None]:
        out = self._engine_thread().stream(self._steps(Request(plan.ids), plan, text))
        async with contextlib.aclosing(out):  # a consumer that stops early still ends the sequence
            async for step in out:
                yield step

    def _steps(self, request: Request, plan: _Plan, text: TextStream | None) -> AsyncGenerator[StreamStep, None]:
        """On the engine thread: the request's steps, ended by EOS, a stop string or the length."""
        sampler = Sampler(plan.params, request.prompt)
        eos = set(self.eos_token_ids) if plan.stop_at_eos else set()
        return steps(self._run(request, plan.max_new_tokens, sampler, eos), sampler, text, eos, plan.max_new_tokens)

    async def _run(self, request: Request, max_new_tokens: int, sampler: Sampler, eos: set[int],
                   record: bool = False) -> AsyncGenerator[int, None]:
        """On the engine thread: one request's tokens, step by step, batched with the others'."""
        session = self.session
        batcher = self._batcher
        assert batcher is not None
        ids = request.prompt
        self._requests += 1
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
        prompts: Sequence[Prompt],
        max_new_tokens: int = 32,
        *,
        concurrency: int | None = None,
        **sampling: Any,
    ) -> list[GenerationResult]:
        """One result per prompt, in order, all running as one continuous batch (at most
        `concurrency` at a time if given); `sampling` is generate's keywords, for every prompt. A
        refused prompt raises and cancels the others; for per-prompt errors use a job file
        (`moeflow.jobs.run_jobs`)."""
        from moeflow.jobs import generate_batch

        return await generate_batch(self, prompts, max_new_tokens, concurrency=concurrency, **sampling)

    async def trace(self, prompt: Prompt, max_new_tokens: int = 32) -> SequenceTrace:
        """Greedy-generate and record the router's choices for every token (for predictors)."""
        ids, max_new_tokens = self._checked(prompt, max_new_tokens)
        return await self._engine_thread().call(self._trace(Request(ids), max_new_tokens))

    async def _trace(self, request: Request, max_new_tokens: int) -> SequenceTrace:
        sampler = Sampler(SamplingParams(), request.prompt)
        tokens = [tok async for tok in self._run(request, max_new_tokens, sampler, set(self.eos_token_ids),
                                                 record=True)]
        return SequenceTrace.from_steps(request.prompt, tokens, request.trace or [])
