"""Llama-4 text model (Llama4ForCausalLM, model_type llama4_text): MoE layers interleaved with dense
ones, a shared expert beside a sigmoid top-k router whose score scales the expert's input, fused
expert tensors, chunked attention on RoPE layers, full attention with temperature tuning on NoPE
layers, and a weightless L2 norm of q and k heads (as transformers' modeling_llama4.py computes)."""

from __future__ import annotations

from moeflow.models.base import Arch, ConfigReader, Naming, RouterSpec, SharedExpertSpec

# "llama4" is the multimodal Llama4ForConditionalGeneration checkpoint (text_config nested, weights
# under language_model.*): listed so that parse can say what to do instead.
MODEL_TYPES = ("llama4_text", "llama4")

NAMING = Naming(
    moe_prefix="model.layers.{layer}.feed_forward",
    expert_gate="gate_proj",  # per-expert names are never read: the experts are fused
    expert_up="up_proj",
    expert_down="down_proj",
    router="model.layers.{layer}.feed_forward.router.weight",
    shared_prefix="model.layers.{layer}.feed_forward.shared_expert",
    dense_prefix="model.layers.{layer}.feed_forward",
    fused_gate_up="model.layers.{layer}.feed_forward.experts.gate_up_proj",
    fused_down="model.layers.{layer}.feed_forward.experts.down_proj",
)

_LAYER_TYPES = ("chunked_attention", "full_attention")


def _int_list(cfg: ConfigReader, name: str, length: int | None = None) -> list[int] | None:
    value = cfg.config.get(name)
    if value is None or value == []:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        cfg.refuse(name, value, "expected a list of integers")
    if length is not None and len(value) < length:
        cfg.refuse(name, value, f"needs an entry for each of num_hidden_layers={length} layers")
    return value


def _sparse(cfg: ConfigReader, layers: int) -> tuple[bool, ...]:
    """Llama4TextConfig: moe_layers if set, else every interleave_moe_layer_step-th layer, from step - 1."""
    moe_layers = _int_list(cfg, "moe_layers")
    if moe_layers is None:
        step = cfg.opt("interleave_moe_layer_step", 1)
        if step <= 0:
            cfg.refuse("interleave_moe_layer_step", step, "must be >= 1")
        moe_layers = list(range(step - 1, layers, step))
    elif any(not 0 <= i < layers for i in moe_layers):
        cfg.refuse("moe_layers", moe_layers, f"layer indices must be below num_hidden_layers={layers}")
    return tuple(i in moe_layers for i in range(layers))


def _positions(cfg: ConfigReader, layers: int) -> tuple[tuple[bool, ...], tuple[int | None, ...]]:
    """(rope per layer, attention chunk per layer). no_rope_layers[i] == 1 means layer i DOES use
    rope (transformers' naming); by default every no_rope_layer_interval-th layer is NoPE. Layers
    of type chunked_attention attend within attention_chunk_size; by default the rope layers."""
    rope_flags = _int_list(cfg, "no_rope_layers", layers)
    if rope_flags is None:
        interval = cfg.opt("no_rope_layer_interval", 4)
        if interval <= 0:
            cfg.refuse("no_rope_layer_interval", interval, "must be >= 1")
        rope_flags = [int((i + 1) % interval != 0) for i in range(layers)]
    rope = tuple(bool(flag) for flag in rope_flags[:layers])
    # absent: Llama4TextConfig's default; an explicit null: no chunked layers
    chunk = cfg.opt("attention_chunk_size", None) if "attention_chunk_size" in cfg.config else 8192
    if chunk is not None and chunk <= 0:
        cfg.refuse("attention_chunk_size", chunk, "must be >= 1")
    types = cfg.config.get("layer_types")
    if types is None:
        types = ["chunked_attention" if r and chunk is not None else "full_attention" for r in rope]
    if not isinstance(types, list) or len(types) < layers or any(t not in _LAYER_TYPES for t in types[:layers]):
        cfg.refuse("layer_types", types, f"expected one of {', '.join(_LAYER_TYPES)} per layer")
    if chunk is None and "chunked_attention" in types[:layers]:
        cfg.refuse("layer_types", types, "chunked_attention layers need attention_chunk_size")
    return rope, tuple(chunk if t == "chunked_attention" else None for t in types[:layers])


def _temperature(cfg: ConfigReader) -> tuple[float, float] | None:
    # Meta's released configs write attn_temperature_tuning as an integer (4): any true value enables it.
    tuning = cfg.config.get("attn_temperature_tuning", True)
    if not isinstance(tuning, (bool, int)):
        cfg.refuse("attn_temperature_tuning", tuning, "expected a boolean")
    if not tuning:
        return None
    floor_scale = cfg.opt("floor_scale", 8192.0, float)
    if floor_scale <= 0:
        cfg.refuse("floor_scale", floor_scale, "must be > 0")
    return floor_scale, cfg.opt("attn_scale", 0.1, float)


def parse(cfg: ConfigReader) -> Arch:
    model_type = cfg.req("model_type", str)
    if model_type == "llama4":
        cfg.refuse("model_type", model_type, "the multimodal Llama4ForConditionalGeneration checkpoint is not "
                   "supported; save its text model (Llama4ForCausalLM, model_type llama4_text) and load that")
    cfg.silu()
    cfg.no_quantization()
    params = cfg.config.get("rope_parameters") or cfg.config.get("rope_scaling") or {}
    if cfg.config.get("rope_theta") is None and not (isinstance(params, dict) and "rope_theta" in params):
        cfg = ConfigReader({**cfg.config, "rope_theta": 500000.0}, cfg.path)  # Llama4TextConfig.default_theta
    hidden = cfg.positive("hidden_size")
    layers = cfg.positive("num_hidden_layers")
    experts, top_k = cfg.experts("num_local_experts")
    sparse = _sparse(cfg, layers)
    rope_layers, chunked = _positions(cfg, layers)
    bias = cfg.opt("attention_bias", False, bool)
    heads = cfg.positive("num_attention_heads")
    rope = cfg.rope(cfg.opt("head_dim", hidden // heads), interleaved=True)  # complex pairs (x0, x1), (x2, x3)
    attention = cfg.gqa(
        hidden,
        layers,
        rope=rope,
        qkv_bias=bias,
        o_bias=bias,
        rope_layers=rope_layers,
        chunked=chunked,
        qk_l2_norm=cfg.opt("use_qk_norm", True, bool),
        temperature_tuning=_temperature(cfg),
    )
    inter = cfg.positive("intermediate_size")
    return Arch(
        family=model_type,
        hidden_size=hidden,
        num_layers=layers,
        dense_intermediate=cfg.positive("intermediate_size_mlp") if not all(sparse) else 0,
        expert_intermediate=inter,
        sparse=sparse,
        attention=attention,
        router=RouterSpec(num_experts=experts, top_k=top_k, scoring="sigmoid", scale_input=True),
        naming=NAMING,
        shared=SharedExpertSpec(inter, gated=False),
        **cfg.common(1e-5, 131072),
    )
