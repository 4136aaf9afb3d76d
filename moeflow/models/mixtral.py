"""Mixtral: GQA attention, softmax top-k router renormalized over the chosen experts."""

from __future__ import annotations

from moeflow.models.base import Arch, ConfigReader, Naming, RouterSpec

MODEL_TYPES = ("mixtral",)

NAMING = Naming(
    moe_prefix="model.layers.{layer}.block_sparse_moe",
    expert_gate="w1",
    expert_up="w3",
    expert_down="w2",
    router="model.layers.{layer}.block_sparse_moe.gate.weight",
)


def parse(cfg: ConfigReader) -> Arch:
    cfg.silu()
    cfg.no_quantization()
    hidden = cfg.positive("hidden_size")
    layers = cfg.positive("num_hidden_layers")
    experts, top_k = cfg.experts("num_local_experts")
    return Arch(
        family="mixtral",
        hidden_size=hidden,
        num_layers=layers,
        dense_intermediate=0,
        expert_intermediate=cfg.positive("intermediate_size"),
        sparse=(True,) * layers,
        attention=cfg.gqa(hidden, layers, sliding_window=cfg.sliding(layers, use_flag=None)),
        router=RouterSpec(num_experts=experts, top_k=top_k, norm_topk_prob=True, keep_fp32_weights=True),
        naming=NAMING,
        shared=None,
        **cfg.common(1e-5, 4096),
    )
