"""FP8 block-quantized weights as DeepSeek-V3/R1, Kimi-K2, MiniMax-M2 and Qwen3 *-FP8 publish them.

A weight [R, C] is stored as float8_e4m3fn codes of the same shape plus a float32 `weight_scale_inv`
of shape [ceil(R / 128), ceil(C / 128)], one per 128x128 block; the blocks on the right and bottom
edges are partial when R or C is not a multiple of 128, and use the scale of the block they start in:

    w[r, c] = float(q[r, c]) * scale_inv[r // 128, c // 128]     (multiplied in float32)

That is DeepSeek's `weight_dequant` and transformers' `_dequantize_fp8_weight`. (transformers'
load-time `Fp8Dequantize` instead divides the weight evenly by the scale grid, block R / ceil(R/128),
which misreads partial edge blocks; see tests/models/test_fp8.py.) kernels/fp8.cu computes
`dequantize` on the GPU; runtime/reference.py re-exports it as that kernel's torch reference.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeflow.errors import CheckpointError, ConfigError, UnsupportedModel
from moeflow.models.checkpoint import Checkpoint
from moeflow.store.layout import BlobLayout

BLOCK = 128
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def grid(rows: int, cols: int, block: tuple[int, int] = (BLOCK, BLOCK)) -> tuple[int, int]:
    """The scale grid of an [rows, cols] weight: ceil division, partial edge blocks included."""
    return -(-rows // block[0]), -(-cols // block[1])


def _expand(scale_inv: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """[GR, GC] block scales -> [rows, cols] per-element scales (edge blocks cut to the weight)."""
    s = scale_inv.float().repeat_interleave(block[0], dim=0)[:rows]
    return s.repeat_interleave(block[1], dim=1)[:, :cols]


def quantize(w: torch.Tensor, block: tuple[int, int] = (BLOCK, BLOCK)) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [R, C] -> (e4m3 codes [R, C], float32 scale_inv [ceil(R/b0), ceil(C/b1)]).

    Per block: scale = 448 / amax, codes = clamp(w * scale) cast to e4m3, scale_inv = 1 / scale (an
    all-zero block keeps scale 1); transformers' Fp8Quantize, with the partial edge blocks of the
    published checkpoints taking the amax of the part that exists."""
    rows, cols = w.shape
    gr, gc = grid(rows, cols, block)
    padded = torch.zeros(gr * block[0], gc * block[1], dtype=torch.float32)
    padded[:rows, :cols] = w.float()
    amax = padded.view(gr, block[0], gc, block[1]).abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, E4M3_MAX / torch.where(amax > 0, amax, torch.ones_like(amax)),
                        torch.ones_like(amax))
    scale_inv = (1.0 / scale).to(torch.float32)
    codes = (w.float() * _expand(scale, rows, cols, block)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return codes, scale_inv


def dequantize(codes: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32,
               block: tuple[int, int] = (BLOCK, BLOCK)) -> torch.Tensor:
    """e4m3 codes [R, C] and block scales -> [R, C] weights in `dtype` (what kernels/fp8.cu computes).

    `codes` may be the raw bytes (uint8) of the e4m3 values, as an expert blob holds them."""
    if codes.dtype == torch.uint8:
        codes = codes.view(E4M3)
    rows, cols = codes.shape
    if tuple(scale_inv.shape) != grid(rows, cols, block):
        raise ValueError(f"FP8 weight {list(codes.shape)} needs a scale grid {list(grid(rows, cols, block))}, "
                         f"got {list(scale_inv.shape)}")
    return (codes.float() * _expand(scale_inv, rows, cols, block)).to(dtype)


# ---- reading a checkpoint's FP8 tensors -----------------------------------------------------------

PRECISION = "fp8-e4m3-b128"  # the store precision keeping such experts as they are published


def checkpoint_block(ckpt: Checkpoint) -> tuple[int, int] | None:
    """The checkpoint's FP8 weight block (rows, cols), None when it is not FP8 block-quantized.
    ConfigReader.fp8_blocks has refused the variants that are not read here."""
    quant = ckpt.config.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "fp8":
        return None
    block = quant.get("weight_block_size")
    return (int(block[0]), int(block[1])) if isinstance(block, list) and len(block) == 2 else None


def native_precision(ckpt: Checkpoint) -> str | None:
    """The expert store precision that keeps the checkpoint's experts byte for byte (None: none)."""
    return PRECISION if checkpoint_block(ckpt) == (BLOCK, BLOCK) else None


def read_fp8(ckpt: Checkpoint, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(e4m3 codes, float32 scale_inv) of a tensor the checkpoint stores FP8; None for one stored
    unquantized (norms, router, embeddings, modules_to_not_convert)."""
    scale = ckpt.scale_inv(name)
    if scale is None:
        return None
    block = checkpoint_block(ckpt)
    if block is None:
        raise UnsupportedModel(f"{ckpt.path}: tensor {name!r} is FP8 but config.json has no FP8 "
                               f"quantization_config with a weight_block_size", path=str(ckpt.path),
                               field="quantization_config")
    codes, scale_inv = ckpt.get(name), ckpt.get(scale)
    if scale_inv.dtype != torch.float32:
        raise UnsupportedModel(f"{ckpt.path}: {scale!r} is {scale_inv.dtype}; only float32 block scales are read",
                               path=str(ckpt.path), field=scale)
    want = grid(codes.shape[0], codes.shape[1], block) if codes.dim() == 2 else None
    if want is None or tuple(scale_inv.shape) != want:
        raise CheckpointError(f"{ckpt.path}: {scale!r} has shape {list(scale_inv.shape)}; a {list(codes.shape)} "
                              f"weight in {list(block)} blocks needs {list(want or ())}", path=str(ckpt.path),
                              field=scale)
    return codes, scale_inv


def read_weight(ckpt: Checkpoint, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor in `dtype` (None: as stored), FP8 ones dequantized: what the model computes with."""
    pair = read_fp8(ckpt, name)
    if pair is None:
        return ckpt.get(name, dtype)
    block = checkpoint_block(ckpt)
    assert block is not None  # read_fp8 refused it
    return dequantize(*pair, dtype or torch.float32, block)


# ---- the expert store codec -----------------------------------------------------------------------


@dataclass(frozen=True)
class Fp8Codec:
    """Experts as e4m3 codes with float32 128x128 block scales, the published checkpoints' bytes.

    gate and up stack as one [2I, H] code matrix (bytes, so stacking is exact) but keep their own
    scale grids: when I is not a multiple of 128, up's first rows start a block of their own."""

    bits = 8
    precision = PRECISION

    def layout(self, hidden: int, intermediate: int, swiglu: tuple[float, float] | None = None) -> BlobLayout:
        if swiglu is not None:
            raise ConfigError(f"precision {self.precision}: GPT-OSS experts (biases, clamped SwiGLU) are stored "
                              f"unquantized or as MXFP4 only")
        h, i = hidden, intermediate
        return BlobLayout.pack(self.precision, [
            ("gate_up.q", "uint8", (2 * i, h)),
            ("gate.scale", "float32", grid(i, h)),
            ("up.scale", "float32", grid(i, h)),
            ("down.q", "uint8", (h, i)),
            ("down.scale", "float32", grid(h, i)),
        ], bits=8, group=BLOCK)

    def encode(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
        """Float experts (a bf16 checkpoint) quantized as the FP8 checkpoints are."""
        return self.encode_fp8(quantize(gate), quantize(up), quantize(down))

    def encode_fp8(self, gate: tuple[torch.Tensor, torch.Tensor], up: tuple[torch.Tensor, torch.Tensor],
                   down: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An FP8 checkpoint's (codes, scale_inv) pairs, kept byte for byte."""
        return {
            "gate_up.q": torch.cat([gate[0].view(torch.uint8), up[0].view(torch.uint8)]),
            "gate.scale": gate[1], "up.scale": up[1],
            "down.q": down[0].view(torch.uint8), "down.scale": down[1],
        }

    def decode(self, views: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return decode_expert(views, dtype)


def decode_expert(w: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """An FP8 expert blob's float gate_up [2I, H] and down [H, I] (what kernels/fp8.cu dequantizes)."""
    i = w["gate_up.q"].shape[0] // 2
    gate_up = torch.cat([dequantize(w["gate_up.q"][:i], w["gate.scale"], dtype),
                         dequantize(w["gate_up.q"][i:], w["up.scale"], dtype)])
    return {"gate_up": gate_up, "down": dequantize(w["down.q"], w["down.scale"], dtype)}


# ---- writing a checkpoint as the FP8 ones are published (`moeflow synth --quant fp8`) -------------

QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [BLOCK, BLOCK]}


def quantized_names(ckpt: Checkpoint) -> list[str]:
    """The tensors an FP8 release quantizes: every 2-D linear weight (attention projections, dense
    MLPs, shared and routed experts) but the embedding, lm_head and the routers (kept unquantized in
    DeepSeek-V3, Qwen3-FP8 and MiniMax-M2 releases: their modules are not nn.Linear, or skipped)."""
    from moeflow.models import parse_arch
    from moeflow.models.tensors import layer_tensors, model_tensors

    arch = parse_arch(ckpt)
    top = model_tensors(arch)
    keep = {top.embed.name, top.lm_head.name}
    for layer in range(arch.num_layers):
        t = layer_tensors(arch, layer)
        keep |= {x.name for x in (t.router, t.shared_gate) if x is not None}
    return [name for name, info in ckpt.tensors.items()
            if name.endswith(".weight") and len(info.shape) == 2 and name not in keep]


def quantize_checkpoint(path: str | os.PathLike[str]) -> list[str]:
    """Rewrite a float checkpoint in place as an FP8 block-quantized one: each of `quantized_names`
    becomes e4m3 codes plus `<name>_scale_inv`, config.json gets the releases' quantization_config.
    Returns the quantized names."""
    ckpt = Checkpoint(path)
    if ckpt.config.get("quantization_config"):
        raise ConfigError(f"{ckpt.path}: already quantized ({ckpt.config['quantization_config']})")
    names = set(quantized_names(ckpt))
    weight_map: dict[str, str] = {}
    total = 0
    for file in ckpt.files:
        tensors = {}
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if name in names:
                    tensors[name], tensors[f"{name}_scale_inv"] = quantize(t)
                else:
                    tensors[name] = t
        for name, t in tensors.items():
            weight_map[name] = file.name
            total += t.nbytes
        save_file(tensors, str(file), metadata={"format": "pt"})
    index = ckpt.path / "model.safetensors.index.json"
    if index.is_file():
        index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = dict(ckpt.config, quantization_config=dict(QUANTIZATION_CONFIG))
    (ckpt.path / "config.json").write_text(json.dumps(config, indent=2))
    ckpt.close()
    return sorted(names)
