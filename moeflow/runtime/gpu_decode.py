"""Launching kernels/moe_decode.cu: the decode expert FFN of several experts' few token rows, two
launches in all (gate/up, then down), weights read in 16-byte vectors.

The rows are sorted by expert, as for the grouped prefill kernel; each row's output is its own
(y [R, H], scaled by its routing weight), so the caller combines a token's experts in its fixed
order and the result never depends on which rows share the launch. `fits` says whether the
kernels take a set of experts (alignment and sizes); where they do not, runtime/gpu.py's kernels do.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from moeflow.runtime import gpu
from moeflow.runtime.gpu import ExpertLauncher, Launch, pointer

WARPS = 8  # kernels/moe_decode.cu DEC_WARPS: weight rows per block
_THREADS = 32 * WARPS
_ALIGN = 16  # bytes: one vector load


def codes_per_chunk(bits: int) -> int:
    """Weights per 16-byte load: 8 16-bit floats, 16 int8, 32 int4 or 64 int2 codes."""
    return 128 // bits


def fits(experts: Sequence[ExpertLauncher], x: torch.Tensor) -> bool:
    """Whether kernels/moe_decode.cu takes these experts and activations: every row a whole number
    of 16-byte chunks, a chunk inside one quantization group, every pointer 16-byte aligned."""
    first = experts[0]
    codes = codes_per_chunk(first.bits)
    if first.hidden % codes or first.inter % codes or (first.bits != 16 and first.group % codes):
        return False
    if x.data_ptr() % _ALIGN:
        return False
    return all(int(p) % _ALIGN == 0 for e in experts for p in e.weights[0::3])


def decode_launches(x: torch.Tensor, offsets: torch.Tensor, experts: Sequence[ExpertLauncher], table: torch.Tensor,
                    h: torch.Tensor, row_weight: torch.Tensor, y: torch.Tensor) -> tuple[Launch, Launch]:
    """Both phases. x [R, H] sorted by expert, offsets [E + 1] int32 (on x's device), table [6, E]
    int64 (the experts' launcher tables side by side), h [R, I] and y [R, H] fp32, row_weight [R] fp32."""
    gpu.check_grouped(x, offsets, experts, table, row_weight)
    first, rows, n = experts[0], x.shape[0], len(experts)
    gpu.check_decode_outputs(x, experts, h, y)
    if not fits(experts, x) or h.data_ptr() % _ALIGN:
        raise ValueError(f"kernels/moe_decode.cu needs 16-byte aligned rows of whole 16-byte chunks "
                         f"(hidden {first.hidden}, inter {first.inter}, group {first.group}, {first.bits} bits)")
    row = gpu.table_rows(table)
    suffix = gpu._entry_suffix(first.bits, x.dtype)
    sizes = (np.int32(first.hidden), np.int32(first.inter), np.int32(first.group))
    gate_up = Launch("moe_decode.cu", f"decode_gate_up_{suffix}", (-(-first.inter // WARPS), n), (_THREADS,),
                     (pointer(x), pointer(offsets), *sizes, *row[:3], pointer(h)))
    down = Launch("moe_decode.cu", f"decode_down_{suffix}", (-(-first.hidden // WARPS), n), (_THREADS,),
                  (pointer(h), pointer(offsets), *sizes, *row[3:], pointer(row_weight), pointer(y)))
    return gate_up, down


def expert_rows(x: torch.Tensor, offsets: list[int], experts: list[dict[str, torch.Tensor]], bits: int, group: int,
                row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Rows offsets[i]:offsets[i+1] of x (sorted by expert) through experts[i]: y [R, H] fp32,
    each row scaled by its row_weight (1 when not given). kernels/moe_decode.cu where it fits,
    else the grouped kernel (runtime/gpu.py), which computes the same."""
    return gpu.launch_grouped(x, offsets, experts, bits, group, row_weight, fits,
                              lambda a, lc, h, y: decode_launches(a.x, a.offsets, lc, a.table, h, a.row_weight, y),
                              torch.float32)
