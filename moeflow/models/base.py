"""The normalized description of an MoE architecture, built from a family's config.json."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeflow.errors import CheckpointError, UnsupportedModel

def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature factor for a context scaled by `scale`."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# Qwen3.5-MoE's multimodal checkpoints keep the text decoder under model.language_model
_LAYER_TENSOR = re.compile(r"^model\.(?:language_model\.)?layers\.(\d+)\.")

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding: which scaling, over how many dims, and pair layout."""

    kind: str  # default | linear | llama3 | yarn
    theta: float
    dim: int
    interleaved: bool = False  # DeepSeek pairs (x0, x1), (x2, x3) instead of halves
    params: dict[str, float] = field(default_factory=dict)
    max_position_embeddings: int = 4096
    ext_factors: tuple[float, ...] = ()  # longrope (Phi-3.5-MoE): one divisor per rotated pair's frequency


@dataclass(frozen=True)
class AttentionSpec:
    kind: str  # "gqa" | "mla"
    num_heads: int
    num_kv_heads: int
    head_dim: int  # query/key head dim (MLA: nope + rope)
    v_head_dim: int
    scaling: float
    rope: RopeSpec
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str | None = None  # None | "head" (Qwen3) | "proj" (OLMoE, over the whole projection)
    clip_qkv: float | None = None
    sliding_window: tuple[int | None, ...] = ()
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    # Llama-4: per layer, whether it rotates q/k (False: a NoPE layer; empty: every layer does),
    # and the attention chunk (queries see only keys of their own chunk; None: full causal).
    rope_layers: tuple[bool, ...] = ()
    chunked: tuple[int | None, ...] = ()
    qk_l2_norm: bool = False  # Llama-4: weightless RMS norm of each q/k head after rope (rope layers only)
    temperature_tuning: tuple[float, float] | None = None  # Llama-4 NoPE layers: (floor_scale, attn_scale)
    sinks: bool = False  # GPT-OSS: a learned per-head logit joins each softmax (and is dropped after it)
    output_gate: bool = False  # Qwen3-Next: q_proj also yields a per-head gate; output * sigmoid(gate)


@dataclass(frozen=True)
class LinearAttentionSpec:
    """Gated DeltaNet linear attention (Qwen3-Next, Qwen3.5-MoE): its layers and head shapes."""

    layers: tuple[bool, ...]  # per layer, True: linear attention (the others: full attention)
    num_k_heads: int
    num_v_heads: int
    k_head_dim: int
    v_head_dim: int
    conv_kernel: int

    @property
    def conv_channels(self) -> int:
        """The depthwise conv's channels: q, k and v side by side."""
        return 2 * self.num_k_heads * self.k_head_dim + self.num_v_heads * self.v_head_dim


@dataclass(frozen=True)
class RouterSpec:
    num_experts: int
    top_k: int
    scoring: str = "softmax"  # softmax | sigmoid
    topk_method: str = "greedy"  # greedy | group_limited_greedy | noaux_tc
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False
    fp32_logits: bool = False  # DeepSeek computes router logits in float32
    keep_fp32_weights: bool = False  # Mixtral combines with float32 routing weights
    scale_input: bool = False  # Llama-4: the combine weight multiplies the expert's input, not its output
    jitter_eps: float = 0.0  # sparsemixer (Phi-3.5-MoE): logits within 2*eps (relative) of a pick share its softmax
    gate_bias: bool = False  # GPT-OSS: the router's linear has a bias (router.bias)


@dataclass(frozen=True)
class SharedExpertSpec:
    intermediate: int
    gated: bool  # Qwen2-MoE: output scaled by sigmoid(shared_expert_gate(x))


@dataclass(frozen=True)
class Naming:
    """Checkpoint tensor names of one family (format strings over layer and expert)."""

    moe_prefix: str  # e.g. "model.layers.{layer}.mlp"
    expert_gate: str
    expert_up: str
    expert_down: str
    router: str
    shared_prefix: str | None = None
    shared_gate: str | None = None
    correction_bias: str | None = None
    dense_prefix: str = "model.layers.{layer}.mlp"  # a dense layer's FFN
    # Llama-4 stores a layer's experts fused: gate_up [E, H, 2I] and down [E, I, H] (x @ w, not w @ x)
    fused_gate_up: str | None = None
    fused_down: str | None = None
    # GPT-OSS: gate and up columns of gate_up alternate (gate = [..., ::2], up = [..., 1::2]), and
    # the experts carry biases gate_up_bias [E, 2I] (interleaved alike) and down_bias [E, H]
    fused_interleaved: bool = False
    fused_gate_up_bias: str | None = None
    fused_down_bias: str | None = None
    # Qwen3.5-MoE as published: fused gate_up [E, 2I, H] and down [E, H, I], each expert's [out, in]
    # matrices stacked (not Llama-4's [E, H, 2I] / [E, I, H])
    fused_rows: bool = False
    prefix: str = "model"  # the decoder's module path: layers, embed_tokens, norm (Qwen3.5-MoE: model.language_model)

    def expert(self, layer: int, expert: int) -> tuple[str, str, str]:
        """(gate, up, down) tensor names of one expert."""
        prefix = self.moe_prefix.format(layer=layer)
        return tuple(  # type: ignore[return-value]
            f"{prefix}.experts.{expert}.{name}.weight" for name in (self.expert_gate, self.expert_up, self.expert_down)
        )


@dataclass(frozen=True)
class Arch:
    """Everything the runtime needs to know about a checkpoint's architecture."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    rms_norm_eps: float
    dense_intermediate: int
    expert_intermediate: int
    sparse: tuple[bool, ...]
    attention: AttentionSpec
    router: RouterSpec
    naming: Naming
    shared: SharedExpertSpec | None
    dtype: torch.dtype
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    max_position_embeddings: int
    # Qwen3-Next's norms are "rms_centered": RMSNorm scaled by (1 + weight), zero-initialized weights
    norm: str = "rms"  # rms | layernorm (Phi-3.5-MoE: nn.LayerNorm with weight and bias)
    lm_head_bias: bool = False
    # GPT-OSS experts: (alpha, limit) of the clamped SwiGLU (gate clamped above at limit, up to
    # [-limit, limit], out = (up + 1) * gate * sigmoid(alpha * gate)); None: SiLU experts
    swiglu: tuple[float, float] | None = None
    linear_attention: LinearAttentionSpec | None = None  # Qwen3-Next: Gated DeltaNet layers

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(self.sparse) if s)


class ConfigReader:
    """Typed access to config.json fields; errors name the field and the file."""

    def __init__(self, config: dict[str, Any], path: Path) -> None:
        self.config = config
        self.path = path

    def _where(self) -> str:
        return str(self.path / "config.json")

    def req(self, name: str, kind: type = int) -> Any:
        if name not in self.config or self.config[name] is None:
            raise CheckpointError(f"{self._where()}: missing required field {name!r}", path=self._where(), field=name)
        return self._cast(name, self.config[name], kind)

    def opt(self, name: str, default: Any, kind: type = int) -> Any:
        value = self.config.get(name, default)
        return default if value is None else self._cast(name, value, kind)

    def _cast(self, name: str, value: Any, kind: type) -> Any:
        if kind is bool:
            if isinstance(value, bool):
                return value
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
        elif kind is float:  # JSON may hold NaN / Infinity: no config field means either
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                return float(value)
        elif isinstance(value, kind):
            return value
        raise CheckpointError(
            f"{self._where()}: field {name!r} has bad value {value!r} (expected {kind.__name__})",
            path=self._where(),
            field=name,
        )

    def positive(self, name: str, *aliases: str) -> int:
        """A required positive integer; `aliases` are other names the field goes by."""
        for alias in aliases:
            if self.config.get(name) is None and self.config.get(alias) is not None:
                name = alias
        value = self.req(name)
        if value <= 0:
            raise CheckpointError(f"{self._where()}: field {name!r} must be > 0, got {value}", field=name)
        return int(value)

    def common(self, eps: float, max_positions: int) -> dict[str, Any]:
        """The Arch fields every family reads the same way (family defaults for eps and length)."""
        rms_eps = self.opt("rms_norm_eps", eps, float)
        if rms_eps < 0:  # 1 / sqrt(mean(x^2) + eps) turns NaN wherever mean(x^2) < -eps
            raise CheckpointError(f"{self._where()}: field 'rms_norm_eps' must be >= 0, got {rms_eps}",
                                  path=self._where(), field="rms_norm_eps")
        if self.config.get("max_position_embeddings") is not None:
            self.positive("max_position_embeddings")
        return {
            "vocab_size": self.positive("vocab_size"),
            "rms_norm_eps": rms_eps,
            "dtype": self.dtype(),
            "tie_word_embeddings": self.opt("tie_word_embeddings", False, bool),
            "eos_token_ids": self.eos_ids(),
            "bos_token_id": self.opt("bos_token_id", None),
            "max_position_embeddings": self.opt("max_position_embeddings", max_positions),
        }

    def experts(self, name: str, *aliases: str) -> tuple[int, int]:
        """(routed experts, experts per token), refusing a top-k above the expert count."""
        experts = self.positive(name, *aliases)
        top_k = self.positive("num_experts_per_tok")
        if top_k > experts:
            self.refuse("num_experts_per_tok", top_k, f"more than {name}={experts}")
        return experts, top_k

    def gqa(self, hidden: int, layers: int, **extra: Any) -> AttentionSpec:
        """Grouped-query attention with the usual fields; `extra` sets bias, q/k norm, windows."""
        heads = self.positive("num_attention_heads")
        head_dim = self.opt("head_dim", hidden // heads)
        fields: dict[str, Any] = {
            "kind": "gqa",
            "num_heads": heads,
            "num_kv_heads": self.opt("num_key_value_heads", heads),
            "head_dim": head_dim,
            "v_head_dim": head_dim,
            "scaling": head_dim**-0.5,
            "rope": self.rope(head_dim),
            "sliding_window": (None,) * layers,
        }
        fields.update(extra)
        return AttentionSpec(**fields)

    def check_layers(self, arch: Arch, tensor_names: Iterable[str]) -> None:
        """The weights must hold exactly num_hidden_layers decoder layers (plus DeepSeek-V3's
        num_nextn_predict_layers draft layers, which moeflow does not run): a config with fewer
        would silently run a cut-down model, one with more would fail mid-load."""
        found = {int(m.group(1)) for name in tensor_names if (m := _LAYER_TENSOR.match(name))}
        extra = self.opt("num_nextn_predict_layers", 0)
        held = max(found) + 1 if found else 0
        missing = sorted(set(range(arch.num_layers)) - found)
        if held > arch.num_layers + extra or missing:
            shown = f"; layers {missing[:8]}{'...' if len(missing) > 8 else ''} have no tensors" if missing else ""
            raise CheckpointError(
                f"{self._where()}: field 'num_hidden_layers' is {arch.num_layers} but the weights hold "
                f"{len(found)} decoder layers ({f'model.layers.0..{held - 1}' if found else 'no model.layers.* tensors'})"
                f"{shown}: fix the config or the weights",
                path=self._where(),
                field="num_hidden_layers",
            )

    def refuse(self, option: str, value: Any, why: str = "") -> None:
        raise UnsupportedModel(
            f"{self._where()}: unsupported config option {option}={value!r}{': ' + why if why else ''}",
            path=self._where(),
            field=option,
        )

    def silu(self) -> None:
        act = self.opt("hidden_act", "silu", str)
        if act != "silu":
            self.refuse("hidden_act", act, "only silu experts are supported")

    def no_quantization(self) -> None:
        quant = self.config.get("quantization_config")
        if isinstance(quant, dict) and quant.get("quant_method") == "fp8":
            self.fp8_blocks(quant)  # FP8 block checkpoints as published load as they are (store/fp8.py)
            return
        if self.config.get("quantization_config"):
            method = self.config["quantization_config"].get("quant_method", "?")
            self.refuse("quantization_config", method, "load the unquantized checkpoint; moeflow quantizes experts itself")

    def fp8_blocks(self, quant: dict[str, Any]) -> None:
        """Refuse the FP8 variants moeflow does not read: only e4m3 codes with float32 block scales
        (weight_scale_inv) and dynamic activations, as DeepSeek-V3, Kimi-K2, MiniMax-M2, Qwen3-FP8 ship."""
        q = "quantization_config."
        if quant.get("fmt", "e4m3") != "e4m3":
            self.refuse(q + "fmt", quant["fmt"], "only e4m3 FP8 weights are supported")
        if quant.get("activation_scheme", "dynamic") != "dynamic":
            self.refuse(q + "activation_scheme", quant["activation_scheme"], "only dynamic activations (no static scales)")
        block = quant.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            self.refuse(q + "weight_block_size", block, "expected two positive ints (per-block scales)")
        if quant.get("scale_fmt") not in (None, "float32", "ue8m0"):
            self.refuse(q + "scale_fmt", quant["scale_fmt"], "block scales must be float32")
        if quant.get("modules_to_convert"):
            self.refuse(q + "modules_to_convert", quant["modules_to_convert"], "FP8 embeddings are not supported")

    def dtype(self) -> torch.dtype:
        name = self.config.get("dtype") or self.config.get("torch_dtype") or "float32"
        if name not in _DTYPES:
            self.refuse("dtype", name)
        return _DTYPES[name]

    def eos_ids(self) -> tuple[int, ...]:
        eos = self.config.get("eos_token_id")
        if eos is None:
            return ()
        ids = eos if isinstance(eos, list) else [eos]
        return tuple(int(i) for i in ids if isinstance(i, int) and not isinstance(i, bool))

    def rope(self, dim: int, *, interleaved: bool = False, partial_default: float | None = None) -> RopeSpec:
        """Normalize old (rope_theta + rope_scaling) and new (rope_parameters) layouts. Families
        that rotate only part of each head (GLM) pass `partial_default`: the RopeSpec then spans
        int(dim * partial_rotary_factor) dims, as transformers computes them; others refuse it."""
        source = "rope_parameters" if self.config.get("rope_parameters") else "rope_scaling"
        params = dict(self.config.get(source) or {})
        theta_field = f"{source}.rope_theta" if "rope_theta" in params else "rope_theta"
        if "rope_theta" not in params:
            params["rope_theta"] = self.opt("rope_theta", 10000.0, float)
        theta = params["rope_theta"]
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 < theta < math.inf:
            # theta ** (-i / dim) is the rotation frequency: 0 or below gives inf / NaN angles
            raise CheckpointError(
                f"{self._where()}: field {theta_field!r} is {theta!r}; the rope base must be a finite number > 0",
                path=self._where(),
                field=theta_field,
            )
        kind = str(params.get("rope_type", params.get("type", "default")))
        if kind not in ("default", "linear", "llama3", "yarn"):
            self.refuse("rope_type", kind, "supported: default, linear, llama3, yarn")
        if partial_default is not None:  # transformers: rope_parameters, then the top-level field, then the default
            factor = params.get("partial_rotary_factor", self.opt("partial_rotary_factor", partial_default, float))
            rotated = int(dim * factor) if isinstance(factor, (int, float)) and not isinstance(factor, bool) else 0
            if not 0 < rotated <= dim or rotated % 2:
                self.refuse("partial_rotary_factor", factor, f"must rotate an even number of the {dim} head dims")
            dim = rotated
        elif params.get("partial_rotary_factor", 1.0) != 1.0:
            self.refuse("partial_rotary_factor", params["partial_rotary_factor"])
        max_pos = self.opt("max_position_embeddings", 4096)
        if kind in ("llama3", "yarn"):
            params.setdefault(
                "original_max_position_embeddings", self.opt("original_max_position_embeddings", max_pos)
            )
        numeric = {k: float(v) for k, v in params.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if kind == "yarn" and "factor" not in numeric:
            numeric["factor"] = max_pos / numeric["original_max_position_embeddings"]
        if kind in ("linear", "llama3") and "factor" not in numeric:
            self.refuse("rope_scaling", params, "factor is required")
        if kind == "yarn":
            numeric["truncate"] = float(params.get("truncate", True))
        return RopeSpec(kind, float(params["rope_theta"]), dim, interleaved, numeric, max_pos)

    def sliding(self, num_layers: int, *, use_flag: str | None) -> tuple[int | None, ...]:
        window = self.config.get("sliding_window")
        if use_flag is not None and not self.config.get(use_flag, False):
            window = None
        if not window:
            return (None,) * num_layers
        layer_types = self.config.get("layer_types")
        if isinstance(layer_types, list) and len(layer_types) == num_layers:
            return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
        max_window_layers = self.config.get("max_window_layers")
        if use_flag is not None and isinstance(max_window_layers, int):
            return tuple(int(window) if i >= max_window_layers else None for i in range(num_layers))
        return (int(window),) * num_layers
