"""FP8 block math (store/fp8.py) against transformers' own FP8 code."""

from __future__ import annotations

import pytest
import torch

from moeflow.store import fp8

finegrained = pytest.importorskip("transformers.integrations.finegrained_fp8")


@pytest.mark.parametrize("shape", [(200, 160), (130, 300), (257, 129), (64, 40), (384, 256)])
def test_dequantize_matches_transformers_block_dequant_with_partial_edges(shape):
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(*shape, generator=g) * torch.linspace(0.01, 3.0, shape[1])
    codes, scale_inv = fp8.quantize(w)
    assert codes.dtype == torch.float8_e4m3fn and scale_inv.dtype == torch.float32
    assert tuple(scale_inv.shape) == (-(-shape[0] // 128), -(-shape[1] // 128))
    ours = fp8.dequantize(codes, scale_inv)
    theirs = finegrained._dequantize_fp8_weight(codes, scale_inv, [128, 128], torch.float32)
    assert torch.equal(ours, theirs)
    # the raw bytes (what an expert blob holds) decode the same
    assert torch.equal(fp8.dequantize(codes.view(torch.uint8), scale_inv), ours)
    # FP8 keeps about 2 significant bits of relative error per block
    assert (ours - w).abs().max() <= w.abs().max() * 2**-3


def test_each_block_has_its_own_scale_and_edge_blocks_use_their_own_amax():
    w = torch.zeros(200, 160)
    w[:128, :128] = 1.0
    w[:128, 128:] = 8.0  # the partial right block
    w[128:, :128] = 0.5  # the partial bottom block
    codes, scale_inv = fp8.quantize(w)
    assert torch.equal(scale_inv, torch.tensor([[1 / 448, 8 / 448], [0.5 / 448, 1.0]]))  # all-zero block: scale 1
    assert torch.equal(fp8.dequantize(codes, scale_inv), w)


def test_quantize_matches_transformers_on_whole_blocks():
    class _Q:
        quantization_config = type("C", (), {"weight_block_size": [128, 128], "scale_fmt": None})()

    w = torch.randn(256, 384, generator=torch.Generator().manual_seed(1))
    out = finegrained.Fp8Quantize(_Q())._quantize_one("x.weight", w)
    codes, scale_inv = fp8.quantize(w)
    assert torch.equal(out["x.weight_scale_inv"], scale_inv)
    assert torch.equal(out["x.weight"].view(torch.uint8), codes.view(torch.uint8))


def test_dequantize_refuses_a_wrong_scale_grid():
    codes, scale_inv = fp8.quantize(torch.randn(200, 160))
    with pytest.raises(ValueError, match="scale grid"):
        fp8.dequantize(codes, scale_inv[:1])
