"""Launching kernels/mxfp4.cu (GPT-OSS's MXFP4 experts) on torch CUDA tensors, as runtime/gpu.py
launches the other kernels: a `Launch` is plain data (checked without a GPU), `gpu.run` hands it
to CuPy on torch's current stream. References: runtime/reference.py mxfp4_expert_ffn and
store/mxfp4.py dequantize."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from moeflow.runtime import reference
from moeflow.runtime.gpu import MAX_DECODE_TOKENS, Launch, pointer, run

# n = tokens, H = hidden, I = intermediate; a matrix [R, C]: blocks [R, C/32, 16], scales [R, C/32].

_THREADS = 256
_WARPS = 8  # kernels/mxfp4.cu MX_WARPS: rows per block of the GEMV kernels
_OUT = {torch.float16: "f16", torch.bfloat16: "bf16"}


def _check_matrix(blocks: torch.Tensor, scales: torch.Tensor, rows: int, cols: int) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales are uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.numel() != rows * cols // 2 or scales.numel() != rows * cols // 32 or cols % 32:
        raise ValueError(f"blocks {tuple(blocks.shape)} / scales {tuple(scales.shape)} do not fill a "
                         f"[{rows}, {cols}] MXFP4 matrix")
    if not blocks.is_contiguous() or not scales.is_contiguous():
        raise ValueError("MXFP4 blocks and scales must be contiguous")


def dequant_launch(blocks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> Launch:
    rows, cols = out.shape
    _check_matrix(blocks, scales, rows, cols)
    if out.dtype not in _OUT:
        raise TypeError(f"MXFP4 dequant writes float16 or bfloat16, not {out.dtype}")
    grid = ((rows * cols // 2 + _THREADS - 1) // _THREADS,)
    return Launch("mxfp4.cu", f"mxfp4_dequant_{_OUT[out.dtype]}", grid, (_THREADS,),
                  (pointer(blocks), pointer(scales), pointer(out), np.int32(rows), np.int32(cols)))


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """kernels/mxfp4.cu mxfp4_dequant_*: [R, C] in float16 or bfloat16; reference store/mxfp4.py."""
    rows, cols = scales.shape[0], scales[0].numel() * 32
    out = torch.empty(rows, cols, dtype=dtype, device=blocks.device)
    run(dequant_launch(blocks.contiguous(), scales.contiguous(), out), blocks.device)
    return out


def decode_launches(w: dict[str, torch.Tensor], x: torch.Tensor, swiglu: tuple[float, float] | None,
                    h: torch.Tensor, out: torch.Tensor) -> tuple[Launch, Launch]:
    """Both phases of the decode FFN on fp32 x [n, H]: h [n, I] and out [n, H] fp32."""
    n, hidden = x.shape
    inter = w["down.scales"].shape[1] * 32
    _check_matrix(w["gate_up.blocks"], w["gate_up.scales"], 2 * inter, hidden)
    _check_matrix(w["down.blocks"], w["down.scales"], hidden, inter)
    if x.dtype != torch.float32 or not x.is_contiguous() or not 0 < n <= MAX_DECODE_TOKENS:
        raise ValueError(f"the MXFP4 decode kernel takes contiguous float32 [1..{MAX_DECODE_TOKENS}, {hidden}] "
                         f"activations, got {x.dtype} {tuple(x.shape)}")
    if h.shape != (n, inter) or out.shape != (n, hidden) or h.dtype != torch.float32 or out.dtype != torch.float32:
        raise ValueError(f"h {tuple(h.shape)} / out {tuple(out.shape)} must be float32 [{n}, {inter}] / "
                         f"[{n}, {hidden}]")
    null = np.uint64(0)
    biases = []
    for name, size in (("gate_up_bias", 2 * inter), ("down_bias", hidden)):
        b = w.get(name) if swiglu is not None else None
        if b is not None and (b.dtype != torch.float32 or b.shape != (size,) or not b.is_contiguous()):
            raise ValueError(f"{name} must be contiguous float32 [{size}], got {b.dtype} {tuple(b.shape)}")
        biases.append(pointer(b) if b is not None else null)
    alpha, limit = swiglu if swiglu is not None else (0.0, 0.0)
    # alpha and limit are the kernel's float parameters: CuPy passes np.float32 as a C float
    args: tuple[Any, ...] = (pointer(x), np.int32(n), np.int32(hidden), np.int32(inter), pointer(w["gate_up.blocks"]),
                             pointer(w["gate_up.scales"]), biases[0], np.int32(swiglu is not None),
                             np.float32(alpha), np.float32(limit), pointer(h))
    gate_up = Launch("mxfp4.cu", "mxfp4_gate_up", ((inter + _WARPS - 1) // _WARPS,), (32 * _WARPS,), args)
    down = Launch("mxfp4.cu", "mxfp4_down", ((hidden + _WARPS - 1) // _WARPS,), (32 * _WARPS,),
                  (pointer(h), np.int32(n), np.int32(hidden), np.int32(inter), pointer(w["down.blocks"]),
                   pointer(w["down.scales"]), biases[1], pointer(out)))
    return gate_up, down


def expert_ffn_decode(w: dict[str, torch.Tensor], x: torch.Tensor,
                      swiglu: tuple[float, float] | None) -> torch.Tensor:
    """kernels/mxfp4.cu: FFN(x) for 1 to 8 tokens, fp32 [n, H]; reference.mxfp4_expert_ffn."""
    x = x.float().contiguous()
    h = torch.empty(x.shape[0], w["down.scales"].shape[1] * 32, dtype=torch.float32, device=x.device)
    out = torch.empty(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for launch in decode_launches(w, x, swiglu, h, out):
        run(launch, x.device)
    return out


def expert_ffn(w: dict[str, torch.Tensor], x: torch.Tensor, swiglu: tuple[float, float] | None) -> torch.Tensor:
    """One MXFP4 expert on CUDA activations (16-bit): the GEMV kernel for decode's few tokens, else
    the weights dequantized by the kernel and the reference's arithmetic (prefill's many rows)."""
    if x.shape[0] <= MAX_DECODE_TOKENS:
        return expert_ffn_decode(w, x, swiglu).to(x.dtype)
    gate_up = dequantize(w["gate_up.blocks"], w["gate_up.scales"], x.dtype)
    down = dequantize(w["down.blocks"], w["down.scales"], x.dtype)
    if swiglu is None:
        return reference.expert_ffn(x, gate_up, down)
    return reference.clamped_swiglu(x, gate_up, w["gate_up_bias"].to(x.dtype), down, w["down_bias"].to(x.dtype),
                                    *swiglu)
