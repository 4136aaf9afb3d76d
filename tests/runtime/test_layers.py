"""Dense building blocks against transformers' own arithmetic, bit for bit where the code claims it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeflow.models.base import RopeSpec
from moeflow.runtime.layers import GQAAttention, KVCache, rms_norm
from moeflow.runtime.rope import Rotary
from tests.conftest import HFCheckpoints
from tests.runtime.opcount import load_model


def _transformers_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_is_bit_identical_to_transformers(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    for shape in ((1, 64), (7, 64), (1, 4, 16), (3, 1024), (2, 8, 128)):
        x = (torch.randn(shape, generator=gen) * 3).to(dtype)
        w = torch.randn(shape[-1], generator=gen).to(dtype)
        assert torch.equal(rms_norm(x, w, 1e-6), _transformers_rms_norm(x, w, 1e-6)), (dtype, shape)


@pytest.mark.parametrize("seq_dim", [0, 1])
def test_kv_cache_keeps_every_position_across_growth(seq_dim: int) -> None:
    # A prefill then single-token steps past two doublings (64 -> 128 -> 256 positions): the
    # views returned must equal everything appended so far, in order.
    shapes = ((2, 3), (2, 5)) if seq_dim == 1 else ((3,), (5,))
    cache = KVCache(shapes, torch.float32, seq_dim=seq_dim)
    gen = torch.Generator().manual_seed(2)
    seen: list[list[torch.Tensor]] = [[], []]
    for t in [40] + [1] * 150 + [70]:
        parts = []
        for i, shape in enumerate(shapes):
            full = list(shape)
            full.insert(seq_dim, t)
            parts.append(torch.randn(full, generator=gen))
            seen[i].append(parts[-1])
        views = cache.append(*parts)
        for i, view in enumerate(views):
            assert torch.equal(view, torch.cat(seen[i], dim=seq_dim))
    assert cache.length == 260 and cache.buffers[0].shape[seq_dim] >= 260


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotation_is_bit_identical_to_the_pairwise_formula(dtype: torch.dtype, interleaved: bool) -> None:
    # One multiply-add over [.., 2, dim/2] tables must give exactly x1*cos - x2*sin, x2*cos + x1*sin
    # (pairs de-interleaved on the way out), at every position of a step that starts mid-sequence.
    rot = Rotary(RopeSpec(kind="default", theta=10000.0, dim=16, interleaved=interleaved), dtype)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1)).to(dtype)  # [heads, T, dim]
    cos, sin = rot.tables(7, 5)
    freqs = torch.arange(7, 12, dtype=torch.float32)[:, None] * rot.inv_freq[None, :].float()
    c, s = freqs.cos().to(dtype), freqs.sin().to(dtype)
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :8], x[..., 8:])
    want = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    assert torch.equal(rot.apply(x, cos, sin), want)
    assert rot.tables(7, 5)[0] is cos  # the slices of a step are made once, for every layer


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["joint-qk-norm", "separate-qk-norms"])
@pytest.mark.asyncio
async def test_olmoe_qk_norms_and_clipping_match_transformers(tmp_path: Path, kv_heads: int) -> None:
    # OLMoE's q/k norms span whole projections: with as many kv heads as query heads one norm
    # call covers both; otherwise two. clip_qkv (after the norms) is set small enough to bite.
    from moeflow import Engine
    from tests.hf_models import load_hf, save_tiny

    path = save_tiny("olmoe", tmp_path / "olmoe", num_key_value_heads=kv_heads, clip_qkv=0.3)
    prompt = [5, 17, 42, 3, 77, 12, 9]
    with torch.no_grad():
        want = load_hf(path)(torch.tensor([prompt])).logits[0].float()
    async with Engine.open(path, device="cpu") as eng:
        prefill = await eng.logits(prompt)
        stepwise = await eng.score(prompt, stepwise=True)  # the decode path, one token per step
    for got in (prefill, stepwise):
        assert ((got - want).abs().max() / want.abs().max()) < 1e-4


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_one_token_block_rotation_gives_the_general_paths_bits(hf_checkpoints: HFCheckpoints, family: str) -> None:
    # Decoding one token, q, k and v rotate as one block with identity tables for v: v must come
    # out untouched and everything must equal the general (any-T) path bit for bit.
    model = load_model(hf_checkpoints.path(family))
    attention = model.layers[0].attention
    assert isinstance(attention, GQAAttention) and attention.one_block
    h = torch.randn(9, model.arch.hidden_size, generator=torch.Generator().manual_seed(3))
    outs = []
    for one_block in (True, False):
        attention.one_block = one_block
        cache = attention.new_cache(model.dtype)
        attention(h[:6], cache)
        outs.append([attention(h[i : i + 1], cache) for i in range(6, 9)] + [cache.buffers[0][:, :9].clone()])
    attention.one_block = True
    for fast, general in zip(*outs, strict=True):
        assert torch.equal(fast, general)
