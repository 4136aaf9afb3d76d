"""Row-wise ops of a decode step on the CPU through moeflow's own kernels (rust/core/src/ops.rs).

At decode sizes torch's cost on the CPU is its dispatch, not its arithmetic: `F.rms_norm` is six
aten ops (pow, mean, add, rsqrt, two multiplies), ~14-25 us for one row of 64 values, twice per
layer. `rms_norm` here is one call (~2-3 us with the output's allocation) that computes the
same bits: the kernel sums the squares in the order of torch's cascade sum for torch's float
vector width, so logits do not move and the norm stays bit-identical to transformers'.

That order is torch's internal detail, so it is checked, not assumed: at import, the kernel's
bits are compared with `F.rms_norm` on rows that cross every vector and cascade boundary, and
where any differs (another torch, another CPU) `NATIVE` is False and `rms_norm` is never taken.

`rotate_half` is the decode step's rope (x * cos + swap(x) * sin over one block of heads) in one
call: elementwise IEEE products and sums rounded one by one, torch's bits on any CPU.
`MOEFLOW_CPU_OPS=torch` turns both off.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from moeflow import _core
from moeflow.errors import ConfigError

_F32 = torch.float32
_BF16 = torch.bfloat16
DTYPES = (_F32, _BF16)
# torch's Vectorized<float> width, which fixes the order of its sums (AVX512: 16 lanes;
# AVX2 and the default build: 8)
LANES = 16 if torch.backends.cpu.get_cpu_capability() == "AVX512" else 8


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm of x [..., D] (float32 or bf16, on the CPU) with weight [D]: the bits
    of `weight * F.rms_norm(x.float(), (D,), None, eps).to(x.dtype)` (bf16 when x and weight
    both are, else float32). Each row's arithmetic depends on that row alone. A non-contiguous
    x goes to torch, whose order of the sum then depends on the strides."""
    d = x.shape[-1]
    x_dtype, w_dtype = x.dtype, weight.dtype
    if (x_dtype not in DTYPES or w_dtype not in DTYPES or weight.dim() != 1 or weight.shape[0] != d or not x.is_cpu
            or not weight.is_cpu):
        raise ValueError(f"rms_norm takes CPU float32/bf16 rows [..., D] and a weight [D]; got {x_dtype} "
                         f"{tuple(x.shape)} on {x.device} and {w_dtype} {tuple(weight.shape)} on {weight.device}")
    if d == 0:
        raise ValueError("rms_norm: rows of 0 values")
    return norm_rows(x, weight, eps)


def norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm` without its checks, for callers that made them (runtime/layers.py's hot path)."""
    if not x.is_contiguous():  # torch's sum order follows the layout (a strided row: its outer-sum path)
        return torch_rms_norm(x, weight, eps)
    d = x.shape[-1]
    if not weight.is_contiguous():
        weight = weight.contiguous()
    x_bf16, w_bf16 = x.dtype is _BF16, weight.dtype is _BF16
    # empty_like: ~1 us against ~3 us for torch.empty(shape) on the decode path
    y = torch.empty_like(x) if x_bf16 is w_bf16 or not x_bf16 else torch.empty_like(x, dtype=_F32)
    rows = x.numel() // d
    if rows:  # no rows: no storage, a null address
        _core.rms_norm(x.data_ptr(), rows, d, weight.data_ptr(), y.data_ptr(), eps, x_bf16, w_bf16, LANES,
                       torch.get_num_threads())
    return y


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """`x * cos + x.roll(D // 2, -1) * sin` (rope with half-split pairs) in one call, the same bits
    (each product and the sum rounded as torch's separate ops round them), where x, cos and sin
    are CPU float32/bf16 tensors of one dtype, one shape [..., D] and contiguous (the decode
    step's q/k/v block and its tables): ~2 us against torch's four ops, ~8 us. None elsewhere."""
    if (not ENABLED or not x.is_cpu or x.dtype not in DTYPES or cos.dtype is not x.dtype or sin.dtype is not x.dtype
            or x.shape != cos.shape or x.shape != sin.shape or x.shape[-1] % 2 or not x.is_contiguous()
            or not cos.is_contiguous() or not sin.is_contiguous() or x.numel() == 0):
        return None
    y = torch.empty_like(x)
    _core.rope_half(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), x.numel(), x.shape[-1], y.data_ptr(),
                    x.dtype is _BF16)
    return y


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """What `rms_norm` replaces: torch's ops, with transformers' rounding at lower precision."""
    if x.dtype == _F32 and weight.dtype == _F32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


# Row lengths of the import check: shorter than a vector (torch's scalar path), every tail past
# whole vectors of 8 and 16 lanes, one whole chain of 4 vectors and past it, and past a first
# cascade level (16 chains: 512 values at 8 lanes, 1024 at 16) and a second.
CHECK_DIMS = (1, 3, 7, 8, 9, 15, 16, 17, 24, 31, 33, 63, 64, 65, 100, 127, 128, 129, 512, 513, 1000, 1024,
              1025, 2048, 4096, 4100, 8192 + 40)


def agrees_with_torch(dims: tuple[int, ...] = CHECK_DIMS) -> bool:
    """Whether the kernel gives F.rms_norm's bits on this torch and CPU (float32 and bf16, one
    and several rows, values spread over many binades)."""
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for d in dims:
            x = torch.randn(3, d, generator=gen) * torch.exp(torch.randn(3, 1, generator=gen) * 4)
            w = torch.randn(d, generator=gen)
            for dtype in DTYPES:
                xs, ws = x.to(dtype), w.to(dtype)
                if not (torch.equal(rms_norm(xs, ws, 1e-6), torch_rms_norm(xs, ws, 1e-6))
                        and torch.equal(rms_norm(xs[1:2], ws, 1e-5), torch_rms_norm(xs[1:2], ws, 1e-5))):
                    return False
    return True


def _switch(value: str) -> bool:
    if value not in ("auto", "torch"):
        raise ConfigError(f"MOEFLOW_CPU_OPS={value!r}: expected 'auto' or 'torch'")
    return value == "auto"


def _choose(value: str) -> bool:
    """Whether RMSNorm takes the kernel: the switch, and the import check of its bits."""
    if not _switch(value):
        return False
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the check must not depend on how torch splits a reduction
        return agrees_with_torch()
    finally:
        torch.set_num_threads(threads)


# rotate_half's bits are torch's on any CPU (IEEE products and sums, rounded one by one): the switch alone
ENABLED = _switch(os.environ.get("MOEFLOW_CPU_OPS", "auto"))
NATIVE = _choose(os.environ.get("MOEFLOW_CPU_OPS", "auto"))
