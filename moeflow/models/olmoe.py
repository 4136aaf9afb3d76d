"""OLMoE: MoE in every layer, no shared expert, q/k RMSNorm over the whole projection, optional clip_qkv."""

from __future__ import annotations

from moeflow.models.base import Arch, ConfigReader, RouterSpec
from moeflow.models.qwen_moe import NAMING

MODEL_TYPES = ("olmoe",)


def parse(cfg: ConfigReader) -> Arch:
    cfg.silu()
    cfg.no_quantization()
    hidden = cfg.positive("hidden_size")
    layers = cfg.positive("num_hidden_layers")
    heads = cfg.positive("num_attention_heads")
    head_dim = cfg.opt("head_dim", hidden // heads)
    if head_dim * heads != hidden:
        cfg.refuse("head_dim", head_dim, f"OLMoE's q/k norm needs head_dim * heads == hidden_size ({hidden})")
    experts, top_k = cfg.experts("num_experts", "num_local_experts")
    bias = cfg.opt("attention_bias", False, bool)
    attention = cfg.gqa(hidden, layers, qkv_bias=bias, o_bias=bias, qk_norm="proj",
                        clip_qkv=cfg.opt("clip_qkv", None, float))
    return Arch(
        family="olmoe",
        hidden_size=hidden,
        num_layers=layers,
        dense_intermediate=0,
        expert_intermediate=cfg.positive("intermediate_size"),
        sparse=(True,) * layers,
        attention=attention,
        router=RouterSpec(num_experts=experts, top_k=top_k, norm_topk_prob=cfg.opt("norm_topk_prob", False, bool)),
        naming=NAMING,
        shared=None,
        **cfg.common(1e-5, 4096),
    )
