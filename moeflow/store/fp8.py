"""FP8 block-quantized weights as DeepSeek-V3/R1, Kimi-K2, MiniMax-M2 and Qwen3 *-FP8 publish them.

A weight [R, C] is stored as float8_e4m3fn codes of the same shape plus a float32 `weight_scale_inv`
of shape [ceil(R / 128), ceil(C / 128)], one per 128x128 block; the blocks on the right and bottom
edges are partial when R or C is not a multiple of 128, and use the scale of the block they start in:

    w[r, c] = float(q[r, c]) * scale_inv[r // 128, c // 128]     (multiplied in float32)

That is DeepSeek's `weight_dequant` and transformers' `_dequantize_fp8_weight`. (transformers'
load-time `Fp8Dequantize` instead divides the weight evenly by the scale grid, block R / ceil(R/128),
which misreads partial edge blocks; see tests/models/test_fp8.py.) kernels/fp8.cu computes
`dequantize` on the GPU; runtime/reference.py re-exports it as that kernel's torch reference.
"""

from __future__ import annotations

import torch

BLOCK = 128
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def grid(rows: int, cols: int, block: tuple[int, int] = (BLOCK, BLOCK)) -> tuple[int, int]:
    """The scale grid of an [rows, cols] weight: ceil division, partial edge blocks included."""
    return -(-rows // block[0]), -(-cols // block[1])


def _expand(scale_inv: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """[GR, GC] block scales -> [rows, cols] per-element scales (edge blocks cut to the weight)."""
    s = scale_inv.float().repeat_interleave(block[0], dim=0)[:rows]
    return s.repeat_interleave(block[1], dim=1)[:, :cols]


def quantize(w: torch.Tensor, block: tuple[int, int] = (BLOCK, BLOCK)) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [R, C] -> (e4m3 codes [R, C], float32 scale_inv [ceil(R/b0), ceil(C/b1)]).

    Per block: scale = 448 / amax, codes = clamp(w * scale) cast to e4m3, scale_inv = 1 / scale (an
    all-zero block keeps scale 1); transformers' Fp8Quantize, with the partial edge blocks of the
    published checkpoints taking the amax of the part that exists."""
    rows, cols = w.shape
    gr, gc = grid(rows, cols, block)
    padded = torch.zeros(gr * block[0], gc * block[1], dtype=torch.float32)
    padded[:rows, :cols] = w.float()
    amax = padded.view(gr, block[0], gc, block[1]).abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, E4M3_MAX / torch.where(amax > 0, amax, torch.ones_like(amax)),
                        torch.ones_like(amax))
    scale_inv = (1.0 / scale).to(torch.float32)
    codes = (w.float() * _expand(scale, rows, cols, block)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return codes, scale_inv


def dequantize(codes: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32,
               block: tuple[int, int] = (BLOCK, BLOCK)) -> torch.Tensor:
    """e4m3 codes [R, C] and block scales -> [R, C] weights in `dtype` (what kernels/fp8.cu computes).

    `codes` may be the raw bytes (uint8) of the e4m3 values, as an expert blob holds them."""
    if codes.dtype == torch.uint8:
        codes = codes.view(E4M3)
    rows, cols = codes.shape
    if tuple(scale_inv.shape) != grid(rows, cols, block):
        raise ValueError(f"FP8 weight {list(codes.shape)} needs a scale grid {list(grid(rows, cols, block))}, "
                         f"got {list(scale_inv.shape)}")
    return (codes.float() * _expand(scale_inv, rows, cols, block)).to(dtype)
