"""The one table of Hub tensor names and shapes of an architecture: `synth` writes it, loading reads it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moeflow.models.base import Arch

if TYPE_CHECKING:
    from moeflow.models.checkpoint import Checkpoint

Shape = tuple[int, ...]


@dataclass(frozen=True)
class HubTensor:
    """One tensor of a Hub checkpoint: its name and the shape the config implies."""

    name: str
    shape: Shape
    # One expert's matrix inside a fused [E, in, out] Hub tensor (Llama-4): (expert, first column,
    # end column) of that tensor, whose own shape is `fused_shape`; `shape` is the matrix's [out, in].
    part: tuple[int, int, int] | None = None
    fused_shape: Shape = ()
    step: int = 1  # GPT-OSS: gate and up columns interleave, every second one is the matrix's
    rows: bool = False  # Qwen3.5-MoE: the part is rows of an [E, out, in] tensor, already [out, in]


@dataclass(frozen=True)
class MLPTensors:
    """A SiLU MLP's matrices: a routed expert, a shared expert or a dense layer's FFN."""

    gate: HubTensor  # [I, H]
    up: HubTensor  # [I, H]
    down: HubTensor  # [H, I]

    def all(self) -> list[HubTensor]:
        return [self.gate, self.up, self.down]


@dataclass(frozen=True)
class LayerTensors:
    """Every non-expert tensor of one decoder layer."""

    input_norm: HubTensor
    post_norm: HubTensor
    attention: dict[str, HubTensor]  # keyed by the attention modules' weight names (q_proj, q_bias, ...)
    router: HubTensor | None  # sparse layers only
    correction_bias: HubTensor | None  # DeepSeek-V3's e_score_correction_bias
    mlp: MLPTensors | None  # a dense layer's FFN, or a sparse layer's shared expert
    shared_gate: HubTensor | None  # Qwen2-MoE's shared_expert_gate
    input_norm_bias: HubTensor | None = None  # LayerNorm families (Phi-3.5-MoE)
    post_norm_bias: HubTensor | None = None
    router_bias: HubTensor | None = None  # GPT-OSS's router.bias

    def all(self) -> list[HubTensor]:
        out = [self.input_norm, self.post_norm, *self.attention.values()]
        out += [t for t in (self.input_norm_bias, self.post_norm_bias) if t is not None]
        out += [t for t in (self.router, self.correction_bias, self.router_bias) if t is not None]
        if self.mlp is not None:
            out += self.mlp.all()
        if self.shared_gate is not None:
            out.append(self.shared_gate)
        return out


@dataclass(frozen=True)
class ModelTensors:
    """The tensors outside the layers."""

    embed: HubTensor
    final_norm: HubTensor
    lm_head: HubTensor  # absent from checkpoints that tie it to the embedding
    final_norm_bias: HubTensor | None = None  # LayerNorm families (Phi-3.5-MoE)
    lm_head_bias: HubTensor | None = None  # Phi-3.5-MoE's lm_head_bias



def expert_tensors(arch: Arch, layer: int, expert: int) -> MLPTensors:
    h, i = arch.hidden_size, arch.expert_intermediate
    if arch.naming.fused_gate_up is not None and arch.naming.fused_down is not None:
        fused_gate_up, fused_down = fused_expert_tensors(arch, layer)
        if arch.naming.fused_interleaved:  # GPT-OSS: gate = [..., ::2], up = [..., 1::2]
            return MLPTensors(
                HubTensor(fused_gate_up.name, (i, h), (expert, 0, 2 * i), fused_gate_up.shape, 2),
                HubTensor(fused_gate_up.name, (i, h), (expert, 1, 2 * i), fused_gate_up.shape, 2),
                HubTensor(fused_down.name, (h, i), (expert, 0, h), fused_down.shape),
            )
        if arch.naming.fused_rows:
            return MLPTensors(
                HubTensor(fused_gate_up.name, (i, h), (expert, 0, i), fused_gate_up.shape, rows=True),
                HubTensor(fused_gate_up.name, (i, h), (expert, i, 2 * i), fused_gate_up.shape, rows=True),
                HubTensor(fused_down.name, (h, i), (expert, 0, h), fused_down.shape, rows=True),
            )
        return MLPTensors(
            HubTensor(fused_gate_up.name, (i, h), (expert, 0, i), fused_gate_up.shape),
            HubTensor(fused_gate_up.name, (i, h), (expert, i, 2 * i), fused_gate_up.shape),
            HubTensor(fused_down.name, (h, i), (expert, 0, h), fused_down.shape),
        )
    gate, up, down = arch.naming.expert(layer, expert)
    return MLPTensors(HubTensor(gate, (i, h)), HubTensor(up, (i, h)), HubTensor(down, (h, i)))


def fused_expert_tensors(arch: Arch, layer: int) -> tuple[HubTensor, HubTensor]:
    """A fused layout's (gate_up [E, H, 2I], down [E, I, H]) tensors of one layer."""
    e, h, i = arch.num_experts, arch.hidden_size, arch.expert_intermediate
    assert arch.naming.fused_gate_up is not None and arch.naming.fused_down is not None
    if arch.naming.fused_rows:  # [E, 2I, H], [E, H, I]
        return (HubTensor(arch.naming.fused_gate_up.format(layer=layer), (e, 2 * i, h)),
                HubTensor(arch.naming.fused_down.format(layer=layer), (e, h, i)))
    return (HubTensor(arch.naming.fused_gate_up.format(layer=layer), (e, h, 2 * i)),
            HubTensor(arch.naming.fused_down.format(layer=layer), (e, i, h)))


def fused_bias_tensors(arch: Arch, layer: int) -> list[HubTensor]:
    """GPT-OSS: a layer's fused expert biases (gate_up [E, 2I], down [E, H]); none elsewhere."""
    n = arch.naming
    if n.fused_gate_up_bias is None or n.fused_down_bias is None:
        return []
    e, h, i = arch.num_experts, arch.hidden_size, arch.expert_intermediate
    return [HubTensor(n.fused_gate_up_bias.format(layer=layer), (e, 2 * i)),
            HubTensor(n.fused_down_bias.format(layer=layer), (e, h))]


def expert_bias_tensors(arch: Arch, layer: int, expert: int) -> tuple[HubTensor, HubTensor, HubTensor] | None:
    """(gate [I], up [I], down [H]) biases of one expert, sliced like its matrices; None without."""
    fused = fused_bias_tensors(arch, layer)
    if not fused:
        return None
    gate_up, down = fused
    i, h = arch.expert_intermediate, arch.hidden_size
    return (HubTensor(gate_up.name, (i,), (expert, 0, 2 * i), gate_up.shape, 2),
            HubTensor(gate_up.name, (i,), (expert, 1, 2 * i), gate_up.shape, 2),
            HubTensor(down.name, (h,), (expert, 0, h), down.shape))


def read_tensor(ckpt: Checkpoint, tensor: HubTensor) -> torch.Tensor:
    """A tensor of the table from the checkpoint, its shape checked; a fused expert's matrix is
    its slice of the fused tensor, transposed to the [out, in] layout of per-expert checkpoints."""
    if tensor.part is None:
        ckpt.expect_shape(tensor.name, tensor.shape)
        return ckpt.get(tensor.name)
    ckpt.expect_shape(tensor.name, tensor.fused_shape)
    expert, lo, hi = tensor.part
    if tensor.rows:
        return ckpt.get_part(tensor.name, expert)[lo:hi].contiguous()
    if len(tensor.fused_shape) == 2:  # a fused bias [E, n]: the expert's row, sliced
        return ckpt.get_part(tensor.name, expert)[lo:hi:tensor.step].contiguous()
    return ckpt.get_part(tensor.name, expert)[:, lo:hi:tensor.step].t().contiguous()


def mlp_tensors(prefix: str, hidden: int, intermediate: int) -> MLPTensors:
    h, i = hidden, intermediate
    return MLPTensors(
        HubTensor(f"{prefix}.gate_proj.weight", (i, h)),
        HubTensor(f"{prefix}.up_proj.weight", (i, h)),
        HubTensor(f"{prefix}.down_proj.weight", (h, i)),
    )


def _mla(arch: Arch, p: str) -> dict[str, HubTensor]:
    s, h = arch.attention, arch.hidden_size
    q_out, kv_a = s.num_heads * s.head_dim, s.kv_lora_rank + s.qk_rope_head_dim
    out: dict[str, HubTensor] = {}
    if s.q_lora_rank is None:
        out["q_proj"] = HubTensor(f"{p}.q_proj.weight", (q_out, h))
    else:
        out["q_a_proj"] = HubTensor(f"{p}.q_a_proj.weight", (s.q_lora_rank, h))
        out["q_a_layernorm"] = HubTensor(f"{p}.q_a_layernorm.weight", (s.q_lora_rank,))
        out["q_b_proj"] = HubTensor(f"{p}.q_b_proj.weight", (q_out, s.q_lora_rank))
        if s.qkv_bias:
            out["q_a_bias"] = HubTensor(f"{p}.q_a_proj.bias", (s.q_lora_rank,))
    out["kv_a_proj_with_mqa"] = HubTensor(f"{p}.kv_a_proj_with_mqa.weight", (kv_a, h))
    out["kv_a_layernorm"] = HubTensor(f"{p}.kv_a_layernorm.weight", (s.kv_lora_rank,))
    out["kv_b_proj"] = HubTensor(
        f"{p}.kv_b_proj.weight", (s.num_heads * (s.qk_nope_head_dim + s.v_head_dim), s.kv_lora_rank)
    )
    out["o_proj"] = HubTensor(f"{p}.o_proj.weight", (h, s.num_heads * s.v_head_dim))
    if s.qkv_bias:
        out["kv_a_bias"] = HubTensor(f"{p}.kv_a_proj_with_mqa.bias", (kv_a,))
    if s.o_bias:
        out["o_bias"] = HubTensor(f"{p}.o_proj.bias", (h,))
    return out


def _gqa(arch: Arch, p: str) -> dict[str, HubTensor]:
    s, h = arch.attention, arch.hidden_size
    q_out, kv_out = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    out: dict[str, HubTensor] = {}
    for name, rows in (("q", q_out), ("k", kv_out), ("v", kv_out)):
        out[f"{name}_proj"] = HubTensor(f"{p}.{name}_proj.weight", (rows, h))
        if s.qkv_bias:
            out[f"{name}_bias"] = HubTensor(f"{p}.{name}_proj.bias", (rows,))
    out["o_proj"] = HubTensor(f"{p}.o_proj.weight", (h, q_out))
    if s.output_gate:  # Qwen3-Next: each head's query rows, then its gate rows
        out["q_proj"] = HubTensor(f"{p}.q_proj.weight", (2 * q_out, h))
    if s.o_bias:
        out["o_bias"] = HubTensor(f"{p}.o_proj.bias", (h,))
    if s.sinks:
        out["sinks"] = HubTensor(f"{p}.sinks", (s.num_heads,))
    if s.qk_norm is not None:
        # "head" (Qwen3) normalizes each head, "proj" (OLMoE) the whole projection
        q_dim, k_dim = (s.head_dim, s.head_dim) if s.qk_norm == "head" else (q_out, kv_out)
        out["q_norm"] = HubTensor(f"{p}.q_norm.weight", (q_dim,))
        out["k_norm"] = HubTensor(f"{p}.k_norm.weight", (k_dim,))
    return out


def layer_tensors(arch: Arch, layer: int) -> LayerTensors:
    h, names = arch.hidden_size, arch.naming
    p = f"{names.prefix}.layers.{layer}"
    attention = (_mla if arch.attention.kind == "mla" else _gqa)(arch, f"{p}.self_attn")
    if arch.linear_attention is not None and arch.linear_attention.layers[layer]:  # Qwen3-Next's Gated DeltaNet
        from moeflow.models.qwen3_next import linear_attention_tensors

        attention = linear_attention_tensors(arch, f"{p}.linear_attn")
    router = correction_bias = shared_gate = router_bias = None
    mlp = None
    if arch.sparse[layer]:
        router = HubTensor(names.router.format(layer=layer), (arch.num_experts, h))
        if arch.router.gate_bias:  # GPT-OSS: router.weight's bias beside it
            router_bias = HubTensor(names.router.format(layer=layer).removesuffix("weight") + "bias", (arch.num_experts,))
        if arch.router.correction_bias and names.correction_bias:
            correction_bias = HubTensor(names.correction_bias.format(layer=layer), (arch.num_experts,))
        if arch.shared is not None and names.shared_prefix:
            mlp = mlp_tensors(names.shared_prefix.format(layer=layer), h, arch.shared.intermediate)
            if arch.shared.gated and names.shared_gate:
                shared_gate = HubTensor(names.shared_gate.format(layer=layer), (1, h))
    else:
        mlp = mlp_tensors(names.dense_prefix.format(layer=layer), h, arch.dense_intermediate)
    return LayerTensors(
        input_norm=HubTensor(f"{p}.input_layernorm.weight", (h,)),
        post_norm=HubTensor(f"{p}.post_attention_layernorm.weight", (h,)),
        attention=attention,
        router=router,
        correction_bias=correction_bias,
        mlp=mlp,
        shared_gate=shared_gate,
        input_norm_bias=HubTensor(f"{p}.input_layernorm.bias", (h,)) if arch.norm == "layernorm" else None,
        post_norm_bias=HubTensor(f"{p}.post_attention_layernorm.bias", (h,)) if arch.norm == "layernorm" else None,
        router_bias=router_bias,
    )


def model_tensors(arch: Arch) -> ModelTensors:
    h, v, prefix = arch.hidden_size, arch.vocab_size, arch.naming.prefix
    return ModelTensors(
        HubTensor(f"{prefix}.embed_tokens.weight", (v, h)), HubTensor(f"{prefix}.norm.weight", (h,)),
        HubTensor("lm_head.weight", (v, h)),
        HubTensor("model.norm.bias", (h,)) if arch.norm == "layernorm" else None,
        HubTensor("lm_head.bias", (v,)) if arch.lm_head_bias else None,
    )


def checkpoint_tensors(arch: Arch) -> list[HubTensor]:
    """Every tensor of a checkpoint, in file order: embedding, layers, final norm, head, then experts."""
    top = model_tensors(arch)
    out = [top.embed]
    for layer in range(arch.num_layers):
        out += layer_tensors(arch, layer).all()
    out.append(top.final_norm)
    if top.final_norm_bias is not None:
        out.append(top.final_norm_bias)
    if not arch.tie_word_embeddings:
        out.append(top.lm_head)
    if top.lm_head_bias is not None:
        out.append(top.lm_head_bias)
    for layer in arch.moe_layers:
        if arch.naming.fused_gate_up is not None:
            out += fused_expert_tensors(arch, layer)
            out += fused_bias_tensors(arch, layer)
            continue
        for e in range(arch.num_experts):
            out += expert_tensors(arch, layer, e).all()
    return out
