"""Phi-3.5-MoE (phimoe): sparsemixer routing against transformers' own function, the lm_head bias,
the variants refused, and a synthesized model that opens and generates. The parity and sim sweeps
over tests.hf_models.FAMILIES cover the tiny checkpoint at every budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeflow import Engine
from moeflow.errors import UnsupportedModel
from moeflow.models import FAMILIES, Checkpoint, parse_arch
from moeflow.models.base import ConfigReader, RouterSpec
from moeflow.models.synth import synthesize
from moeflow.runtime.router import Router
from tests.hf_models import PROMPT, assert_engine_matches, hf_reference, load_hf, save_tiny



def _logits(dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 8, generator=gen) * 0.3
    logits[:8] = -logits[:8].abs()  # every logit negative: |s| and the maximum trade places in the factor
    logits[8, 2:4] = logits[8].max() + 0.5  # a tie for first: both must follow transformers' index choice
    logits[9, 5] = logits[9].max() * 1.001  # a runner-up inside the 2 * eps window
    return logits.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps", [0.0, 0.01, 0.2, 0.5])
def test_sparsemixer_gives_transformers_experts_and_weights_bit_for_bit(dtype: torch.dtype, eps: float) -> None:
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    logits = _logits(dtype)
    want_weights, want_ids = sparsemixer(logits, jitter_eps=eps, training=False)
    router = Router(RouterSpec(num_experts=8, top_k=2, topk_method="sparsemixer", jitter_eps=eps),
                    torch.zeros(8, 4, dtype=dtype), None)
    ids, weights = router.select(logits, dtype)
    assert torch.equal(ids, want_ids)
    assert weights.dtype == want_weights.dtype and torch.equal(weights, want_weights)
    if eps >= 0.2:  # the window matters here: some picks share their softmax with other experts
        assert (weights < 1).any()


@pytest.mark.asyncio
async def test_lm_head_bias_matches_transformers(tmp_path: Path) -> None:
    path = save_tiny("phimoe", tmp_path / "phimoe-head-bias", lm_head_bias=True)
    hf = load_hf(path)
    want, tokens = hf_reference(hf)
    assert hf.lm_head.bias is not None
    await assert_engine_matches(path, want, tokens, ("50%",))


def _config(tmp_path: Path, **changes: object) -> Path:
    path = save_tiny("phimoe", tmp_path / "phimoe")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _longrope(**changes: object) -> dict[str, object]:
    # as microsoft/Phi-3.5-MoE-instruct ships it (equal mscales), factors for head_dim / 2 = 4 pairs and an
    # original length of 8, which the 10-token prompt passes (transformers' generate then re-prefills)
    return {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.5, 3.0, 7.0],
            "long_factor": [2.0, 4.0, 8.0, 16.0], "short_mscale": 1.243, "long_mscale": 1.243,
            "original_max_position_embeddings": 8, **changes}


@pytest.mark.asyncio
async def test_longrope_as_published_matches_transformers(tmp_path: Path) -> None:
    path = save_tiny("phimoe", tmp_path / "phimoe-longrope", rope_parameters=_longrope(), max_position_embeddings=64)
    hf = load_hf(path)
    assert hf.config.rope_parameters["rope_type"] == "longrope"
    want, tokens = hf_reference(hf)
    await assert_engine_matches(path, want, tokens, ("50%",))


def test_longrope_with_unequal_mscales_is_refused_naming_rope_scaling(tmp_path: Path) -> None:
    path = _config(tmp_path, rope_parameters=_longrope(long_mscale=1.5))
    with pytest.raises(UnsupportedModel, match="rope_scaling='longrope'") as err:
        parse_arch(Checkpoint(path))
    assert err.value.field == "rope_scaling"


def test_other_than_two_experts_per_token_is_refused(tmp_path: Path) -> None:
    path = _config(tmp_path, num_experts_per_tok=3)
    with pytest.raises(UnsupportedModel, match="num_experts_per_tok=3") as err:
        parse_arch(Checkpoint(path))
    assert err.value.field == "num_experts_per_tok"


@pytest.mark.asyncio
async def test_synthesized_tiny_model_opens_and_generates(tmp_path: Path) -> None:
    path = tmp_path / "synth"
    arch = synthesize(path, "phimoe", "tiny", seed=4, progress=False)
    assert arch.norm == "layernorm" and arch.lm_head_bias and arch.attention.qkv_bias and arch.attention.o_bias
    async with Engine.open(path, device="cpu", expert_budget="25%") as eng:
        res = await eng.generate(eng.encode("def f(x):"), 8)
        assert len(res.tokens) == 8 and eng.stats()["misses"] > 0


def test_the_published_config_parses_to_longrope_layernorm_and_biases(tmp_path: Path) -> None:
    # microsoft/Phi-3.5-MoE-instruct's config.json (old rope_scaling layout; factors shortened to values
    # of the right count, head_dim 128 -> 64 pairs)
    cfg = {"model_type": "phimoe", "architectures": ["PhiMoEForCausalLM"], "attention_bias": True, "bos_token_id": 1,
           "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 4096, "input_jitter_noise": 0.01,
           "intermediate_size": 6400, "lm_head_bias": True, "max_position_embeddings": 131072,
           "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8,
           "num_local_experts": 16, "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
           "rope_scaling": {"long_factor": [1.5] * 64, "long_mscale": 1.243163121016122,
                            "original_max_position_embeddings": 4096, "short_factor": [1.25] * 64,
                            "short_mscale": 1.243163121016122, "type": "longrope"},
           "rope_theta": 10000.0, "router_jitter_noise": 0.01, "sliding_window": 131072, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16", "vocab_size": 32064}
    arch = FAMILIES["phimoe"].parse(ConfigReader(cfg, tmp_path))
    rope = arch.attention.rope
    assert (rope.kind, rope.theta, rope.dim, rope.ext_factors) == ("longrope", 10000.0, 128, (1.25,) * 64)
    assert rope.params["mscale"] == 1.243163121016122
    assert arch.norm == "layernorm" and arch.lm_head_bias and arch.attention.qkv_bias and arch.attention.o_bias
    assert arch.router.topk_method == "sparsemixer" and arch.router.jitter_eps == 0.01 and arch.top_k == 2
    assert arch.attention.sliding_window == (131072,) * 32 and arch.dtype == torch.bfloat16
    assert arch.naming.expert(3, 5)[0] == "model.layers.3.block_sparse_moe.experts.5.w1.weight"
