"""Tiny random checkpoints of every supported family, saved by transformers itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "llama4_text", "phimoe",
            "glm4_moe", "minimax_m2", "gpt_oss", "qwen3_next", "qwen3_5_moe_text")

TINY: dict[str, dict[str, Any]] = {
    "mixtral": dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2),
    "qwen2_moe": dict(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                      shared_expert_intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1]),
    "qwen3_moe": dict(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=6,
                      num_experts_per_tok=2, head_dim=16, norm_topk_prob=True),
    "olmoe": dict(vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
                  eos_token_id=2, pad_token_id=1),
    "deepseek_v2": dict(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16,
                        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=2,
                        topk_group=1, topk_method="group_limited_greedy", routed_scaling_factor=1.5),
    "deepseek_v3": dict(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16,
                        q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=4,
                        topk_group=2, routed_scaling_factor=2.5),
    # half of each 16-dim head rotates (GLM's default partial_rotary_factor 0.5), q/k norm and q/k/v bias on
    "glm4_moe": dict(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                     n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, use_qk_norm=True,
                     attention_bias=True),
    # rotary_dim 8 of head_dim 16 (MiniMax-M2: 64 of 128); q/k norms over the whole projections
    "minimax_m2": dict(vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=6,
                       num_experts_per_tok=2, rotary_dim=8, bos_token_id=1, eos_token_id=2),
    # 4 layers: RoPE+chunked / NoPE+full alternate (no_rope_layer_interval=2), MoE every 2nd layer;
    # chunks of 4 positions (prompt 10 + 12 new tokens cross five), temperature tuning steps every 3
    # positions, llama3 rope scaling whose low-frequency bands the short original length reaches.
    "llama4_text": dict(vocab_size=96, hidden_size=32, intermediate_size=24, intermediate_size_mlp=48,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                        num_local_experts=6, num_experts_per_tok=1, interleave_moe_layer_step=2,
                        no_rope_layer_interval=2, attention_chunk_size=4, floor_scale=3, attn_scale=0.5,
                        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                             low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_position_embeddings=16)),
    # router_jitter_noise 0.2: save_tiny leaves phimoe's router (mlp.router) at its small init, where
    # the default 0.01 window would hold one expert per pick and every weight would be exactly 1
    "phimoe": dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, attention_bias=True,
                   router_jitter_noise=0.2),
    # sliding window 4 on layers 0 and 2 (GptOssConfig's alternation) so the 22 positions cross it; the
    # default yarn rope; swiglu_limit 0.2 so the clamps bind at this init (the default 7 never would)
    "gpt_oss": dict(vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, num_local_experts=6, num_experts_per_tok=2, sliding_window=4,
                    swiglu_limit=0.2),
    # 4 layers: Gated DeltaNet on 0 and 2, gated full attention on 1 and 3 (full_attention_interval 2), layer 2
    # dense; 2 key / 4 value heads (grouped), partial rotary (4 of 16 dims); generation runs the recurrent step
    "qwen3_next": dict(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                       shared_expert_intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                       linear_key_head_dim=8, linear_value_head_dim=8, num_experts=6, num_experts_per_tok=2,
                       mlp_only_layers=[2], full_attention_interval=2),
    # Qwen3.5-MoE's text model: qwen3_next's layers with separate in_proj_qkv/z/b/a, every layer sparse
    "qwen3_5_moe_text": dict(vocab_size=96, hidden_size=32, moe_intermediate_size=24,
                             shared_expert_intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                             linear_key_head_dim=8, linear_value_head_dim=8, num_experts=6, num_experts_per_tok=2,
                             full_attention_interval=2),
}


def save_tiny(family: str, out: Path, seed: int = 0, **overrides: Any) -> Path:
    """Random float32 model of `family`; norms and biases perturbed so those paths are exercised."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(family, **{**TINY[family], **overrides})
    model = AutoModelForCausalLM.from_config(cfg).eval()
    perturb(model)
    model.save_pretrained(out)
    return out


def perturb(model: Any, biases: bool = True, correction_bias: float = 0.0) -> None:
    """Norms (and biases) nudged off their init so those paths are exercised, router weights spread
    so tokens reach many experts, and, when `correction_bias` is set, the score-correction bias
    buffers (which init leaves at zero) drawn with that spread so they really change the choice."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or (biases and "bias" in name):
                param.add_(torch.randn_like(param) * 0.1)
            elif "gate.weight" in name:
                param.normal_(0, 0.5)  # spread the routing over experts
        if correction_bias:
            for name, buf in model.named_buffers():
                if "e_score_correction_bias" in name:
                    buf.normal_(0, correction_bias)


def copy_with_config(src: Path, dst: Path, **config: Any) -> Path:
    """A copy of checkpoint `src` at `dst` with these config.json fields set."""
    shutil.copytree(src, dst)
    data = json.loads((dst / "config.json").read_text())
    data.update(config)
    (dst / "config.json").write_text(json.dumps(data))
    return dst


def load_hf(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


PROMPT = [5, 17, 42, 3, 77, 12, 9, 60, 31, 8]


def hf_reference(hf: Any) -> tuple[torch.Tensor, list[int]]:
    """transformers' own prefill logits (float32) of PROMPT and its 12 greedy tokens."""
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = hf(ids).logits[0].float()
        out = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    return logits, out[0, len(PROMPT):].tolist()


async def assert_engine_matches(path: Path, want: torch.Tensor, tokens: list[int], budgets: tuple[Any, ...]) -> None:
    """At each budget ("smallest": the top-k of one layer), the CPU engine's prefill logits are
    within 1e-4 (relative) of `want` and its 12 greedy tokens equal `tokens`."""
    from moeflow import Engine

    for budget in budgets:
        if budget == "smallest":
            async with Engine.open(path, device="cpu") as eng:
                budget = eng.plan.min_budget_bytes
        async with Engine.open(path, device="cpu", expert_budget=budget) as eng:
            got = await eng.logits(PROMPT)
            assert (got - want).abs().max() / want.abs().max() < 1e-4, budget
            assert (await eng.generate(PROMPT, 12)).tokens == tokens, budget
