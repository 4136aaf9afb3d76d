"""Choosing the next token: greedy, or temperature sampling with top-k / top-p and a seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeflow.errors import InvalidRequest


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise InvalidRequest(f"temperature={self.temperature!r}: must be >= 0")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k <= 0):
            raise InvalidRequest(f"top_k={self.top_k!r}: must be a positive integer")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise InvalidRequest(f"top_p={self.top_p!r}: must be in (0, 1]")

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
