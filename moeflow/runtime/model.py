"""The resident (non-expert) part of a model: embeddings, attention, norms, routers, dense and shared MLPs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeflow.models.base import Arch
from moeflow.models.checkpoint import Checkpoint
from moeflow.runtime.layers import GQAAttention, MLAAttention
from moeflow.runtime.rope import Rotary
from moeflow.runtime.router import Router


@dataclass
class SharedMLP:
    """A dense SiLU MLP: a dense layer's FFN or an MoE layer's shared expert (optionally gated)."""

    gate_up: torch.Tensor  # [2I, H]
    down: torch.Tensor  # [H, I]
    gate: torch.Tensor | None = None  # [1, H]: Qwen2-MoE scales the output by sigmoid(x @ gate)

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes

    def to(self, device: torch.device) -> SharedMLP:
        self.gate_up, self.down = self.gate_up.to(device), self.down.to(device)
        self.gate = self.gate.to(device) if self.gate is not None else None
        return self


@dataclass
class Layer:
    index: int
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    attention: GQAAttention | MLAAttention
    mlp: SharedMLP | None  # dense FFN (dense layers) or shared expert (sparse layers)
    router: Router | None  # None on dense layers


@dataclass
class DenseModel:
    arch: Arch
    dtype: torch.dtype
    embed: torch.Tensor  # [V, H]
    layers: list[Layer]
    final_norm: torch.Tensor
    lm_head: torch.Tensor  # [V, H]
    rotary: Rotary | None = None

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def to(self, device: torch.device) -> DenseModel:
        """Move every resident weight (and the rope tables) to `device`."""
        tied = self.lm_head is self.embed
        self.embed, self.final_norm = self.embed.to(device), self.final_norm.to(device)
        self.lm_head = self.embed if tied else self.lm_head.to(device)
        if self.rotary is not None:
            self.rotary.to(device)
        for layer in self.layers:
            layer.input_norm, layer.post_norm = layer.input_norm.to(device), layer.post_norm.to(device)
            layer.attention.to(device)
            if layer.mlp is not None:
                layer.mlp.to(device)
            if layer.router is not None:
                layer.router.to(device)
        return self


class _Loader:
    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype) -> None:
        self.ckpt = ckpt
        self.dtype = dtype

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        self.ckpt.expect_shape(name, shape)
        return self.ckpt.get(name, dtype or self.dtype).contiguous()

    def mlp(self, prefix: str, hidden: int, inter: int) -> SharedMLP:
        gate = self.get(f"{prefix}.gate_proj.weight", (inter, hidden))
        up = self.get(f"{prefix}.up_proj.weight", (inter, hidden))
        down = self.get(f"{prefix}.down_proj.weight", (hidden, inter))
        return SharedMLP(torch.cat([gate, up]).contiguous(), down)


def _gqa_weights(ld: _Loader, arch: Arch, p: str) -> dict[str, torch.Tensor]:
    s, h = arch.attention, arch.hidden_size
    q_out, kv_out = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    w = {
        "q_proj": ld.get(f"{p}.q_proj.weight", (q_out, h)),
        "k_proj": ld.get(f"{p}.k_proj.weight", (kv_out, h)),
        "v_proj": ld.get(f"{p}.v_proj.weight", (kv_out, h)),
        "o_proj": ld.get(f"{p}.o_proj.weight", (h, q_out)),
    }
    if s.qkv_bias:
        w["q_bias"] = ld.get(f"{p}.q_proj.bias", (q_out,))
        w["k_bias"] = ld.get(f"{p}.k_proj.bias", (kv_out,))
        w["v_bias"] = ld.get(f"{p}.v_proj.bias", (kv_out,))
    if s.o_bias:
        w["o_bias"] = ld.get(f"{p}.o_proj.bias", (h,))
    if s.qk_norm == "head":
        w["q_norm"] = ld.get(f"{p}.q_norm.weight", (s.head_dim,))
        w["k_norm"] = ld.get(f"{p}.k_norm.weight", (s.head_dim,))
    elif s.qk_norm == "proj":
        w["q_norm"] = ld.get(f"{p}.q_norm.weight", (q_out,))
        w["k_norm"] = ld.get(f"{p}.k_norm.weight", (kv_out,))
    return w


def _mla_weights(ld: _Loader, arch: Arch, p: str) -> dict[str, torch.Tensor]:
    s, h = arch.attention, arch.hidden_size
    q_out = s.num_heads * s.head_dim
    w: dict[str, torch.Tensor] = {}
    if s.q_lora_rank is None:
        w["q_proj"] = ld.get(f"{p}.q_proj.weight", (q_out, h))
    else:
        w["q_a_proj"] = ld.get(f"{p}.q_a_proj.weight", (s.q_lora_rank, h))
        w["q_a_layernorm"] = ld.get(f"{p}.q_a_layernorm.weight", (s.q_lora_rank,))
        w["q_b_proj"] = ld.get(f"{p}.q_b_proj.weight", (q_out, s.q_lora_rank))
        if s.qkv_bias:
            w["q_a_bias"] = ld.get(f"{p}.q_a_proj.bias", (s.q_lora_rank,))
    w["kv_a_proj_with_mqa"] = ld.get(f"{p}.kv_a_proj_with_mqa.weight", (s.kv_lora_rank + s.qk_rope_head_dim, h))
    if s.qkv_bias:
        w["kv_a_bias"] = ld.get(f"{p}.kv_a_proj_with_mqa.bias", (s.kv_lora_rank + s.qk_rope_head_dim,))
    w["kv_a_layernorm"] = ld.get(f"{p}.kv_a_layernorm.weight", (s.kv_lora_rank,))
    w["kv_b_proj"] = ld.get(
        f"{p}.kv_b_proj.weight", (s.num_heads * (s.qk_nope_head_dim + s.v_head_dim), s.kv_lora_rank)
    )
    w["o_proj"] = ld.get(f"{p}.o_proj.weight", (h, s.num_heads * s.v_head_dim))
    if s.o_bias:
        w["o_bias"] = ld.get(f"{p}.o_proj.bias", (h,))
    return w


def load_dense(ckpt: Checkpoint, arch: Arch, dtype: torch.dtype) -> DenseModel:
    """Load every non-expert weight into RAM in `dtype`, checking each shape against the config."""
    ld = _Loader(ckpt, dtype)
    h, v = arch.hidden_size, arch.vocab_size
    rotary = Rotary(arch.attention.rope, dtype)
    layers = []
    for i in range(arch.num_layers):
        p = f"model.layers.{i}"
        if arch.attention.kind == "mla":
            attention: GQAAttention | MLAAttention = MLAAttention(
                arch.attention, _mla_weights(ld, arch, f"{p}.self_attn"), rotary, arch.rms_norm_eps
            )
        else:
            attention = GQAAttention(
                arch.attention,
                _gqa_weights(ld, arch, f"{p}.self_attn"),
                rotary,
                arch.rms_norm_eps,
                arch.attention.sliding_window[i] if arch.attention.sliding_window else None,
            )
        router = None
        mlp = None
        if arch.sparse[i]:
            names = arch.naming
            bias = None
            if arch.router.correction_bias and names.correction_bias:
                bias = ld.get(names.correction_bias.format(layer=i), (arch.num_experts,), torch.float32)
            router = Router(arch.router, ld.get(names.router.format(layer=i), (arch.num_experts, h)), bias)
            if arch.shared is not None and names.shared_prefix:
                mlp = ld.mlp(names.shared_prefix.format(layer=i), h, arch.shared.intermediate)
                if arch.shared.gated and names.shared_gate:
                    mlp.gate = ld.get(names.shared_gate.format(layer=i), (1, h))
        else:
            mlp = ld.mlp(f"{p}.mlp", h, arch.dense_intermediate)
        layers.append(
            Layer(
                index=i,
                input_norm=ld.get(f"{p}.input_layernorm.weight", (h,)),
                post_norm=ld.get(f"{p}.post_attention_layernorm.weight", (h,)),
                attention=attention,
                mlp=mlp,
                router=router,
            )
        )
    embed = ld.get("model.embed_tokens.weight", (v, h))
    lm_head = embed if arch.tie_word_embeddings and not ckpt.has("lm_head.weight") else ld.get("lm_head.weight", (v, h))
    return DenseModel(arch, dtype, embed, layers, ld.get("model.norm.weight", (h,)), lm_head, rotary)
