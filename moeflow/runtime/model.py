"""The resident (non-expert) part of a model: embeddings, attention, norms, routers, dense and shared MLPs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeflow.models.base import Arch
from moeflow.models.checkpoint import Checkpoint
from moeflow.models.tensors import HubTensor, MLPTensors, layer_tensors, model_tensors
from moeflow.runtime.deltanet import GatedAttention, GatedDeltaNet
from moeflow.runtime.layers import GQAAttention, MLAAttention
from moeflow.runtime.llama4_attention import Llama4Attention
from moeflow.runtime.rope import Rotary
from moeflow.runtime.router import Router
from moeflow.store.fp8 import read_weight


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
    input_norm_bias: torch.Tensor | None = None  # LayerNorm families (Phi-3.5-MoE); None: RMSNorm
    post_norm_bias: torch.Tensor | None = None


@dataclass
class DenseModel:
    arch: Arch
    dtype: torch.dtype
    embed: torch.Tensor  # [V, H]
    layers: list[Layer]
    final_norm: torch.Tensor
    lm_head: torch.Tensor  # [V, H]
    rotary: Rotary | None = None
    final_norm_bias: torch.Tensor | None = None  # LayerNorm families (Phi-3.5-MoE); None: RMSNorm
    lm_head_bias: torch.Tensor | None = None

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
        self.final_norm_bias = self.final_norm_bias.to(device) if self.final_norm_bias is not None else None
        self.lm_head_bias = self.lm_head_bias.to(device) if self.lm_head_bias is not None else None
        for layer in self.layers:
            layer.input_norm, layer.post_norm = layer.input_norm.to(device), layer.post_norm.to(device)
            if layer.input_norm_bias is not None and layer.post_norm_bias is not None:
                layer.input_norm_bias = layer.input_norm_bias.to(device)
                layer.post_norm_bias = layer.post_norm_bias.to(device)
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

    def get(self, tensor: HubTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        self.ckpt.expect_shape(tensor.name, tensor.shape)
        # an FP8 checkpoint's quantized weights are dequantized here (store/fp8.py), the rest read as stored
        return read_weight(self.ckpt, tensor.name, dtype or self.dtype).contiguous()

    def mlp(self, tensors: MLPTensors) -> SharedMLP:
        return SharedMLP(torch.cat([self.get(tensors.gate), self.get(tensors.up)]).contiguous(), self.get(tensors.down))


def load_dense(ckpt: Checkpoint, arch: Arch, dtype: torch.dtype) -> DenseModel:
    """Load every non-expert weight into RAM in `dtype`, checking each shape against the config."""
    ld = _Loader(ckpt, dtype)
    rotary = Rotary(arch.attention.rope, dtype)
    layers = []
    for i in range(arch.num_layers):
        names = layer_tensors(arch, i)
        weights = {key: ld.get(tensor) for key, tensor in names.attention.items()}
        if arch.attention.kind == "mla":
            attention: GQAAttention | MLAAttention = MLAAttention(arch.attention, weights, rotary, arch.rms_norm_eps)
        elif arch.linear_attention is not None and arch.linear_attention.layers[i]:  # Qwen3-Next
            attention = GatedDeltaNet(arch.linear_attention, weights, arch.rms_norm_eps)  # type: ignore[assignment]
        elif arch.attention.output_gate:  # Qwen3-Next's full attention
            attention = GatedAttention(arch.attention, weights, rotary, arch.rms_norm_eps)
        elif arch.attention.rope_layers or arch.attention.chunked or arch.attention.qk_l2_norm:  # Llama-4
            attention = Llama4Attention(arch.attention, weights, rotary, arch.rms_norm_eps, i)
        else:
            attention = GQAAttention(
                arch.attention,
                weights,
                rotary,
                arch.rms_norm_eps,
                arch.attention.sliding_window[i] if arch.attention.sliding_window else None,
            )
        router = None
        if names.router is not None:
            bias = ld.get(names.correction_bias, torch.float32) if names.correction_bias is not None else None
            gate_bias = ld.get(names.router_bias) if names.router_bias is not None else None  # GPT-OSS
            # DeepSeek and GLM: transformers keeps gate.weight in float32 at any dtype
            # (_keep_in_fp32_modules_strict), so it is read as stored, not rounded to the model's dtype
            weight = ld.get(names.router, torch.float32 if arch.router.fp32_logits else None)
            router = Router(arch.router, weight, bias, gate_bias)
        mlp = ld.mlp(names.mlp) if names.mlp is not None else None
        if mlp is not None and names.shared_gate is not None:
            mlp.gate = ld.get(names.shared_gate)
        layers.append(
            Layer(
                index=i,
                input_norm=ld.get(names.input_norm),
                post_norm=ld.get(names.post_norm),
                attention=attention,
                mlp=mlp,
                router=router,
                input_norm_bias=ld.get(names.input_norm_bias) if names.input_norm_bias is not None else None,
                post_norm_bias=ld.get(names.post_norm_bias) if names.post_norm_bias is not None else None,
            )
        )
    top = model_tensors(arch)
    embed = ld.get(top.embed)
    lm_head = embed if arch.tie_word_embeddings and not ckpt.has(top.lm_head.name) else ld.get(top.lm_head)
    model = DenseModel(arch, dtype, embed, layers, ld.get(top.final_norm), lm_head, rotary,
                       ld.get(top.final_norm_bias) if top.final_norm_bias is not None else None,
                       ld.get(top.lm_head_bias) if top.lm_head_bias is not None else None)
    if arch.norm == "rms_centered":  # Qwen3-Next's norms scale by (1 + weight): the 1 folded in once
        model.final_norm = 1 + model.final_norm
        for layer in layers:
            layer.input_norm, layer.post_norm = 1 + layer.input_norm, 1 + layer.post_norm
    return model
