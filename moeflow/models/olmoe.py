"""OLMoE: MoE in every layer, no shared expert, q/k RMSNorm over the whole projection, optional clip_qkv."""

from __future__ import annotations

from moeflow.models.base import Arch, AttentionSpec, ConfigReader, RouterSpec
from moeflow.models.qwen_moe import NAMING

MODEL_TYPES = ("olmoe",)


def parse(cfg: ConfigReader) -> Arch:
    cfg.silu()
    cfg.no_quantization()
    hidden = cfg.positive("hidden_size")
    heads = cfg.positive("num_attention_heads")
    layers = cfg.positive("num_hidden_layers")
    head_dim = cfg.opt("head_dim", hidden // heads)
    if head_dim * heads != hidden:
        cfg.refuse("head_dim", head_dim, "OLMoE's q/k norm needs head_dim * heads == hidden_size")
    experts = cfg.positive("num_experts", "num_local_experts")
    top_k = cfg.positive("num_experts_per_tok")
    if top_k > experts:
        cfg.refuse("num_experts_per_tok", top_k, f"more than num_experts={experts}")
    clip = cfg.opt("clip_qkv", None, float)
    bias = cfg.opt("attention_bias", False, bool)
    attention = AttentionSpec(
        kind="gqa",
        num_heads=heads,
        num_kv_heads=cfg.opt("num_key_value_heads", heads),
        head_dim=head_dim,
        v_head_dim=head_dim,
        scaling=head_dim**-0.5,
        rope=cfg.rope(head_dim),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="proj",
        clip_qkv=clip,
        sliding_window=(None,) * layers,
    )
    return Arch(
        family="olmoe",
        vocab_size=cfg.positive("vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        rms_norm_eps=cfg.opt("rms_norm_eps", 1e-5, float),
        dense_intermediate=0,
        expert_intermediate=cfg.positive("intermediate_size"),
        sparse=(True,) * layers,
        attention=attention,
        router=RouterSpec(num_experts=experts, top_k=top_k, norm_topk_prob=cfg.opt("norm_topk_prob", False, bool)),
        naming=NAMING,
        shared=None,
        dtype=cfg.dtype(),
        tie_word_embeddings=cfg.opt("tie_word_embeddings", False, bool),
        eos_token_ids=cfg.eos_ids(),
        bos_token_id=cfg.opt("bos_token_id", None),
        max_position_embeddings=cfg.opt("max_position_embeddings", 4096),
    )
