"""Launching kernels/grouped_mma.cu: the grouped expert FFN of prefill on tensor cores (mma.sync
m16n8k16), weights dequantized into shared memory tile by tile.

The same contract as runtime/gpu.py's grouped kernel: rows sorted by expert, y [R, H] fp32, each
row scaled by its routing weight. `fits` says whether the kernels take the experts (sizes a
multiple of the 64-wide K step, groups of whole 8-value segments, aligned pointers); where they do
not, the grouped kernel of runtime/gpu.py does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from moeflow.runtime import gpu
from moeflow.runtime.gpu import ExpertLauncher, Launch, pointer

BM, BN, BK = 64, 64, 64  # kernels/grouped_mma.cu: rows and columns of a block's tile, K step
_THREADS = 128
_ALIGN = 16


def fits(experts: Sequence[ExpertLauncher], x: torch.Tensor) -> bool:
    first = experts[0]
    if first.hidden % BK or first.inter % BK or (first.bits != 16 and first.group % 8):
        return False
    if x.data_ptr() % _ALIGN:
        return False
    return all(int(p) % _ALIGN == 0 for e in experts for p in e.weights[0::3])


def mma_launches(x: torch.Tensor, offsets: torch.Tensor, longest: int, experts: Sequence[ExpertLauncher],
                 table: torch.Tensor, h: torch.Tensor, row_weight: torch.Tensor, y: torch.Tensor) -> tuple[Launch, Launch]:
    """Both phases. x [R, H] sorted by expert, offsets [E + 1] int32, longest = most rows of one
    expert, table [6, E] int64, h [R, I] in x's 16-bit dtype, y [R, H] fp32, row_weight [R] fp32."""
    gpu.check_grouped(x, offsets, experts, table, row_weight)
    first, rows, n = experts[0], x.shape[0], len(experts)
    if h.shape != (rows, first.inter) or h.dtype != x.dtype or not h.is_contiguous():
        raise ValueError(f"h must be contiguous {x.dtype} [{rows}, {first.inter}], got {h.dtype} {tuple(h.shape)}")
    if y.shape != (rows, first.hidden) or y.dtype != torch.float32 or not y.is_contiguous():
        raise ValueError(f"y must be contiguous float32 [{rows}, {first.hidden}], got {y.dtype} {tuple(y.shape)}")
    if not fits(experts, x) or h.data_ptr() % _ALIGN:
        raise ValueError(f"kernels/grouped_mma.cu needs hidden and inter multiples of {BK}, groups of whole "
                         f"8-value segments and 16-byte aligned pointers (hidden {first.hidden}, inter "
                         f"{first.inter}, group {first.group})")
    row = gpu.table_rows(table)
    suffix = gpu._entry_suffix(first.bits, x.dtype)
    sizes = (np.int32(first.hidden), np.int32(first.inter), np.int32(first.group))
    tiles_y = max(1, -(-longest // BM))
    gate_up = Launch("grouped_mma.cu", f"mma_gate_up_{suffix}", (-(-first.inter // BN), tiles_y, n), (_THREADS,),
                     (pointer(x), pointer(offsets), *sizes, *row[:3], pointer(h)))
    down = Launch("grouped_mma.cu", f"mma_down_{suffix}", (-(-first.hidden // BN), tiles_y, n), (_THREADS,),
                  (pointer(h), pointer(offsets), *sizes, *row[3:], pointer(row_weight), pointer(y)))
    return gate_up, down


def grouped_expert_ffn(x: torch.Tensor, offsets: list[int], experts: list[dict[str, torch.Tensor]], bits: int,
                       group: int, row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Rows offsets[i]:offsets[i+1] of x (sorted by expert) through experts[i] on tensor cores:
    y [R, H] fp32, scaled by row_weight; runtime/gpu.py's grouped kernel where these do not fit."""
    return gpu.launch_grouped(x, offsets, experts, bits, group, row_weight, fits,
                              lambda a, lc, h, y: mma_launches(a.x, a.offsets, a.longest, lc, a.table, h,
                                                               a.row_weight, y),
                              x.dtype)
