"""moeflow's row-wise CPU ops (runtime/cpu_ops.py over rust/core/src/ops.rs): RMSNorm bit for bit
torch's and transformers', the same bits alone or batched, the decode rope bit for bit torch's,
their refusals, the switch, and the engine's logits with them and without them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moeflow import Engine, _core
from moeflow.errors import ConfigError
from moeflow.runtime import cpu_ops, layers

pytestmark = pytest.mark.skipif(not cpu_ops.NATIVE, reason="the kernel's sum order is not this torch's")

# rows shorter than a vector, every tail past whole vectors of 8 and 16 lanes, a whole chain of
# 4 vectors and past it, past the first cascade level (512 values at 8 lanes, 1024 at 16)
DIMS = [1, 5, 8, 12, 16, 23, 32, 40, 64, 72, 100, 128, 136, 511, 512, 520, 1024, 1031, 4096, 5120]
ROWS = [1, 2, 7, 33]


def transformers_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """MixtralRMSNorm.forward, op for op."""
    xf = x.to(torch.float32)
    variance = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(variance + eps)).to(x.dtype)


def _inputs(rows: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=gen) * torch.exp(torch.randn(rows, 1, generator=gen) * 3)
    return x, torch.randn(d, generator=gen)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_it_is_torchs_and_transformers_bits(d: int, x_dtype: torch.dtype, w_dtype: torch.dtype) -> None:
    for rows in ROWS:
        x, w = _inputs(rows, d, d * 100 + rows)
        x, w = x.to(x_dtype), w.to(w_dtype)
        for eps in (1e-6, 1e-5):
            got = cpu_ops.rms_norm(x, w, eps)
            want = cpu_ops.torch_rms_norm(x, w, eps)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got, want), (rows, d, x_dtype, w_dtype, eps)
            assert torch.equal(got, transformers_rms_norm(x, w, eps))


def test_float32_is_one_f_rms_norm_call() -> None:
    x, w = _inputs(5, 4096, 1)
    assert torch.equal(cpu_ops.rms_norm(x, w, 1e-5), F.rms_norm(x, (4096,), w, 1e-5))


def test_a_row_is_the_same_bits_alone_or_batched() -> None:
    # 40 rows of 2048 pass the size where the kernel splits rows over threads and drops the GIL
    d = 2048
    x, w = _inputs(40, d, 5)
    alone = [cpu_ops.rms_norm(x[i : i + 1], w, 1e-6) for i in range(40)]
    for threads in (1, 3):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            batched = cpu_ops.rms_norm(x, w, 1e-6)
        finally:
            torch.set_num_threads(before)
        for i in range(40):
            assert torch.equal(batched[i : i + 1], alone[i]), (threads, i)


def test_leading_dims_and_views() -> None:
    x, w = _inputs(12, 64, 7)
    x3 = x.view(3, 4, 64)
    assert torch.equal(cpu_ops.rms_norm(x3, w, 1e-6), cpu_ops.torch_rms_norm(x3, w, 1e-6))
    # not contiguous: torch's own bits (it sums a strided row in another order)
    for strided in (torch.randn(64, 12).t(), torch.randn(12, 128)[:, 32:96]):
        assert torch.equal(cpu_ops.rms_norm(strided, w, 1e-6), cpu_ops.torch_rms_norm(strided, w, 1e-6))
    empty = torch.empty(0, 64)
    assert cpu_ops.rms_norm(empty, w, 1e-6).shape == (0, 64)


def test_refusals() -> None:
    x, w = _inputs(2, 64, 3)
    with pytest.raises(ValueError, match="float32/bf16 rows"):
        cpu_ops.rms_norm(x.half(), w, 1e-6)
    with pytest.raises(ValueError, match=r"weight \[D\]"):
        cpu_ops.rms_norm(x, w[:32], 1e-6)
    with pytest.raises(ValueError, match=r"weight \[D\]"):
        cpu_ops.rms_norm(x, w.view(2, 32), 1e-6)
    with pytest.raises(ValueError, match="on meta"):
        cpu_ops.rms_norm(x.to("meta"), w, 1e-6)
    with pytest.raises(ValueError, match="rows of 0 values"):
        cpu_ops.rms_norm(torch.empty(2, 0), torch.empty(0), 1e-6)
    y = torch.empty(2, 64)
    with pytest.raises(ValueError, match="lanes = 4"):
        _core.rms_norm(x.data_ptr(), 2, 64, w.data_ptr(), y.data_ptr(), 1e-6, False, False, 4)
    with pytest.raises(ValueError, match="null tensor address"):
        _core.rms_norm(0, 2, 64, w.data_ptr(), y.data_ptr(), 1e-6, False, False)


def test_the_switch() -> None:
    assert cpu_ops._choose("torch") is False
    assert cpu_ops._choose("auto") is True  # the module's skip condition
    with pytest.raises(ConfigError, match="MOEFLOW_CPU_OPS='fast'"):
        cpu_ops._choose("fast")


def test_the_import_check_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    def other_order(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        ss = (xf * xf).flip(-1).cumsum(-1)[..., -1:]  # the same sum, another order
        return (weight * (xf * torch.rsqrt(ss / x.shape[-1] + eps)).to(x.dtype))

    monkeypatch.setattr(cpu_ops, "rms_norm", other_order)
    assert cpu_ops.agrees_with_torch() is False


def test_layers_take_it_on_the_cpu_only_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    native = cpu_ops.norm_rows

    def counted(*args: object) -> torch.Tensor:
        calls.append(1)
        return native(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(cpu_ops, "norm_rows", counted)
    x, w = _inputs(3, 64, 9)
    layers.rms_norm(x, w, 1e-6)
    assert calls == [1]
    layers.rms_norm(x.half(), w.half(), 1e-6)  # float16: torch
    layers.rms_norm(x.view(3, 2, 32), w.view(2, 32), 1e-6)  # a broadcast weight (q/k norms): torch
    assert calls == [1]
    monkeypatch.setattr(cpu_ops, "NATIVE", False)
    layers.rms_norm(x, w, 1e-6)
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_half_is_torchs_bits(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(11)
    for heads in (1, 3, 12):
        for d in (2, 6, 16, 18, 64, 80, 128, 130):  # halves crossing vector widths and their tails
            x, cos, sin = (torch.randn(heads, 1, d, generator=gen).to(dtype) for _ in range(3))
            x[0, 0, 0] = -0.0  # the identity rows of v: -0 * 1 + swap * 0 rounds as torch rounds it
            got = cpu_ops.rotate_half(x, cos, sin)
            assert got is not None and got.dtype == dtype
            assert torch.equal(got, x * cos + x.roll(d // 2, -1) * sin), (heads, d)
            assert got[0, 0, 0].item() == (x * cos + x.roll(d // 2, -1) * sin)[0, 0, 0].item()


def test_rotate_half_with_the_decode_tables() -> None:
    from moeflow.models.base import RopeSpec
    from moeflow.runtime.rope import Rotary

    rot = Rotary(RopeSpec(kind="default", theta=10000.0, dim=16, interleaved=False), torch.float32)
    cos, sin = rot.decode_tables(37, 6, 2)  # q and k heads rotate, v heads pass
    x = torch.randn(8, 1, 16)
    got = rot.apply(x, cos, sin)
    assert torch.equal(got, x * cos + x.roll(8, -1) * sin)
    assert torch.equal(got[6:], x[6:])  # v passes unchanged


def test_rotate_half_declines_what_it_does_not_take() -> None:
    x = torch.randn(4, 1, 16)
    assert cpu_ops.rotate_half(x, x[:1], x) is None  # broadcast tables: torch
    assert cpu_ops.rotate_half(x.half(), x.half(), x.half()) is None
    assert cpu_ops.rotate_half(x, x.bfloat16(), x) is None
    assert cpu_ops.rotate_half(torch.randn(16, 4).t().unsqueeze(1), x, x) is None  # not contiguous
    assert cpu_ops.rotate_half(x[..., :15], x[..., :15], x[..., :15]) is None  # odd
    assert cpu_ops.rotate_half(x[:0], x[:0], x[:0]) is None
    y = torch.empty(4, 1, 15)
    with pytest.raises(ValueError, match="even number"):
        _core.rope_half(y.data_ptr(), y.data_ptr(), y.data_ptr(), 60, 15, torch.empty_like(y).data_ptr(), False)
    with pytest.raises(ValueError, match="null tensor address"):
        _core.rope_half(0, y.data_ptr(), y.data_ptr(), 60, 16, y.data_ptr(), False)


async def _logits_and_tokens(path: Path) -> tuple[torch.Tensor, list[int]]:
    prompt = [5, 17, 99, 3, 42, 7, 250, 11]
    async with Engine.open(path, expert_budget=1.0, device="cpu", prefetch="none") as eng:
        logits = await eng.logits(prompt)
        tokens = await eng.generate(prompt, 6, stop_at_eos=False)
    return logits, tokens.tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_engine_gives_the_same_bits_with_it_and_without(tmp_path: Path, dtype: torch.dtype,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from moeflow.models.synth import synthesize

    synthesize(tmp_path / "m", "olmoe", "tiny", dtype=dtype, progress=False)  # q/k norms too
    calls: list[int] = []
    kernel = cpu_ops.rotate_half

    def counted(*args: torch.Tensor) -> torch.Tensor | None:
        out = kernel(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(cpu_ops, "rotate_half", counted)
    native, native_tokens = asyncio.run(_logits_and_tokens(tmp_path / "m"))
    assert sum(calls) > 0  # the decode steps' rope took it
    monkeypatch.setattr(cpu_ops, "NATIVE", False)
    monkeypatch.setattr(cpu_ops, "ENABLED", False)
    plain, plain_tokens = asyncio.run(_logits_and_tokens(tmp_path / "m"))
    assert torch.equal(native, plain) and native_tokens == plain_tokens
