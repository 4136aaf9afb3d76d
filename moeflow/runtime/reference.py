"""Torch references of every CUDA kernel in kernels/: the CPU path runs these, the GPU tests compare against them.

The quantized format and its math (quantize, dequantize) live in store/quant.py; `dequantize` is
re-exported here as the reference of kernels/dequant.cu, `quantize` to build the kernels' inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeflow.runtime.layers import silu_mlp
from moeflow.store import mxfp4
from moeflow.store.fp8 import decode_expert as _fp8_decode_expert, dequantize as fp8_dequantize
from moeflow.store.quant import dequantize, quantize

__all__ = ["clamped_swiglu", "dequantize", "expert_ffn", "grouped_expert_ffn", "mxfp4_expert_ffn", "quantize",
           "quantized_expert_ffn"]
__all__ += ["fp8_dequantize", "fp8_expert_ffn"]  # FP8 experts as published (store/fp8.py), kernels/fp8.cu

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



def fp8_expert_ffn(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """Reference of kernels/fp8.cu's decode FFN (and of its dequant + silu_mlp): the expert's
    e4m3 codes times their 128x128 block scales, in x's dtype, then the SiLU MLP."""
    weights = _fp8_decode_expert(w, x.dtype)
    return expert_ffn(x, weights["gate_up"], weights["down"])


def clamped_swiglu(x: torch.Tensor, gate_up: torch.Tensor, gate_up_bias: torch.Tensor, down: torch.Tensor,
                   down_bias: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's expert (runtime/moe.py clamped_swiglu_ffn) on float weights, gate rows above up rows."""
    gate, up = F.linear(x, gate_up, gate_up_bias).chunk(2, dim=-1)
    gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return F.linear((up + 1) * (gate * torch.sigmoid(gate * alpha)), down, down_bias)


def mxfp4_expert_ffn(x: torch.Tensor, w: dict[str, torch.Tensor],
                     swiglu: tuple[float, float] | None) -> torch.Tensor:
    """Reference of kernels/mxfp4.cu's decode FFN (and the CPU path): the MXFP4 weights dequantized
    to x's dtype (store/mxfp4.py), then GPT-OSS's clamped SwiGLU with biases, or a SiLU MLP."""
    gate_up = mxfp4.dequantize(w["gate_up.blocks"], w["gate_up.scales"], x.dtype)
    down = mxfp4.dequantize(w["down.blocks"], w["down.scales"], x.dtype)
    if swiglu is None:
        return expert_ffn(x, gate_up, down)
    return clamped_swiglu(x, gate_up, w["gate_up_bias"].to(x.dtype), down, w["down_bias"].to(x.dtype), *swiglu)
