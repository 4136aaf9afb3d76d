"""Llama-4 text attention: grouped-query attention whose layers differ by position handling.

RoPE layers rotate q and k (complex, interleaved pairs), L2-normalize every q/k head after the
rotation (use_qk_norm) and attend only within their chunk of attention_chunk_size positions.
NoPE layers (no_rope_layers[i] == 0) neither rotate nor normalize; they attend to every earlier
position, and attn_temperature_tuning scales their queries by a factor that grows with the
position: log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1. As transformers'
Llama4TextAttention computes it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeflow.models.base import AttentionSpec
from moeflow.runtime.layers import GQAAttention, KVCache, attend, attention_mask
from moeflow.runtime.rope import Rotary

# Shape legend: T = new tokens, S = cached + new tokens, N = heads, KV = kv heads, D = head dim.


def chunked_mask(start: int, t: int, first_key: int, chunk: int, device: torch.device) -> torch.Tensor | None:
    """Boolean [T, S - first_key] mask (True = attend) for queries at start..start+T-1 over keys
    first_key..start+T-1: causal and within the query's chunk. None when all attend (one query
    whose chunk begins at first_key)."""
    s = start + t
    if t == 1 and start // chunk * chunk == first_key:
        return None
    q_pos = torch.arange(start, s, device=device)[:, None]
    k_pos = torch.arange(first_key, s, device=device)[None, :]
    return (k_pos <= q_pos) & (k_pos // chunk == q_pos // chunk)


class Llama4Attention(GQAAttention):
    """GQAAttention with Llama-4's per-layer position handling (see the module docstring)."""

    def __init__(self, spec: AttentionSpec, w: dict[str, torch.Tensor], rotary: Rotary, eps: float, layer: int):
        super().__init__(spec, w, rotary, eps, None)
        self.rope = spec.rope_layers[layer] if spec.rope_layers else True
        self.chunk = spec.chunked[layer] if spec.chunked else None
        self.l2_norm = spec.qk_l2_norm and self.rope
        self.temperature = spec.temperature_tuning if not self.rope else None
        self.one_block = False  # always `_rotate` below: NoPE layers and the L2 norm break the one-block decode

    def _rotate(self, qkv: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(q [N, T, D], k and v heads [2*KV, T, D]) from qkv [T, (N+2KV)*D], in transformers'
        order: rope, then the L2 norm (rope layers); the temperature scale (NoPE layers)."""
        s, t = self.spec, qkv.shape[0]
        qk, v = qkv.split(self.qk_v, dim=-1)
        qk = qk.view(t, self.heads, s.head_dim).transpose(0, 1)  # [N+KV, T, D]
        v = v.view(t, s.num_kv_heads, s.head_dim).transpose(0, 1)  # [KV, T, D]
        if self.rope:
            cos, sin = self.rotary.tables(start, t)
            qk = self.rotary.apply(qk, cos, sin)
            if self.l2_norm:  # over each whole head: the de-interleaved rope layout sums the same squares
                qk = F.rms_norm(qk.float(), (s.head_dim,), None, self.eps).to(qkv.dtype)
        q, k = qk.split(self.q_k)
        if self.temperature is not None:
            floor_scale, attn_scale = self.temperature
            positions = torch.arange(start, start + t, device=qkv.device, dtype=torch.float32)
            scales = torch.log1p(torch.floor((positions + 1.0) / floor_scale)) * attn_scale + 1.0  # [T]
            q = (q * scales[:, None]).to(qkv.dtype)
        return q, torch.cat((k, v))

    def core(self, qkv: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One sequence's attention; chunked layers read only the keys from the first query's
        chunk on (the cache keeps every position: the engine sizes it by the whole sequence)."""
        s = self.spec
        t = qkv.shape[0]
        start = cache.length
        q, kv = self._rotate(qkv, start)
        (cached,) = cache.append(kv)  # [2*KV, S, D]
        if self.chunk is None:
            mask = attention_mask(start, t, None, qkv.device)
        else:
            first = start // self.chunk * self.chunk
            cached = cached[:, first:]
            mask = chunked_mask(start, t, first, self.chunk, qkv.device)
        keys, values = cached.split(s.num_kv_heads)
        out = attend(q, keys, values, mask, s.scaling)  # [N, T, D]
        return out.view(1, -1) if t == 1 else out.transpose(0, 1).reshape(t, -1)
