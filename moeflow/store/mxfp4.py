"""MXFP4 (OCP microscaling FP4), as GPT-OSS's Hub checkpoints store their experts.

A matrix w [R, C] (C a multiple of 32) is cut along its input columns into blocks of 32 values.
Each block has one e8m0 scale byte s (the power of two 2**(s - 127)) and 32 FP4 e2m1 codes packed
two per byte, the even column in the low nibble and the odd one in the high nibble:
    blocks [R, C/32, 16] uint8, scales [R, C/32] uint8,
    w[r, c] = FP4_VALUES[code(r, c)] * 2**(scales[r, c // 32] - 127).
A code's bit 3 is the sign; bits 0-2 index the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.

`dequantize` computes exactly what transformers' integrations/mxfp4.py (_convert_moe_packed_tensors,
its dequantize=True loading path) computes, in the same operations, so the values are bit-identical
(it then transposes to its [in, out] parameter layout; the store keeps [out, in]). `quantize` writes
what OpenAI's triton_kernels downcast_to_mxfp does by default: the scale is max|block| / 6 rounded
UP to a power of two, each value rounded to the nearest e2m1 value (ties to the even code).
kernels/mxfp4.cu implements `dequantize` on the GPU.
"""

from __future__ import annotations

import torch

BLOCK = 32  # values per scale
BIAS = 127  # e8m0 exponent bias
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_MAGNITUDES = torch.tensor(FP4_VALUES[:8])

# R = rows (outputs), C = columns (inputs), G = blocks per row (C / 32).


def _check_cols(cols: int) -> None:
    if cols % BLOCK:
        raise ValueError(f"MXFP4 packs blocks of {BLOCK} columns; {cols} columns is not a multiple of {BLOCK}")


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [R, C] float -> (blocks [R, C/32, 16] uint8, scales [R, C/32] uint8), as the Hub checkpoints."""
    r, c = w.shape
    _check_cols(c)
    wf = w.float().reshape(r, c // BLOCK, BLOCK)
    amax = wf.abs().amax(-1)
    # 2**ceil(log2(amax / 6)) on the float32 bits: adding a full mantissa bumps the exponent unless
    # the mantissa is zero (already a power of two); 0 stays 0 (scale byte 0, every code 0)
    bits = ((amax / 6.0).view(torch.int32) + 0x007FFFFF) & 0x7F800000
    scale = bits.view(torch.float32)
    scaled = torch.where(scale[..., None] > 0, wf / scale[..., None], torch.zeros_like(wf))
    mag = scaled.abs().clamp(max=6.0)
    grid = _MAGNITUDES.to(mag.device)
    lo = (torch.bucketize(mag, grid, right=True) - 1).clamp(0, 7)  # largest magnitude <= mag
    hi = (lo + 1).clamp(max=7)
    d_lo, d_hi = mag - grid[lo], grid[hi] - mag
    up = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0) & (hi != lo))
    code = torch.where(up, hi, lo).to(torch.uint8)
    code = code | ((scaled < 0) & (code > 0)).to(torch.uint8) << 3
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    return packed.contiguous(), (bits >> 23).to(torch.uint8)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks [..., G, 16] (or [R, C/2]) and scales [..., G] -> [..., G * 32] in `dtype`, with
    transformers' operations: the e2m1 table in `dtype`, then ldexp by the unbiased exponent."""
    if blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        blocks = blocks.reshape(*scales.shape, BLOCK // 2)
    *prefix, g, b = blocks.shape
    rows = blocks.numel() // b
    blk = blocks.to(torch.uint8).reshape(rows, b)
    exp = (scales.to(torch.int32) - BIAS).reshape(rows, 1)
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    out = torch.empty(rows, b * 2, dtype=dtype, device=blocks.device)
    out[:, 0::2] = lut[(blk & 0x0F).to(torch.int)]
    out[:, 1::2] = lut[(blk >> 4).to(torch.int)]
    torch.ldexp(out, exp, out=out)
    return out.reshape(*prefix, g * b * 2)


def deinterleave(t: torch.Tensor) -> torch.Tensor:
    """GPT-OSS's fused gate_up rows alternate gate, up, gate, ...: the gate rows, then the up rows
    (the store's order). Whole rows move, with their blocks and scales: nothing is re-quantized."""
    return torch.cat([t[0::2], t[1::2]]).contiguous()


def interleave(t: torch.Tensor) -> torch.Tensor:
    """The inverse of `deinterleave`: gate rows above up rows -> alternating rows (the Hub layout)."""
    half = t.shape[0] // 2
    out = torch.empty_like(t)
    out[0::2], out[1::2] = t[:half], t[half:]
    return out
