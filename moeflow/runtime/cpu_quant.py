"""int4 (and int2) experts on the CPU through torch's own int4 matmul (aten._weight_int4pack_mm_for_cpu), the
store's codes repacked on each call: the fast path of quantized experts on a CPU.

The reference (runtime/reference.py quantized_expert_ffn) dequantizes a whole expert to float
before each F.linear: for one decode row that is several float passes over 8x the packed bytes.
torch's int4 kernel reads the packed codes directly. Its layout differs from the store's, but the
repack is a handful of byte operations on the packed bytes, no float pass
(benches/bench_cpu_experts.py measures all three: dequant, repack per call, repacked once), so
nothing beside the store's blob is kept: the memory budget stays the store's bytes.

The math is the same: the kernel computes w = (q - 8) * scale + z per group; the store's
w = (q - zero) * scale, so z = (8 - zero) * scale. Scales and zeros reach the kernel in the
activations' dtype, the one rounding that differs from the reference (bf16: ~3e-3 relative).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# N = output rows, K = input columns, G = K / group.

GROUPS = (32, 64, 128, 256)  # the group sizes the kernel takes
_BLOCK_N = 32  # the kernel's row block: a byte holds row i's code (low nibble) and row i + 16's
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available() -> bool:
    """Whether this torch build has the CPU int4 kernel (2.5 and later)."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def fits(w: dict[str, torch.Tensor], group: int, dtype: torch.dtype) -> bool:
    """Whether an int4 expert's matrices have shapes the kernel takes."""
    return (group in GROUPS and dtype in _DTYPES
            and all(w[f"{m}.q"].shape[0] % _BLOCK_N == 0 for m in ("gate_up", "down")))


def widen_int2(q: torch.Tensor) -> torch.Tensor:
    """int2 codes packed four to a byte [N, K/4] -> the same codes packed two to a byte as int4
    [N, K/2]. Every int2 code (0-3) is an int4 code, and w = (q - zero) * scale is the same
    formula at either width, so an int2 expert runs through the int4 kernel unchanged."""
    low = (q & 0x03) | ((q & 0x0C) << 2)  # codes 4j, 4j+1 -> byte 2j
    high = ((q >> 4) & 0x03) | ((q >> 2) & 0x30)  # codes 4j+2, 4j+3 -> byte 2j+1
    return torch.stack((low, high), dim=-1).view(q.shape[0], -1)


def repack(q: torch.Tensor) -> torch.Tensor:
    """The store's packed codes [N, K/2] (column 2j in the low nibble, 2j+1 in the high) ->
    the kernel's [N, K/2]: per block of 32 rows and per column k, 16 bytes whose byte i holds
    row i's code in the low nibble and row i + 16's in the high one. Worked on whole bytes: for
    even k both nibbles are the sources' low ones, for odd k their high ones; each half is
    written once, in place, into its strided slot of the output."""
    n, half = q.shape
    src = q.view(n // _BLOCK_N, 2, 16, half).transpose(2, 3)  # [N/32, rows i | i + 16, K/2, 16]
    low, high = src[:, 0], src[:, 1]
    out = torch.empty(n // _BLOCK_N, half, 2, 16, dtype=torch.uint8)  # [N/32, K/2, even | odd k, 16]
    torch.bitwise_or(low & 0x0F, high << 4, out=out[:, :, 0])
    torch.bitwise_or(low >> 4, high & 0xF0, out=out[:, :, 1])
    return out.view(n, half)


def scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The store's scale, zero [N, G] (float16) -> the kernel's [G, N, 2] (scale, z) in `dtype`."""
    s = scale.float()
    return torch.stack((s, (8.0 - zero.float()) * s), dim=-1).transpose(0, 1).to(dtype).contiguous()


def int4_linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str, group: int, bits: int = 4) -> torch.Tensor:
    """x [T, K] @ dequantize(w[name])^T without materializing the float matrix (int4 codes, or
    int2 widened to int4 first)."""
    q = w[f"{name}.q"]
    packed = repack(widen_int2(q) if bits == 2 else q)
    sz = scales_and_zeros(w[f"{name}.scale"], w[f"{name}.zero"], x.dtype)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group, sz)


def int4_expert_ffn(x: torch.Tensor, w: dict[str, torch.Tensor], group: int, bits: int = 4) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) of an int4 (or int2) expert, store layout, on the CPU."""
    gate, up = int4_linear(x, w, "gate_up", group, bits).chunk(2, dim=-1)
    return int4_linear(F.silu(gate) * up, w, "down", group, bits)
