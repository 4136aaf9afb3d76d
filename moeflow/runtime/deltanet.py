"""Gated DeltaNet linear attention (Qwen3-Next, Qwen3.5-MoE): the torch reference of the gated
delta rule and the layer that runs it, as transformers' Qwen3NextGatedDeltaNet computes it, and
the gated full attention of the layers between.

Per value head the state S [Dk, Dv] evolves per token t as
    S = exp(g_t) * S;  S = S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T q_t
with q, k L2-normalized (q also scaled by Dk^-0.5), g = -exp(A_log) * softplus(a + dt_bias) and
beta = sigmoid(b). A prompt runs in chunks of 64 (transformers' torch_chunk_gated_delta_rule: a
triangular solve per chunk, then one state update per chunk); a decode token runs one O(1) step
(torch_recurrent_gated_delta_rule). Before the rule, q, k and v pass a causal depthwise conv of
width K (SiLU after it), whose last K-1 inputs are the rest of the state. A sequence's state is
a fixed size whatever its length: `DeltaState` replaces a KV cache on these layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeflow.models.base import AttentionSpec, LinearAttentionSpec
from moeflow.runtime.cpu_bf16 import linear
from moeflow.runtime.layers import GQAAttention, KVCache
from moeflow.runtime.rope import Rotary

# Shape legend: T = new tokens, Hk / Hv = key / value heads, Dk / Dv = their dims, C = conv channels.

CHUNK = 64  # transformers' chunk_size


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor
             ) -> tuple[torch.Tensor, ...]:
    """q, k [T, Hk, Dk], v [T, Hv, Dv], g, beta [T, Hv] -> float32 [Hv, T, ...] with q and k
    repeated over their value heads (head h reads key head h // (Hv / Hk)), L2-normalized, q scaled."""
    hk, hv = k.shape[1], v.shape[1]
    if hk != hv:
        q, k = q.repeat_interleave(hv // hk, dim=1), k.repeat_interleave(hv // hk, dim=1)
    q, k, v, g, beta = (x.transpose(0, 1).float().contiguous() for x in (q, k, v, g, beta))
    # transformers' l2norm (as the FLA library): x * rsqrt(sum(x^2) + 1e-6), in float32
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    return q * q.shape[-1] ** -0.5, k, v, g, beta


def recurrent_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               beta: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token: (out [T, Hv, Dv] in v's dtype, new state [Hv, Dk, Dv] float32) from the
    state before these tokens. O(1) in the sequence length per token."""
    dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    out = torch.empty_like(v)  # [Hv, T, Dv]
    for t in range(v.shape[1]):
        state = state * g[:, t].exp()[:, None, None]
        k_t = k[:, t].unsqueeze(-1)  # [Hv, Dk, 1]
        remembered = (state * k_t).sum(dim=-2)  # [Hv, Dv]
        delta = (v[:, t] - remembered) * beta[:, t, None]
        state = state + k_t * delta.unsqueeze(-2)
        out[:, t] = (state * q[:, t].unsqueeze(-1)).sum(dim=-2)
    return out.transpose(0, 1).to(dtype), state


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                           beta: torch.Tensor, state: torch.Tensor, chunk: int = CHUNK
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same result as `recurrent_gated_delta_rule`, in chunks of `chunk` tokens (the
    sequence zero-padded to a whole number of them, as transformers does): within a chunk the
    delta-rule updates solve as one unit-triangular system (the UT transform), and the state is
    read and updated once per chunk."""
    dtype, length = v.dtype, v.shape[0]
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    pad = (chunk - length % chunk) % chunk
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    heads, n = v.shape[0], (length + pad) // chunk
    v_beta, k_beta = v * beta.unsqueeze(-1), k * beta.unsqueeze(-1)
    q, k, k_beta, v_beta = (x.reshape(heads, n, chunk, x.shape[-1]) for x in (q, k, k_beta, v_beta))
    decay = g.reshape(heads, n, chunk).cumsum(dim=-1)  # log of the decay from the chunk's start
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    # pairwise[i, j] = decay from position j to i of a chunk (i >= j); above the diagonal -inf -> 0
    pairwise = (decay.unsqueeze(-1) - decay.unsqueeze(-2)).masked_fill(upper, float("-inf")).exp()
    system = (k_beta @ k.transpose(-1, -2)) * pairwise
    intra = (q @ k.transpose(-1, -2)) * pairwise
    new_values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    k_decayed = torch.linalg.solve_triangular(system, k_beta * decay.exp().unsqueeze(-1), upper=False,
                                              unitriangular=True)
    state = state.float()
    out = torch.zeros_like(new_values)
    q = q * decay.exp().unsqueeze(-1)
    k = k * (decay[..., -1:] - decay).exp().unsqueeze(-1)
    chunk_decay = decay[..., -1].exp()[..., None, None]  # [Hv, n, 1, 1]
    for i in range(n):
        v_new = new_values[:, i] - k_decayed[:, i] @ state  # what the state does not already predict
        out[:, i] = q[:, i] @ state + intra[:, i] @ v_new
        state = state * chunk_decay[:, i] + k[:, i].transpose(-1, -2) @ v_new
    out = out.reshape(heads, -1, out.shape[-1])[:, :length]
    return out.transpose(0, 1).to(dtype), state


class DeltaState:
    """One sequence's state on one Gated DeltaNet layer, in place of a KV cache: the recurrent
    state [Hv, Dk, Dv] (float32, as transformers keeps it) and the conv inputs of the last K-1
    positions [C, K-1]. Its size never grows: `bytes_fixed` per sequence, nothing per position."""

    bytes_per_position = 0

    def __init__(self, spec: LinearAttentionSpec, dtype: torch.dtype, device: torch.device) -> None:
        s = spec
        self.recurrent = torch.zeros(s.num_v_heads, s.k_head_dim, s.v_head_dim, dtype=torch.float32, device=device)
        self.conv = torch.zeros(s.conv_channels, s.conv_kernel - 1, dtype=dtype, device=device)
        self.length = 0
        self.bytes_fixed = self.recurrent.nbytes + self.conv.nbytes

    def reserve(self, positions: int) -> None:
        """Nothing to do: the state was allocated whole at creation."""

    def free(self) -> None:
        """Drop the tensors (a finished or cancelled sequence); using the state after raises."""
        self.recurrent = self.conv = None  # type: ignore[assignment]


class GatedDeltaNet:
    """A Gated DeltaNet layer (transformers' Qwen3NextGatedDeltaNet) over one sequence's rows.

    Qwen3-Next's in_proj_qkvz holds, per key head, [q (Dk), k (Dk), v (r*Dv), z (r*Dv)] rows
    (r = Hv / Hk), and in_proj_ba per key head [b (r), a (r)]: regrouped at load into one matrix
    whose output is [q (all heads) | k | v | z | b | a], so the conv input q|k|v is one contiguous
    slice. Qwen3.5-MoE stores in_proj_qkv, in_proj_z, in_proj_b and in_proj_a in that order already."""

    def __init__(self, spec: LinearAttentionSpec, w: dict[str, torch.Tensor], eps: float) -> None:
        s = spec
        self.spec, self.eps = s, eps
        if "in_proj_qkv" in w:  # Qwen3.5-MoE
            self.in_proj = torch.cat([w["in_proj_qkv"], w["in_proj_z"], w["in_proj_b"], w["in_proj_a"]]).contiguous()
        else:
            r = s.num_v_heads // s.num_k_heads
            qkvz = w["in_proj_qkvz"].view(s.num_k_heads, 2 * s.k_head_dim + 2 * r * s.v_head_dim, -1)
            ba = w["in_proj_ba"].view(s.num_k_heads, 2 * r, -1)
            hidden = qkvz.shape[-1]
            parts = qkvz.split((s.k_head_dim, s.k_head_dim, r * s.v_head_dim, r * s.v_head_dim), dim=1)
            parts += ba.split((r, r), dim=1)
            self.in_proj = torch.cat([p.reshape(-1, hidden) for p in parts]).contiguous()
        self.conv = w["conv1d"].reshape(s.conv_channels, 1, s.conv_kernel).contiguous()  # depthwise, no bias
        self.dt_bias, self.a_log, self.norm, self.out_proj = w["dt_bias"], w["A_log"], w["norm"], w["out_proj"]
        key_dim, value_dim = s.num_k_heads * s.k_head_dim, s.num_v_heads * s.v_head_dim
        self.splits = (key_dim, key_dim, value_dim, value_dim, s.num_v_heads, s.num_v_heads)

    def new_cache(self, dtype: torch.dtype) -> DeltaState:
        return DeltaState(self.spec, dtype, self.out_proj.device)

    def to(self, device: torch.device) -> GatedDeltaNet:
        for name in ("in_proj", "conv", "dt_bias", "a_log", "norm", "out_proj"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def __call__(self, x: torch.Tensor, state: DeltaState) -> torch.Tensor:
        """x [T, H] of one sequence -> [T, H]; advances its state by T positions."""
        s, t = self.spec, x.shape[0]
        q, k, v, z, b, a = linear(x, self.in_proj).split(self.splits, dim=-1)
        mixed = torch.cat((state.conv, torch.cat((q, k, v), dim=-1).t()), dim=-1)  # [C, K-1+T]
        state.conv = mixed[:, t:].contiguous()  # the last K-1 inputs (mixed holds >= K-1 + T columns)
        mixed = F.silu(F.conv1d(mixed.unsqueeze(0), self.conv, groups=s.conv_channels)[0]).t()  # [T, C]
        q, k, v = mixed.split(self.splits[:3], dim=-1)
        beta = b.sigmoid()
        g = -self.a_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # float32 (fp16 A would overflow)
        shapes = ((t, s.num_k_heads, s.k_head_dim), (t, s.num_k_heads, s.k_head_dim), (t, s.num_v_heads, s.v_head_dim))
        q, k, v = (part.reshape(shape) for part, shape in zip((q, k, v), shapes, strict=True))
        # transformers: the one-token step once the layer has a state, the chunked rule otherwise
        rule = recurrent_gated_delta_rule if t == 1 and state.length else chunk_gated_delta_rule
        out, state.recurrent = rule(q, k, v, g, beta, state.recurrent)
        state.length += t
        return linear(self._gated_norm(out, z.reshape(t, s.num_v_heads, s.v_head_dim)).reshape(t, -1),
                        self.out_proj)

    def _gated_norm(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Qwen3NextRMSNormGated over each head's Dv: normalize in float32, cast, scale by the
        weight, times silu(gate) in float32, cast back."""
        dtype = x.dtype
        normed = self.norm * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(dtype)
        return (normed * F.silu(gate.float())).to(dtype)


class GatedAttention(GQAAttention):
    """Qwen3-Next's full attention: GQA whose q_proj yields, per head, the query and an output
    gate ([N, 2D] rows), per-head q/k norms scaled by (1 + weight), partial rotary, and the
    attention output times sigmoid(gate) before o_proj. The gate rows are moved behind v at load,
    so `project` gives [q | k | v | gate] and `core` (per sequence) gates its own rows."""

    def __init__(self, spec: AttentionSpec, w: dict[str, torch.Tensor], rotary: Rotary, eps: float) -> None:
        n, d = spec.num_heads, spec.head_dim
        rows = w["q_proj"].view(n, 2 * d, -1)
        query, gate = rows[:, :d].reshape(n * d, -1), rows[:, d:].reshape(n * d, -1)
        w = {**w, "q_proj": query, "q_norm": 1 + w["q_norm"], "k_norm": 1 + w["k_norm"]}
        super().__init__(spec, w, rotary, eps, None)
        self.qkv = torch.cat((self.qkv, gate)).contiguous()
        self.gate_width = n * d

    def core(self, qkv: torch.Tensor, cache: KVCache) -> torch.Tensor:
        qkv, gate = qkv.split((qkv.shape[-1] - self.gate_width, self.gate_width), dim=-1)
        return super().core(qkv, cache) * torch.sigmoid(gate)
