"""Phi-3.5-MoE: GQA attention with optional biases, LayerNorm (weight and bias) in place of RMSNorm,
and SparseMixer top-2 routing (its eval-mode path: each pick's weight is a softmax over the experts
within a jitter-eps window of it)."""

from __future__ import annotations

from moeflow.models.base import Arch, ConfigReader, Naming, RouterSpec

MODEL_TYPES = ("phimoe",)

# The Hub layout (transformers saves this too, converting back from its fused experts).
NAMING = Naming(
    moe_prefix="model.layers.{layer}.block_sparse_moe",
    expert_gate="w1",
    expert_up="w3",
    expert_down="w2",
    router="model.layers.{layer}.block_sparse_moe.gate.weight",
)


def _refuse_scaled_rope(cfg: ConfigReader) -> None:
    """Phi-3.5-MoE's published config uses longrope (short/long factors with mscale applied to
    cos and sin, switching at original_max_position_embeddings); moeflow does not implement it, and
    running such a checkpoint with plain rope would give wrong logits, so it is refused."""
    for source in ("rope_parameters", "rope_scaling"):
        params = cfg.config.get(source)
        if isinstance(params, dict):
            kind = params.get("rope_type", params.get("type", "default"))
            if kind != "default":
                cfg.refuse("rope_scaling", kind, "phimoe runs only default rope (longrope is not implemented)")


def parse(cfg: ConfigReader) -> Arch:
    cfg.silu()
    cfg.no_quantization()
    _refuse_scaled_rope(cfg)
    hidden = cfg.positive("hidden_size")
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
        attention=cfg.gqa(hidden, layers, qkv_bias=bias, o_bias=bias, sliding_window=cfg.sliding(layers, use_flag=None)),
        # scoring stays softmax for the predictors: sparsemixer's two picks are the top-2 logits
        router=RouterSpec(num_experts=experts, top_k=2, topk_method="sparsemixer", jitter_eps=jitter),
        naming=NAMING,
        shared=None,
        norm="layernorm",
        lm_head_bias=cfg.opt("lm_head_bias", False, bool),
        **cfg.common(1e-5, 131072),
    )
