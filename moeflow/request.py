"""One generation request: its prompt and stop strings checked into plain values before any
compute, its steps as a caller sees them (token, text delta, logprob, finish), and its results."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass

import torch

from moeflow.errors import InvalidRequest
from moeflow.runtime.sampling import Sampler, TokenLogprob, integer_value
from moeflow.stats import RequestStats
from moeflow.text import TextStream

Prompt = str | Sequence[int] | torch.Tensor
ONE_PROMPT = "generate and stream take one prompt; for several, use generate_batch (one result per prompt)"


@dataclass(frozen=True)
class GenerationResult:
    tokens: list[int]  # generated token ids (the prompt excluded; up to the one that ended it)
    prompt_tokens: list[int]
    text: str | None  # the generated text (cut before a stop string), when the checkpoint has a tokenizer
    finish_reason: str  # "length" | "eos" | "stop" (a stop string)
    stats: RequestStats
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked for logprobs


@dataclass(frozen=True)
class StreamStep:
    """One generated token as a caller sees it. `text` is what may be shown now ("" while a
    character is incomplete or text could still become a stop string); held text comes out on
    the last step, the only one with a `finish_reason` ("length" | "eos" | "stop")."""

    token: int
    text: str
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None


class Request:
    """A request's bookkeeping on the engine thread."""

    def __init__(self, prompt: list[int]) -> None:
        self.prompt = prompt
        self.finish_reason = "length"
        self.stats = RequestStats.builder()
        self.trace: list[dict[int, torch.Tensor]] | None = None


def stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """`stop` as a tuple of non-empty strings; InvalidRequest naming `stop` for anything else."""
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, Sequence) or not all(isinstance(s, str) for s in items):
        raise InvalidRequest(f"stop={stop!r}: expected a string or a list of strings")
    if any(s == "" for s in items):
        raise InvalidRequest(f"stop={stop!r}: a stop string cannot be empty")
    return tuple(items)


def _several_prompts(prompt: object) -> bool:
    """A batch where one prompt belongs: a list of texts or of id lists, or a 2-D array."""
    if getattr(prompt, "ndim", 1) >= 2:  # a torch tensor or numpy array of prompts
        return True
    if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence) or not prompt:
        return False
    first = prompt[0]
    return isinstance(first, (str, bytes, Sequence)) or getattr(first, "ndim", 0) >= 1


def prompt_ids(prompt: Prompt, encode: Callable[[str], list[int]], vocab: int) -> list[int]:
    """The prompt as plain ints, each checked against the vocabulary. numpy and torch integer
    scalars are ids; a float (or a float tensor) is refused, never rounded; a list of prompts
    is refused with a pointer to generate_batch."""
    if isinstance(prompt, str):
        ids = encode(prompt)
        if not ids:
            raise InvalidRequest("empty prompt: it encodes to no tokens")
        return ids
    if _several_prompts(prompt):
        what = f"of shape {list(prompt.shape)}" if hasattr(prompt, "shape") else f"a list of {len(prompt)} prompts"
        raise InvalidRequest(f"prompt is {what}: {ONE_PROMPT}")
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1:
            raise InvalidRequest(f"token ids must be a 1-D tensor, got shape {list(prompt.shape)}")
        if prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
            raise InvalidRequest(f"token ids must be an integer tensor, got {prompt.dtype}: ids are never rounded")
        prompt = prompt.tolist()
    prompt = list(prompt)  # a numpy array has no truth value
    if not prompt:
        raise InvalidRequest("empty prompt: give at least one token")
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


async def steps(tokens: AsyncGenerator[int, None], sampler: Sampler, text: TextStream | None, eos: set[int],
                max_new_tokens: int) -> AsyncGenerator[StreamStep, None]:
    """`tokens` (a request's ids as the engine picks them) as StreamSteps, ending at an EOS id, a
    stop string or the length; ending closes `tokens`, which ends the sequence at once."""
    async with contextlib.aclosing(tokens):
        count = 0
        async for token in tokens:
            count += 1
            logprob = sampler.last if sampler.params.logprobs is not None else None
            finish = None
            if token in eos:  # its text is never shown, as transformers' and vLLM's outputs
                finish, delta = "eos", text.flush() if text is not None else ""
            else:
                delta = text.push(token) if text is not None else ""
                if text is not None and text.stopped:
                    finish = "stop"
                elif count == max_new_tokens:
                    finish = "length"
                    delta += text.flush() if text is not None else ""
            yield StreamStep(token, delta, logprob, finish)
            if finish is not None:
                return
