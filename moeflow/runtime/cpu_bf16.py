"""Products with bfloat16 weights on CPUs without bf16 instructions, and with MXFP4 weights on any
x86-64 CPU, through moeflow's own kernels.

Without AVX512-BF16 or AMX, torch's bf16 product on the CPU converts the weights again for every
row: 64 rows cost ~64x one row (benches/bench_cpu_bf16.py), so batching sequences or chunking a
prompt saves nothing on the bf16 matrices. moeflow._core.bf16_linear (rust/core/src/gemm/,
AVX2 + FMA) converts each weight once, in registers, for all rows, and accumulates in float32 as
torch does; each output's summation order is fixed, so a row's result never depends on the other
rows of the call (batch invariance).

`linear` is F.linear with that kernel taking bf16 weights on the CPU when `ENABLED`; every
other call (float32 weights, CUDA tensors, machines whose torch has native bf16) is F.linear.
`MOEFLOW_CPU_BF16` chooses: "auto" (default: the kernel where the CPU lacks native bf16),
"moeflow" (always the kernel where the CPU can run it) or "torch" (never).

`mxfp4_expert_ffn` computes GPT-OSS's MXFP4 experts on the CPU with moeflow._core.mxfp4_linear,
which decodes the e2m1 codes and their scales in registers: torch has no MXFP4 product, and the
alternative, dequantizing the whole expert to bf16 for every call, writes 4x the packed bytes
before the product reads them again. Each weight's value is exactly store/mxfp4.py's `dequantize`,
so the result is bit for bit `linear` over the dequantized bf16 matrices: it takes bf16 rows
where `linear` takes bf16 weights (ENABLED), and an MXFP4 model gives the same logits as its
bf16-stored copy. Float32 rows keep torch's float32 product over the dequantized matrix, the
same arithmetic as a float32-stored copy.
"""

from __future__ import annotations

import os
from collections.abc import Callable

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
    # _takes inlined: this runs for every product of a step, float32 models included
    if (ENABLED and weight.dtype is _BF16 and x.dtype in (_BF16, _F32) and weight.dim() == 2 and weight.shape[1] != 0
            and weight.is_contiguous() and x.device.type == "cpu" and weight.device.type == "cpu"):
        return _kernel(x, weight, bias)
    return F.linear(x, weight, bias)


def _takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel takes this product: a contiguous 2-D bf16 weight with features (k = 0
    is F.linear's zeros), bf16 or float32 rows, both on the CPU. The dtype is read first: most
    calls of a float32 model leave here."""
    return (weight.dtype is _BF16 and x.dtype in (_BF16, _F32) and weight.dim() == 2 and weight.shape[1] != 0
            and weight.is_contiguous() and _on_cpu(x, weight))


def _on_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" for t in tensors)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy where its address is not a multiple of its element size (a view made at an
    odd byte offset): the core reads its elements in place, as aligned values."""
    return t if t.data_ptr() % t.element_size() == 0 else t.clone()


def _rows(x: torch.Tensor, k: int) -> tuple[torch.Size, torch.Tensor]:
    """(x's leading shape, x as contiguous aligned rows [R, k])."""
    rows = x.reshape(-1, k)
    return x.shape[:-1], _aligned(rows if rows.is_contiguous() else rows.contiguous())


def _bias(bias: torch.Tensor | None, n: int, dtype: torch.dtype | None, what: str) -> torch.Tensor | None:
    """The bias as float32 [n] for the core, its values first rounded to `dtype` (None: its own):
    added to the float32 sum before the one rounding, as F.linear adds a bias in its input's
    dtype. Refused unless on the CPU with exactly n values (the core reads n floats)."""
    if bias is None:
        return None
    if bias.device.type != "cpu" or bias.shape != (n,):
        raise ValueError(f"{what}: bias of shape {tuple(bias.shape)} on {bias.device} for {n} outputs on the cpu")
    return (bias if dtype is None else bias.to(dtype)).to(_F32).contiguous()


def _product(x: torch.Tensor, k: int, n: int, bias: torch.Tensor | None,
             core: Callable[[int, int, int, bool, int, int], None]) -> torch.Tensor:
    """y [.., n] in x's dtype from x [.., k] through `core(rows address, rows, y address, bf16 rows
    and output, bias address or 0, threads)` (the quantized products; `_kernel` calls its core
    directly, being on every step's path); every tensor the core reads stays referenced here
    until it returns. No rows (or no outputs): an empty result without the core (an empty tensor
    may have no address)."""
    lead, rows = _rows(x, k)
    y = torch.empty(rows.shape[0], n, dtype=x.dtype)
    if y.numel() != 0:
        core(rows.data_ptr(), rows.shape[0], y.data_ptr(), x.dtype is _BF16, 0 if bias is None else bias.data_ptr(),
             torch.get_num_threads())
    return y.view(*lead, n)


def takes_float32(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether `linear` takes this bf16 weight with float32 rows x as they are (no cast of the
    weight per use, which on the CPU writes a float32 copy of it first)."""
    return ENABLED and x.dtype is _F32 and _takes(x, weight)


def _kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"linear: x has {x.shape[-1]} features, the weight [{n}, {k}] takes {k}")
    lead, rows = _rows(x, k)
    y = torch.empty(rows.shape[0], n, dtype=x.dtype)
    if y.numel() == 0:  # no rows (or no outputs): nothing to compute, and an empty tensor may have no address
        return y.view(*lead, n)
    weight, b = _aligned(weight), _bias(bias, n, None, "linear")
    bf16 = x.dtype is _BF16
    # the core called directly, not through _product: this is every bf16 product of a step
    _core.bf16_linear(rows.data_ptr(), rows.shape[0], k, weight.data_ptr(), n, y.data_ptr(), bf16, bf16,
                      0 if b is None else b.data_ptr(), torch.get_num_threads())
    return y.view(*lead, n)


def mxfp4_linear(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [.., k] (bf16 or float32, on the CPU) times the MXFP4 matrix [n, k] given by blocks
    [n, k/32, 16] and scales [n, k/32] (+ bias [n]), in x's dtype: the bits of
    `linear(x, dequantize(blocks, scales, bfloat16), bias)`."""
    n, k = scales.shape[0], scales.shape[-1] * 32
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or scales.dim() != 2:
        raise TypeError(f"MXFP4 blocks and scales are uint8 and scales [n, k/32]; got {blocks.dtype} "
                        f"{tuple(blocks.shape)} and {scales.dtype} {tuple(scales.shape)}")
    if blocks.numel() != n * k // 2 or not blocks.is_contiguous() or not scales.is_contiguous():
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not hold a contiguous [{n}, {k}] matrix")
    if k == 0 or x.shape[-1] != k or x.dtype not in (_BF16, _F32) or not _on_cpu(x, blocks, scales):
        raise ValueError(f"mxfp4_linear takes CPU bf16/float32 rows of {k} (> 0) features, got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    b = _bias(bias, n, x.dtype, "mxfp4_linear")  # in x's dtype, as `linear` gets it
    return _product(x, k, n, b, lambda xp, m, yp, bf16, bp, threads: _core.mxfp4_linear(
        xp, m, k, blocks.data_ptr(), scales.data_ptr(), n, yp, bf16, bf16, bp, threads))


def mxfp4_expert_ffn(x: torch.Tensor, w: dict[str, torch.Tensor],
                     swiglu: tuple[float, float] | None) -> torch.Tensor:
    """runtime/reference.py's mxfp4_expert_ffn through mxfp4_linear: GPT-OSS's clamped SwiGLU
    with biases (gate rows above up rows), or a SiLU MLP, in x's dtype."""
    if swiglu is None:
        gate, up = mxfp4_linear(x, w["gate_up.blocks"], w["gate_up.scales"]).chunk(2, dim=-1)
        return mxfp4_linear(F.silu(gate) * up, w["down.blocks"], w["down.scales"])
    alpha, limit = swiglu
    gate, up = mxfp4_linear(x, w["gate_up.blocks"], w["gate_up.scales"], w["gate_up_bias"]).chunk(2, dim=-1)
    gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return mxfp4_linear((up + 1) * (gate * torch.sigmoid(gate * alpha)), w["down.blocks"], w["down.scales"],
                        w["down_bias"])


def minmax_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                  group: int) -> torch.Tensor:
    """x [.., k] (bf16 or float32, on the CPU) times the min-max matrix [n, k] of store/quant.py
    (codes q [n, k * bits / 8], float16 scale and zero [n, k / group]), in x's dtype: the bits of
    `linear(x, dequantize(q, scale, zero, bits, group, x.dtype))` for bf16 rows (the weights are
    rounded to bf16 as dequantize rounds them)."""
    if q.dim() != 2 or bits not in (2, 4, 8) or group <= 0:
        raise ValueError(f"min-max codes are a [n, k * bits / 8] matrix of 2, 4 or 8 bits in groups of a positive "
                         f"size, got {tuple(q.shape)} of {bits} bits, group {group}")
    n, k = q.shape[0], q.shape[-1] * 8 // bits
    if q.dtype != torch.uint8 or scale.dtype != torch.float16 or zero.dtype != torch.float16:
        raise TypeError(f"min-max codes are uint8 and scale/zero float16, got {q.dtype}, {scale.dtype}, {zero.dtype}")
    if scale.shape != (n, k // group) or zero.shape != scale.shape or k % group:
        raise ValueError(f"min-max scale {tuple(scale.shape)} / zero {tuple(zero.shape)} do not fit a [{n}, {k}] "
                         f"matrix in groups of {group}")
    if not (q.is_contiguous() and scale.is_contiguous() and zero.is_contiguous()):
        raise ValueError("min-max codes, scale and zero must be contiguous")
    if k == 0 or x.shape[-1] != k or x.dtype not in (_BF16, _F32) or not _on_cpu(x, q, scale, zero):
        raise ValueError(f"minmax_linear takes CPU bf16/float32 rows of {k} (> 0) features, got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    scale, zero = _aligned(scale), _aligned(zero)
    return _product(x, k, n, None, lambda xp, m, yp, bf16, bp, threads: _core.minmax_linear(
        xp, m, k, q.data_ptr(), scale.data_ptr(), zero.data_ptr(), bits, group, bf16, n, yp, bf16, bf16, bp, threads))


def minmax_takes(w: dict[str, torch.Tensor], bits: int, group: int, x: torch.Tensor) -> bool:
    """Whether `minmax_expert_ffn` computes this expert on x: bf16 or float32 rows on the CPU
    where `linear` takes bf16 weights, codes of 2, 4 or 8 bits in groups of a multiple of 8. For
    bf16 rows the result is the dequantizing reference's, bit for bit; for float32 rows the
    same weight values, summed in this kernel's order rather than torch's."""
    return (ENABLED and x.dtype in (_BF16, _F32) and not x.is_cuda and bits in (2, 4, 8) and group % 8 == 0
            and w["gate_up.q"].shape[-1] * 8 // bits % group == 0 and w["down.q"].shape[-1] * 8 // bits % group == 0)


def minmax_expert_ffn(x: torch.Tensor, w: dict[str, torch.Tensor], bits: int, group: int) -> torch.Tensor:
    """runtime/reference.py's quantized_expert_ffn through minmax_linear: the SiLU MLP over the
    expert's codes, decoded in registers rather than dequantized whole for each call."""
    gate, up = minmax_linear(x, w["gate_up.q"], w["gate_up.scale"], w["gate_up.zero"], bits, group).chunk(2, dim=-1)
    return minmax_linear(F.silu(gate) * up, w["down.q"], w["down.scale"], w["down.zero"], bits, group)
