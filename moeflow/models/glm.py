"""GLM-4.5 / 4.6 (glm4_moe): GQA with partial rotary, optional per-head q/k norm and q/k/v bias;
DeepSeek-V3's sigmoid noaux_tc routing over groups; shared experts; dense first layers."""

from __future__ import annotations

from moeflow.models.base import Arch, AttentionSpec, ConfigReader, RouterSpec, SharedExpertSpec
from moeflow.models.deepseek import NAMING

MODEL_TYPES = ("glm4_moe",)


def _router(cfg: ConfigReader) -> RouterSpec:
    experts, top_k = cfg.experts("n_routed_experts", "num_local_experts")
    n_group = cfg.opt("n_group", 1) or 1
    topk_group = cfg.opt("topk_group", 1) or 1
    # transformers sums each group's two best scores: a group of one expert fails there.
    if experts % n_group or experts // n_group < 2 or topk_group > n_group:
        cfg.refuse("n_group", n_group, f"must divide n_routed_experts={experts} into groups of >= 2 "
                   f"and be >= topk_group={topk_group}")
    if top_k > topk_group * (experts // n_group):
        cfg.refuse("topk_group", topk_group, "the chosen groups hold fewer experts than num_experts_per_tok")
    return RouterSpec(
        num_experts=experts,
        top_k=top_k,
        scoring="sigmoid",
        topk_method="noaux_tc",
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=cfg.opt("norm_topk_prob", True, bool),
        routed_scaling_factor=cfg.opt("routed_scaling_factor", 1.0, float),
        correction_bias=True,  # Glm4MoeTopkRouter always holds e_score_correction_bias
        fp32_logits=True,  # transformers computes the gate in float32 (gate.weight is kept fp32)
    )


def parse(cfg: ConfigReader) -> Arch:
    cfg.silu()
    cfg.no_quantization()
    hidden = cfg.positive("hidden_size")
    heads = cfg.positive("num_attention_heads")
    layers = cfg.positive("num_hidden_layers")
    head_dim = cfg.opt("head_dim", hidden // heads)
    # Not cfg.gqa: its rope refuses partial rotary, which GLM needs.
    attention = AttentionSpec(
        kind="gqa",
        num_heads=heads,
        num_kv_heads=cfg.opt("num_key_value_heads", heads),
        head_dim=head_dim,
        v_head_dim=head_dim,
        scaling=head_dim**-0.5,
        # Glm4MoeConfig defaults partial_rotary_factor to 0.5: half of each head rotates.
        rope=cfg.rope(head_dim, partial_default=0.5),
        # GLM's attention_bias covers q, k and v only: o_proj never has a bias.
        qkv_bias=cfg.opt("attention_bias", False, bool),
        qk_norm="head" if cfg.opt("use_qk_norm", False, bool) else None,
        sliding_window=(None,) * layers,
    )
    first_dense = cfg.opt("first_k_dense_replace", 1)
    sparse = tuple(i >= first_dense for i in range(layers))
    moe_inter = cfg.positive("moe_intermediate_size")
    n_shared = cfg.opt("n_shared_experts", 1)
    return Arch(
        family="glm4_moe",
        hidden_size=hidden,
        num_layers=layers,
        dense_intermediate=cfg.positive("intermediate_size") if not all(sparse) else 0,
        expert_intermediate=moe_inter,
        sparse=sparse,
        attention=attention,
        router=_router(cfg),
        naming=NAMING,
        # n_shared_experts=0 gives transformers a zero-width MLP whose output is 0: none here.
        shared=SharedExpertSpec(moe_inter * n_shared, gated=False) if n_shared else None,
        **cfg.common(1e-5, 131072),
    )
