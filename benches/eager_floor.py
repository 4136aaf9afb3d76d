"""The eager-PyTorch floor of a Mixtral decode step: the fewest torch calls that decode one token.

bench_overhead's third baseline. It is a real decoder over a transformers Mixtral model's own
weights (its greedy tokens are checked against transformers' in the same run), written the way
a hand-tuned eager implementation would be, with no engine around it: no expert cache, no
scheduler, no stats, weights pre-arranged once (q/k/v stacked, down projections transposed),
one host read per layer for the router's choice (as any MoE decoder on a GPU needs), rope as
one addcmul, the expert's down projection and its combine weight fused into one addmm onto the
residual. Its time per layer is what eager torch costs on this machine for this shape: how far
moeflow is from it is the engine's own overhead, and no eager engine goes below it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


class EagerMixtral:
    """Greedy one-token-at-a-time decoding of a transformers Mixtral model, float32, one sequence."""

    def __init__(self, hf: Any, max_len: int = 512) -> None:
        c = hf.config
        self.h = c.hidden_size
        self.n, self.kv = c.num_attention_heads, c.num_key_value_heads
        self.d = getattr(c, "head_dim", None) or self.h // self.n
        self.top_k = c.num_experts_per_tok
        self.eps = c.rms_norm_eps
        params = getattr(c, "rope_parameters", None) or {}
        theta = params.get("rope_theta", getattr(c, "rope_theta", 10000.0))
        self.scale = self.d ** -0.5
        with torch.no_grad():
            self.embed = hf.model.embed_tokens.weight.detach().clone()
            self.final_norm = hf.model.norm.weight.detach().clone()
            self.lm_head = hf.lm_head.weight.detach().clone()
            self.layers = []
            for layer in hf.model.layers:
                a, m = layer.self_attn, layer.mlp
                self.layers.append(dict(
                    norm1=layer.input_layernorm.weight.detach().clone(),
                    norm2=layer.post_attention_layernorm.weight.detach().clone(),
                    qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach().clone(),
                    o_t=a.o_proj.weight.detach().t().contiguous(),
                    router=m.gate.weight.detach().clone(),
                    gate_up=[w.clone() for w in m.experts.gate_up_proj.detach()],  # [2I, H] each
                    down_t=[w.t().contiguous() for w in m.experts.down_proj.detach()],  # [I, H] each
                    cache=torch.zeros(2 * self.kv, max_len, self.d),
                ))
        # Half-split rope as out = x * cos + swap_halves(x) * sin_signed, per position [P, 1, D].
        inv = 1.0 / (theta ** (torch.arange(0, self.d, 2, dtype=torch.float32) / self.d))
        ang = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
        ang = torch.cat((ang, ang), dim=-1)
        half = self.d // 2
        sign = torch.cat((-torch.ones(half), torch.ones(half)))
        self.cos = ang.cos()[:, None, :]
        self.sin = (ang.sin() * sign)[:, None, :]

    def _layer(self, w: dict[str, Any], x: torch.Tensor, pos: int) -> torch.Tensor:
        n, kv, d = self.n, self.kv, self.d
        h = F.rms_norm(x, (self.h,), w["norm1"], self.eps)
        qkv = F.linear(h, w["qkv"]).view(-1, 1, d)  # [N+2KV, 1, D]
        rot_heads = n + kv
        c = self.cos[pos]
        s = self.sin[pos]
        qk = qkv[:rot_heads]
        qk = torch.addcmul(qk * c, qk.view(rot_heads, 1, 2, d // 2).flip(-2).view(rot_heads, 1, d), s)
        w["cache"][:kv, pos] = qk[n:, 0]
        w["cache"][kv:, pos] = qkv[rot_heads:, 0]
        keys, values = w["cache"][:, : pos + 1].split(kv)
        out = F.scaled_dot_product_attention(qk[:n], keys, values, scale=self.scale, enable_gqa=n != kv)
        x = torch.addmm(x, out.view(1, -1), w["o_t"])
        h = F.rms_norm(x, (self.h,), w["norm2"], self.eps)
        probs = torch.softmax(F.linear(h, w["router"]), dim=-1)
        top, ids = torch.topk(probs, self.top_k)
        both = torch.cat((ids.to(top.dtype), top / top.sum(-1, keepdim=True)), dim=-1).tolist()[0]  # one read
        for j in range(self.top_k):
            e = int(both[j])
            gate, up = F.linear(h, w["gate_up"][e]).chunk(2, dim=-1)
            x = torch.addmm(x, F.silu(gate).mul_(up), w["down_t"][e], alpha=both[self.top_k + j])
        return x

    @torch.inference_mode()
    def generate(self, prompt: list[int], new_tokens: int,
                 clock: Callable[[], object] = time.perf_counter) -> tuple[list[int], list[object]]:
        """Greedy tokens after `prompt` (fed one token at a time, from position 0) and clock()
        taken as each was read back."""
        tokens: list[int] = []
        times: list[object] = []
        token = prompt[0]
        self.first_logits: torch.Tensor | None = None
        for pos in range(len(prompt) + new_tokens - 1):
            x = self.embed[token].view(1, -1)
            for w in self.layers:
                x = self._layer(w, x, pos)
            if pos + 1 < len(prompt):
                token = prompt[pos + 1]
                continue
            logits = F.linear(F.rms_norm(x, (self.h,), self.final_norm, self.eps), self.lm_head)
            if self.first_logits is None:
                self.first_logits = logits[0].clone()
            token = int(logits.argmax())
            tokens.append(token)
            times.append(clock())
        return tokens, times
