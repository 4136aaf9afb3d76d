"""Test utility: count the torch calls and aten ops of one decode step of one layer's dense part."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from moeflow.models import Checkpoint, parse_arch
from moeflow.runtime.layers import KVCache, norm
from moeflow.runtime.model import DenseModel, Layer, load_dense


# Methods that read a tensor's metadata and dispatch no op (a fraction of a microsecond each):
# not what the count measures. runtime/cpu_ops.py reads addresses and contiguity this way.
METADATA = frozenset(("dim", "size", "__get__", "data_ptr", "is_contiguous", "numel", "stride"))


class CallCounter(TorchFunctionMode):
    """Counts torch calls made from Python (functions, methods, tensor properties excluded): what
    the host pays in argument parsing and dispatch, once per call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", str(func))
        if not name.startswith("__get__") and name not in METADATA:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


@dataclass
class OpRecord:
    """Every aten op dispatched, and the ones whose output landed off the expected device."""

    ops: Counter[str] = field(default_factory=Counter)
    off_device: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.ops.values())


class OpCounter(TorchDispatchMode):
    """Counts aten ops (after composite ops decompose: roughly the kernels a step launches) and
    records any op that creates a tensor off `device` (e.g. a CPU mask in a CUDA step)."""

    def __init__(self, device: torch.device | None = None) -> None:
        super().__init__()
        self.device = device
        self.record = OpRecord()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket.__name__)
        self.record.ops[name] += 1
        if self.device is not None:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for t in outs:
                if isinstance(t, torch.Tensor) and t.device != self.device:
                    self.record.off_device.append(f"{func} -> {t.device}")
        return out


def load_model(path: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> DenseModel:
    ckpt = Checkpoint(path)
    return load_dense(ckpt, parse_arch(ckpt), dtype).to(torch.device(device))


def sparse_layer(model: DenseModel) -> Layer:
    """The first MoE layer (the one whose dense part includes the router)."""
    return next(layer for layer in model.layers if layer.router is not None)


def dense_part(model: DenseModel, layer: Layer) -> Callable[[torch.Tensor, KVCache], Any]:
    """One layer's work outside the MoE executor, as the runner does it: norm, attention, residual,
    norm, router logits and selection (or the dense MLP of a dense layer)."""
    eps = model.arch.rms_norm_eps

    def step(h: torch.Tensor, cache: KVCache) -> Any:
        from moeflow.runtime.layers import silu_mlp

        h = h + layer.attention(norm(h, layer.input_norm, layer.input_norm_bias, eps), cache)
        x = norm(h, layer.post_norm, layer.post_norm_bias, eps)
        if layer.router is None:
            assert layer.mlp is not None
            return h + silu_mlp(x, layer.mlp.gate_up, layer.mlp.down)
        return h, layer.router.select(layer.router.logits(x), x.dtype)

    return step


@dataclass(frozen=True)
class StepCount:
    calls: int
    ops: int
    off_device: tuple[str, ...]


def count_decode_step(model: DenseModel, layer: Layer, prompt_len: int = 5) -> StepCount:
    """Counts of the dense part of one decode step (T=1) of `layer`, after a prefill of
    `prompt_len` tokens (so the KV cache and rope tables already exist, as in steady decoding).
    The step runs once uncounted and then again, counted, at the same position: every layer
    but the first of a step finds the step's rope tables made (the first layer's are shared)."""
    device = model.device
    step = dense_part(model, layer)
    cache = layer.attention.new_cache(model.dtype)
    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(prompt_len + 2, model.arch.hidden_size, generator=gen) * 0.5).to(model.dtype).to(device)
    step(h[:prompt_len], cache)
    step(h[prompt_len : prompt_len + 1], cache)  # warm: a decode-sized step settles any lazy state
    x = h[prompt_len + 1 :]
    step(x, cache)
    cache.length -= 1
    with CallCounter() as calls, OpCounter(device) as ops:
        step(x, cache)
    return StepCount(sum(calls.calls.values()), ops.record.total, tuple(ops.record.off_device))
