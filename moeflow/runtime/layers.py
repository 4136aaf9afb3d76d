"""Dense building blocks: RMSNorm, GQA and MLA attention with their KV caches, the SiLU MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moeflow.models.base import AttentionSpec
from moeflow.runtime import cpu_ops
from moeflow.runtime.cpu_bf16 import linear
from moeflow.runtime.rope import Rotary

# Shape legend: T = new tokens, S = cached + new tokens, H = hidden, N = heads, D = head dim.


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm over the last dim of x [..., D]: normalize in float32, cast back,
    then scale by weight [D] (or any [..., D] that broadcasts: one call for several norms). One
    F.rms_norm call (one kernel on a GPU): in float32 it is the same arithmetic; at lower
    precision transformers rounds the normalized x before scaling, so the weight multiplies after
    the cast. On the CPU, one call of moeflow's kernel gives the same bits (runtime/cpu_ops.py)."""
    if (cpu_ops.NATIVE and weight.dim() == 1 and x.is_cpu and x.dtype in cpu_ops.DTYPES
            and weight.dtype in cpu_ops.DTYPES):
        return cpu_ops.norm_rows(x, weight, eps)
    if weight.dim() == 1 and x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """A decoder norm: RMSNorm, or where the family's norms carry a bias (Arch.norm "layernorm",
    Phi-3.5-MoE) transformers' nn.LayerNorm, which is exactly F.layer_norm in the input's dtype."""
    if bias is None:
        return rms_norm(x, weight, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def silu_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with gate and up stacked in one [2I, H] matrix."""
    gate, up = linear(x, gate_up).chunk(2, dim=-1)
    return linear(F.silu(gate).mul_(up), down)  # in place on silu's own output: one allocation fewer


class KVCache:
    """One sequence's cache for one layer: preallocated [.., capacity, ..] buffers grown by doubling."""

    def __init__(
        self, shapes: tuple[tuple[int, ...], ...], dtype: torch.dtype, seq_dim: int, device: torch.device | None = None
    ) -> None:
        self.shapes = shapes
        self.dtype = dtype
        self.device = device or torch.device("cpu")
        self.seq_dim = seq_dim
        self.length = 0
        self.buffers: list[torch.Tensor] = []
        self.capacity = 0  # positions the buffers hold
        self._lead = (slice(None),) * seq_dim  # index prefix up to seq_dim

    def append(self, *parts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store parts (each with T new positions along seq_dim); return views of all S positions."""
        need = self.length + parts[0].shape[self.seq_dim]
        if need > self.capacity:
            self._grow(need)
        new, upto = self._lead + (slice(self.length, need),), self._lead + (slice(0, need),)
        for buf, part in zip(self.buffers, parts, strict=True):
            buf[new] = part  # one slice write per part, no per-step allocation
        self.length = need
        return tuple([buf[upto] for buf in self.buffers])

    def reserve(self, positions: int) -> None:
        """Hold buffers for exactly `positions` positions now (no doubling later up to them):
        what the engine admitted a sequence for is what its cache occupies."""
        if positions > self.capacity:
            self._grow(positions, exact=True)

    @property
    def bytes_per_position(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes) * self.dtype.itemsize

    def _grow(self, need: int, exact: bool = False) -> None:
        capacity = need if exact else max(need, 2 * self.capacity, 64)
        grown = []
        for i, shape in enumerate(self.shapes):
            full = list(shape)
            full.insert(self.seq_dim, capacity)
            buf = torch.empty(full, dtype=self.dtype, device=self.device)
            if self.buffers:
                buf.narrow(self.seq_dim, 0, self.length).copy_(self.buffers[i].narrow(self.seq_dim, 0, self.length))
            grown.append(buf)
        self.buffers, self.capacity = grown, capacity


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
           scale: float) -> torch.Tensor:
    """Attention of q [N, T, D] over keys/values [KV, S, D*] (N a multiple of KV: query head h
    reads kv head h // (N / KV)); returns [N, T, Dv]. One SDPA call, decode included: in float32
    on the CPU it beats a matmul-softmax-matmul chain ~2x at one query token."""
    out_dtype = q.dtype
    if q.device.type == "cpu":
        # Small attention products in bf16/fp16 go through oneDNN, which builds a new primitive
        # for every new key length (every decode step): ~1 ms each. fp32 takes another path.
        if q.dtype != torch.float32:
            q = q.float()
        if keys.dtype != torch.float32:
            keys, values = keys.float(), values.float()
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, scale=scale, enable_gqa=q.shape[0] != keys.shape[0]
    )
    return out if out.dtype == out_dtype else out.to(out_dtype)


def attend_with_sinks(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                      scale: float, sinks: torch.Tensor) -> torch.Tensor:
    """`attend` with GPT-OSS's sinks [N]: each head's learned logit joins its softmax over the
    keys and is dropped after it (transformers' eager_attention_forward; SDPA has no such term)."""
    out_dtype, n = q.dtype, q.shape[0]
    q = q.to(keys.dtype)
    if n != keys.shape[0]:
        keys, values = keys.repeat_interleave(n // keys.shape[0], 0), values.repeat_interleave(n // keys.shape[0], 0)
    scores = torch.matmul(q, keys.transpose(1, 2)) * scale  # [N, T, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.to(scores.dtype).view(n, 1, 1).expand(n, scores.shape[1], 1)
    logits = torch.cat((scores, sink), dim=-1)
    logits = logits - logits.amax(dim=-1, keepdim=True)
    probs = torch.softmax(logits, dim=-1)[..., :-1]
    return torch.matmul(probs.to(values.dtype), values).to(out_dtype)


def cache_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """KV caches on the CPU hold float32 (the same bf16/fp16-rounded values, exactly), so decode
    attention never converts the whole cache per step (see `attend`)."""
    return torch.float32 if device.type == "cpu" else dtype


def _move(obj: object, names: tuple[str, ...], device: torch.device) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, torch.Tensor):
            setattr(obj, name, value.to(device))


def attention_mask(start: int, t: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean [T, S] mask (True = attend) on `device` for queries at positions start..start+T-1;
    None when all attend."""
    s = start + t
    if t == 1 and (window is None or s <= window):
        return None
    q_pos = torch.arange(start, s, device=device)[:, None]
    k_pos = torch.arange(s, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= (q_pos - k_pos) < window
    return allowed


class GQAAttention:
    """Grouped-query attention (Mixtral, Qwen, OLMoE) with optional q/k norm and clipping.

    q, k and v come from one product over weights concatenated at load and stay side by side
    (heads q..., k..., v...): one norm serves q and k, one rotation q and k (and, decoding one
    token, v too, with identity tables), and the cache holds k and v heads in one buffer
    [2*KV, S, D], written with one slice assignment."""

    def __init__(self, spec: AttentionSpec, w: dict[str, torch.Tensor], rotary: Rotary, eps: float, window: int | None):
        self.spec = spec
        self.rotary = rotary
        self.eps = eps
        self.window = window
        n, kv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.qkv = torch.cat([w["q_proj"], w["k_proj"], w["v_proj"]])
        self.qkv_bias = torch.cat([w["q_bias"], w["k_bias"], w["v_bias"]]) if "q_bias" in w else None
        self.o_proj = w["o_proj"]
        self.o_bias = w.get("o_bias")
        self.sinks = w.get("sinks")  # GPT-OSS [N]
        self.heads = n + kv  # rotated heads: q and k
        self.qk_v = ((n + kv) * d, kv * d)
        self.q_k = (n, kv)
        self.q_kv = (n, 2 * kv)
        self.kv_kv = (kv, kv)
        # One token with half-split rope and no per-head norm: q, k, v rotate as one block.
        self.one_block = not rotary.spec.interleaved and spec.qk_norm != "head"
        # qk_norm weights shaped to broadcast over the q/k block: "head" [N+KV, 1, D]; "proj"
        # [2, N*D] when q and k projections are as wide (OLMoE), else (q [N*D], k [KV*D]).
        self.qk_norm: torch.Tensor | None = None
        self.q_norm: torch.Tensor | None = None
        self.k_norm: torch.Tensor | None = None
        if spec.qk_norm == "head":  # [N+KV, 1, D]: broadcast over the [N+KV, T, D] block
            self.qk_norm = torch.cat([w["q_norm"].expand(n, 1, d), w["k_norm"].expand(kv, 1, d)])
        elif spec.qk_norm == "proj" and n == kv:
            self.qk_norm = torch.stack([w["q_norm"], w["k_norm"]])
        elif spec.qk_norm == "proj":
            self.q_norm, self.k_norm = w["q_norm"], w["k_norm"]

    def new_cache(self, dtype: torch.dtype) -> KVCache:
        s, device = self.spec, self.o_proj.device
        return KVCache(((2 * s.num_kv_heads, s.head_dim),), cache_dtype(dtype, device), seq_dim=1, device=device)

    def to(self, device: torch.device) -> GQAAttention:
        _move(self, ("qkv", "qkv_bias", "o_proj", "o_bias", "qk_norm", "q_norm", "k_norm", "sinks"), device)
        return self

    def _proj_norm_and_clip(self, qkv: torch.Tensor) -> torch.Tensor:
        """OLMoE: norms over the whole q and k projections of qkv [T, (N+2KV)*D], then clipping
        of q, k and v (transformers' order)."""
        s, t = self.spec, qkv.shape[0]
        if s.qk_norm == "proj":
            qk, v = qkv.split(self.qk_v, dim=-1)
            if self.qk_norm is not None:
                qk = rms_norm(qk.view(t, 2, -1), self.qk_norm, self.eps).view(t, -1)
            else:
                assert self.q_norm is not None and self.k_norm is not None
                q, k = qk.split((self.q_norm.shape[0], self.k_norm.shape[0]), dim=-1)
                qk = torch.cat((rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)), dim=-1)
            qkv = torch.cat((qk, v), dim=-1)
            if s.clip_qkv is not None:
                qkv.clamp_(-s.clip_qkv, s.clip_qkv)  # a fresh tensor: clip in place
            return qkv
        assert s.clip_qkv is not None
        return qkv.clamp(-s.clip_qkv, s.clip_qkv)

    def _rotate(self, qkv: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(q [N, T, D] rotated, k and v heads [2*KV, T, D], k rotated) from qkv [T, (N+2KV)*D]."""
        s, t = self.spec, qkv.shape[0]
        if t == 1 and self.one_block:  # one token's [1, heads * D] is already [heads, 1, D]
            cos, sin = self.rotary.decode_tables(start, self.heads, s.num_kv_heads)
            # split_with_sizes: Tensor.split is a Python wrapper over it (~3 us of ~5 at decode sizes)
            q, kv = self.rotary.apply(qkv.view(-1, 1, s.head_dim), cos, sin).split_with_sizes(self.q_kv)
            return q, kv
        qk, v = qkv.split(self.qk_v, dim=-1)
        qk = qk.view(t, self.heads, s.head_dim).transpose(0, 1)  # [N+KV, T, D]
        v = v.view(t, s.num_kv_heads, s.head_dim).transpose(0, 1)  # [KV, T, D]
        if self.qk_norm is not None and s.qk_norm == "head":
            qk = rms_norm(qk, self.qk_norm, self.eps)
        cos, sin = self.rotary.tables(start, t)
        q, k = self.rotary.apply(qk, cos, sin).split(self.q_k)
        return q, torch.cat((k, v))

    def __call__(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self.output(self.core(self.project(x), cache))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """q, k and v of x [T, H] (one product for the tokens of every sequence of a step), with
        OLMoE's norms and clipping: [T, (N+2KV)*D]."""
        qkv = linear(x, self.qkv, self.qkv_bias)
        if self.spec.qk_norm == "proj" or self.spec.clip_qkv is not None:
            qkv = self._proj_norm_and_clip(qkv)
        return qkv

    def core(self, qkv: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One sequence's attention: rotate its rows of `project`, append k and v to its cache,
        attend; [T, N*D] for `output`."""
        s = self.spec
        t = qkv.shape[0]
        start = cache.length
        q, kv = self._rotate(qkv, start)
        (cached,) = cache.append(kv)  # [2*KV, S, D]
        keys, values = cached.split_with_sizes(self.kv_kv)
        mask = attention_mask(start, t, self.window, qkv.device)
        if self.sinks is not None:
            out = attend_with_sinks(q, keys, values, mask, s.scaling, self.sinks)
        else:
            out = attend(q, keys, values, mask, s.scaling)  # [N, T, D]
        # One token's [N, 1, D] is already laid out as [1, N*D].
        return out.view(1, -1) if t == 1 else out.transpose(0, 1).reshape(t, -1)

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """The output projection of `core`'s rows (of every sequence of a step at once)."""
        return linear(out, self.o_proj, self.o_bias)


class MLAAttention:
    """DeepSeek multi-head latent attention; the cache keeps the compressed latent and the rope key."""

    def __init__(self, spec: AttentionSpec, w: dict[str, torch.Tensor], rotary: Rotary, eps: float):
        self.spec = spec
        self.rotary = rotary
        self.eps = eps
        self.w = w

    def new_cache(self, dtype: torch.dtype) -> KVCache:
        s = self.spec
        return KVCache(((s.kv_lora_rank,), (s.qk_rope_head_dim,)), dtype, seq_dim=0, device=self.w["o_proj"].device)

    def to(self, device: torch.device) -> MLAAttention:
        self.w = {k: v.to(device) for k, v in self.w.items()}
        return self

    def __call__(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        s, w = self.spec, self.w
        t = x.shape[0]
        start = cache.length
        if s.q_lora_rank is None:
            q = linear(x, w["q_proj"])
        else:
            q_a = rms_norm(linear(x, w["q_a_proj"], w.get("q_a_bias")), w["q_a_layernorm"], 1e-6)
            q = linear(q_a, w["q_b_proj"])
        q = q.view(t, s.num_heads, s.head_dim).transpose(0, 1)  # [N, T, nope+rope]
        q_nope, q_rot = q.split((s.qk_nope_head_dim, s.qk_rope_head_dim), dim=-1)
        compressed = linear(x, w["kv_a_proj_with_mqa"], w.get("kv_a_bias"))
        latent, k_rot = compressed.split((s.kv_lora_rank, s.qk_rope_head_dim), dim=-1)
        latent = rms_norm(latent, w["kv_a_layernorm"], 1e-6)
        cos, sin = self.rotary.tables(start, t)
        # q's heads and the one shared rope key rotate together: [N+1, T, rope]
        rotated = self.rotary.apply(torch.cat((q_rot, k_rot.unsqueeze(0))), cos, sin)
        q_rot, k_rot = rotated.split((s.num_heads, 1))
        latents, k_rots = cache.append(latent, k_rot[0])  # [S, rank], [S, rope]
        total = latents.shape[0]
        kv = linear(latents, w["kv_b_proj"]).view(total, s.num_heads, s.qk_nope_head_dim + s.v_head_dim)
        k_nope, values = kv.transpose(0, 1).split((s.qk_nope_head_dim, s.v_head_dim), dim=-1)
        keys = torch.cat((k_nope, k_rots.unsqueeze(0).expand(s.num_heads, -1, -1)), dim=-1)
        query = torch.cat((q_nope, q_rot), dim=-1)
        out = attend(query, keys, values, attention_mask(start, t, None, x.device), s.scaling)  # [N, T, v]
        out = out.view(1, -1) if t == 1 else out.transpose(0, 1).reshape(t, -1)
        return linear(out, w["o_proj"], w.get("o_bias"))
