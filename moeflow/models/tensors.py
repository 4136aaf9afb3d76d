"""Every tensor name and shape a checkpoint of a given architecture holds (Hub layout)."""

from __future__ import annotations

from moeflow.models.base import Arch


def expert_tensors(arch: Arch) -> list[tuple[str, tuple[int, ...]]]:
    h, i = arch.hidden_size, arch.expert_intermediate
    out: list[tuple[str, tuple[int, ...]]] = []
    for layer in arch.moe_layers:
        for e in range(arch.num_experts):
            gate, up, down = arch.naming.expert(layer, e)
            out += [(gate, (i, h)), (up, (i, h)), (down, (h, i))]
    return out


def _mlp(prefix: str, h: int, i: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.gate_proj.weight", (i, h)), (f"{prefix}.up_proj.weight", (i, h)), (f"{prefix}.down_proj.weight", (h, i))]


def _attention(arch: Arch, p: str) -> list[tuple[str, tuple[int, ...]]]:
    s, h = arch.attention, arch.hidden_size
    out: list[tuple[str, tuple[int, ...]]] = []
    if s.kind == "mla":
        q_out = s.num_heads * s.head_dim
        if s.q_lora_rank is None:
            out.append((f"{p}.q_proj.weight", (q_out, h)))
        else:
            out += [
                (f"{p}.q_a_proj.weight", (s.q_lora_rank, h)),
                (f"{p}.q_a_layernorm.weight", (s.q_lora_rank,)),
                (f"{p}.q_b_proj.weight", (q_out, s.q_lora_rank)),
            ]
            if s.qkv_bias:
                out.append((f"{p}.q_a_proj.bias", (s.q_lora_rank,)))
        kv_a = s.kv_lora_rank + s.qk_rope_head_dim
        out += [
            (f"{p}.kv_a_proj_with_mqa.weight", (kv_a, h)),
            (f"{p}.kv_a_layernorm.weight", (s.kv_lora_rank,)),
            (f"{p}.kv_b_proj.weight", (s.num_heads * (s.qk_nope_head_dim + s.v_head_dim), s.kv_lora_rank)),
            (f"{p}.o_proj.weight", (h, s.num_heads * s.v_head_dim)),
        ]
        if s.qkv_bias:
            out.append((f"{p}.kv_a_proj_with_mqa.bias", (kv_a,)))
        if s.o_bias:
            out.append((f"{p}.o_proj.bias", (h,)))
        return out
    q_out, kv_out = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    for name, rows in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
        out.append((f"{p}.{name}.weight", (rows, h)))
        if s.qkv_bias:
            out.append((f"{p}.{name}.bias", (rows,)))
    out.append((f"{p}.o_proj.weight", (h, q_out)))
    if s.o_bias:
        out.append((f"{p}.o_proj.bias", (h,)))
    if s.qk_norm == "head":
        out += [(f"{p}.q_norm.weight", (s.head_dim,)), (f"{p}.k_norm.weight", (s.head_dim,))]
    elif s.qk_norm == "proj":
        out += [(f"{p}.q_norm.weight", (q_out,)), (f"{p}.k_norm.weight", (kv_out,))]
    return out


def dense_tensors(arch: Arch) -> list[tuple[str, tuple[int, ...]]]:
    """All non-expert tensors: embeddings, attention, norms, routers, shared and dense MLPs."""
    h, v = arch.hidden_size, arch.vocab_size
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    names = arch.naming
    for layer in range(arch.num_layers):
        p = f"model.layers.{layer}"
        out += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,))]
        out += _attention(arch, f"{p}.self_attn")
        if arch.sparse[layer]:
            out.append((names.router.format(layer=layer), (arch.num_experts, h)))
            if arch.router.correction_bias and names.correction_bias:
                out.append((names.correction_bias.format(layer=layer), (arch.num_experts,)))
            if arch.shared is not None and names.shared_prefix:
                out += _mlp(names.shared_prefix.format(layer=layer), h, arch.shared.intermediate)
                if arch.shared.gated and names.shared_gate:
                    out.append((names.shared_gate.format(layer=layer), (1, h)))
        else:
            out += _mlp(f"{p}.mlp", h, arch.dense_intermediate)
    out.append(("model.norm.weight", (h,)))
    if not arch.tie_word_embeddings:
        out.append(("lm_head.weight", (v, h)))
    return out
