"""DeepSeek-V2 and V3: MLA attention, shared experts, dense first layers, grouped top-k routing."""

from __future__ import annotations

from moeflow.models.base import (
    Arch,
    AttentionSpec,
    ConfigReader,
    Naming,
    RouterSpec,
    SharedExpertSpec,
    yarn_mscale,
)

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")

NAMING = Naming(
    moe_prefix="model.layers.{layer}.mlp",
    expert_gate="gate_proj",
    expert_up="up_proj",
    expert_down="down_proj",
    router="model.layers.{layer}.mlp.gate.weight",
    shared_prefix="model.layers.{layer}.mlp.shared_experts",
    correction_bias="model.layers.{layer}.mlp.gate.e_score_correction_bias",
)


def _router(cfg: ConfigReader, v3: bool) -> RouterSpec:
    experts, top_k = cfg.experts("n_routed_experts")
    method = cfg.opt("topk_method", "noaux_tc" if v3 else "greedy", str)
    scoring = cfg.opt("scoring_func", "sigmoid" if v3 else "softmax", str)
    if v3 and (method != "noaux_tc" or scoring != "sigmoid"):
        cfg.refuse("topk_method", f"{method}/{scoring}", "DeepSeek-V3 routing is noaux_tc with sigmoid scores")
    if not v3 and (method not in ("greedy", "group_limited_greedy") or scoring != "softmax"):
        cfg.refuse("topk_method", f"{method}/{scoring}", "DeepSeek-V2 routing is greedy or group_limited_greedy")
    n_group = cfg.opt("n_group", 1) or 1
    topk_group = cfg.opt("topk_group", 1) or 1
    if method != "greedy" and (experts % n_group or topk_group > n_group):
        cfg.refuse("n_group", n_group, f"must divide n_routed_experts={experts} and be >= topk_group={topk_group}")
    if method == "noaux_tc" and top_k > topk_group * (experts // n_group):
        cfg.refuse("topk_group", topk_group, "the chosen groups hold fewer experts than num_experts_per_tok")
    return RouterSpec(
        num_experts=experts,
        top_k=top_k,
        scoring=scoring,
        topk_method=method,
        n_group=n_group,
        topk_group=topk_group,
        # V2's transformers port ignores norm_topk_prob (its released configs all set it false).
        norm_topk_prob=cfg.opt("norm_topk_prob", False, bool) and v3,
        routed_scaling_factor=cfg.opt("routed_scaling_factor", 1.0, float),
        correction_bias=v3,
        fp32_logits=True,
    )


def parse(cfg: ConfigReader) -> Arch:
    model_type = cfg.req("model_type", str)
    v3 = model_type == "deepseek_v3"
    cfg.silu()
    cfg.no_quantization()
    hidden = cfg.positive("hidden_size")
    heads = cfg.positive("num_attention_heads")
    layers = cfg.positive("num_hidden_layers")
    rope_dim = cfg.positive("qk_rope_head_dim")
    nope_dim = cfg.positive("qk_nope_head_dim")
    v_dim = cfg.positive("v_head_dim")
    q_lora = cfg.opt("q_lora_rank", None)
    rope = cfg.rope(rope_dim, interleaved=cfg.opt("rope_interleave", True, bool) if v3 else True)
    scaling = (nope_dim + rope_dim) ** -0.5
    if rope.kind != "default" and rope.params.get("mscale_all_dim"):
        m = yarn_mscale(rope.params["factor"], rope.params["mscale_all_dim"])
        scaling *= m * m
    attention = AttentionSpec(
        kind="mla",
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=nope_dim + rope_dim,
        v_head_dim=v_dim,
        scaling=scaling,
        rope=rope,
        qkv_bias=cfg.opt("attention_bias", False, bool),
        o_bias=cfg.opt("attention_bias", False, bool),
        sliding_window=(None,) * layers,
        q_lora_rank=q_lora or None,
        kv_lora_rank=cfg.positive("kv_lora_rank"),
        qk_nope_head_dim=nope_dim,
        qk_rope_head_dim=rope_dim,
    )
    first_dense = cfg.opt("first_k_dense_replace", 0)
    freq = cfg.opt("moe_layer_freq", 1)
    if freq <= 0:
        cfg.refuse("moe_layer_freq", freq, "must be >= 1")
    sparse = tuple(i >= first_dense and i % freq == 0 for i in range(layers))
    n_shared = cfg.opt("n_shared_experts", 0)
    moe_inter = cfg.positive("moe_intermediate_size")
    return Arch(
        family=model_type,
        hidden_size=hidden,
        num_layers=layers,
        dense_intermediate=cfg.positive("intermediate_size") if not all(sparse) else 0,
        expert_intermediate=moe_inter,
        sparse=sparse,
        attention=attention,
        router=_router(cfg, v3),
        naming=NAMING,
        shared=SharedExpertSpec(moe_inter * n_shared, gated=False) if n_shared else None,
        **cfg.common(1e-6, 4096),
    )
