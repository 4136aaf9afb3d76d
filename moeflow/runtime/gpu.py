"""Launching kernels/*.cu on torch CUDA tensors through CuPy: launch objects built once, raw pointers, torch's stream.

Each launcher mirrors a function of runtime/reference.py (the GPU tests compare them). A launch is
plain data first (`Launch`: entry point, grid, block, arguments as numpy scalars: np.uint64 device
pointers, np.int32 sizes), built without CuPy and so checked on machines without a GPU; `run` hands
it to the kernel function resolved once per (source, entry, device), on a CuPy wrapper of torch's
current stream made once per stream. `ExpertLauncher` holds one expert block's weight pointers and
shapes, so a decode launch adds only the activation pointers.

Tensors handed to a launch must live on the current stream's device until the kernel has run:
torch's caching allocator reuses a freed block only in stream order, so temporaries made on the
current stream right before a launch are safe to drop after it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moeflow.runtime import kernels

# n = tokens of a decode launch, R = rows of a grouped launch, H = hidden, I = intermediate, E = experts.

_THREADS = 256
MAX_DECODE_TOKENS = 8  # kernels/expert_ffn.cu MAX_TOKENS
_WEIGHT_PARTS = ("q", "scale", "zero")


@dataclass(frozen=True)
class Launch:
    """One kernel launch as plain data: what `run` passes to the driver."""

    source: str
    entry: str
    grid: tuple[int, ...]
    block: tuple[int, ...]
    args: tuple[np.uint64 | np.int32, ...]


def pointer(t: torch.Tensor) -> np.uint64:
    """A tensor's first byte as a kernel pointer argument (CuPy passes 8-byte numpy scalars as is)."""
    return np.uint64(t.data_ptr())


def _suffix(dtype: torch.dtype) -> str:
    if dtype is torch.bfloat16:
        return "bf16"
    if dtype is torch.float16:
        return "f16"
    raise TypeError(f"kernels take float16 or bfloat16 activations, not {dtype}")


def _entry_suffix(bits: int, dtype: torch.dtype) -> str:
    act = _suffix(dtype)
    return f"{act}_{act}" if bits == 16 else f"int{bits}_{act}"


# ---- running a launch (needs CuPy and a GPU) ------------------------------------------------------
_STREAMS: dict[tuple[int, int], Any] = {}  # (device, torch stream pointer) -> CuPy stream wrapper


def _cupy_stream(device: int) -> Any:
    """A CuPy view of torch's current stream on `device`, made once per stream."""
    stream = torch.cuda.current_stream(device)
    key = (device, stream.cuda_stream)
    wrapper = _STREAMS.get(key)
    if wrapper is None:
        import cupy

        if hasattr(cupy.cuda.Stream, "from_external"):  # CuPy >= 14 (ExternalStream is deprecated there)
            wrapper = cupy.cuda.Stream.from_external(stream)
        else:
            wrapper = cupy.cuda.ExternalStream(stream.cuda_stream, device)
        _STREAMS[key] = wrapper
    return wrapper


def run(launch: Launch, device: torch.device) -> None:
    """Launch on torch's current stream of `device`."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    kernels.function(launch.source, launch.entry, index)(launch.grid, launch.block, launch.args,
                                                         stream=_cupy_stream(index))


# ---- dequantization -------------------------------------------------------------------------------
def dequant_launch(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
                   out: torch.Tensor) -> Launch:
    rows, cols = out.shape
    if q.shape != (rows, cols * bits // 8):
        raise ValueError(f"packed codes of shape {tuple(q.shape)} do not fill a [{rows}, {cols}] int{bits} matrix")
    grid = ((q.numel() + _THREADS - 1) // _THREADS,)
    return Launch("dequant.cu", f"dequant_int{bits}_{_suffix(out.dtype)}", grid, (_THREADS,),
                  (pointer(q), pointer(scale), pointer(zero), pointer(out), np.int32(rows), np.int32(cols),
                   np.int32(group)))


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
               dtype: torch.dtype) -> torch.Tensor:
    """kernels/dequant.cu; reference.dequantize."""
    q, scale, zero = q.contiguous(), scale.contiguous(), zero.contiguous()
    out = torch.empty(q.shape[0], q.shape[1] * (8 // bits), dtype=dtype, device=q.device)
    run(dequant_launch(q, scale, zero, bits, group, out), q.device)
    return out


# ---- one expert block -----------------------------------------------------------------------------
class ExpertLauncher:
    """The launch arguments of one expert block, built once per block: its six weight pointers
    (gate_up q/scale/zero, down q/scale/zero; float weights pass the matrix for all three) and shapes.

    The pointers are the block's, not the expert's: the launcher serves whichever expert the block
    holds. `launcher(tensors, bits, group)` returns the one made for the same pointers and shapes."""

    def __init__(self, tensors: dict[str, torch.Tensor], bits: int, group: int) -> None:
        if bits == 16:
            gate_up, down = tensors["gate_up"], tensors["down"]
            parts = [gate_up] * 3 + [down] * 3
            self.inter, self.hidden = down.shape[1], down.shape[0]
            self.weight_dtype: torch.dtype | None = gate_up.dtype
            if gate_up.shape != (2 * self.inter, self.hidden) or gate_up.dtype != down.dtype:
                raise ValueError(f"gate_up {tuple(gate_up.shape)} {gate_up.dtype} does not match down "
                                 f"{tuple(down.shape)} {down.dtype}")
        elif bits in (8, 4, 2):
            parts = [tensors[f"{m}.{p}"] for m in ("gate_up", "down") for p in _WEIGHT_PARTS]
            per = 8 // bits
            self.inter, self.hidden = parts[3].shape[1] * per, parts[3].shape[0]
            self.weight_dtype = None
            if parts[0].shape != (2 * self.inter, self.hidden // per):
                raise ValueError(f"gate_up.q {tuple(parts[0].shape)} does not match down.q {tuple(parts[3].shape)} "
                                 f"at int{bits}")
            for t in (parts[1], parts[2], parts[4], parts[5]):
                if t.dtype != torch.float16:
                    raise TypeError(f"quantized scales and zeros are float16, not {t.dtype}")
        else:
            raise ValueError(f"bits={bits}: the kernels take 16 (float) or 8, 4, 2 (quantized) bit weights")
        for t in parts:
            if not t.is_contiguous():
                raise ValueError(f"expert weights must be contiguous views of their block (shape {tuple(t.shape)})")
        self.bits, self.group = bits, max(group, 1)
        self.device = parts[0].device
        self.weights = tuple(pointer(t) for t in parts)
        self._table: torch.Tensor | None = None

    @property
    def table(self) -> torch.Tensor:
        """[6, 1] int64 on the block's device: the weight pointers as the grouped kernels read them."""
        if self._table is None:
            host = torch.tensor([int(p) for p in self.weights], dtype=torch.int64).view(6, 1)
            if self.device.type == "cuda":  # pinned: the copy does not block the host
                host = host.pin_memory()
            self._table = host.to(self.device, non_blocking=True)
        return self._table

    def _check_activations(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.hidden or not x.is_contiguous():
            raise ValueError(f"activations must be contiguous [n, {self.hidden}] (the hidden size), got "
                             f"{tuple(x.shape)} with strides {x.stride()}")
        if x.device != self.device:
            raise ValueError(f"activations on {x.device}, expert weights on {self.device}")
        _suffix(x.dtype)
        if self.weight_dtype is not None and x.dtype != self.weight_dtype:
            raise TypeError(f"activations in {x.dtype} with float weights in {self.weight_dtype}: "
                            "the kernel reads both in one dtype")

    def decode_launch(self, x: torch.Tensor, token_weight: torch.Tensor, out: torch.Tensor) -> Launch:
        """kernels/expert_ffn.cu on contiguous x [n, H], token_weight [n] fp32, out [n, H] fp32."""
        self._check_activations(x)
        n = x.shape[0]
        if not 0 < n <= MAX_DECODE_TOKENS:
            raise ValueError(f"the decode kernel takes 1 to {MAX_DECODE_TOKENS} tokens, got {n}")
        if token_weight.dtype != torch.float32 or token_weight.shape != (n,):
            raise ValueError(f"token_weight must be float32 [{n}], got {token_weight.dtype} {tuple(token_weight.shape)}")
        if out.dtype != torch.float32 or out.shape != (n, self.hidden) or not out.is_contiguous():
            raise ValueError(f"out must be contiguous float32 [{n}, {self.hidden}], got {out.dtype} {tuple(out.shape)}")
        grid = ((self.inter + 63) // 64,)  # kernels/expert_ffn.cu SLICE rows per block
        return Launch("expert_ffn.cu", f"expert_ffn_decode_{_entry_suffix(self.bits, x.dtype)}", grid, (256,),
                      (pointer(x), np.int32(n), np.int32(self.hidden), np.int32(self.inter), np.int32(self.group),
                       *self.weights, pointer(token_weight), pointer(out)))

    def decode(self, x: torch.Tensor, token_weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """out[t] += token_weight[t] * FFN(x[t]) for a few tokens; fp32 out (zeros when not given)."""
        x = x.contiguous()
        token_weight = token_weight.float().contiguous()
        if out is None:
            out = torch.zeros(x.shape[0], self.hidden, dtype=torch.float32, device=x.device)
        run(self.decode_launch(x, token_weight, out), x.device)
        return out


_LAUNCHERS: dict[tuple[Any, ...], ExpertLauncher] = {}
_MAX_LAUNCHERS = 1 << 14  # far above any fast tier's blocks; past it the table starts over


def launcher(tensors: dict[str, torch.Tensor], bits: int, group: int) -> ExpertLauncher:
    """The ExpertLauncher of a block, made on first use. Keyed by every pointer and shape it holds,
    so a block that now holds another expert (or another layout) can never get stale arguments."""
    key = (bits, group, *((t.data_ptr(), t.shape, t.dtype) for t in tensors.values()))
    found = _LAUNCHERS.get(key)
    if found is None:
        if len(_LAUNCHERS) >= _MAX_LAUNCHERS:
            _LAUNCHERS.clear()
        found = _LAUNCHERS[key] = ExpertLauncher(tensors, bits, group)
    return found


def expert_ffn_decode(w: dict[str, torch.Tensor], x: torch.Tensor, token_weight: torch.Tensor, bits: int,
                      group: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """kernels/expert_ffn.cu: out[t] += token_weight[t] * FFN(x[t]) for a few tokens (fp32 out)."""
    return launcher(w, bits, group).decode(x, token_weight, out)


# ---- many experts, many tokens --------------------------------------------------------------------
def check_grouped(x: torch.Tensor, offsets: torch.Tensor, experts: Sequence[ExpertLauncher], table: torch.Tensor,
                  row_weight: torch.Tensor) -> None:
    """What every grouped launch (grouped_ffn.cu, moe_decode.cu, grouped_mma.cu) checks: experts
    of one shape and encoding, the activations, the pointer table, the offsets, the row weights."""
    first = experts[0]
    for e in experts:
        if (e.bits, e.hidden, e.inter, e.group) != (first.bits, first.hidden, first.inter, first.group):
            raise ValueError("one grouped launch takes experts of one shape and encoding")
        e._check_activations(x)
    rows, n_experts = x.shape[0], len(experts)
    if table.shape != (6, n_experts) or table.dtype != torch.int64 or not table.is_contiguous():
        raise ValueError(f"pointer table must be contiguous int64 [6, {n_experts}], got {table.dtype} {tuple(table.shape)}")
    if offsets.shape != (n_experts + 1,) or offsets.dtype != torch.int32:
        raise ValueError(f"offsets must be int32 [{n_experts + 1}], got {offsets.dtype} {tuple(offsets.shape)}")
    if row_weight.dtype != torch.float32 or row_weight.shape != (rows,):
        raise ValueError(f"row_weight must be float32 [{rows}], got {row_weight.dtype} {tuple(row_weight.shape)}")


def check_decode_outputs(x: torch.Tensor, experts: Sequence[ExpertLauncher], h: torch.Tensor, y: torch.Tensor) -> None:
    """What the decode kernels' launches (moe_decode.cu, moe_decode_kslice.cu) check of their
    scratch and output: h [R, I] and y [R, H], contiguous float32."""
    first, rows = experts[0], x.shape[0]
    if h.shape != (rows, first.inter) or y.shape != (rows, first.hidden) or h.dtype != torch.float32 or \
            y.dtype != torch.float32 or not (h.is_contiguous() and y.is_contiguous()):
        raise ValueError(f"h {tuple(h.shape)} / y {tuple(y.shape)} must be contiguous float32 for {rows} rows")


def table_rows(table: torch.Tensor) -> list[np.uint64]:
    """The six rows of a [6, E] pointer table as kernel arguments (row i: part i of every expert)."""
    return [np.uint64(table.data_ptr() + i * table.shape[1] * 8) for i in range(6)]


@dataclass(frozen=True)
class GroupedArgs:
    """A grouped launch's inputs on x's device: contiguous rows, the pointer table, the offsets,
    the row weights (1 when not given) and the most rows of one expert."""

    x: torch.Tensor
    table: torch.Tensor
    offsets: torch.Tensor
    row_weight: torch.Tensor
    longest: int


def launchers_for(x: torch.Tensor, offsets: list[int], experts: list[dict[str, torch.Tensor]], bits: int,
                  group: int) -> list[ExpertLauncher]:
    """The experts' launchers, once `offsets` is checked to cut x's rows into one span per expert."""
    if len(offsets) != len(experts) + 1 or offsets[0] != 0 or offsets[-1] != x.shape[0] or any(
            b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"offsets {offsets} must rise from 0 to the {x.shape[0]} rows, one span per expert")
    return [launcher(w, bits, group) for w in experts]


# Small device tensors a grouped launch reads and never writes, made once per value: the offsets
# (decode repeats the same few), rows of weight 1, the joined pointer tables of an expert set. A
# decode step's host work is most of its time on a GPU (measured on an H200: ~90 us of Python
# against ~30 us of kernels for an OLMoE expert), and each of these was a copy or allocation.
_CONSTANTS: dict[tuple[Any, ...], torch.Tensor] = {}
_MAX_CONSTANTS = 4096


def _constant(key: tuple[Any, ...], make: Any) -> torch.Tensor:
    found = _CONSTANTS.get(key)
    if found is None:
        if len(_CONSTANTS) >= _MAX_CONSTANTS:
            _CONSTANTS.clear()
        found = _CONSTANTS[key] = make()
    return found


def _offsets_tensor(offsets: list[int], device: torch.device) -> torch.Tensor:
    host = torch.tensor(offsets, dtype=torch.int32)
    if device.type == "cuda":  # pinned, so the one copy does not synchronize the stream
        return host.pin_memory().to(device, non_blocking=True)
    return host  # on the CPU, where tests/emu runs the kernels, there is nothing to copy


def grouped_args(x: torch.Tensor, offsets: list[int], launchers: list[ExpertLauncher],
                 row_weight: torch.Tensor | None) -> GroupedArgs:
    device = x.device
    if len(launchers) == 1:
        table = launchers[0].table
    else:  # keyed by every pointer: a block holding another expert has other pointers
        table = _constant(("table", *(p for lc in launchers for p in lc.weights)),
                          lambda: torch.cat([lc.table for lc in launchers], dim=1).contiguous())
    offs = _constant(("offsets", device, *offsets), lambda: _offsets_tensor(offsets, device))
    rows = x.shape[0]
    weights = (row_weight.float().contiguous() if row_weight is not None
               else _constant(("ones", device, rows), lambda: torch.ones(rows, dtype=torch.float32, device=device)))
    return GroupedArgs(x.contiguous(), table, offs, weights, max(b - a for a, b in zip(offsets, offsets[1:])))


def launch_grouped(x: torch.Tensor, offsets: list[int], experts: list[dict[str, torch.Tensor]], bits: int,
                   group: int, row_weight: torch.Tensor | None, fits: Callable[[list[ExpertLauncher], torch.Tensor], bool],
                   launches: Callable[[GroupedArgs, list[ExpertLauncher], torch.Tensor, torch.Tensor], Sequence[Launch]],
                   h_dtype: torch.dtype) -> torch.Tensor:
    """The body of the decode (moe_decode.cu) and tensor-core (grouped_mma.cu) FFN launchers: the
    rows offsets[i]:offsets[i+1] of x through experts[i], y [R, H] fp32 scaled by row_weight,
    through `launches(args, launchers, h, y)` where `fits`, else through grouped_ffn.cu (which
    takes any size); h [R, I] in `h_dtype` is the phases' scratch."""
    launchers = launchers_for(x, offsets, experts, bits, group)
    x = x.contiguous()
    if not fits(launchers, x):
        return grouped_expert_ffn(x, offsets, experts, bits, group, row_weight)
    a = grouped_args(x, offsets, launchers, row_weight)
    rows, device = x.shape[0], x.device
    h = torch.empty(rows, launchers[0].inter, dtype=h_dtype, device=device)
    y = torch.empty(rows, launchers[0].hidden, dtype=torch.float32, device=device)
    for launch in launches(a, launchers, h, y):
        run(launch, device)
    return y


def grouped_launches(x: torch.Tensor, offsets: torch.Tensor, longest: int, experts: Sequence[ExpertLauncher],
                     table: torch.Tensor, h: torch.Tensor, row_weight: torch.Tensor,
                     out: torch.Tensor) -> tuple[Launch, Launch]:
    """kernels/grouped_ffn.cu, both phases. x [R, H] sorted by expert, offsets [E + 1] int32, table
    [6, E] int64 (the experts' launcher tables side by side: row i holds part i of every expert),
    h [R, I] and out [R, H] fp32, row_weight [R] fp32; longest = most rows of one expert."""
    check_grouped(x, offsets, experts, table, row_weight)
    first, rows, n_experts = experts[0], x.shape[0], len(experts)
    if h.shape != (rows, first.inter) or out.shape != (rows, first.hidden):
        raise ValueError(f"h {tuple(h.shape)} / out {tuple(out.shape)} do not fit {rows} rows")
    row = table_rows(table)
    tiles_y = max(1, (longest + 31) // 32)
    suffix = _entry_suffix(first.bits, x.dtype)
    sizes = (np.int32(first.hidden), np.int32(first.inter), np.int32(first.group))
    gate_up = Launch("grouped_ffn.cu", f"grouped_gate_up_{suffix}", ((first.inter + 31) // 32, tiles_y, n_experts),
                     (32, 32), (pointer(x), pointer(offsets), *sizes, *row[:3], pointer(h)))
    down = Launch("grouped_ffn.cu", f"grouped_down_{suffix}", ((first.hidden + 31) // 32, tiles_y, n_experts),
                  (32, 32), (pointer(h), pointer(offsets), *sizes, *row[3:], pointer(row_weight), pointer(out)))
    return gate_up, down


def grouped_expert_ffn(x: torch.Tensor, offsets: list[int], experts: list[dict[str, torch.Tensor]], bits: int,
                       group: int, row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """kernels/grouped_ffn.cu: rows offsets[i]:offsets[i+1] of x (sorted by expert) through
    experts[i], all experts in one launch per phase; fp32 out, scaled by row_weight."""
    launchers = launchers_for(x, offsets, experts, bits, group)
    a = grouped_args(x, offsets, launchers, row_weight)
    rows, device = x.shape[0], x.device
    h = torch.empty(rows, launchers[0].inter, dtype=torch.float32, device=device)
    out = torch.empty(rows, launchers[0].hidden, dtype=torch.float32, device=device)
    for launch in grouped_launches(a.x, a.offsets, a.longest, launchers, a.table, h, a.row_weight, out):
        run(launch, device)
    return out


# ---- FP8 experts as published (kernels/fp8.cu; store/fp8.py holds the blob layout) ----------------
_FP8_OUT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def fp8_dequant_launch(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> Launch:
    """kernels/fp8.cu fp8_dequant_*: e4m3 codes q [R, C] (uint8 bytes) and float32 block scales
    [ceil(R/128), ceil(C/128)] into out [R, C] (float32, float16 or bfloat16)."""
    rows, cols = out.shape
    if q.shape != (rows, cols) or q.element_size() != 1:
        raise ValueError(f"FP8 codes of shape {tuple(q.shape)} ({q.dtype}) do not fill a [{rows}, {cols}] matrix")
    if scale.dtype != torch.float32 or scale.shape != (-(-rows // 128), -(-cols // 128)):
        raise ValueError(f"FP8 block scales must be float32 [{-(-rows // 128)}, {-(-cols // 128)}], "
                         f"got {scale.dtype} {tuple(scale.shape)}")
    if out.dtype not in _FP8_OUT:
        raise TypeError(f"FP8 dequant writes float32, float16 or bfloat16, not {out.dtype}")
    grid = ((rows * cols + _THREADS - 1) // _THREADS,)
    return Launch("fp8.cu", f"fp8_dequant_{_FP8_OUT[out.dtype]}", grid, (_THREADS,),
                  (pointer(q), pointer(scale), pointer(out), np.int32(rows), np.int32(cols)))


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """kernels/fp8.cu; reference.fp8_dequantize."""
    q, scale = q.contiguous().view(torch.uint8), scale.contiguous()
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    run(fp8_dequant_launch(q, scale, out), q.device)
    return out


def fp8_decode_launch(w: dict[str, torch.Tensor], x: torch.Tensor, token_weight: torch.Tensor,
                      out: torch.Tensor) -> Launch:
    """kernels/fp8.cu fp8_ffn_decode_*: out[t] += token_weight[t] * FFN(x[t]) for 1 to 8 tokens of an
    FP8 expert blob's views (gate_up.q [2I, H], gate.scale, up.scale, down.q [H, I], down.scale)."""
    gate_up, down = w["gate_up.q"], w["down.q"]
    inter, hidden = gate_up.shape[0] // 2, gate_up.shape[1]
    n = x.shape[0]
    if gate_up.shape != (2 * inter, hidden) or down.shape != (hidden, inter):
        raise ValueError(f"gate_up.q {tuple(gate_up.shape)} does not match down.q {tuple(down.shape)}")
    for name, shape in (("gate.scale", (-(-inter // 128), -(-hidden // 128))),
                        ("up.scale", (-(-inter // 128), -(-hidden // 128))),
                        ("down.scale", (-(-hidden // 128), -(-inter // 128)))):
        if w[name].dtype != torch.float32 or w[name].shape != shape:
            raise ValueError(f"{name} must be float32 {list(shape)}, got {w[name].dtype} {tuple(w[name].shape)}")
    for t in w.values():
        if not t.is_contiguous() or t.device != x.device:
            raise ValueError(f"FP8 expert weights must be contiguous on {x.device}")
    if x.dim() != 2 or x.shape[1] != hidden or not x.is_contiguous() or not 0 < n <= MAX_DECODE_TOKENS:
        raise ValueError(f"activations must be contiguous [1..{MAX_DECODE_TOKENS}, {hidden}], got {tuple(x.shape)}")
    if token_weight.dtype != torch.float32 or token_weight.shape != (n,):
        raise ValueError(f"token_weight must be float32 [{n}], got {token_weight.dtype} {tuple(token_weight.shape)}")
    if out.dtype != torch.float32 or out.shape != (n, hidden) or not out.is_contiguous():
        raise ValueError(f"out must be contiguous float32 [{n}, {hidden}], got {out.dtype} {tuple(out.shape)}")
    grid = ((inter + 63) // 64,)  # kernels/fp8.cu FP8_SLICE rows per block
    return Launch("fp8.cu", f"fp8_ffn_decode_{_suffix(x.dtype)}", grid, (256,),
                  (pointer(x), np.int32(n), np.int32(hidden), np.int32(inter), pointer(gate_up),
                   pointer(w["gate.scale"]), pointer(w["up.scale"]), pointer(down), pointer(w["down.scale"]),
                   pointer(token_weight), pointer(out)))


def fp8_expert_ffn(w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """An FP8 expert on x [n, H] (reference.fp8_expert_ffn): the fused decode kernel for up to 8
    float16/bfloat16 tokens, else the dequant kernel into x's dtype and the SiLU MLP."""
    n = x.shape[0]
    if x.dtype in (torch.float16, torch.bfloat16) and 0 < n <= MAX_DECODE_TOKENS:
        x = x.contiguous()
        out = torch.zeros(n, x.shape[1], dtype=torch.float32, device=x.device)
        ones = torch.ones(n, dtype=torch.float32, device=x.device)
        run(fp8_decode_launch(w, x, ones, out), x.device)
        return out.to(x.dtype)
    from moeflow.runtime.layers import silu_mlp

    inter = w["gate_up.q"].shape[0] // 2
    gate_up = torch.cat([fp8_dequantize(w["gate_up.q"][:inter], w["gate.scale"], x.dtype),
                         fp8_dequantize(w["gate_up.q"][inter:], w["up.scale"], x.dtype)])
    return silu_mlp(x, gate_up, fp8_dequantize(w["down.q"], w["down.scale"], x.dtype))
