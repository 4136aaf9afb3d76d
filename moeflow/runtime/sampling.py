"""Choosing the next token: greedy or sampled (temperature, top-k, top-p, min-p, seed), with
repetition / presence / frequency penalties and the chosen token's logprobs."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moeflow.errors import InvalidRequest

SEED_RANGE = (-(1 << 63), 1 << 64)  # what torch.Generator.manual_seed takes: any 64-bit pattern
MAX_LOGPROBS = 20  # OpenAI's limit on top logprobs per token


def integer_value(value: object) -> int:
    """A plain int from an int or a numpy / torch integer scalar. TypeError (saying what the
    value is) for a bool, a float or anything else: those are mistakes, never rounded."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError("a bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"a {kind}") from None


def _integer(name: str, value: object) -> int:
    try:
        return integer_value(value)
    except TypeError as e:
        raise InvalidRequest(f"{name}={value!r}: expected an integer, got {e}") from None


def _real(name: str, value: object) -> float:
    """A finite float from an int or float (numpy / torch scalars included); bools, NaN and
    infinities are refused."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidRequest(f"{name}={value!r}: expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise InvalidRequest(f"{name}={value!r}: must be a finite number")
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens; checked (and numpy / torch scalars made plain) when built, so a bad
    value is refused before the request computes anything.

    Order of work on one step's logits (that of transformers' generate and vLLM): penalties on
    the raw logits (repetition: HF's, over prompt and output, dividing a positive logit and
    multiplying a negative one; presence and frequency: OpenAI's, over the output only), then
    temperature (0: argmax of the penalised logits), top_k, top_p and min_p, then the draw.
    `logprobs` (None: none; 0: the chosen token's; k: also the k most likely) are those of the
    model's own distribution, log_softmax of the raw logits before penalties and temperature,
    as vLLM returns them by default (its logprobs_mode='raw_logprobs')."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None

    def __post_init__(self) -> None:
        temperature = _real("temperature", self.temperature)
        if temperature < 0:
            raise InvalidRequest(f"temperature={self.temperature!r}: must be >= 0 (0 is greedy)")
        object.__setattr__(self, "temperature", temperature)
        if self.top_k is not None:
            top_k = _integer("top_k", self.top_k)
            if top_k <= 0:
                raise InvalidRequest(f"top_k={self.top_k!r}: must be a positive integer")
            object.__setattr__(self, "top_k", top_k)
        if self.top_p is not None:
            top_p = _real("top_p", self.top_p)
            if not 0 < top_p <= 1:
                raise InvalidRequest(f"top_p={self.top_p!r}: must be in (0, 1]")
            object.__setattr__(self, "top_p", top_p)
        if self.seed is not None:
            seed = _integer("seed", self.seed)
            if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
                raise InvalidRequest(f"seed={self.seed!r}: must fit in 64 bits (an integer in [-2**63, 2**64))")
            object.__setattr__(self, "seed", seed)
        if self.min_p is not None:
            min_p = _real("min_p", self.min_p)
            if not 0 <= min_p <= 1:
                raise InvalidRequest(f"min_p={self.min_p!r}: must be in [0, 1]")
            object.__setattr__(self, "min_p", min_p)
        penalty = _real("repetition_penalty", self.repetition_penalty)
        if penalty <= 0:
            raise InvalidRequest(f"repetition_penalty={self.repetition_penalty!r}: must be > 0 (1 is none)")
        object.__setattr__(self, "repetition_penalty", penalty)
        for name in ("presence_penalty", "frequency_penalty"):
            value = _real(name, getattr(self, name))
            if not -2 <= value <= 2:
                raise InvalidRequest(f"{name}={getattr(self, name)!r}: must be in [-2, 2] (0 is none)")
            object.__setattr__(self, name, value)
        if self.logprobs is not None:
            logprobs = _integer("logprobs", self.logprobs)
            if not 0 <= logprobs <= MAX_LOGPROBS:
                raise InvalidRequest(f"logprobs={self.logprobs!r}: must be in [0, {MAX_LOGPROBS}] "
                                     "(0: the chosen token's logprob only)")
            object.__setattr__(self, "logprobs", logprobs)

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def greedy(self) -> bool:
        """The token is the argmax of the raw logits and nothing else is wanted (no penalty, no
        logprobs): the step batcher then picks it with other such rows, without the Sampler."""
        return self.temperature == 0 and not self.penalised and self.logprobs is None


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's logprob, and the `logprobs` most likely tokens' (ids, most likely first)."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


class Sampler:
    """Per-request sampler with its own generator, so concurrent requests stay reproducible.
    It works where the logits are: the generator, and the token history the penalties read
    (counts of output tokens, a mask of prompt + output tokens), are made on their device at the
    first call; each call reads back one small tensor (the token, and its logprobs when asked)."""

    def __init__(self, params: SamplingParams, prompt: Sequence[int] = ()) -> None:
        self.params = params
        self.prompt = list(prompt)
        self.generator: torch.Generator | None = None
        self.last: TokenLogprob | None = None  # the last call's logprobs, when params.logprobs is set
        self._counts: torch.Tensor | None = None  # [V] float: times each token was generated
        self._seen: torch.Tensor | None = None  # [V] bool: in the prompt or generated

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device)
            if self.params.seed is not None:
                self.generator.manual_seed(self.params.seed)
            else:
                self.generator.seed()
        return self.generator

    def penalised_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [V] with the penalties of the tokens seen so far applied (a new tensor)."""
        p = self.params
        if self._counts is None or self._counts.device != logits.device:
            self._counts = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
            self._seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            if self.prompt:
                self._seen[torch.tensor(self.prompt, device=logits.device)] = True
        assert self._seen is not None
        if p.repetition_penalty != 1:
            hit = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self._seen, hit, logits)
        if p.frequency_penalty != 0:
            logits = logits - p.frequency_penalty * self._counts
        if p.presence_penalty != 0:
            logits = logits - p.presence_penalty * (self._counts > 0).to(logits.dtype)
        return logits

    def _draw(self, scores: torch.Tensor) -> torch.Tensor:
        """The token (a 1-element tensor on the logits' device) from penalised logits [V]."""
        p = self.params
        if p.temperature == 0:
            return torch.argmax(scores).view(1)
        scores = scores / p.temperature
        if p.top_k is not None and p.top_k < scores.shape[-1]:
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p is not None and p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
            drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= p.top_p  # keep the first past top_p
            scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
        probs = torch.softmax(scores, dim=-1)
        if p.min_p is not None and p.min_p > 0:
            # the ratio to the likeliest token is the same before and after renormalising
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        return torch.multinomial(probs, 1, generator=self._generator(probs.device))

    def __call__(self, logits: torch.Tensor, readback: Callable[..., list[Any]] | None = None) -> int:
        """Next token from float32 logits [V] on any device; one readback per call: `readback`
        (a ComputeDevice's, which counts it) given device logits, else `.tolist()`."""
        p = self.params
        read = readback or (lambda t: [t.tolist()])
        with torch.inference_mode():  # the history tensors are made and updated in it, always
            scores = self.penalised_logits(logits) if p.penalised else logits
            token = self._draw(scores)
            if p.penalised:
                assert self._counts is not None and self._seen is not None
                self._counts.index_add_(0, token, torch.ones(1, dtype=self._counts.dtype, device=token.device))
                self._seen[token] = True
            if p.logprobs is None:
                return int(read(token)[0][0])
            raw = torch.log_softmax(logits.double(), dim=-1)
            top = torch.topk(raw, min(p.logprobs, raw.shape[-1]))
            # ids travel as float64 (exact below 2**53) so token and logprobs are one readback
            (packed,) = read(torch.cat([token.double(), raw[token], top.indices.double(), top.values]))
        k = len(top.indices)
        chosen = int(packed[0])
        self.last = TokenLogprob(chosen, packed[1], [(int(i), v) for i, v in zip(packed[2:2 + k], packed[2 + k:],
                                                                                   strict=True)])
        return chosen
