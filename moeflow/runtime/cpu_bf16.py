"""Products with bfloat16 weights on CPUs without bf16 instructions, through moeflow's own kernel.

Without AVX512-BF16 or AMX, torch's bf16 product on the CPU converts the weights again for every
row: 64 rows cost ~64x one row (benches/bench_cpu_bf16.py), so batching sequences or chunking a
prompt saves nothing on the bf16 matrices. moeflow._core.bf16_linear (rust/core/src/gemm.rs,
AVX2 + FMA) converts each weight once, in registers, for all rows, and accumulates in float32 as
torch does; each output's summation order is fixed, so a row's result never depends on the other
rows of the call (batch invariance).

`linear` is F.linear with that kernel taking bf16 weights on the CPU when `ENABLED`; every
other call (float32 weights, CUDA tensors, machines whose torch has native bf16) is F.linear.
`MOEFLOW_CPU_BF16` chooses: "auto" (default: the kernel where the CPU lacks native bf16),
"moeflow" (always the kernel where the CPU can run it) or "torch" (never).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from moeflow import _core
from moeflow.errors import ConfigError

CHOICES = ("auto", "moeflow", "torch")
_BF16 = torch.bfloat16
_F32 = torch.float32


def _choose(value: str) -> bool:
    if value not in CHOICES:
        raise ConfigError(f"MOEFLOW_CPU_BF16={value!r}: expected one of {', '.join(CHOICES)}")
    if value == "torch" or not _core.bf16_linear_available():
        return False
    return value == "moeflow" or not torch.ops.mkldnn._is_mkldnn_bf16_supported()


ENABLED = _choose(os.environ.get("MOEFLOW_CPU_BF16", "auto"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), in x's dtype; with a bf16 weight on the CPU (and x bf16 or
    float32) through the kernel when ENABLED."""
    if not ENABLED or weight.dtype is not _BF16 or weight.is_cuda:
        return F.linear(x, weight, bias)
    if x.dtype not in (_BF16, _F32) or weight.dim() != 2 or not weight.is_contiguous() or x.is_cuda:
        return F.linear(x, weight, bias)
    return _kernel(x, weight, bias)


def takes_float32(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether `linear` takes this bf16 weight with float32 rows x as they are (no cast of the
    weight per use, which on the CPU writes a float32 copy of it first)."""
    return (ENABLED and weight.dtype is _BF16 and x.dtype is _F32 and weight.dim() == 2
            and weight.is_contiguous() and not weight.is_cuda and not x.is_cuda)


def _kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"linear: x has {x.shape[-1]} features, the weight [{n}, {k}] takes {k}")
    lead = x.shape[:-1]
    rows = x.reshape(-1, k)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    y = torch.empty(rows.shape[0], n, dtype=x.dtype)
    b = 0
    if bias is not None:
        bias = bias.to(_F32).contiguous()  # added to the float32 sum before the one rounding
        if bias.shape != (n,):
            raise ValueError(f"linear: bias of shape {tuple(bias.shape)} for {n} outputs")
        b = bias.data_ptr()
    bf16 = x.dtype is _BF16
    _core.bf16_linear(rows.data_ptr(), rows.shape[0], k, weight.data_ptr(), n, y.data_ptr(), bf16, bf16, b,
                      torch.get_num_threads())
    return y.view(*lead, n)
