"""Torch references of every CUDA kernel in kernels/: the CPU path runs these, the GPU tests compare against them.

The quantized format and its math (quantize, dequantize) live in store/quant.py; `dequantize` is
re-exported here as the reference of kernels/dequant.cu, `quantize` to build the kernels' inputs.
"""

from __future__ import annotations

import torch

from moeflow.runtime.layers import silu_mlp
from moeflow.store.quant import dequantize, quantize

__all__ = ["dequantize", "expert_ffn", "grouped_expert_ffn", "quantize", "quantized_expert_ffn"]

# n = tokens, H = hidden.

# Reference of the expert FFN kernels with float weights: down(silu(gate(x)) * up(x)), gate_up [2I, H].
expert_ffn = silu_mlp


def quantized_expert_ffn(x: torch.Tensor, w: dict[str, torch.Tensor], bits: int, group: int) -> torch.Tensor:
    """Reference of kernels/expert_ffn.cu (decode) and grouped_ffn.cu (prefill) for quantized experts."""
    gate_up = dequantize(w["gate_up.q"], w["gate_up.scale"], w["gate_up.zero"], bits, group, x.dtype)
    down = dequantize(w["down.q"], w["down.scale"], w["down.zero"], bits, group, x.dtype)
    return expert_ffn(x, gate_up, down)


def grouped_expert_ffn(x: torch.Tensor, offsets: list[int], experts: list[dict[str, torch.Tensor]], bits: int,
                       group: int) -> torch.Tensor:
    """Reference of grouped_ffn.cu: tokens x [n, H] sorted by expert; rows offsets[i]:offsets[i+1]
    go through experts[i]."""
    out = torch.empty_like(x)
    for i, w in enumerate(experts):
        lo, hi = offsets[i], offsets[i + 1]
        if hi > lo:
            out[lo:hi] = quantized_expert_ffn(x[lo:hi], w, bits, group)
    return out
