"""MiniMax-M2 (minimax_m2) beyond the parity sweep's tiny model: a nonzero e_score_correction_bias,
how rotary_dim, partial_rotary_factor and the default head_dim and rope base are read, and a refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeflow.errors import UnsupportedModel
from moeflow.models import minimax
from moeflow.models.base import Arch, ConfigReader
from tests.hf_models import PROMPT, TINY, assert_engine_matches, hf_reference, load_hf, perturb



def _save(out: Path) -> Path:
    """TINY's model with a random e_score_correction_bias (a buffer: save_tiny leaves it at zero),
    so the bias changes which experts are chosen but not their weights, as in transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("minimax_m2", **TINY["minimax_m2"])).eval()
    perturb(model, biases=False, correction_bias=0.3)
    model.save_pretrained(out)
    return out


@pytest.mark.asyncio
async def test_correction_bias_picks_experts_as_transformers_does(tmp_path: Path) -> None:
    path = _save(tmp_path / "mm")
    hf = load_hf(path)
    want, tokens = hf_reference(hf)
    await assert_engine_matches(path, want, tokens, ("smallest", "100%"))
    with torch.no_grad():  # the bias decides the experts here: without it transformers' logits move
        for name, buf in hf.named_buffers():
            if "e_score_correction_bias" in name:
                buf.zero_()
        unbiased = hf(torch.tensor([PROMPT])).logits[0].float()
    assert (unbiased - want).abs().max() / want.abs().max() > 1e-3


def _parse(**fields: object) -> Arch:
    config = {"model_type": "minimax_m2", **TINY["minimax_m2"], **fields}
    return minimax.parse(ConfigReader({k: v for k, v in config.items() if v is not None}, Path("/ckpt")))


def test_rotary_dim_partial_factor_head_dim_and_theta_are_read_as_transformers_does() -> None:
    from transformers import AutoConfig

    for fields in ({}, {"rotary_dim": None}, {"rotary_dim": 4, "partial_rotary_factor": 0.75},
                   {"head_dim": None, "hidden_size": 64, "rotary_dim": 64}, {"rope_theta": 1e4}):
        config = {**TINY["minimax_m2"], **fields}
        hf = AutoConfig.for_model("minimax_m2", **{k: v for k, v in config.items() if v is not None})
        rope = _parse(**fields).attention.rope
        assert rope.dim == int(hf.head_dim * hf.rope_parameters.get("partial_rotary_factor", 1.0)), fields
        assert rope.theta == hf.rope_parameters["rope_theta"], fields
        assert _parse(**fields).attention.head_dim == hf.head_dim, fields


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        # MiniMax-M2's FP8 release loads (tests/models/test_fp8.py); FP8 variants it does not use are refused
        ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"}},
         "quantization_config.activation_scheme"),
        ({"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
        ({"rotary_dim": 3}, "partial_rotary_factor"),  # an odd number of rotated dims has no pairs
    ],
)
def test_unhandled_minimax_variants_are_refused_naming_the_field(fields: dict[str, object], field: str) -> None:
    with pytest.raises(UnsupportedModel) as err:
        _parse(**fields)
    assert err.value.field == field
