"""The `precision="mxfp4"` expert store: GPT-OSS's MXFP4 experts kept as the checkpoint holds them.

The format's math and the checkpoint layout live in models/mxfp4.py (synth writes it too); they
are re-exported here, where the store encodes and decodes with them. kernels/mxfp4.cu implements
`dequantize` and the decode FFN on the GPU (runtime/reference.py mxfp4_expert_ffn is its reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moeflow.errors import ConfigError
from moeflow.models.base import Arch
from moeflow.models.checkpoint import Checkpoint
from moeflow.models.mxfp4 import (BIAS, BLOCK, FP4_VALUES, deinterleave, dequantize, interleave, is_mxfp4, quantize,
                                  read_expert)
from moeflow.models.tensors import expert_bias_tensors, read_tensor
from moeflow.store.layout import DTYPES, BlobLayout, _bits

__all__ = ["BIAS", "BLOCK", "FP4_VALUES", "Mxfp4Codec", "deinterleave", "dequantize", "encode_expert", "interleave",
           "native_precision", "quantize"]


@dataclass(frozen=True)
class Mxfp4Codec:
    """The `precision="mxfp4"` store: each expert's blocks and scales as the checkpoint holds them,
    gate rows above up rows (store/codecs.py codec_for); GPT-OSS's biases in float32 (exact for
    bf16 or float32 ones), alpha and limit in the layout's meta as dense_layout keeps them."""

    precision = "mxfp4"
    bits = 4

    def layout(self, hidden: int, intermediate: int, swiglu: tuple[float, float] | None = None) -> BlobLayout:
        for name, cols in (("gate/up", hidden), ("down", intermediate)):
            if cols % BLOCK:
                raise ConfigError(f"precision mxfp4: {name} has {cols} input columns, not a multiple of {BLOCK}")
        tensors: list[tuple[str, str, tuple[int, ...]]] = []
        for name, rows, cols in (("gate_up", 2 * intermediate, hidden), ("down", hidden, intermediate)):
            tensors += [(f"{name}.blocks", "uint8", (rows, cols // BLOCK, BLOCK // 2)),
                        (f"{name}.scales", "uint8", (rows, cols // BLOCK))]
        if swiglu is None:
            return BlobLayout.pack(self.precision, tensors, bits=4, group=BLOCK)
        tensors += [("gate_up_bias", "float32", (2 * intermediate,)), ("down_bias", "float32", (hidden,))]
        return BlobLayout.pack(self.precision, tensors, bits=4, group=BLOCK, swiglu_alpha=_bits(swiglu[0]),
                               swiglu_limit=_bits(swiglu[1]))

    def encode(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
        """Float experts (a bf16 checkpoint) quantized the way the Hub checkpoints are."""
        out = {}
        for name, w in (("gate_up", torch.cat([gate, up])), ("down", down)):
            out[f"{name}.blocks"], out[f"{name}.scales"] = quantize(w)
        return out

    def encode_native(self, gate_up: tuple[torch.Tensor, torch.Tensor],
                      down: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An MXFP4 checkpoint's (blocks, scales) of one expert, gate rows above up rows, as they are."""
        return {"gate_up.blocks": gate_up[0], "gate_up.scales": gate_up[1],
                "down.blocks": down[0], "down.scales": down[1]}

    def decode(self, views: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {name: dequantize(views[f"{name}.blocks"], views[f"{name}.scales"], dtype)
                for name in ("gate_up", "down")}


def native_precision(ckpt: Checkpoint) -> str | None:
    """The store precision that keeps an MXFP4 checkpoint's experts as they are: a user who downloads
    gpt-oss expects its experts to stay 4x smaller than bf16. None for other checkpoints."""
    return Mxfp4Codec.precision if is_mxfp4(ckpt.config) else None


def encode_expert(ckpt: Checkpoint, arch: Arch, codec: Any, layout: BlobLayout, layer: int,
                  expert: int) -> dict[str, torch.Tensor]:
    """One expert's blob tensors from an MXFP4 checkpoint: the mxfp4 store copies its bytes; any
    other precision gets the dequantized weights (exactly the values transformers computes with)."""
    gate_up, down = read_expert(ckpt, arch, layer, expert)
    if isinstance(codec, Mxfp4Codec):
        tensors = codec.encode_native(gate_up, down)
    else:
        gu, dn = dequantize(*gate_up), dequantize(*down)
        i = arch.expert_intermediate
        tensors = codec.encode(gu[:i], gu[i:], dn)
    biases = expert_bias_tensors(arch, layer, expert)
    if biases is not None:
        dtype = DTYPES[layout.slot("gate_up_bias").dtype]
        b_gate, b_up, b_down = (read_tensor(ckpt, t) for t in biases)
        tensors["gate_up_bias"], tensors["down_bias"] = torch.cat([b_gate, b_up]).to(dtype), b_down.to(dtype)
    return tensors
