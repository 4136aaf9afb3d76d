"""The quantized expert format: group-wise min-max codes, their packing, quantize and dequantize.

HQQ-style asymmetric min-max, group-wise along the input dimension:
    w[r, c] = (q[r, c] - zero[r, c // g]) * scale[r, c // g]
q is packed along the last dim, 8 // bits values per byte, lowest bits first; scale and zero are
float16. kernels/dequant.cu implements `dequantize` on the GPU; runtime/reference.py re-exports it
as that kernel's torch reference. The math lives here, below runtime/, because the store encodes
with it.
"""

from __future__ import annotations

import torch

# R = rows (outputs), C = columns (inputs), G = groups per row (C / g).


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C] integer codes in [0, 2**bits) -> [R, C * bits / 8] uint8."""
    per = 8 // bits
    r, c = q.shape
    q = q.to(torch.uint8).view(r, c // per, per)
    out = torch.zeros(r, c // per, dtype=torch.uint8, device=q.device)
    for i in range(per):
        out |= q[..., i] << (i * bits)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, C * bits / 8] uint8 -> [R, C] uint8 codes."""
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (i * bits)) & mask for i in range(per)]
    return torch.stack(parts, dim=-1).view(packed.shape[0], -1)


def quantize(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max quantize w [R, C] per group of `group` columns: (packed q, scale [R, G], zero [R, G]),
    scale and zero in float16."""
    r, c = w.shape
    wf = w.float().view(r, c // group, group)
    lo, hi = wf.amin(-1), wf.amax(-1)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).clamp(min=1e-8)
    scale16 = scale.to(torch.float16).clamp(min=torch.finfo(torch.float16).tiny)
    zero16 = (-lo / scale16.float()).to(torch.float16)
    q = torch.round(wf / scale16.float()[..., None] + zero16.float()[..., None]).clamp(0, levels)
    return pack(q.view(r, c).to(torch.uint8), bits), scale16, zero16


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed codes -> [R, C] weights in `dtype` (what kernels/dequant.cu computes)."""
    q = unpack(packed, bits).float()
    r, c = q.shape
    w = (q.view(r, c // group, group) - zero.float()[..., None]) * scale.float()[..., None]
    return w.view(r, c).to(dtype)
