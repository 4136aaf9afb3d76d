"""RoPE scaling variants against transformers' own implementations."""

from __future__ import annotations

import pytest
import torch

from moeflow.models.base import ConfigReader
from moeflow.runtime.rope import Rotary, inverse_frequencies

CASES = {
    "default": {"rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 512, "rope_theta": 500000.0},
    "yarn": {"rope_type": "yarn", "factor": 40.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
             "mscale_all_dim": 1.0, "original_max_position_embeddings": 512, "rope_theta": 10000.0},
    "yarn-plain": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "rope_theta": 10000.0},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_inverse_frequencies_match_transformers(case: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from transformers import MixtralConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(CASES[case])
    cfg = MixtralConfig(hidden_size=256, num_attention_heads=4, head_dim=64, max_position_embeddings=2048, rope_parameters=params)
    kind = params.get("rope_type", "default")
    if kind == "default":
        ref_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, 64, 2, dtype=torch.int64).float() / 64))
        ref_factor = 1.0
    else:
        ref_freq, ref_factor = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu")
    ours = ConfigReader({"rope_parameters": params, "max_position_embeddings": 2048}, tmp_path).rope(64)
    freq, factor = inverse_frequencies(ours)
    torch.testing.assert_close(freq, ref_freq.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(ref_factor)


def test_interleaved_rotation_preserves_dot_products_of_the_pairwise_form() -> None:
    from moeflow.models.base import RopeSpec

    spec = RopeSpec("default", 10000.0, 16, interleaved=True)
    rot = Rotary(spec, torch.float64)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 5, 16, dtype=torch.float64, generator=gen)
    k = torch.randn(3, 5, 16, dtype=torch.float64, generator=gen)
    cos, sin = rot.tables(0, 5)
    ours = (rot.apply(q, cos, sin) * rot.apply(k, cos, sin)).sum(-1)
    # reference: complex multiplication of consecutive pairs (DeepSeek's original form)
    angles = torch.complex(cos, sin)
    qc = torch.view_as_complex(q.reshape(3, 5, 8, 2).contiguous()) * angles
    kc = torch.view_as_complex(k.reshape(3, 5, 8, 2).contiguous()) * angles
    ref = (torch.view_as_real(qc) * torch.view_as_real(kc)).sum((-1, -2))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
