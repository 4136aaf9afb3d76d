"""Qwen2-MoE (shared expert with a sigmoid gate, dense layers) and Qwen3-MoE (per-head q/k norm)."""

from __future__ import annotations

import dataclasses

from moeflow.models.base import Arch, ConfigReader, Naming, RouterSpec, SharedExpertSpec

MODEL_TYPES = ("qwen2_moe", "qwen3_moe")

NAMING = Naming(
    moe_prefix="model.layers.{layer}.mlp",
    expert_gate="gate_proj",
    expert_up="up_proj",
    expert_down="down_proj",
    router="model.layers.{layer}.mlp.gate.weight",
)
QWEN2_NAMING = dataclasses.replace(
    NAMING,
    shared_prefix="model.layers.{layer}.mlp.shared_expert",
    shared_gate="model.layers.{layer}.mlp.shared_expert_gate.weight",
)


def _sparse_layers(cfg: ConfigReader, layers: int, experts: int) -> tuple[bool, ...]:
    mlp_only = cfg.opt("mlp_only_layers", [], list)
    step = cfg.opt("decoder_sparse_step", 1)
    if step <= 0:
        cfg.refuse("decoder_sparse_step", step, "must be >= 1")
    return tuple(i not in mlp_only and (i + 1) % step == 0 for i in range(layers))


def parse(cfg: ConfigReader) -> Arch:
    model_type = cfg.req("model_type", str)
    qwen3 = model_type == "qwen3_moe"
    cfg.silu()
    cfg.no_quantization()
    hidden = cfg.positive("hidden_size")
    layers = cfg.positive("num_hidden_layers")
    experts, top_k = cfg.experts("num_experts", "num_local_experts")
    sparse = _sparse_layers(cfg, layers, experts)
    attention = cfg.gqa(
        hidden,
        layers,
        qkv_bias=cfg.opt("attention_bias", False, bool) if qwen3 else cfg.opt("qkv_bias", True, bool),
        o_bias=cfg.opt("attention_bias", False, bool) if qwen3 else False,
        qk_norm="head" if qwen3 else None,
        sliding_window=cfg.sliding(layers, use_flag="use_sliding_window"),
    )
    shared = None
    if not qwen3:
        shared_size = cfg.opt("shared_expert_intermediate_size", 0)
        shared = SharedExpertSpec(shared_size, gated=True) if shared_size else None
    return Arch(
        family=model_type,
        hidden_size=hidden,
        num_layers=layers,
        dense_intermediate=cfg.positive("intermediate_size") if not all(sparse) else 0,
        expert_intermediate=cfg.positive("moe_intermediate_size"),
        sparse=sparse,
        attention=attention,
        router=RouterSpec(num_experts=experts, top_k=top_k, norm_topk_prob=cfg.opt("norm_topk_prob", False, bool)),
        naming=QWEN2_NAMING if shared is not None else NAMING,
        shared=shared,
        **cfg.common(1e-6, 32768),
    )
