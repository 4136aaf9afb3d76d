"""Phi-3.5-MoE: GQA attention with optional biases, LayerNorm (weight and bias) in place of RMSNorm,
and SparseMixer top-2 routing (its eval-mode path: each pick's weight is a softmax over the experts
within a jitter-eps window of it)."""

from __future__ import annotations

import dataclasses
import math
from typing import cast

from moeflow.models.base import Arch, AttentionSpec, ConfigReader, Naming, RopeSpec, RouterSpec

MODEL_TYPES = ("phimoe",)

# The Hub layout (transformers saves this too, converting back from its fused experts).
NAMING = Naming(
    moe_prefix="model.layers.{layer}.block_sparse_moe",
    expert_gate="w1",
    expert_up="w3",
    expert_down="w2",
    router="model.layers.{layer}.block_sparse_moe.gate.weight",
)


def _rope(cfg: ConfigReader, head_dim: int) -> RopeSpec:
    """Default rope, or longrope as transformers' PhimoeRotaryEmbedding computes it: inv_freq from
    short_factor at every length (its forward calls the init function without seq_len), cos and
    sin scaled by short_mscale, or by long_mscale in a pass reaching past
    original_max_position_embeddings, where transformers' generate also re-prefills. Only equal
    mscales (as microsoft/Phi-3.5-MoE-instruct ships, 1.243) make that switch a no-op; others are
    refused."""
    source = "rope_parameters" if cfg.config.get("rope_parameters") else "rope_scaling"
    params = cfg.config.get(source) or {}
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else params
    theta_given = isinstance(params, dict) and "rope_theta" in params or cfg.config.get("rope_theta") is not None
    if kind == "default":
        spec = cfg.rope(head_dim)
        # PhimoeConfig.default_theta: a config without rope_theta means 1e6, not the usual 1e4
        return spec if theta_given else dataclasses.replace(spec, theta=1e6)
    if kind != "longrope":
        cfg.refuse("rope_scaling", kind, "phimoe runs default rope or longrope")
    short, long = params.get("short_mscale"), params.get("long_mscale")
    factors = params.get("short_factor")
    if not isinstance(short, (int, float)) or short != long:
        cfg.refuse("rope_scaling", kind, f"short_mscale {short!r} != long_mscale {long!r}: the scale would switch "
                   "mid-sequence at original_max_position_embeddings")
    if not isinstance(factors, list) or len(factors) != head_dim // 2 or not all(
            isinstance(f, (int, float)) and f > 0 for f in factors):
        cfg.refuse("rope_scaling", kind, f"short_factor must hold head_dim/2 = {head_dim // 2} positive numbers")
    theta = params.get("rope_theta", cfg.config.get("rope_theta", 1e6))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 < theta < math.inf:
        cfg.refuse("rope_theta", theta, "the rope base must be a finite number > 0")
    # refuse() raised on anything else: these are numbers now
    return RopeSpec("longrope", float(cast(float, theta)), head_dim, params={"mscale": float(cast(float, short))},
                    max_position_embeddings=cfg.opt("max_position_embeddings", 131072),
                    ext_factors=tuple(float(f) for f in cast(list, factors)))


def parse(cfg: ConfigReader) -> Arch:
    cfg.silu()
    cfg.no_quantization()
    hidden = cfg.positive("hidden_size")
    heads = cfg.positive("num_attention_heads")
    head_dim = cfg.opt("head_dim", hidden // heads)  # transformers: getattr(config, "head_dim", H / heads)
    layers = cfg.positive("num_hidden_layers")
    experts, top_k = cfg.experts("num_local_experts")
    if top_k != 2:
        # transformers' sparsemixer always picks exactly two experts, whatever num_experts_per_tok says
        cfg.refuse("num_experts_per_tok", top_k, "phimoe's sparsemixer routing picks exactly 2 experts")
    jitter = cfg.opt("router_jitter_noise", 0.01, float)
    if jitter < 0:
        cfg.refuse("router_jitter_noise", jitter, "must be >= 0")
    bias = cfg.opt("attention_bias", False, bool)
    return Arch(
        family="phimoe",
        hidden_size=hidden,
        num_layers=layers,
        dense_intermediate=0,
        expert_intermediate=cfg.positive("intermediate_size"),
        sparse=(True,) * layers,
        attention=AttentionSpec(
            kind="gqa", num_heads=heads, num_kv_heads=cfg.opt("num_key_value_heads", heads), head_dim=head_dim,
            v_head_dim=head_dim, scaling=head_dim**-0.5, rope=_rope(cfg, head_dim), qkv_bias=bias, o_bias=bias,
            sliding_window=cfg.sliding(layers, use_flag=None),
        ),
        # scoring stays softmax for the predictors: sparsemixer's two picks are the top-2 logits
        router=RouterSpec(num_experts=experts, top_k=2, topk_method="sparsemixer", jitter_eps=jitter),
        naming=NAMING,
        shared=None,
        norm="layernorm",
        lm_head_bias=cfg.opt("lm_head_bias", False, bool),
        **cfg.common(1e-5, 131072),
    )
