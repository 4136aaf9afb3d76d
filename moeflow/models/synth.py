"""`moeflow synth`: write a Hub-format checkpoint of any supported family with random weights."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from moeflow import corpus
from moeflow.errors import ConfigError
from moeflow.models import FAMILIES, Checkpoint, mxfp4
from moeflow.models.base import Arch, ConfigReader
from moeflow.models.tensors import checkpoint_tensors

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
BOS, EOS = 1, 2

_COMMON = {"bos_token_id": BOS, "eos_token_id": EOS, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}

# (family, size) -> config.json fields beyond _COMMON. "small" has about 1 GB or more of bf16 experts.
CONFIGS: dict[tuple[str, str], dict[str, Any]] = {
    ("mixtral", "tiny"): dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=512),
    ("mixtral", "small"): dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_attention_heads=16,
                               num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000),
    ("qwen2_moe", "tiny"): dict(hidden_size=64, intermediate_size=192, moe_intermediate_size=64,
                                shared_expert_intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1],
                                decoder_sparse_step=1, norm_topk_prob=False, vocab_size=512),
    ("qwen2_moe", "small"): dict(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=1408,
                                 shared_expert_intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                                 num_key_value_heads=16, num_experts=16, num_experts_per_tok=4, mlp_only_layers=[],
                                 decoder_sparse_step=1, norm_topk_prob=False, vocab_size=32000),
    ("qwen3_moe", "tiny"): dict(hidden_size=64, intermediate_size=192, moe_intermediate_size=64, head_dim=32,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                                num_experts_per_tok=2, norm_topk_prob=True, vocab_size=512),
    ("qwen3_moe", "small"): dict(hidden_size=1024, intermediate_size=3072, moe_intermediate_size=768, head_dim=128,
                                 num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, num_experts=32,
                                 num_experts_per_tok=4, norm_topk_prob=True, vocab_size=32000),
    ("olmoe", "tiny"): dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, vocab_size=512),
    ("olmoe", "small"): dict(hidden_size=1024, intermediate_size=512, num_hidden_layers=8, num_attention_heads=16,
                             num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=32000),
    ("deepseek_v2", "tiny"): dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                                  n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
                                  first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16,
                                  qk_nope_head_dim=16, v_head_dim=16, n_group=2, topk_group=1,
                                  topk_method="group_limited_greedy", routed_scaling_factor=1.0, vocab_size=512),
    ("deepseek_v2", "small"): dict(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=704,
                                   num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16,
                                   n_routed_experts=32, n_shared_experts=2, num_experts_per_tok=6,
                                   first_k_dense_replace=1, kv_lora_rank=256, q_lora_rank=None,
                                   qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, n_group=1, topk_group=1,
                                   topk_method="greedy", routed_scaling_factor=1.0, vocab_size=32000),
    ("deepseek_v3", "tiny"): dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                                  n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                                  first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16,
                                  qk_nope_head_dim=16, v_head_dim=16, n_group=4, topk_group=2,
                                  topk_method="noaux_tc", routed_scaling_factor=2.5, norm_topk_prob=True,
                                  vocab_size=512),
    ("deepseek_v3", "small"): dict(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                                   num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16,
                                   n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=8,
                                   first_k_dense_replace=1, kv_lora_rank=256, q_lora_rank=384,
                                   qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, n_group=8,
                                   topk_group=4, topk_method="noaux_tc", routed_scaling_factor=2.5,
                                   norm_topk_prob=True, vocab_size=32000),
    # Llama-4 text: top-1 sigmoid routing, a shared expert, fused expert tensors, every 4th layer NoPE
    # (full attention, temperature tuning), the rest chunked RoPE attention; tiny interleaves dense
    # layers (Maverick), small is all-MoE like Scout (8 layers x 16 experts, ~1.6 GB bf16)
    ("llama4_text", "tiny"): dict(hidden_size=64, intermediate_size=128, intermediate_size_mlp=256, head_dim=16,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                  num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=2,
                                  no_rope_layer_interval=4, attention_chunk_size=32, vocab_size=512),
    ("llama4_text", "small"): dict(hidden_size=1024, intermediate_size=2048, intermediate_size_mlp=4096,
                                   head_dim=64, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                                   num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1,
                                   no_rope_layer_interval=4, attention_chunk_size=1024, vocab_size=32000),
    # Phi-3.5-MoE as published: attention and lm_head biases, 2 of 16 experts (small: ~1.3 GB bf16)
    ("phimoe", "tiny"): dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, attention_bias=True,
                             lm_head_bias=True, router_jitter_noise=0.01, vocab_size=512),
    ("phimoe", "small"): dict(hidden_size=1024, intermediate_size=1600, num_hidden_layers=8, num_attention_heads=16,
                              num_key_value_heads=4, num_local_experts=16, num_experts_per_tok=2, attention_bias=True,
                              lm_head_bias=True, router_jitter_noise=0.01, vocab_size=32000),
    # GLM-4.5's layout: half of each head rotates, q/k norm, q/k/v bias, one shared expert, a dense first
    # layer, sigmoid routing scaled by 2.5 (small: 7 MoE layers x 64 experts, ~1.4 GB bf16)
    ("glm4_moe", "tiny"): dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, head_dim=32,
                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                               n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                               first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                               norm_topk_prob=True, use_qk_norm=True, attention_bias=True,
                               partial_rotary_factor=0.5, vocab_size=512),
    ("glm4_moe", "small"): dict(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, head_dim=64,
                                num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                                n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=8,
                                first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=2.5,
                                norm_topk_prob=True, use_qk_norm=True, attention_bias=True,
                                partial_rotary_factor=0.5, vocab_size=32000),
    # MiniMax-M2's layout: rotary_dim half of head_dim, q/k norms over the whole projections, every
    # layer MoE (small: 8 layers x 64 experts, ~1.6 GB bf16)
    ("minimax_m2", "tiny"): dict(hidden_size=64, intermediate_size=64, head_dim=32, rotary_dim=16,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 num_local_experts=8, num_experts_per_tok=2, vocab_size=512),
    ("minimax_m2", "small"): dict(hidden_size=1024, intermediate_size=512, head_dim=64, rotary_dim=32,
                                  num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                                  num_local_experts=64, num_experts_per_tok=8, vocab_size=32000),
    # GPT-OSS's layout: sinks, q/k/v/o biases, sliding and full layers alternating, fused interleaved
    # experts with biases and the clamped SwiGLU (small: 8 layers x 32 experts, ~1.6 GB bf16)
    ("gpt_oss", "tiny"): dict(hidden_size=64, intermediate_size=64, head_dim=16, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                              num_experts_per_tok=2, sliding_window=32, vocab_size=512),
    ("gpt_oss", "small"): dict(hidden_size=1024, intermediate_size=1024, head_dim=64, num_hidden_layers=8,
                               num_attention_heads=16, num_key_value_heads=4, num_local_experts=32,
                               num_experts_per_tok=4, sliding_window=128, vocab_size=32000),
    # Gated DeltaNet layers with gated full attention every 4th (Qwen3NextConfig's default interval)
    ("qwen3_next", "tiny"): dict(hidden_size=64, intermediate_size=192, moe_intermediate_size=64,
                                 shared_expert_intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                                 linear_key_head_dim=16, linear_value_head_dim=16, num_experts=8,
                                 num_experts_per_tok=2, vocab_size=512),
    ("qwen3_next", "small"): dict(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=384,
                                  shared_expert_intermediate_size=384, num_hidden_layers=8, num_attention_heads=8,
                                  num_key_value_heads=2, head_dim=128, linear_num_key_heads=8,
                                  linear_num_value_heads=16, linear_key_head_dim=64, linear_value_head_dim=64,
                                  num_experts=64, num_experts_per_tok=8, vocab_size=32000),
    ("qwen3_5_moe_text", "tiny"): dict(hidden_size=64, moe_intermediate_size=64,
                                       shared_expert_intermediate_size=128, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                       linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                                       linear_value_head_dim=16, num_experts=8, num_experts_per_tok=2, vocab_size=512),
    ("qwen3_5_moe_text", "small"): dict(hidden_size=1024, moe_intermediate_size=384,
                                        shared_expert_intermediate_size=384, num_hidden_layers=8,
                                        num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                                        linear_num_key_heads=8, linear_num_value_heads=16, linear_key_head_dim=64,
                                        linear_value_head_dim=64, num_experts=64, num_experts_per_tok=8,
                                        vocab_size=32000),
}
ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "llama4_text": "Llama4ForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM",
    "minimax_m2": "MiniMaxM2ForCausalLM",
    "phimoe": "PhimoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "qwen3_next": "Qwen3NextForCausalLM",
    "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
}
ALIASES = {
    "qwen2-moe": "qwen2_moe", "qwen3-moe": "qwen3_moe", "deepseek-v2": "deepseek_v2", "deepseek-v3": "deepseek_v3",
    "llama4": "llama4_text", "glm4-moe": "glm4_moe", "minimax-m2": "minimax_m2",
    "gpt-oss": "gpt_oss", "qwen3-next": "qwen3_next", "qwen3.5-moe": "qwen3_5_moe_text",
}
SHARD_BYTES = 1 << 30


def family_name(arch: str) -> str:
    name = ALIASES.get(arch, arch)
    if name not in ARCHITECTURES:
        raise ConfigError(f"--arch {arch!r}: expected one of {', '.join(sorted(ARCHITECTURES))}")
    return name


def synth_config(arch: str, size: str, dtype: torch.dtype, **overrides: Any) -> dict[str, Any]:
    family = family_name(arch)
    if (family, size) not in CONFIGS:
        raise ConfigError(f"--size {size!r}: expected tiny or small")
    cfg = {"architectures": [ARCHITECTURES[family]], "model_type": family, **_COMMON, **CONFIGS[(family, size)]}
    cfg["dtype"] = str(dtype).removeprefix("torch.")  # the name config.json uses: float32, bfloat16
    cfg["max_position_embeddings"] = 4096
    cfg["rope_theta"] = 10000.0
    if family == "mixtral":
        cfg["rope_theta"] = 1e6
    if family == "gpt_oss":  # as the Hub ships it: MXFP4 experts (quantization_config=None: the bf16 layout)
        cfg["quantization_config"] = mxfp4.quantization_config()
    cfg.update(overrides)
    if cfg.get("quantization_config") is None:
        cfg.pop("quantization_config", None)
    return cfg


def train_tokenizer(vocab_size: int, max_bytes: int = 8 << 20) -> Tokenizer:
    """A byte-level BPE trained on the standard library's sources (deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(corpus.documents("train", max_bytes), trainer)
    return tok


def _tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, std: float) -> torch.Tensor:
    if name.endswith("norm.weight") or "layernorm" in name:
        return torch.ones(shape, dtype=dtype)
    if name.endswith(".bias") or name.endswith("e_score_correction_bias"):
        return torch.zeros(shape, dtype=torch.float32 if "e_score" in name else dtype)
    return (torch.randn(shape, generator=gen, device=gen.device) * std).to(dtype).cpu()


def _shards(names: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> Iterator[list[tuple[str, tuple[int, ...]]]]:
    shard: list[tuple[str, tuple[int, ...]]] = []
    size = 0
    for name, shape in names:
        n = dtype.itemsize
        for d in shape:
            n *= d
        if shard and size + n > SHARD_BYTES:
            yield shard
            shard, size = [], 0
        shard.append((name, shape))
        size += n
    if shard:
        yield shard


def synthesize(out: str | os.PathLike[str], arch: str, size: str, *, dtype: torch.dtype | None = None,
               seed: int = 0, progress: bool = True, device: str = "cpu", **overrides: Any) -> Arch:
    """Write config.json, generation_config.json, tokenizer.json and safetensors shards into `out`.
    `device` draws the random weights there ('cuda' writes a multi-GB checkpoint in seconds; the
    values differ from the CPU's for the same seed)."""
    dtype = dtype or (torch.float32 if size == "tiny" else torch.bfloat16)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = synth_config(arch, size, dtype, **overrides)
    spec = parse_arch_from_config(cfg, out_dir)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    (out_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": BOS, "eos_token_id": EOS, "do_sample": False}, indent=2)
    )
    train_tokenizer(spec.vocab_size).save(str(out_dir / "tokenizer.json"))
    table = checkpoint_tensors(spec)
    names = [(t.name, t.shape) for t in (mxfp4.checkpoint_tensors(table, spec) if mxfp4.is_mxfp4(cfg) else table)]
    pending: dict[str, torch.Tensor] = {}  # MXFP4 scales made with their blocks
    gen = torch.Generator(device=device).manual_seed(seed)
    shards = list(_shards(names, dtype))
    weight_map: dict[str, str] = {}
    total_size = 0
    bar = tqdm(total=len(names), desc="writing weights", unit="tensor", disable=not progress)
    for i, shard in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            quantized = mxfp4.synth_tensor(name, shape, gen, 0.02, pending) if mxfp4.is_mxfp4(cfg) else None
            tensors[name] = quantized if quantized is not None else _tensor(name, shape, dtype, gen, 0.02)
            total_size += tensors[name].nbytes
            weight_map[name] = file
            bar.update(1)
        save_file(tensors, str(out_dir / file), metadata={"format": "pt"})
    bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    Checkpoint(out_dir)  # validates what was written
    return spec


def parse_arch_from_config(cfg: dict[str, Any], where: Path) -> Arch:
    return FAMILIES[cfg["model_type"]].parse(ConfigReader(cfg, where))
