"""Launching kernels/*.cu on torch CUDA tensors through CuPy, on torch's current stream.

Each launcher mirrors a function of runtime/reference.py (the GPU tests compare them). Tensors
cross to CuPy through __cuda_array_interface__ (16-bit floats viewed as int16: the kernels read
raw bits), so nothing is copied.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from moeflow.runtime import kernels

_THREADS = 256


def _cp(t: torch.Tensor) -> Any:
    import cupy

    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return cupy.asarray(t)


def _suffix(dtype: torch.dtype) -> str:
    if dtype is torch.bfloat16:
        return "bf16"
    if dtype is torch.float16:
        return "f16"
    raise TypeError(f"kernels take float16 or bfloat16 activations, not {dtype}")


def _launch(source: str, entry: str, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
    import cupy

    with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
        kernels.function(source, entry)(grid, block, args)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
               dtype: torch.dtype) -> torch.Tensor:
    """kernels/dequant.cu; reference.dequantize."""
    rows, cols = q.shape[0], q.shape[1] * (8 // bits)
    out = torch.empty(rows, cols, dtype=dtype, device=q.device)
    grid = ((q.numel() + _THREADS - 1) // _THREADS,)
    _launch("dequant.cu", f"dequant_int{bits}_{_suffix(dtype)}", grid, (_THREADS,),
            (_cp(q), _cp(scale), _cp(zero), _cp(out), np.int32(rows), np.int32(cols), np.int32(group)))
    return out


def _weight_args(w: dict[str, torch.Tensor], name: str, bits: int) -> tuple[Any, Any, Any]:
    if bits == 16:
        mat = _cp(w[name])
        return mat, mat, mat  # scale/zero unused for float weights
    return _cp(w[f"{name}.q"]), _cp(w[f"{name}.scale"]), _cp(w[f"{name}.zero"])


def _entry_suffix(bits: int, dtype: torch.dtype) -> str:
    act = _suffix(dtype)
    return f"{act}_{act}" if bits == 16 else f"int{bits}_{act}"


def expert_ffn_decode(w: dict[str, torch.Tensor], x: torch.Tensor, token_weight: torch.Tensor, bits: int,
                      group: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """kernels/expert_ffn.cu: out[t] += token_weight[t] * FFN(x[t]) for a few tokens (fp32 out)."""
    n, hidden = x.shape
    inter = (w["down"].shape[1] if bits == 16 else w["down.q"].shape[1] * (8 // bits))
    if n > 8:
        raise ValueError(f"the decode kernel takes at most 8 tokens, got {n}")
    if out is None:
        out = torch.zeros(n, hidden, dtype=torch.float32, device=x.device)
    gu_q, gu_s, gu_z = _weight_args(w, "gate_up", bits)
    d_q, d_s, d_z = _weight_args(w, "down", bits)
    grid = ((inter + 63) // 64,)
    _launch("expert_ffn.cu", f"expert_ffn_decode_{_entry_suffix(bits, x.dtype)}", grid, (256,),
            (_cp(x.contiguous()), np.int32(n), np.int32(hidden), np.int32(inter), np.int32(max(group, 1)),
             gu_q, gu_s, gu_z, d_q, d_s, d_z, _cp(token_weight.float().contiguous()), _cp(out)))
    return out


def grouped_expert_ffn(x: torch.Tensor, offsets: list[int], experts: list[dict[str, torch.Tensor]], bits: int,
                       group: int, row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """kernels/grouped_ffn.cu: rows offsets[i]:offsets[i+1] of x (sorted by expert) through
    experts[i], all experts in one launch per phase; fp32 out, scaled by row_weight."""
    rows, hidden = x.shape
    inter = experts[0]["down"].shape[1] if bits == 16 else experts[0]["down.q"].shape[1] * (8 // bits)
    device = x.device

    def table(name: str, part: str) -> torch.Tensor:
        key = name if bits == 16 else f"{name}.{part}"
        return torch.tensor([w[key].data_ptr() for w in experts], dtype=torch.int64, device=device)

    offs = torch.tensor(offsets, dtype=torch.int32, device=device)
    h = torch.empty(rows, inter, dtype=torch.float32, device=device)
    out = torch.empty(rows, hidden, dtype=torch.float32, device=device)
    weights = row_weight if row_weight is not None else torch.ones(rows, device=device)
    longest = max(offsets[i + 1] - offsets[i] for i in range(len(experts)))
    tiles_y = max(1, (longest + 31) // 32)
    suffix = _entry_suffix(bits, x.dtype)
    gu = [table("gate_up", p) for p in ("q", "scale", "zero")]
    _launch("grouped_ffn.cu", f"grouped_gate_up_{suffix}", ((inter + 31) // 32, tiles_y, len(experts)), (32, 32),
            (_cp(x.contiguous()), _cp(offs), np.int32(hidden), np.int32(inter), np.int32(max(group, 1)),
             *(_cp(t) for t in gu), _cp(h)))
    d = [table("down", p) for p in ("q", "scale", "zero")]
    _launch("grouped_ffn.cu", f"grouped_down_{suffix}", ((hidden + 31) // 32, tiles_y, len(experts)), (32, 32),
            (_cp(h), _cp(offs), np.int32(hidden), np.int32(inter), np.int32(max(group, 1)),
             *(_cp(t) for t in d), _cp(weights.float().contiguous()), _cp(out)))
    return out
