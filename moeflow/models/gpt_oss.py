"""GPT-OSS (GptOssForCausalLM) in the bf16 layout transformers' save_pretrained writes: GQA with
q/k/v/o biases and per-head attention sinks, alternating sliding-window and full layers, yarn
rope, a biased router (top-k of the logits, softmax over the chosen), and fused experts with
interleaved gate/up columns, biases and a clamped SwiGLU (as modeling_gpt_oss.py computes).
The Hub's own checkpoints hold the experts in MXFP4 (models/mxfp4.py, store/mxfp4.py): accepted here,
their experts go into an mxfp4 store as they are."""

from __future__ import annotations

from moeflow.models.base import Arch, ConfigReader, Naming, RouterSpec

MODEL_TYPES = ("gpt_oss",)

NAMING = Naming(
    moe_prefix="model.layers.{layer}.mlp",
    expert_gate="gate_proj",  # per-expert names are never read: the experts are fused
    expert_up="up_proj",
    expert_down="down_proj",
    router="model.layers.{layer}.mlp.router.weight",
    fused_gate_up="model.layers.{layer}.mlp.experts.gate_up_proj",
    fused_down="model.layers.{layer}.mlp.experts.down_proj",
    fused_interleaved=True,
    fused_gate_up_bias="model.layers.{layer}.mlp.experts.gate_up_proj_bias",
    fused_down_bias="model.layers.{layer}.mlp.experts.down_proj_bias",
)

_LAYER_TYPES = ("sliding_attention", "full_attention")

# GptOssConfig's rope when config.json names none (transformers fills it in __post_init__)
_DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096}


def _windows(cfg: ConfigReader, layers: int) -> tuple[int | None, ...]:
    """Per layer, the sliding window or None (full attention). GptOssConfig: layer_types, by
    default sliding on even layers (0, 2, ...) and full on odd ones; sliding_window 128."""
    types = cfg.config.get("layer_types")
    if types is None:
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or any(t not in _LAYER_TYPES for t in types):
        cfg.refuse("layer_types", types, f"expected one of {', '.join(_LAYER_TYPES)} for each of {layers} layers")
    if "sliding_attention" not in types:
        return (None,) * layers
    window = cfg.config.get("sliding_window", 128)  # transformers' sliding mask raises on a null window
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        cfg.refuse("sliding_window", window, "sliding_attention layers need a window >= 1")
    return tuple(window if t == "sliding_attention" else None for t in types)


def _mxfp4(cfg: ConfigReader, quant: object) -> None:
    """The MXFP4 experts of the Hub checkpoints load as they are (models/mxfp4.py, store/mxfp4.py); other
    quantizations, or MXFP4 elsewhere than the experts, are refused naming the field."""
    method = quant.get("quant_method") if isinstance(quant, dict) else quant
    if method != "mxfp4":
        cfg.refuse("quantization_config.quant_method", method, "GPT-OSS loads unquantized or with MXFP4 experts")
    assert isinstance(quant, dict)
    skipped = quant.get("modules_to_not_convert") or []
    if not isinstance(skipped, list) or any(isinstance(m, str) and "experts" in m for m in skipped):
        cfg.refuse("quantization_config.modules_to_not_convert", skipped,
                   "MXFP4 GPT-OSS checkpoints quantize their experts (and only them)")
    for name, default in (("hidden_size", None), ("intermediate_size", 2880)):
        value = cfg.opt(name, default) if default is not None else cfg.positive(name)
        if value % 32:
            cfg.refuse(name, value, "MXFP4 experts need input sizes that are multiples of its 32-value blocks")


def parse(cfg: ConfigReader) -> Arch:
    quant = cfg.config.get("quantization_config")
    if quant:
        _mxfp4(cfg, quant)
    config = dict(cfg.config)
    if not config.get("rope_parameters") and not config.get("rope_scaling"):
        config["rope_parameters"] = dict(_DEFAULT_ROPE)
    if config.get("rope_theta") is None and "rope_theta" not in (config.get("rope_parameters") or {}):
        config["rope_theta"] = 150000.0  # GptOssConfig.default_theta
    config.setdefault("max_position_embeddings", 131072)
    cfg = ConfigReader(config, cfg.path)
    hidden = cfg.positive("hidden_size")
    layers = cfg.positive("num_hidden_layers")
    experts, top_k = cfg.experts("num_local_experts")
    heads = cfg.positive("num_attention_heads")
    # GptOssConfig: head_dim 64 when absent; an explicit null is derived as hidden // heads
    head_dim = cfg.opt("head_dim", hidden // heads) if "head_dim" in cfg.config else 64
    bias = cfg.opt("attention_bias", True, bool)
    attention = cfg.gqa(hidden, layers, head_dim=head_dim, v_head_dim=head_dim, scaling=head_dim**-0.5,
                        rope=cfg.rope(head_dim), qkv_bias=bias, o_bias=bias,
                        sliding_window=_windows(cfg, layers), sinks=True)
    alpha, limit = cfg.opt("swiglu_alpha", 1.702, float), cfg.opt("swiglu_limit", 7.0, float)
    return Arch(
        family="gpt_oss",
        hidden_size=hidden,
        num_layers=layers,
        dense_intermediate=0,
        expert_intermediate=cfg.opt("intermediate_size", 2880),
        sparse=(True,) * layers,
        attention=attention,
        router=RouterSpec(num_experts=experts, top_k=top_k, norm_topk_prob=True, gate_bias=True),
        naming=NAMING,
        shared=None,
        swiglu=(alpha, limit),
        **cfg.common(1e-5, 131072),
    )
