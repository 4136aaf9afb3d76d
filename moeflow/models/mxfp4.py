"""MXFP4 (OCP microscaling FP4), as GPT-OSS's Hub checkpoints store their experts: the format's math
and the checkpoint layout (tensor names and shapes, config, reading one expert).

A matrix w [R, C] (C a multiple of 32) is cut along its input columns into blocks of 32 values.
Each block has one e8m0 scale byte s (the power of two 2**(s - 127)) and 32 FP4 e2m1 codes packed
two per byte, the even column in the low nibble and the odd one in the high nibble:
    blocks [R, C/32, 16] uint8, scales [R, C/32] uint8,
    w[r, c] = FP4_VALUES[code(r, c)] * 2**(scales[r, c // 32] - 127).
A code's bit 3 is the sign; bits 0-2 index the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.

`dequantize` computes exactly the values of transformers' integrations/mxfp4.py (_convert_moe_packed_tensors,
its dequantize=True loading path), bit for bit
(it then transposes to its [in, out] parameter layout; the store keeps [out, in]). `quantize` writes
what OpenAI's triton_kernels downcast_to_mxfp does by default: the scale is max|block| / 6 rounded
UP to a power of two, each value rounded to the nearest e2m1 value (ties to the even code).
kernels/mxfp4.cu implements `dequantize` on the GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from moeflow.errors import CheckpointError
from moeflow.models.base import Arch
from moeflow.models.tensors import HubTensor, fused_expert_tensors

if TYPE_CHECKING:
    from moeflow.models.checkpoint import Checkpoint

BLOCK = 32  # values per scale
BIAS = 127  # e8m0 exponent bias
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_MAGNITUDES = torch.tensor(FP4_VALUES[:8])
# byte -> (value of its low nibble, value of its high nibble)
_PAIRS = torch.stack([torch.tensor(FP4_VALUES).repeat(16), torch.tensor(FP4_VALUES).repeat_interleave(16)], -1)

# R = rows (outputs), C = columns (inputs), G = blocks per row (C / 32).


def _check_cols(cols: int) -> None:
    if cols % BLOCK:
        raise ValueError(f"MXFP4 packs blocks of {BLOCK} columns; {cols} columns is not a multiple of {BLOCK}")


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [R, C] float -> (blocks [R, C/32, 16] uint8, scales [R, C/32] uint8), as the Hub checkpoints."""
    r, c = w.shape
    _check_cols(c)
    wf = w.float().reshape(r, c // BLOCK, BLOCK)
    amax = wf.abs().amax(-1)
    # 2**ceil(log2(amax / 6)) on the float32 bits: adding a full mantissa bumps the exponent unless
    # the mantissa is zero (already a power of two); 0 stays 0 (scale byte 0, every code 0)
    bits = ((amax / 6.0).view(torch.int32) + 0x007FFFFF) & 0x7F800000
    scale = bits.view(torch.float32)
    scaled = torch.where(scale[..., None] > 0, wf / scale[..., None], torch.zeros_like(wf))
    mag = scaled.abs().clamp(max=6.0)
    grid = _MAGNITUDES.to(mag.device)
    lo = (torch.bucketize(mag, grid, right=True) - 1).clamp(0, 7)  # largest magnitude <= mag
    hi = (lo + 1).clamp(max=7)
    d_lo, d_hi = mag - grid[lo], grid[hi] - mag
    up = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0) & (hi != lo))
    code = torch.where(up, hi, lo).to(torch.uint8)
    code = code | ((scaled < 0) & (code > 0)).to(torch.uint8) << 3
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    return packed.contiguous(), (bits >> 23).to(torch.uint8)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks [..., G, 16] (or [R, C/2]) and scales [..., G] -> [..., G * 32] in `dtype`: the values
    transformers computes (its e2m1 table in `dtype`, then torch.ldexp: times 2**(s - 127) in
    float32, rounded to `dtype`), bit for bit. Each (scale, byte) pair is looked up, whole, in a
    table of every such pair's two values made once per dtype with that same arithmetic: one
    index pass and one gather (index_select), several times faster on the CPU than computing."""
    if blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        blocks = blocks.reshape(*scales.shape, BLOCK // 2)
    *prefix, g, _ = blocks.shape
    index = blocks.to(torch.int32) + (scales.to(torch.int32) << 8)[..., None]  # scale * 256 + byte
    pairs = torch.index_select(_pair_table(dtype, blocks.device), 0, index.reshape(-1))
    return pairs.view(dtype).reshape(*prefix, g * BLOCK)


_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _pair_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256 scales x 256 bytes] -> the byte's (low, high) nibble values times 2**(s - 127), in
    `dtype`, each pair packed in one word (int32 for 16-bit dtypes, int64 for float32): 256 or
    512 KiB, computed as transformers computes each value."""
    key = (dtype, device)
    table = _TABLES.get(key)
    if table is None:
        scale = torch.exp2(torch.arange(256, dtype=torch.float32) - BIAS)  # exact powers of two, as ldexp's
        values = (_PAIRS.to(dtype)[None, :, :] * scale[:, None, None]).to(dtype).contiguous()  # [256, 256, 2]
        word = {2: torch.int32, 4: torch.int64}[dtype.itemsize]
        table = _TABLES[key] = values.view(word).reshape(-1).to(device)
    return table


def deinterleave(t: torch.Tensor) -> torch.Tensor:
    """GPT-OSS's fused gate_up rows alternate gate, up, gate, ...: the gate rows, then the up rows
    (the store's order). Whole rows move, with their blocks and scales: nothing is re-quantized."""
    return torch.cat([t[0::2], t[1::2]]).contiguous()


def interleave(t: torch.Tensor) -> torch.Tensor:
    """The inverse of `deinterleave`: gate rows above up rows -> alternating rows (the Hub layout)."""
    half = t.shape[0] // 2
    out = torch.empty_like(t)
    out[0::2], out[1::2] = t[:half], t[half:]
    return out


# ---- the Hub checkpoint layout ----------------------------------------------------------------------
# GPT-OSS checkpoints whose experts are MXFP4, as openai/gpt-oss-20b and -120b ship them.
#
# config.json: quantization_config {"quant_method": "mxfp4", "modules_to_not_convert": [attention,
# router, embeddings, lm_head]}. Per MoE layer, beside the bf16 biases:
#     model.layers.N.mlp.experts.gate_up_proj_blocks [E, 2I, H/32, 16] uint8, _scales [E, 2I, H/32] uint8
#     model.layers.N.mlp.experts.down_proj_blocks    [E, H, I/32, 16] uint8,  _scales [E, H, I/32] uint8
# rows are output features ([out, in], gate and up rows interleaved), columns the input features in
# blocks of 32 (transformers' dequantization transposes them to its [E, in, out] parameters).
# Everything else is a float tensor named as in the bf16 layout (models/tensors.py).

# Where the Hub checkpoints leave their float tensors (what transformers' quantizer skips)
MODULES_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def quantization_config() -> dict[str, Any]:
    """config.json's quantization_config of the Hub's MXFP4 GPT-OSS checkpoints."""
    return {"quant_method": "mxfp4", "modules_to_not_convert": list(MODULES_NOT_CONVERTED)}


def is_mxfp4(config: dict[str, Any]) -> bool:
    quant = config.get("quantization_config")
    return isinstance(quant, dict) and quant.get("quant_method") == "mxfp4"


def expert_tensors(arch: Arch, layer: int) -> list[HubTensor]:
    """One layer's (gate_up blocks, gate_up scales, down blocks, down scales) with their Hub shapes."""
    gate_up, down = fused_expert_tensors(arch, layer)
    e, h, i = arch.num_experts, arch.hidden_size, arch.expert_intermediate
    out = []
    for t, rows, cols in ((gate_up, 2 * i, h), (down, h, i)):
        out += [HubTensor(f"{t.name}_blocks", (e, rows, cols // BLOCK, BLOCK // 2)),
                HubTensor(f"{t.name}_scales", (e, rows, cols // BLOCK))]
    return out


def checkpoint_tensors(table: list[HubTensor], arch: Arch) -> list[HubTensor]:
    """A bf16 layout's tensor table with each layer's float expert matrices replaced by their
    blocks and scales (what an MXFP4 checkpoint holds)."""
    fused = {t.name: layer for layer in arch.moe_layers for t in fused_expert_tensors(arch, layer)}
    out = []
    for t in table:
        if t.name not in fused:
            out.append(t)
        elif t.name.endswith("gate_up_proj"):  # the layer's four, once, where its gate_up was
            out += expert_tensors(arch, fused[t.name])
    return out


def _part(ckpt: Checkpoint, tensor: HubTensor, expert: int) -> torch.Tensor:
    info = ckpt.expect_shape(tensor.name, tensor.shape)
    if info.dtype != torch.uint8:
        raise CheckpointError(f"{info.file}: MXFP4 tensor {tensor.name!r} is {info.dtype}, not uint8",
                              path=str(info.file), field=tensor.name)
    return ckpt.get_part(tensor.name, expert)


def read_expert(ckpt: Checkpoint, arch: Arch, layer: int,
                expert: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """One expert's ((gate_up blocks, scales), (down blocks, scales)), gate rows moved above up
    rows (whole rows: the bytes are the checkpoint's)."""
    gu_b, gu_s, d_b, d_s = (_part(ckpt, t, expert) for t in expert_tensors(arch, layer))
    return (deinterleave(gu_b), deinterleave(gu_s)), (d_b.contiguous(), d_s.contiguous())


def synth_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, std: float,
                 pending: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """`moeflow synth`: a layer's `*_blocks` are random normal experts (std `std`) quantized as the
    Hub's are, their `*_scales` kept in `pending` until asked for; None for every other tensor."""
    if name in pending:
        return pending.pop(name)
    if not name.endswith("_blocks"):
        return None
    experts, rows, groups, _ = shape
    blocks, scales = [], []
    for _ in range(experts):  # one expert at a time: bounded memory for the small size's layers
        b, s = quantize(torch.randn(rows, groups * BLOCK, generator=gen, device=gen.device) * std)
        blocks.append(b.cpu())
        scales.append(s.cpu())
    pending[name.removesuffix("_blocks") + "_scales"] = torch.stack(scales)
    return torch.stack(blocks)
