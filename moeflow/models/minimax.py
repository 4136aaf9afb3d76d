"""MiniMax-M2 (minimax_m2), as transformers' modeling_minimax_m2 computes it: GQA with RMSNorm over
the whole q and k projections (OLMoE's "proj" norm) and partial rotary (rotary_dim of head_dim);
every layer MoE with Mixtral's tensor names; sigmoid scores, a per-expert correction bias that
only picks the experts, weights renormalized over the chosen ones; no shared expert."""

from __future__ import annotations

import dataclasses

from moeflow.models.base import Arch, AttentionSpec, ConfigReader, RouterSpec
from moeflow.models.mixtral import NAMING as MIXTRAL_NAMING

MODEL_TYPES = ("minimax_m2",)

NAMING = dataclasses.replace(
    MIXTRAL_NAMING, correction_bias="model.layers.{layer}.block_sparse_moe.e_score_correction_bias"
)
DEFAULT_THETA = 5e6  # MiniMaxM2Config.default_theta: the base when config.json names none


def _rope_reader(cfg: ConfigReader) -> ConfigReader:
    """cfg with MiniMax's default rope base filled in where neither layout gives one."""
    params = cfg.config.get("rope_parameters") or cfg.config.get("rope_scaling") or {}
    if cfg.config.get("rope_theta") is None and "rope_theta" not in params:
        return ConfigReader({**cfg.config, "rope_theta": DEFAULT_THETA}, cfg.path)
    return cfg


def parse(cfg: ConfigReader) -> Arch:
    cfg.silu()
    cfg.no_quantization()
    hidden = cfg.positive("hidden_size")
    heads = cfg.positive("num_attention_heads")
    layers = cfg.positive("num_hidden_layers")
    head_dim = cfg.opt("head_dim", 128)  # MiniMaxM2Config's default, not hidden_size // heads
    experts, top_k = cfg.experts("num_local_experts", "num_experts")
    if experts < 2:  # the shared noaux_tc selection sums each group's two best scores
        cfg.refuse("num_local_experts", experts, "MiniMax-M2 routing needs at least 2 experts")
    # MiniMaxM2Config turns rotary_dim into partial_rotary_factor = rotary_dim / head_dim, which an
    # explicit partial_rotary_factor (top level or in rope_parameters) overrides; neither: all rotate.
    rotary_dim = cfg.opt("rotary_dim", None)
    rope = _rope_reader(cfg).rope(head_dim, partial_default=1.0 if rotary_dim is None else rotary_dim / head_dim)
    attention = AttentionSpec(  # not cfg.gqa: its rope refuses partial rotary
        kind="gqa",
        num_heads=heads,
        num_kv_heads=cfg.opt("num_key_value_heads", heads),
        head_dim=head_dim,
        v_head_dim=head_dim,
        scaling=head_dim**-0.5,
        rope=rope,
        # transformers always builds q_norm [N*D] and k_norm [KV*D]; no projection has a bias, and
        # its causal mask has no sliding window whatever config.json says.
        qk_norm="proj",
        sliding_window=(None,) * layers,
    )
    router = RouterSpec(
        num_experts=experts,
        top_k=top_k,
        scoring="sigmoid",
        # One group of all experts: noaux_tc reduces to top-k of sigmoid + bias, weighted by the
        # sigmoid alone, renormalized (noaux_tc's + 1e-20 on the sum is lost in float32 unless the
        # chosen sigmoids are all below ~1e-13).
        topk_method="noaux_tc",
        norm_topk_prob=True,
        correction_bias=True,
    )
    return Arch(
        family="minimax_m2",
        hidden_size=hidden,
        num_layers=layers,
        dense_intermediate=0,
        expert_intermediate=cfg.positive("intermediate_size"),
        sparse=(True,) * layers,
        attention=attention,
        router=router,
        naming=NAMING,
        shared=None,
        **cfg.common(1e-6, 196608),
    )
