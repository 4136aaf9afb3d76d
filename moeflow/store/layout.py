"""Byte layout of one expert blob: which tensors, where, in which dtype; views over a block."""

from __future__ import annotations


import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

BLOB_ALIGN = 4096  # every blob starts and ends on this boundary: O_DIRECT-ready
_SLOT_ALIGN = 64  # each tensor inside a blob starts on a cache line

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "uint8": torch.uint8,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def align_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class Slot:
    """One tensor inside a blob."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype].itemsize
        for d in self.shape:
            n *= d
        return n

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "offset": self.offset}

    @staticmethod
    def from_json(d: dict[str, Any]) -> Slot:
        return Slot(str(d["name"]), str(d["dtype"]), tuple(int(x) for x in d["shape"]), int(d["offset"]))


@dataclass(frozen=True)
class ExpertView:
    """One expert's tensors in fast memory (views over its block) and how they are encoded."""

    tensors: dict[str, torch.Tensor]
    bits: int = 16  # 16: float weights gate_up/down; 8, 4, 2: packed codes with scale/zero
    group: int = 0
    nbytes: int = 0  # of the tensors (the views are made once per block)
    # GPT-OSS: (alpha, limit) of its clamped SwiGLU; its experts also hold gate_up_bias and down_bias
    swiglu: tuple[float, float] | None = None
    # which arithmetic decodes the tensors: "dense" (float gate_up/down), "minmax" (store/quant.py's
    # int8/4/2 codes), or a native checkpoint format named by its precision's first part ("mxfp4",
    # "fp8", ...). Dispatch on this, never on `bits` alone: int4 and mxfp4 are both 4 bits.
    kind: str = "dense"

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]


@dataclass(frozen=True)
class BlobLayout:
    """The layout shared by every expert blob of one store variant (one precision)."""

    precision: str
    slots: tuple[Slot, ...]
    size: int  # bytes, a multiple of BLOB_ALIGN
    meta: tuple[tuple[str, int], ...] = ()  # quantization parameters (bits, group size)

    @staticmethod
    def pack(precision: str, tensors: Sequence[tuple[str, str, tuple[int, ...]]], **meta: int) -> BlobLayout:
        """Place tensors one after another, each aligned to a cache line."""
        slots, offset = [], 0
        for name, dtype, shape in tensors:
            slot = Slot(name, dtype, shape, offset)
            slots.append(slot)
            offset = align_up(offset + slot.nbytes, _SLOT_ALIGN)
        return BlobLayout(precision, tuple(slots), align_up(max(offset, 1), BLOB_ALIGN), tuple(sorted(meta.items())))

    def expert_view(self, blob: torch.Tensor) -> ExpertView:
        meta = dict(self.meta)
        views = self.views(blob)
        swiglu = (_float(meta["swiglu_alpha"]), _float(meta["swiglu_limit"])) if "swiglu_alpha" in meta else None
        return ExpertView(views, meta.get("bits", 16), meta.get("group", 0), sum(t.nbytes for t in views.values()),
                          swiglu, precision_kind(self.precision))

    def slot(self, name: str) -> Slot:
        for s in self.slots:
            if s.name == name:
                return s
        raise KeyError(name)

    def views(self, blob: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed, shaped tensors over a uint8 tensor holding one blob (no copies)."""
        out = {}
        for s in self.slots:
            raw = blob[s.offset : s.offset + s.nbytes]
            out[s.name] = raw.view(DTYPES[s.dtype]).view(s.shape)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "size": self.size,
            "slots": [s.to_json() for s in self.slots],
            "meta": dict(self.meta),
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> BlobLayout:
        return BlobLayout(
            str(d["precision"]),
            tuple(Slot.from_json(s) for s in d["slots"]),
            int(d["size"]),
            tuple(sorted((str(k), int(v)) for k, v in d.get("meta", {}).items())),
        )


def precision_kind(precision: str) -> str:
    """ExpertView.kind of a store precision: 'bfloat16' -> dense, 'int4-g64' -> minmax,
    'mxfp4' -> mxfp4, 'fp8-e4m3-b128' -> fp8."""
    if precision in DTYPES:
        return "dense"
    if precision.startswith("int"):
        return "minmax"
    return precision.split("-")[0]


def _bits(x: float) -> int:
    """A float as the integer of its IEEE-754 double bits: layout meta holds integers, exactly."""
    return int(struct.unpack("<q", struct.pack("<d", x))[0])


def _float(bits: int) -> float:
    return float(struct.unpack("<d", struct.pack("<q", bits))[0])


def dense_layout(dtype: torch.dtype, hidden: int, intermediate: int,
                 swiglu: tuple[float, float] | None = None) -> BlobLayout:
    """Unquantized expert: gate and up stacked as one [2I, H] matrix, then down [H, I]. GPT-OSS's
    experts (`swiglu` set) add their biases gate_up_bias [2I] and down_bias [H], so a cached or
    offloaded expert is the whole expert; alpha and limit travel in the layout's meta."""
    name = DTYPE_NAMES[dtype]
    tensors: list[tuple[str, str, tuple[int, ...]]] = [
        ("gate_up", name, (2 * intermediate, hidden)), ("down", name, (hidden, intermediate))]
    if swiglu is None:
        return BlobLayout.pack(name, tensors)
    tensors += [("gate_up_bias", name, (2 * intermediate,)), ("down_bias", name, (hidden,))]
    return BlobLayout.pack(name, tensors, swiglu_alpha=_bits(swiglu[0]), swiglu_limit=_bits(swiglu[1]))
