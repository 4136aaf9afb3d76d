"""Launching kernels/moe_decode_kslice.cu: the decode FFN of min-max quantized experts (int8/4/2)
for a few token rows, a candidate path ("moe_decode_kslice") that runtime/kernel_choice.py times
against kernels/moe_decode.cu and the others on a GPU and picks only where it measured faster.
Without a kernel table the engine never runs it.

The same contract as runtime/gpu_decode.py: rows sorted by expert, two launches (gate/up, down),
each row's output its own (y [R, H] fp32, scaled by its row weight). A block owns KS_ROWS weight
rows and its warps split K; how many warps depends only on the expert's shape (`warps_for`), so a
row's bits never depend on the other rows, its expert's row count or the budget.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from moeflow.runtime import gpu
from moeflow.runtime.gpu import ExpertLauncher, Launch, pointer

SOURCE = "moe_decode_kslice.cu"
ROWS = 8  # KS_ROWS: weight rows per block
PAIRS = ROWS // 2  # KS_PAIRS: gate/up pairs per block in phase 1
MAX_WARPS = 8  # KS_MAX_WARPS
_ALIGN = 16  # bytes: one vector load


def codes_per_chunk(bits: int) -> int:
    """Codes per 16-byte load: 16 int8, 32 int4 or 64 int2."""
    return 128 // bits


def warps_for(cols: int, bits: int) -> int:
    """Warps splitting a row of `cols` codes: one per 64 chunks (two chunks per lane), 1 to
    MAX_WARPS. Fewer chunks per lane spend more of a block on its setup and reduction (about a
    third of it at one chunk per lane, by the sm_90 instruction count); more leave fewer warps to
    spread over the GPU. A function of the shape alone: the order of the block's sums (and so the
    bits) never changes with the rows. Unmeasured: the next GPU run may move the 64."""
    return max(1, min(MAX_WARPS, cols // codes_per_chunk(bits) // 64))


def shape_fits(bits: int, group: int, hidden: int, inter: int) -> bool:
    """Whether the kernels take experts of this encoding and shape: quantized, every row whole
    16-byte chunks, each chunk inside one quantization group, and whole tiles of rows (ROWS down
    rows, PAIRS gate/up pairs per block: implied by the chunks, stated because the kernels rely
    on it)."""
    if bits not in (8, 4, 2):
        return False
    codes = codes_per_chunk(bits)
    return (hidden % codes == 0 and inter % codes == 0 and group % codes == 0 and hidden % ROWS == 0
            and inter % PAIRS == 0)


def fits(experts: Sequence[ExpertLauncher], x: torch.Tensor) -> bool:
    """shape_fits, and every pointer (activations, weights) 16-byte aligned."""
    first = experts[0]
    if not shape_fits(first.bits, first.group, first.hidden, first.inter) or x.data_ptr() % _ALIGN:
        return False
    return all(int(p) % _ALIGN == 0 for e in experts for p in e.weights[0::3])


def rows_per_pass(longest: int) -> int:
    """The kernels' TOK: token rows per pass over the weights, 1 where every expert of the launch
    has one row (fewer registers: more warps in flight), else 4. A row's arithmetic is the same in
    both instances, so this choice never changes its bits."""
    return 1 if longest <= 1 else 4


def decode_launches(x: torch.Tensor, offsets: torch.Tensor, experts: Sequence[ExpertLauncher], table: torch.Tensor,
                    h: torch.Tensor, row_weight: torch.Tensor, y: torch.Tensor, longest: int) -> tuple[Launch, Launch]:
    """Both phases. x [R, H] sorted by expert, offsets [E + 1] int32 (on x's device), table [6, E]
    int64, h [R, I] and y [R, H] fp32 contiguous, row_weight [R] fp32; longest = most rows of one
    expert."""
    gpu.check_grouped(x, offsets, experts, table, row_weight)
    first, rows, n = experts[0], x.shape[0], len(experts)
    gpu.check_decode_outputs(x, experts, h, y)
    if not fits(experts, x) or h.data_ptr() % _ALIGN:
        raise ValueError(f"kernels/{SOURCE} needs int8/4/2 experts with 16-byte aligned rows of whole 16-byte "
                         f"chunks, each inside one group (hidden {first.hidden}, inter {first.inter}, group "
                         f"{first.group}, {first.bits} bits)")
    row = gpu.table_rows(table)
    suffix = f"{gpu._entry_suffix(first.bits, x.dtype)}_t{rows_per_pass(longest)}"
    sizes = (np.int32(first.hidden), np.int32(first.inter), np.int32(first.group))
    gate_up = Launch(SOURCE, f"kslice_gate_up_{suffix}", (-(-first.inter // PAIRS), n),
                     (32 * warps_for(first.hidden, first.bits),), (pointer(x), pointer(offsets), *sizes, *row[:3],
                                                                   pointer(h)))
    down = Launch(SOURCE, f"kslice_down_{suffix}", (-(-first.hidden // ROWS), n),
                  (32 * warps_for(first.inter, first.bits),),
                  (pointer(h), pointer(offsets), *sizes, *row[3:], pointer(row_weight), pointer(y)))
    return gate_up, down


def expert_rows(x: torch.Tensor, offsets: list[int], experts: list[dict[str, torch.Tensor]], bits: int, group: int,
                row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Rows offsets[i]:offsets[i+1] of x (sorted by expert) through experts[i]: y [R, H] fp32, each
    row scaled by its row_weight (1 when not given). ValueError for an encoding or shape the
    kernels cannot take (so the tuner never chooses this path for it); a misaligned view of x or
    of the weights goes to the grouped kernel (runtime/gpu.py), which computes the same."""
    first = gpu.launchers_for(x, offsets, experts, bits, group)[0]
    if not shape_fits(bits, first.group, first.hidden, first.inter):
        raise ValueError(f"kernels/{SOURCE} takes int8/4/2 experts whose hidden ({first.hidden}), inter "
                         f"({first.inter}) and group ({first.group}) are multiples of {codes_per_chunk(bits)} "
                         f"codes at {bits} bits")
    return gpu.launch_grouped(x, offsets, experts, bits, group, row_weight, fits,
                              lambda a, lc, h, y: decode_launches(a.x, a.offsets, lc, a.table, h, a.row_weight, y,
                                                                  a.longest), torch.float32)
