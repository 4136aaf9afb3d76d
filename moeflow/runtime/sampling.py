"""Choosing the next token: greedy, or temperature sampling with top-k / top-p and a seed."""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass

import torch

from moeflow.errors import InvalidRequest

SEED_RANGE = (-(1 << 63), 1 << 64)  # what torch.Generator.manual_seed takes: any 64-bit pattern


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
    value is refused before the request computes anything."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Per-request sampler with its own generator, so concurrent requests stay reproducible.
    It samples where the logits are: the generator is made on their device at the first draw
    (torch.multinomial refuses a generator of another device)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator: torch.Generator | None = None

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device)
            if self.params.seed is not None:
                self.generator.manual_seed(self.params.seed)
            else:
                self.generator.seed()
        return self.generator

    def __call__(self, logits: torch.Tensor) -> int:
        """Next token from float32 logits [V] on any device; the int is the step's one readback."""
        p = self.params
        if p.greedy:
            return int(torch.argmax(logits))
        scores = logits / p.temperature
        if p.top_k is not None and p.top_k < scores.shape[-1]:
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p is not None and p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
            drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= p.top_p  # keep the first past top_p
            scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator(probs.device)))
