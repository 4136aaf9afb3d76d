"""GLM-4.5 (glm4_moe) beyond the parity sweep's tiny model: the old config layout of partial rotary,
a nonzero score-correction bias, and the variants moeflow refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeflow.errors import UnsupportedModel
from moeflow.models import glm
from moeflow.models.base import ConfigReader
from tests.hf_models import PROMPT, TINY, assert_engine_matches, hf_reference, load_hf, perturb



def _save(out: Path) -> Path:
    """A GLM variant unlike the sweep's: a quarter of each head rotates, no q/k norm, no bias,
    two dense layers, one kv head, tied embeddings, and a random e_score_correction_bias (a
    buffer, which save_tiny leaves at zero), so the bias really changes which experts win."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(1)
    cfg = AutoConfig.for_model(
        "glm4_moe", **{**TINY["glm4_moe"], "num_key_value_heads": 1, "n_shared_experts": 2,
                       "num_experts_per_tok": 3, "first_k_dense_replace": 2, "n_group": 2, "topk_group": 1,
                       "norm_topk_prob": False, "use_qk_norm": False, "attention_bias": False,
                       "tie_word_embeddings": True, "routed_scaling_factor": 1.5,
                       "rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.25}},
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    perturb(model, biases=False, correction_bias=0.3)
    model.save_pretrained(out)
    # GLM-4.5's own config.json keeps partial_rotary_factor and rope_theta at the top level
    config = json.loads((out / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"])
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.asyncio
async def test_top_level_partial_rotary_and_correction_bias_match_transformers(tmp_path: Path) -> None:
    path = _save(tmp_path / "glm")
    arch = glm.parse(ConfigReader(json.loads((path / "config.json").read_text()), path))
    assert arch.attention.rope.dim == 4 and arch.attention.head_dim == 16  # int(16 * 0.25) dims rotate
    hf = load_hf(path)
    assert hf.config.rope_parameters["partial_rotary_factor"] == 0.25  # transformers reads it the same way
    want, tokens = hf_reference(hf)
    await assert_engine_matches(path, want, tokens, ("smallest", "100%"))


def _reader(**fields: object) -> ConfigReader:
    return ConfigReader({"model_type": "glm4_moe", **TINY["glm4_moe"], **fields}, Path("/ckpt"))


def test_partial_rotary_dims_are_truncated_as_transformers_does() -> None:
    assert glm.parse(_reader(partial_rotary_factor=0.3)).attention.rope.dim == 4  # int(16 * 0.3)
    assert glm.parse(_reader()).attention.rope.dim == 8  # no factor in the config: GLM's default 0.5


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.1}}, "partial_rotary_factor"),  # 1 dim
        ({"n_group": 8}, "n_group"),  # groups of one expert: transformers' top-2 per group fails on them
    ],
)
def test_unhandled_glm_variants_are_refused_naming_the_field(fields: dict[str, object], field: str) -> None:
    with pytest.raises(UnsupportedModel) as err:
        glm.parse(_reader(**fields))
    assert err.value.field == field


@pytest.mark.parametrize(
    "rope",
    [{"rope_type": "default", "rope_theta": 10000.0},
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "rope_theta": 10000.0}],
    ids=["default", "yarn"],
)
def test_partial_rotation_matches_transformers_and_passes_the_rest_through(rope: dict[str, object]) -> None:
    """The vectors themselves, at distinct positions: the first int(64 * 0.5) dims rotate as
    transformers rotates them (yarn's frequencies over the rotated dims only), the rest pass."""
    from transformers import Glm4MoeConfig
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeRotaryEmbedding, apply_rotary_pos_emb

    from moeflow.runtime.rope import Rotary

    fields = {**TINY["glm4_moe"], "head_dim": 64, "max_position_embeddings": 2048,
              "rope_parameters": {**rope, "partial_rotary_factor": 0.5}}
    cfg = Glm4MoeConfig(**fields)
    positions = [0, 3, 17, 250, 1023, 2047]
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 1, 3, len(positions), 64, generator=gen)  # [1, heads, T, head_dim] each
    cos, sin = Glm4MoeRotaryEmbedding(cfg)(q, torch.tensor([positions]))
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    spec = glm.parse(ConfigReader({"model_type": "glm4_moe", **fields}, Path("/ckpt"))).attention.rope
    assert spec.dim == 32
    rot = Rotary(spec, torch.float32)
    ours_cos, ours_sin = rot.tables(0, max(positions) + 1)
    for x, want in ((q, want_q), (k, want_k)):
        got = rot.apply(x, ours_cos[positions], ours_sin[positions])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got[..., 32:], x[..., 32:])


def test_the_router_weight_stays_float32_in_a_bfloat16_model(hf_checkpoints) -> None:
    """transformers keeps GLM's (and DeepSeek's) gate.weight in float32 at any dtype
    (_keep_in_fp32_modules_strict): the engine reads it as stored, not rounded through bfloat16."""
    from moeflow.models.checkpoint import Checkpoint
    from moeflow.models.families import parse_arch
    from moeflow.runtime.model import load_dense

    ckpt = Checkpoint(hf_checkpoints.path("glm4_moe"))
    arch = parse_arch(ckpt)
    model = load_dense(ckpt, arch, torch.bfloat16)
    layer = next(i for i, sparse in enumerate(arch.sparse) if sparse)
    stored = ckpt.get(f"model.layers.{layer}.mlp.gate.weight")
    assert stored.dtype == torch.float32
    weight = model.layers[layer].router.weight
    assert weight.dtype == torch.float32 and torch.equal(weight, stored)
    assert not torch.equal(stored.to(torch.bfloat16).float(), stored)  # the rounding this avoids is real
