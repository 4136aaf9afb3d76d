"""MXFP4 math (store/mxfp4.py): bit-identical to transformers' dequantization, exact round trips of
representable values, the Hub's scale rule, and the packing across many blocks and rows."""

from __future__ import annotations

import pytest
import torch

from moeflow.store import mxfp4


def _hub_dequant(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """transformers' own dequantization of [E, R, G, 16] blocks -> [E, C, R] (its parameter layout)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rows", "cols"), [(1, 32), (3, 96), (10, 320), (64, 2880)])
def test_dequantize_is_bit_identical_to_transformers(rows: int, cols: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(rows * cols)
    blocks = torch.randint(0, 256, (2, rows, cols // 32, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(95, 150, (2, rows, cols // 32), generator=gen, dtype=torch.uint8)  # float16 subnormals and overflow too
    want = _hub_dequant(blocks, scales, dtype)  # [2, C, R]
    for e in range(2):
        got = mxfp4.dequantize(blocks[e], scales[e], dtype)
        assert got.shape == (rows, cols) and got.dtype == dtype
        itype = torch.int16 if dtype.itemsize == 2 else torch.int32  # compare bits: -0.0 and 0.0 differ
        assert torch.equal(got.view(itype), want[e].t().contiguous().view(itype))


def test_every_code_and_nibble_order() -> None:
    # one row of one block: byte j holds column 2j (low nibble) and 2j + 1 (high nibble)
    codes = torch.arange(32, dtype=torch.uint8) % 16
    blocks = (codes[0::2] | (codes[1::2] << 4)).view(1, 1, 16)
    scales = torch.tensor([[127]], dtype=torch.uint8)  # 2**0
    got = mxfp4.dequantize(blocks, scales)
    assert got[0].tolist() == [mxfp4.FP4_VALUES[int(c)] for c in codes]
    assert mxfp4.dequantize(blocks, scales + 3)[0].tolist() == [8 * mxfp4.FP4_VALUES[int(c)] for c in codes]
    assert mxfp4.dequantize(blocks, scales - 2)[0].tolist() == [mxfp4.FP4_VALUES[int(c)] / 4 for c in codes]


@pytest.mark.parametrize(("rows", "cols"), [(1, 32), (5, 64), (7, 2880)])
def test_representable_values_round_trip_exactly(rows: int, cols: int) -> None:
    gen = torch.Generator().manual_seed(cols)
    values = torch.tensor(mxfp4.FP4_VALUES)[torch.randint(0, 16, (rows, cols), generator=gen)]
    exps = torch.randint(-20, 20, (rows, cols // 32), generator=gen)
    values[:, ::32] = 6.0  # each block reaches 6 * 2**e, so its scale is exactly 2**e
    w = values * torch.exp2(exps.float()).repeat_interleave(32, dim=1)
    blocks, scales = mxfp4.quantize(w)
    assert blocks.shape == (rows, cols // 32, 16) and scales.shape == (rows, cols // 32)
    assert torch.equal(scales.to(torch.int64), exps + 127)
    assert torch.equal(mxfp4.dequantize(blocks, scales), w)
    again = mxfp4.quantize(mxfp4.dequantize(blocks, scales))  # a dequantized matrix re-encodes to its bytes
    assert torch.equal(again[0], blocks) and torch.equal(again[1], scales)


def test_scale_rounds_up_and_values_to_nearest_even() -> None:
    # max 3.5: 3.5 / 6 rounds up to the scale 1 (byte 127); 3.5 ties 3 and 4 -> 4 (even code 6)
    w = torch.zeros(1, 32)
    w[0, :6] = torch.tensor([3.5, 0.25, 0.75, -1.25, 5.0, -2.5])
    blocks, scales = mxfp4.quantize(w)
    assert scales.tolist() == [[127]]
    got = mxfp4.dequantize(blocks, scales)[0, :6].tolist()
    assert got == [4.0, 0.0, 1.0, -1.0, 4.0, -2.0]
    assert mxfp4.quantize(torch.zeros(2, 64))[1].tolist() == [[0, 0], [0, 0]]


def test_quantize_error_is_bounded_by_half_a_step() -> None:
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(1))
    blocks, scales = mxfp4.quantize(w)
    back = mxfp4.dequantize(blocks, scales)
    step = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=1)  # the coarsest gap is 2 units
    assert ((back - w).abs() <= step + 1e-12).all()
    assert (back - w).abs().max() < w.abs().max()


def test_deinterleave_moves_whole_rows() -> None:
    t = torch.arange(12).view(6, 2)
    d = mxfp4.deinterleave(t)
    assert d[:, 0].tolist() == [0, 4, 8, 2, 6, 10]
    assert torch.equal(mxfp4.interleave(d), t)


def test_refuses_columns_not_in_blocks() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.quantize(torch.zeros(2, 48))
