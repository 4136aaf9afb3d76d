"""Qwen2-MoE (shared expert with a sigmoid gate, dense layers) and Qwen3-MoE (per-head q/k norm)."""

from __future__ import annotations

from moeflow.models.base import Arch, AttentionSpec, ConfigReader, Naming, RouterSpec, SharedExpertSpec

MODEL_TYPES = ("qwen2_moe", "qwen3_moe")

NAMING = Naming(
    moe_prefix="model.layers.{layer}.mlp",
    expert_gate="gate_proj",
    expert_up="up_proj",
    expert_down="down_proj",
    router="model.layers.{layer}.mlp.gate.weight",
)
QWEN2_NAMING = Naming(
    moe_prefix=NAMING.moe_prefix,
    expert_gate=NAMING.expert_gate,
    expert_up=NAMING.expert_up,
    expert_down=NAMING.expert_down,
    router=NAMING.router,
    shared_prefix="model.layers.{layer}.mlp.shared_expert",
    shared_gate="model.layers.{layer}.mlp.shared_expert_gate.weight",
)


def _sparse_layers(cfg: ConfigReader, layers: int, experts: int) -> tuple[bool, ...]:
    mlp_only = cfg.opt("mlp_only_layers", [], list)
    step = cfg.opt("decoder_sparse_step", 1)
    if step <= 0:
        cfg.refuse("decoder_sparse_step", step, "must be >= 1")
    return tuple(i not in mlp_only and experts > 0 and (i + 1) % step == 0 for i in range(layers))


def parse(cfg: ConfigReader) -> Arch:
    model_type = cfg.req("model_type", str)
    qwen3 = model_type == "qwen3_moe"
    cfg.silu()
    cfg.no_quantization()
    hidden = cfg.positive("hidden_size")
    heads = cfg.positive("num_attention_heads")
    layers = cfg.positive("num_hidden_layers")
    head_dim = cfg.opt("head_dim", hidden // heads)
    experts = cfg.positive("num_experts", "num_local_experts")
    top_k = cfg.positive("num_experts_per_tok")
    if top_k > experts:
        cfg.refuse("num_experts_per_tok", top_k, f"more than num_experts={experts}")
    sparse = _sparse_layers(cfg, layers, experts)
    attention = AttentionSpec(
        kind="gqa",
        num_heads=heads,
        num_kv_heads=cfg.opt("num_key_value_heads", heads),
        head_dim=head_dim,
        v_head_dim=head_dim,
        scaling=head_dim**-0.5,
        rope=cfg.rope(head_dim),
        qkv_bias=cfg.opt("attention_bias", False, bool) if qwen3 else cfg.opt("qkv_bias", True, bool),
        o_bias=cfg.opt("attention_bias", False, bool) if qwen3 else False,
        qk_norm="head" if qwen3 else None,
        sliding_window=cfg.sliding(layers, use_flag="use_sliding_window"),
    )
    shared = None
    if not qwen3:
        shared_size = cfg.opt("shared_expert_intermediate_size", 0)
        shared = SharedExpertSpec(shared_size, gated=True) if shared_size else None
    dense_needed = not all(sparse)
    return Arch(
        family=model_type,
        vocab_size=cfg.positive("vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        rms_norm_eps=cfg.opt("rms_norm_eps", 1e-6, float),
        dense_intermediate=cfg.positive("intermediate_size") if dense_needed else 0,
        expert_intermediate=cfg.positive("moe_intermediate_size"),
        sparse=sparse,
        attention=attention,
        router=RouterSpec(num_experts=experts, top_k=top_k, norm_topk_prob=cfg.opt("norm_topk_prob", False, bool)),
        naming=QWEN2_NAMING if shared is not None else NAMING,
        shared=shared,
        dtype=cfg.dtype(),
        tie_word_embeddings=cfg.opt("tie_word_embeddings", False, bool),
        eos_token_ids=cfg.eos_ids(),
        bos_token_id=cfg.opt("bos_token_id", None),
        max_position_embeddings=cfg.opt("max_position_embeddings", 32768),
    )
