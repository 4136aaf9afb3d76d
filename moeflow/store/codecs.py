"""Expert encodings (precisions): the blob layout of each and how an expert's matrices become it.

Dense codecs keep a float dtype. Quantized codecs (int8, int4, int2) store each matrix as packed
codes plus float16 scale and zero per group of `group` input columns (HQQ-style asymmetric
min-max; see store/quant.py for the exact formula).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from moeflow.errors import ConfigError
from moeflow.store import quant
from moeflow.store.mxfp4 import Mxfp4Codec
from moeflow.store.fp8 import PRECISION as FP8_PRECISION, Fp8Codec
from moeflow.store.layout import DTYPE_NAMES, DTYPES, BlobLayout, dense_layout

DEFAULT_GROUP = {8: 64, 4: 64, 2: 32}


@dataclass(frozen=True)
class DenseCodec:
    """Unquantized experts in a float dtype."""

    dtype: torch.dtype
    bits = 16

    @property
    def precision(self) -> str:
        return DTYPE_NAMES[self.dtype]

    def layout(self, hidden: int, intermediate: int, swiglu: tuple[float, float] | None = None) -> BlobLayout:
        return dense_layout(self.dtype, hidden, intermediate, swiglu)

    def encode(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"gate_up": torch.cat([gate, up]).to(self.dtype), "down": down.to(self.dtype)}

    def decode(self, views: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Float weights (gate_up, down) of one expert's blob, in `dtype`."""
        return {"gate_up": views["gate_up"].to(dtype), "down": views["down"].to(dtype)}


@dataclass(frozen=True)
class QuantCodec:
    """Group-wise min-max quantized experts: `bits` in (8, 4, 2), groups of `group` columns."""

    bits: int
    group: int

    @property
    def precision(self) -> str:
        return f"int{self.bits}-g{self.group}"

    def _check(self, name: str, cols: int) -> None:
        if cols % self.group:
            raise ConfigError(
                f"precision {self.precision}: {name} has {cols} input columns, not a multiple of group size {self.group}"
            )

    def layout(self, hidden: int, intermediate: int, swiglu: tuple[float, float] | None = None) -> BlobLayout:
        if swiglu is not None:  # GPT-OSS: no quantized kernel or reference computes biased, clamped experts
            raise ConfigError(f"precision {self.precision}: GPT-OSS experts (biases, clamped SwiGLU) are stored "
                              f"unquantized only; use precision bfloat16, float16 or float32")
        self._check("gate/up", hidden)
        self._check("down", intermediate)
        per = 8 // self.bits
        tensors = []
        for name, rows, cols in (("gate_up", 2 * intermediate, hidden), ("down", hidden, intermediate)):
            tensors += [
                (f"{name}.q", "uint8", (rows, cols // per)),
                (f"{name}.scale", "float16", (rows, cols // self.group)),
                (f"{name}.zero", "float16", (rows, cols // self.group)),
            ]
        return BlobLayout.pack(self.precision, tensors, bits=self.bits, group=self.group)

    def encode(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, w in (("gate_up", torch.cat([gate, up])), ("down", down)):
            q, scale, zero = quant.quantize(w, self.bits, self.group)
            out[f"{name}.q"], out[f"{name}.scale"], out[f"{name}.zero"] = q, scale, zero
        return out

    def decode(self, views: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {
            name: quant.dequantize(
                views[f"{name}.q"], views[f"{name}.scale"], views[f"{name}.zero"], self.bits, self.group, dtype
            )
            for name in ("gate_up", "down")
        }


Codec = DenseCodec | QuantCodec | Fp8Codec | Mxfp4Codec
_QUANT = re.compile(r"^int(8|4|2)(?:-g(\d+))?$")


def codec_for(precision: str, group: int | None = None) -> Codec:
    """The codec of a precision name: 'bfloat16', 'float32', 'float16', 'int8', 'int4-g64', 'int2', ..."""
    if precision in ("float32", "float16", "bfloat16"):
        return DenseCodec(DTYPES[precision])
    if precision == Mxfp4Codec.precision:  # GPT-OSS's native experts (store/mxfp4.py)
        return Mxfp4Codec()
    if precision == FP8_PRECISION:  # FP8 checkpoints' experts as published (store/fp8.py)
        return Fp8Codec()
    m = _QUANT.match(precision)
    if m:
        bits = int(m.group(1))
        g = group or (int(m.group(2)) if m.group(2) else DEFAULT_GROUP[bits])
        if g <= 0 or g % (8 // bits):
            raise ConfigError(f"group size {g} for {precision}: must be a positive multiple of {8 // bits}")
        return QuantCodec(bits, g)
    raise ConfigError(
        f"unknown expert precision {precision!r}; expected float32, float16, bfloat16, int8, int4 or int2 "
        f"(optionally with a group size, e.g. int4-g64)"
    )
