"""Qwen3-Next (Qwen3NextForCausalLM) and Qwen3.5-MoE (its text model, qwen3_5_moe_text, and the
published multimodal checkpoint, qwen3_5_moe), as transformers' modeling_qwen3_next.py and
modeling_qwen3_5_moe.py compute them: Gated DeltaNet linear-attention layers (runtime/deltanet.py)
with gated full attention every full_attention_interval-th layer (q_proj yields each head's query
and an output gate; per-head q/k norm; partial rotary, 25% of each head by default), RMSNorms
scaled by (1 + weight), and sparse MoE layers (softmax top-k) with a shared expert behind a
sigmoid gate, dense where Qwen3-Next's mlp_only_layers / decoder_sparse_step say. Qwen3.5-MoE
stores the DeltaNet projections apart and every layer is sparse; a text-only prompt's mrope is
plain rope (its three position ids are equal). Experts are read one tensor per expert (what
save_pretrained writes) or fused [E, out, in] (Qwen3.5-MoE as published). mtp.* and the vision
tower are not run."""

from __future__ import annotations

import dataclasses

from moeflow.models.base import (
    Arch,
    AttentionSpec,
    ConfigReader,
    LinearAttentionSpec,
    RouterSpec,
    SharedExpertSpec,
)
from moeflow.models.checkpoint import Checkpoint
from moeflow.models.qwen_moe import QWEN2_NAMING, _sparse_layers
from moeflow.models.tensors import HubTensor

MODEL_TYPES = ("qwen3_next", "qwen3_5_moe_text", "qwen3_5_moe")

# Qwen3.5-MoE's multimodal checkpoint (Qwen3_5MoeForConditionalGeneration): the text decoder's
# tensors under model.language_model (the vision tower's, model.visual.*, are not read)
MULTIMODAL_NAMING = dataclasses.replace(QWEN2_NAMING, prefix="model.language_model", **{
    name: getattr(QWEN2_NAMING, name).replace("model.layers.", "model.language_model.layers.")
    for name in ("moe_prefix", "router", "shared_prefix", "shared_gate", "dense_prefix")
})

_LAYER_TYPES = ("linear_attention", "full_attention")


def _linear_layers(cfg: ConfigReader, layers: int) -> tuple[bool, ...]:
    """Per layer, True where it is linear attention. Qwen3NextConfig: layer_types, else every
    full_attention_interval-th layer (default 4) is full attention."""
    types = cfg.config.get("layer_types")
    if types is None:
        interval = cfg.opt("full_attention_interval", 4)
        if interval <= 0:
            cfg.refuse("full_attention_interval", interval, "must be >= 1")
        types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or any(t not in _LAYER_TYPES for t in types):
        cfg.refuse("layer_types", types, f"expected one of {', '.join(_LAYER_TYPES)} for each of {layers} layers")
    return tuple(t == "linear_attention" for t in types)


def linear_spec(cfg: ConfigReader, layers: int) -> LinearAttentionSpec:
    """The Gated DeltaNet shapes (Qwen3NextConfig defaults)."""
    k_heads, v_heads = cfg.opt("linear_num_key_heads", 16), cfg.opt("linear_num_value_heads", 32)
    if k_heads <= 0 or v_heads <= 0 or v_heads % k_heads:
        cfg.refuse("linear_num_value_heads", v_heads, f"must be a positive multiple of linear_num_key_heads={k_heads}")
    spec = LinearAttentionSpec(
        layers=_linear_layers(cfg, layers),
        num_k_heads=k_heads,
        num_v_heads=v_heads,
        k_head_dim=cfg.opt("linear_key_head_dim", 128),
        v_head_dim=cfg.opt("linear_value_head_dim", 128),
        conv_kernel=cfg.opt("linear_conv_kernel_dim", 4),
    )
    if spec.conv_kernel < 1 or spec.k_head_dim < 1 or spec.v_head_dim < 1:
        cfg.refuse("linear_conv_kernel_dim", spec.conv_kernel, "the conv width and head dims must be >= 1")
    return spec


def _text_config(cfg: ConfigReader) -> ConfigReader:
    """A multimodal Qwen3.5-MoE config's text_config, over the top level's other fields (dtype,
    tie_word_embeddings) where it leaves them out."""
    text = cfg.config.get("text_config")
    if not isinstance(text, dict):
        cfg.refuse("text_config", text, "a qwen3_5_moe config holds the text model's fields in text_config")
        raise AssertionError  # refuse raised
    top = {k: v for k, v in cfg.config.items() if k not in ("text_config", "vision_config")}
    return ConfigReader({**top, **text, "model_type": "qwen3_5_moe"}, cfg.path)


def parse(cfg: ConfigReader) -> Arch:
    multimodal = cfg.req("model_type", str) == "qwen3_5_moe"
    if multimodal:
        cfg = _text_config(cfg)
    cfg.silu()
    cfg.no_quantization()
    if cfg.opt("attention_bias", False, bool):
        cfg.refuse("attention_bias", True, "the Qwen3-Next checkpoints have no attention biases")
    hidden = cfg.positive("hidden_size")
    layers = cfg.positive("num_hidden_layers")
    heads = cfg.positive("num_attention_heads")
    head_dim = cfg.opt("head_dim", 256)
    experts, top_k = cfg.experts("num_experts")
    family = cfg.req("model_type", str)
    qwen3_5 = family != "qwen3_next"
    # Qwen3.5-MoE: every layer is sparse and the top-k weights always renormalized (no config fields)
    sparse = (True,) * layers if qwen3_5 else _sparse_layers(cfg, layers, experts)
    attention = AttentionSpec(
        kind="gqa",
        num_heads=heads,
        num_kv_heads=cfg.opt("num_key_value_heads", 2),
        head_dim=head_dim,
        v_head_dim=head_dim,
        scaling=head_dim**-0.5,
        rope=cfg.rope(head_dim, partial_default=0.25),
        qk_norm="head",
        sliding_window=(None,) * layers,
        output_gate=True,
    )
    shared_size = cfg.opt("shared_expert_intermediate_size", 0)
    return Arch(
        family=family,
        hidden_size=hidden,
        num_layers=layers,
        dense_intermediate=cfg.positive("intermediate_size") if not all(sparse) else 0,
        expert_intermediate=cfg.positive("moe_intermediate_size"),
        sparse=sparse,
        attention=attention,
        router=RouterSpec(num_experts=experts, top_k=top_k,
                          norm_topk_prob=qwen3_5 or cfg.opt("norm_topk_prob", True, bool)),
        naming=MULTIMODAL_NAMING if multimodal else QWEN2_NAMING,
        # a zero-width shared expert in transformers outputs 0: none here
        shared=SharedExpertSpec(shared_size, gated=True) if shared_size else None,
        norm="rms_centered",
        linear_attention=linear_spec(cfg, layers),
        **cfg.common(1e-6, 32768),
    )


def adapt(arch: Arch, ckpt: Checkpoint) -> Arch:
    """Qwen3.5-MoE as published fuses each layer's experts (gate_up [E, 2I, H], down [E, H, I]);
    transformers' save_pretrained writes one tensor per expert. Read whichever the checkpoint holds."""
    fused = f"{arch.naming.prefix}.layers.{{layer}}.mlp.experts"
    if arch.family == "qwen3_next" or not arch.moe_layers or \
            not ckpt.has(f"{fused}.gate_up_proj".format(layer=arch.moe_layers[0])):
        return arch
    naming = dataclasses.replace(arch.naming, fused_gate_up=f"{fused}.gate_up_proj", fused_down=f"{fused}.down_proj",
                                 fused_rows=True)
    return dataclasses.replace(arch, naming=naming)


def linear_attention_tensors(arch: Arch, prefix: str) -> dict[str, HubTensor]:
    """A Gated DeltaNet layer's tensors (prefix: model.layers.{i}.linear_attn), keyed as
    runtime/deltanet.GatedDeltaNet reads them."""
    s, h = arch.linear_attention, arch.hidden_size
    assert s is not None
    key_dim, value_dim = s.num_k_heads * s.k_head_dim, s.num_v_heads * s.v_head_dim
    if arch.family != "qwen3_next":  # Qwen3.5-MoE: the projections stored apart, in conv order
        projections = {
            "in_proj_qkv": HubTensor(f"{prefix}.in_proj_qkv.weight", (2 * key_dim + value_dim, h)),
            "in_proj_z": HubTensor(f"{prefix}.in_proj_z.weight", (value_dim, h)),
            "in_proj_b": HubTensor(f"{prefix}.in_proj_b.weight", (s.num_v_heads, h)),
            "in_proj_a": HubTensor(f"{prefix}.in_proj_a.weight", (s.num_v_heads, h)),
        }
    else:
        projections = {
            "in_proj_qkvz": HubTensor(f"{prefix}.in_proj_qkvz.weight", (2 * key_dim + 2 * value_dim, h)),
            "in_proj_ba": HubTensor(f"{prefix}.in_proj_ba.weight", (2 * s.num_v_heads, h)),
        }
    return {
        **projections,
        "conv1d": HubTensor(f"{prefix}.conv1d.weight", (s.conv_channels, 1, s.conv_kernel)),
        "dt_bias": HubTensor(f"{prefix}.dt_bias", (s.num_v_heads,)),
        "A_log": HubTensor(f"{prefix}.A_log", (s.num_v_heads,)),
        "norm": HubTensor(f"{prefix}.norm.weight", (s.v_head_dim,)),
        "out_proj": HubTensor(f"{prefix}.out_proj.weight", (h, value_dim)),
    }
