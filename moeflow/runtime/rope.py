"""Rotary position embeddings: default, linear, llama3 and yarn scaling, half or interleaved pairs."""

from __future__ import annotations

import math

import torch

from moeflow.models.base import RopeSpec, yarn_mscale
from moeflow.runtime import cpu_ops


def inverse_frequencies(spec: RopeSpec) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2], attention_factor) as transformers computes them for each rope type."""
    dim, base, p = spec.dim, spec.theta, spec.params
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
    if spec.kind == "default":
        return inv_freq, 1.0
    if spec.kind == "linear":
        return inv_freq / p["factor"], 1.0
    if spec.kind == "llama3":
        return _llama3(inv_freq, p), 1.0
    if spec.kind == "longrope":  # transformers' expression (factors times the power), and its mscale on cos/sin
        shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (torch.tensor(spec.ext_factors, dtype=torch.float32) * base**shape), p["mscale"]
    return _yarn(spec)


def _llama3(inv_freq: torch.Tensor, p: dict[str, float]) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(spec: RopeSpec) -> tuple[torch.Tensor, float]:
    dim, base, p = spec.dim, spec.theta, spec.params
    factor = p["factor"]
    original = p["original_max_position_embeddings"]
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = yarn_mscale(factor, p["mscale"]) / yarn_mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = p.get("beta_fast") or 32.0
    beta_slow = p.get("beta_slow") or 1.0

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", 1.0):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(torch.float) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


class Rotary:
    """cos/sin tables grown on demand. Stored [positions, 2, dim/2] as (cos, cos) and (-sin, sin),
    so a rotation is one multiply-add: x * cos + swap(x) * sin, where swap exchanges the two
    members of every pair (a roll by dim/2 for half-split pairs, a flip for interleaved ones)."""

    def __init__(self, spec: RopeSpec, dtype: torch.dtype) -> None:
        self.spec = spec
        self.dtype = dtype
        self.device = torch.device("cpu")
        self.half = spec.dim // 2
        self.inv_freq, self.attention_factor = inverse_frequencies(spec)
        self._cos = torch.empty(0, 2, self.half, dtype=dtype)
        self._sin = torch.empty(0, 2, self.half, dtype=dtype)
        # Every layer of a step asks for the same positions: the tables are sliced once per step.
        self._step: dict[tuple[int, int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def to(self, device: torch.device) -> Rotary:
        self.device = device
        self.inv_freq = self.inv_freq.to(device)
        self._cos, self._sin = self._cos.to(device), self._sin.to(device)
        self._step = {}
        return self

    def _grow(self, length: int) -> None:
        # Built where they are used (as transformers does), never on the CPU and then copied.
        n = max(length, 2 * self._cos.shape[0], 64)
        freqs = torch.arange(n, dtype=torch.float32, device=self.device)[:, None] * self.inv_freq[None, :].float()
        cos = (freqs.cos() * self.attention_factor).to(self.dtype)
        sin = (freqs.sin() * self.attention_factor).to(self.dtype)
        self._cos = torch.stack((cos, cos), dim=1)
        self._sin = torch.stack((-sin, sin), dim=1)  # negation is exact: x1*c + x2*(-s) == x1*c - x2*s
        self._step = {}

    def _cached(self, key: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        found = self._step.get(key)
        if found is None and len(self._step) >= 8:  # keep only the current step's few entries
            self._step.clear()
        return found

    def tables(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of positions [start, start+length): [length, dim] for half-split pairs (the
        layout of x's last dim), [length, 2, dim/2] for interleaved ones."""
        key = (start, length, 0, 0)
        found = self._cached(key)
        if found is not None:
            return found
        if start + length > self._cos.shape[0]:
            self._grow(start + length)
        cos, sin = self._cos[start : start + length], self._sin[start : start + length]
        if not self.spec.interleaved:
            cos, sin = cos.flatten(1), sin.flatten(1)
        self._step[key] = (cos, sin)
        return cos, sin

    def decode_tables(self, position: int, rotated: int, passed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [rotated + passed, 1, dim] of one position for half-split pairs: the first
        `rotated` heads rotate, the last `passed` get cos 1 and sin 0 and come out of `apply`
        unchanged, so a layer's q, k and v go through one multiply-add (v is not rotated)."""
        key = (position, 1, rotated, passed)
        found = self._cached(key)
        if found is not None:
            return found
        cos, sin = self.tables(position, 1)  # [1, dim]
        keep = torch.ones(passed, 1, self.spec.dim, dtype=cos.dtype, device=cos.device)
        tables = (torch.cat((cos.expand(rotated, 1, -1), keep)), torch.cat((sin.expand(rotated, 1, -1), keep * 0)))
        self._step[key] = tables
        return tables

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [..., T, dim] with tables of its T positions. Interleaved pairs come out
        de-interleaved (real parts, then imaginary); q and k get the same permutation, so their
        dot products are unchanged. Bit-identical to x1*cos - x2*sin, x2*cos + x1*sin. A head wider
        than the tables (partial rotary, GLM) rotates its first spec.dim dims and passes the rest
        (`decode_tables`' identity rows then leave v whole too)."""
        if x.shape[-1] > self.spec.dim:
            rot, rest = x.split((self.spec.dim, x.shape[-1] - self.spec.dim), dim=-1)
            return torch.cat((self.apply(rot, cos, sin), rest), dim=-1)
        if self.spec.interleaved:
            pairs = x.unflatten(-1, (self.half, 2)).transpose(-1, -2)  # [..., T, 2, dim/2]
            return (pairs * cos + pairs.flip(-2) * sin).flatten(-2)
        rotated = cpu_ops.rotate_half(x, cos, sin)  # one call on the CPU where x and the tables match
        if rotated is not None:
            return rotated
        return x * cos + x.roll(self.half, -1) * sin
