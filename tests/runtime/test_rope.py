"""Rotary embeddings against transformers' own rotations, at distinct positions, for every supported variant.

Comparing q.k at equal positions cannot catch a wrong rotation (any rotation of both cancels), so
these tests compare the rotated vectors themselves with transformers', and check q.k at m != n
against its closed form, which depends only on m - n and on the direction of rotation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from moeflow.models import FAMILIES
from moeflow.models.base import ConfigReader, RopeSpec
from moeflow.runtime.rope import Rotary, inverse_frequencies

# h = heads, T = positions, d = rotary dims.
HEADS, DIM = 3, 64
POSITIONS = [0, 3, 17, 250, 1023, 2047]  # distinct and out of order, so a table indexed wrongly shows

# rope_parameters of the GQA families (half-split pairs, rotary over the whole head).
CASES: dict[str, dict[str, Any]] = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 512, "rope_theta": 500000.0},
    "yarn": {"rope_type": "yarn", "factor": 40.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
             "mscale_all_dim": 1.0, "original_max_position_embeddings": 512, "rope_theta": 10000.0},
    "yarn-plain": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "rope_theta": 10000.0},
}
# DeepSeek's MLA: rotary over qk_rope_head_dim (16) of a 48-dim query/key head, in interleaved pairs.
MLA = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, qk_rope_head_dim=16, qk_nope_head_dim=32,
           v_head_dim=16, kv_lora_rank=32, q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2,
           max_position_embeddings=4096)
MLA_YARN = {"rope_type": "yarn", "factor": 8.0, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
            "mscale_all_dim": 0.707, "original_max_position_embeddings": 512, "rope_theta": 10000.0}


def _vectors(dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, HEADS, len(POSITIONS), dim, generator=gen)  # [1, h, T, d]
    k = torch.randn(1, HEADS, len(POSITIONS), dim, generator=gen)
    return q, k


def _ours(spec: RopeSpec, x: torch.Tensor) -> torch.Tensor:
    """moeflow's rotation of x [1, h, T, d], position POSITIONS[t] for row t."""
    rot = Rotary(spec, torch.float32)
    cos, sin = rot.tables(0, max(POSITIONS) + 1)
    return rot.apply(x, cos[POSITIONS], sin[POSITIONS])


def _ids() -> torch.Tensor:
    return torch.tensor([POSITIONS])


def _mla_arch(family: str, rope: dict[str, Any] | None, tmp_path: Path) -> tuple[Any, RopeSpec]:
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(family, **MLA, **({"rope_parameters": rope} if rope else {}))
    spec = FAMILIES[family].parse(ConfigReader(cfg.to_dict(), tmp_path)).attention.rope
    assert spec.interleaved and spec.dim == MLA["qk_rope_head_dim"]  # partial: 16 of the 48 q/k dims
    return cfg, spec


@pytest.mark.parametrize("case", sorted(CASES))
def test_inverse_frequencies_match_transformers(case: str, tmp_path: Path) -> None:
    from transformers import MixtralConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(CASES[case])
    cfg = MixtralConfig(hidden_size=256, num_attention_heads=4, head_dim=DIM, max_position_embeddings=2048,
                        rope_parameters=params)
    if params["rope_type"] == "default":
        ref_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, DIM, 2, dtype=torch.int64).float() / DIM))
        ref_factor = 1.0
    else:
        ref_freq, ref_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu")
    ours = ConfigReader({"rope_parameters": params, "max_position_embeddings": 2048}, tmp_path).rope(DIM)
    freq, factor = inverse_frequencies(ours)
    torch.testing.assert_close(freq, ref_freq.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(ref_factor)


@pytest.mark.parametrize("case", sorted(CASES))
def test_half_split_rotation_matches_transformers(case: str, tmp_path: Path) -> None:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding, apply_rotary_pos_emb

    params = dict(CASES[case])
    cfg = MixtralConfig(hidden_size=256, num_attention_heads=4, head_dim=DIM, max_position_embeddings=2048,
                        rope_parameters=params)
    q, k = _vectors(DIM, seed=1)
    cos, sin = MixtralRotaryEmbedding(cfg)(q, _ids())
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    spec = ConfigReader({"rope_parameters": params, "max_position_embeddings": 2048}, tmp_path).rope(DIM)
    torch.testing.assert_close(_ours(spec, q), want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_ours(spec, k), want_k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rope", [None, MLA_YARN], ids=["default", "yarn"])
def test_deepseek_v3_partial_interleaved_rotation_matches_transformers(rope: dict[str, Any] | None,
                                                                        tmp_path: Path) -> None:
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3RotaryEmbedding,
        apply_rotary_pos_emb_interleave,
    )

    cfg, spec = _mla_arch("deepseek_v3", rope, tmp_path)
    q, k = _vectors(spec.dim, seed=2)
    cos, sin = DeepseekV3RotaryEmbedding(cfg)(q, _ids())
    want_q, want_k = apply_rotary_pos_emb_interleave(q, k, cos, sin)  # de-interleaved out, as moeflow's
    torch.testing.assert_close(_ours(spec, q), want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_ours(spec, k), want_k, rtol=1e-5, atol=1e-5)


def test_deepseek_v2_complex_rotation_matches_transformers(tmp_path: Path) -> None:
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RotaryEmbedding, apply_rotary_emb

    cfg, spec = _mla_arch("deepseek_v2", MLA_YARN, tmp_path)
    q, k = _vectors(spec.dim, seed=3)
    want_q, want_k = apply_rotary_emb(q, k, DeepseekV2RotaryEmbedding(cfg)(q, _ids()))
    # DeepSeek-V2 keeps the pairs interleaved; moeflow lays real parts, then imaginary parts, out
    # (the same permutation for q and k, so q.k is unchanged).
    for ours, want in ((_ours(spec, q), want_q), (_ours(spec, k), want_k)):
        torch.testing.assert_close(ours, torch.cat([want[..., 0::2], want[..., 1::2]], dim=-1), rtol=1e-5, atol=1e-5)


_HERE = Path("config.json")  # only named in errors
SPECS = {
    **{case: ConfigReader({"rope_parameters": p, "max_position_embeddings": 2048}, _HERE).rope(DIM)
       for case, p in CASES.items()},
    "interleaved-yarn": ConfigReader({"rope_parameters": MLA_YARN, "max_position_embeddings": 4096}, _HERE).rope(
        MLA["qk_rope_head_dim"], interleaved=True
    ),
}


@pytest.mark.parametrize("case", sorted(SPECS))
def test_scores_depend_only_on_the_distance_and_its_sign(case: str) -> None:
    """(R_m q).(R_n k) = a^2 * sum_j Re(q_j conj(k_j) e^{i (m - n) w_j}), with q_j, k_j the j-th
    pair as a complex number, w_j its frequency and a the attention factor."""
    spec = SPECS[case]
    rot = Rotary(spec, torch.float64)
    inv_freq, factor = inverse_frequencies(spec)
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(spec.dim, dtype=torch.float64, generator=gen), torch.randn(spec.dim, dtype=torch.float64, generator=gen)

    def pairs(x: torch.Tensor) -> torch.Tensor:
        if spec.interleaved:
            return torch.complex(x[0::2], x[1::2])
        return torch.complex(x[: spec.dim // 2], x[spec.dim // 2 :])

    cos, sin = rot.tables(0, 2048)
    products = []
    for m, n in [(5, 2), (2, 5), (9, 6), (1000, 997), (40, 0), (0, 40), (1500, 1460), (7, 1900)]:
        score = float(rot.apply(q, cos[m], sin[m]) @ rot.apply(k, cos[n], sin[n]))
        angle = (m - n) * inv_freq.double()
        want = factor**2 * float((pairs(q) * pairs(k).conj() * torch.polar(torch.ones_like(angle), angle)).real.sum())
        assert score == pytest.approx(want, rel=1e-4, abs=1e-4 * float(q.norm() * k.norm())), (m, n)
        products.append(score)
    assert products[0] == pytest.approx(products[2], rel=1e-4)  # same distance 3
    assert products[0] != pytest.approx(products[1], rel=1e-3)  # distance -3 differs from +3


def test_partial_rotary_factor_is_refused_rather_than_rotated_wrongly(tmp_path: Path) -> None:
    from moeflow.errors import UnsupportedModel

    params = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    with pytest.raises(UnsupportedModel, match="partial_rotary_factor"):
        ConfigReader({"rope_parameters": params}, tmp_path).rope(DIM)
