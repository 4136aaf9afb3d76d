"""The gated delta rule: chunked prefill equals the token-by-token recurrence, and both equal
transformers' torch reference (Qwen3-Next); the layer's state carries a sequence across passes."""

from __future__ import annotations

import pytest
import torch

from moeflow.models.base import LinearAttentionSpec
from moeflow.runtime.deltanet import (
    DeltaState,
    GatedDeltaNet,
    chunk_gated_delta_rule,
    recurrent_gated_delta_rule,
)

HK, HV, DK, DV = 2, 4, 8, 6


def _inputs(t: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(t, HK, DK, generator=gen), torch.randn(t, HK, DK, generator=gen)
    v = torch.randn(t, HV, DV, generator=gen)
    # decays from ~0.37 to ~1: long-lived and fast-fading heads both
    g = -torch.rand(t, HV, generator=gen)
    beta = torch.rand(t, HV, generator=gen)
    return q, k, v, g, beta


@pytest.mark.parametrize("length", [1, 63, 64, 65, 130])
def test_chunked_prefill_equals_the_token_by_token_recurrence(length: int) -> None:
    q, k, v, g, beta = _inputs(length)
    start = torch.randn(HV, DK, DV, generator=torch.Generator().manual_seed(1))
    for state in (torch.zeros(HV, DK, DV), start):
        chunked, chunked_state = chunk_gated_delta_rule(q, k, v, g, beta, state)
        steps, step_state = recurrent_gated_delta_rule(q, k, v, g, beta, state)
        assert chunked.shape == (length, HV, DV) and chunked_state.shape == (HV, DK, DV)
        torch.testing.assert_close(chunked, steps, rtol=0, atol=1e-5)
        torch.testing.assert_close(chunked_state, step_state, rtol=0, atol=1e-5)


@pytest.mark.parametrize("length", [1, 65, 130])
def test_rules_equal_transformers_reference(length: int) -> None:
    from transformers.models.qwen3_next import modeling_qwen3_next as hf

    q, k, v, g, beta = _inputs(length, seed=3)
    state = torch.randn(HV, DK, DV, generator=torch.Generator().manual_seed(4))
    args = (q[None], k[None], v[None])
    kw = dict(g=g[None], beta=beta[None], initial_state=state[None], output_final_state=True,
              use_qk_l2norm_in_kernel=True)
    want, want_state = hf.torch_chunk_gated_delta_rule(*args, **kw)
    got, got_state = chunk_gated_delta_rule(q, k, v, g, beta, state)
    torch.testing.assert_close(got, want[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got_state, want_state[0], rtol=0, atol=1e-5)
    rec, rec_state = recurrent_gated_delta_rule(q, k, v, g, beta, state)
    torch.testing.assert_close(rec, want[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(rec_state, want_state[0], rtol=0, atol=1e-5)


def _layer(hidden: int = 16) -> GatedDeltaNet:
    spec = LinearAttentionSpec(layers=(True,), num_k_heads=HK, num_v_heads=HV, k_head_dim=DK, v_head_dim=DV,
                               conv_kernel=4)
    gen = torch.Generator().manual_seed(5)
    r = HV // HK
    w = {
        "in_proj_qkvz": torch.randn(HK * (2 * DK + 2 * r * DV), hidden, generator=gen) * 0.3,
        "in_proj_ba": torch.randn(HK * 2 * r, hidden, generator=gen),
        "conv1d": torch.randn(spec.conv_channels, 1, 4, generator=gen) * 0.5,
        "dt_bias": torch.rand(HV, generator=gen),
        "A_log": torch.rand(HV, generator=gen).log(),
        "norm": 1 + 0.1 * torch.randn(DV, generator=gen),
        "out_proj": torch.randn(hidden, HV * DV, generator=gen) * 0.3,
    }
    return GatedDeltaNet(spec, w, 1e-6)


def test_layer_state_carries_a_sequence_across_passes_and_decode_steps() -> None:
    """A prompt in one pass, in passes of 3 (the conv's K-1 = 3 history crosses each cut), and
    token by token give the same rows: the state is all a later pass needs."""
    layer = _layer()
    x = torch.randn(70, 16, generator=torch.Generator().manual_seed(6))
    whole = layer(x, layer.new_cache(torch.float32))
    state = layer.new_cache(torch.float32)
    passes = torch.cat([layer(x[i:i + 3], state) for i in range(0, 70, 3)])
    stepped_state = layer.new_cache(torch.float32)
    stepped = torch.cat([layer(x[i:i + 1], stepped_state) for i in range(70)])
    torch.testing.assert_close(passes, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(stepped, whole, rtol=0, atol=1e-5)
    assert state.length == stepped_state.length == 70


def test_state_is_a_fixed_size_and_freed() -> None:
    layer = _layer()
    state = layer.new_cache(torch.float32)
    assert isinstance(state, DeltaState) and state.bytes_per_position == 0
    size = state.bytes_fixed
    assert size == 4 * (HV * DK * DV + (2 * HK * DK + HV * DV) * 3)
    layer(torch.randn(100, 16), state)
    assert state.recurrent.nbytes + state.conv.nbytes == size  # 100 positions later, the same bytes
    state.free()
    assert state.recurrent is None and state.conv is None
