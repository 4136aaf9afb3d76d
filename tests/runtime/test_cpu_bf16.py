"""moeflow's bf16 product for CPUs without bf16 instructions (runtime/cpu_bf16.py over
rust/core/src/gemm/): against torch, bit-exact against itself across batches, its fallbacks,
its switch, and the engine on a bf16 model with it and without it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moeflow import Engine, _core
from moeflow.errors import ConfigError
from moeflow.runtime import cpu_bf16

pytestmark = pytest.mark.skipif(not _core.bf16_linear_available(), reason="the kernels need AVX2, FMA and F16C")


@pytest.fixture
def kernel_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel whatever this CPU's torch has (on a CPU with native bf16 'auto' leaves it off)."""
    monkeypatch.setattr(cpu_bf16, "ENABLED", True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# rows crossing the 4-row tiles, columns the 3- and 12-wide tiles, k the 8-wide steps and the
# 128 KiB panels (k=3000: 24 columns a panel, so n=100 spans 5)
SHAPES = [(1, 8, 3), (3, 13, 12), (4, 64, 25), (5, 100, 13), (9, 520, 37), (17, 3000, 100)]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_it_computes_what_torch_computes(kernel_on: None, m: int, k: int, n: int, x_dtype: torch.dtype,
                                         with_bias: bool) -> None:
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=g).to(x_dtype)
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if with_bias else None
    y = cpu_bf16.linear(x, w, b)
    assert y.dtype == x_dtype and y.shape == (m, n)
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())  # the true product
    # float32 accumulation in another order, then (bf16 rows) one rounding: as torch's own error
    tol = 1e-5 if x_dtype == torch.float32 else 8e-3
    assert rel_err(y, exact) < tol
    assert rel_err(y, F.linear(x, w.to(x_dtype), None if b is None else b.to(x_dtype))) < tol


def test_bf16_results_are_its_float32_results_rounded_as_torch_rounds(kernel_on: None) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 300, generator=g)
    w = torch.randn(50, 300, generator=g).bfloat16()
    as_f32 = cpu_bf16.linear(x, w)
    as_bf16 = cpu_bf16.linear(x.bfloat16(), w)  # the same float32 rows: x is exact in bf16 only if rounded
    assert torch.equal(cpu_bf16.linear(x.bfloat16().float(), w).bfloat16(), as_bf16)
    assert as_f32.dtype == torch.float32


def test_a_row_is_the_same_bits_alone_or_batched(kernel_on: None) -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(19, 2048, generator=g).bfloat16()
    w = torch.randn(300, 2048, generator=g).bfloat16()
    batched = cpu_bf16.linear(x, w)
    for i in range(x.shape[0]):
        assert torch.equal(cpu_bf16.linear(x[i:i + 1], w), batched[i:i + 1]), i
    # and with more threads (the columns split between them)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(cpu_bf16.linear(x, w), batched)
    finally:
        torch.set_num_threads(saved)


def test_leading_dims_and_views(kernel_on: None) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 40, generator=g).bfloat16()
    w = torch.randn(24, 40, generator=g).bfloat16()
    y = cpu_bf16.linear(x, w)
    assert y.shape == (2, 3, 24)
    assert torch.equal(y.view(6, 24), cpu_bf16.linear(x.reshape(6, 40), w))
    strided = torch.randn(40, 6, generator=g).bfloat16().t()  # x [6, 40], not contiguous
    assert torch.equal(cpu_bf16.linear(strided, w), cpu_bf16.linear(strided.contiguous(), w))


def test_what_the_kernel_does_not_take_goes_to_torch(kernel_on: None) -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 16, generator=g)
    w32 = torch.randn(8, 16, generator=g)
    assert torch.equal(cpu_bf16.linear(x, w32), F.linear(x, w32))  # float32 weights
    half = torch.randn(8, 16, generator=g).half()
    assert torch.equal(cpu_bf16.linear(x.half(), half), F.linear(x.half(), half))  # fp16
    wt = torch.randn(16, 8, generator=g).bfloat16().t()  # a transposed bf16 weight
    xb = x.bfloat16()
    assert torch.equal(cpu_bf16.linear(xb, wt), F.linear(xb, wt))
    assert not cpu_bf16.takes_float32(wt, x)
    assert cpu_bf16.takes_float32(wt.contiguous(), x)


def test_a_bad_shape_is_a_clear_error(kernel_on: None) -> None:
    w = torch.zeros(4, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="x has 7 features"):
        cpu_bf16.linear(torch.zeros(2, 7), w)
    with pytest.raises(ValueError, match="bias of shape"):
        cpu_bf16.linear(torch.zeros(2, 8), w, torch.zeros(3))


def test_the_switch() -> None:
    assert cpu_bf16._choose("torch") is False
    assert cpu_bf16._choose("moeflow") is True  # this CPU runs it (the module's skip condition)
    assert cpu_bf16._choose("auto") is (not torch.ops.mkldnn._is_mkldnn_bf16_supported())
    with pytest.raises(ConfigError, match="MOEFLOW_CPU_BF16='fast'"):
        cpu_bf16._choose("fast")


async def _logits_and_tokens(path: Path, budget: float) -> tuple[torch.Tensor, list[int]]:
    prompt = [5, 17, 99, 3, 42, 7, 250, 11]
    async with Engine.open(path, expert_budget=budget, device="cpu", prefetch="none") as eng:
        logits = await eng.logits(prompt)
        tokens = await eng.generate(prompt, 10, stop_at_eos=False)
    return logits, tokens.tokens


def test_a_bf16_model_with_the_kernel(tiny_bf16_mixtral: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every budget gives the same bits through the kernel, and its logits are torch's bf16
    logits up to bf16 rounding."""
    monkeypatch.setattr(cpu_bf16, "ENABLED", True)
    calls = []
    kernel = cpu_bf16._kernel

    def counted(*args: object) -> torch.Tensor:
        calls.append(1)
        return kernel(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(cpu_bf16, "_kernel", counted)
    full, tokens = asyncio.run(_logits_and_tokens(tiny_bf16_mixtral, 1.0))
    assert len(calls) > 100  # attention, experts, router and head all went through it
    for budget in (0.25, 0.5):
        logits, budget_tokens = asyncio.run(_logits_and_tokens(tiny_bf16_mixtral, budget))
        assert torch.equal(logits, full) and budget_tokens == tokens
    monkeypatch.setattr(cpu_bf16, "ENABLED", False)
    torch_logits, _ = asyncio.run(_logits_and_tokens(tiny_bf16_mixtral, 1.0))
    assert rel_err(full, torch_logits) < 3e-2


@pytest.fixture(scope="module")
def tiny_bf16_mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moeflow.models.synth import synthesize

    out = tmp_path_factory.mktemp("bf16") / "mixtral"
    synthesize(out, "mixtral", "tiny", dtype=torch.bfloat16, progress=False)
    return out


def _mxfp4_matrix(g: torch.Generator, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    from moeflow.store import mxfp4

    return mxfp4.quantize(torch.randn(n, k, generator=g) * 0.1)


@pytest.mark.parametrize("m,k,n", [(1, 32, 1), (3, 64, 13), (5, 96, 24), (9, 2880, 40)])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_mxfp4_is_the_bf16_product_of_its_dequantized_matrix(m: int, k: int, n: int, x_dtype: torch.dtype) -> None:
    from moeflow.store import mxfp4

    g = torch.Generator().manual_seed(m + k + n)
    blocks, scales = _mxfp4_matrix(g, n, k)
    x = torch.randn(m, k, generator=g).to(x_dtype)
    bias = torch.randn(n, generator=g)
    dense = mxfp4.dequantize(blocks, scales, torch.bfloat16)
    saved = cpu_bf16.ENABLED
    cpu_bf16.ENABLED = True
    try:
        for b in (None, bias):
            got = cpu_bf16.mxfp4_linear(x, blocks, scales, b)
            want = cpu_bf16.linear(x, dense, None if b is None else b.to(x_dtype))
            assert got.dtype == x_dtype and torch.equal(got, want)
            assert rel_err(got, F.linear(x.double(), dense.double())
                           + (0 if b is None else b.to(x_dtype).double())) < 8e-3
    finally:
        cpu_bf16.ENABLED = saved


@pytest.mark.parametrize("swiglu", [None, (1.702, 7.0)])
def test_an_mxfp4_expert_matches_the_reference(kernel_on: None, swiglu: tuple[float, float] | None) -> None:
    from moeflow.runtime import reference

    g = torch.Generator().manual_seed(8)
    hidden, inter = 64, 96
    w: dict[str, torch.Tensor] = {}
    w["gate_up.blocks"], w["gate_up.scales"] = _mxfp4_matrix(g, 2 * inter, hidden)
    w["down.blocks"], w["down.scales"] = _mxfp4_matrix(g, hidden, inter)
    w["gate_up_bias"] = torch.randn(2 * inter, generator=g)
    w["down_bias"] = torch.randn(hidden, generator=g)
    x = torch.randn(5, hidden, generator=g).bfloat16()
    got = cpu_bf16.mxfp4_expert_ffn(x, w, swiglu)
    want = reference.mxfp4_expert_ffn(x, w, swiglu)  # dequantized weights, torch's products
    assert got.dtype == x.dtype and got.shape == want.shape
    assert rel_err(got, want) < 3e-2
    for i in range(x.shape[0]):  # batch invariance
        assert torch.equal(cpu_bf16.mxfp4_expert_ffn(x[i:i + 1], w, swiglu), got[i:i + 1])


def test_mxfp4_refusals() -> None:
    g = torch.Generator().manual_seed(9)
    blocks, scales = _mxfp4_matrix(g, 4, 64)
    with pytest.raises(ValueError, match="rows of 64 "):
        cpu_bf16.mxfp4_linear(torch.zeros(2, 32), blocks, scales)
    with pytest.raises(ValueError, match="do not hold"):
        cpu_bf16.mxfp4_linear(torch.zeros(2, 64), blocks[:2], scales)
    with pytest.raises(TypeError, match="uint8"):
        cpu_bf16.mxfp4_linear(torch.zeros(2, 64), blocks.to(torch.int32), scales)


def _minmax_expert(g: torch.Generator, hidden: int, inter: int, bits: int, group: int) -> dict[str, torch.Tensor]:
    from moeflow.store import quant

    w: dict[str, torch.Tensor] = {}
    for name, (n, k) in (("gate_up", (2 * inter, hidden)), ("down", (hidden, inter))):
        w[f"{name}.q"], w[f"{name}.scale"], w[f"{name}.zero"] = quant.quantize(
            torch.randn(n, k, generator=g) * 0.05, bits, group)
    return w


@pytest.mark.parametrize("bits,group", [(8, 64), (4, 64), (4, 32), (2, 32), (4, 8)])
@pytest.mark.parametrize("rows", [1, 3, 5, 17])
def test_minmax_is_the_product_of_its_dequantized_matrix(kernel_on: None, bits: int, group: int, rows: int) -> None:
    """bf16 rows: bit for bit the reference (dequantize to bf16, then the bf16 product), with one
    row block (decoding as it goes) or several (each weight decoded once); float32 rows: the
    float32 weights, within float32 rounding of torch's product."""
    from moeflow.store import quant

    g = torch.Generator().manual_seed(bits * 100 + group + rows)
    n, k = 40, 256
    q, scale, zero = quant.quantize(torch.randn(n, k, generator=g) * 0.05, bits, group)
    x = torch.randn(rows, k, generator=g)
    got = cpu_bf16.minmax_linear(x.bfloat16(), q, scale, zero, bits, group)
    want = cpu_bf16.linear(x.bfloat16(), quant.dequantize(q, scale, zero, bits, group, torch.bfloat16))
    assert torch.equal(got, want)
    got32 = cpu_bf16.minmax_linear(x, q, scale, zero, bits, group)
    want32 = F.linear(x, quant.dequantize(q, scale, zero, bits, group, torch.float32))
    assert got32.dtype == torch.float32 and rel_err(got32, want32) < 1e-5
    for i in range(rows):  # batch invariance, across the decode-once path and the direct one
        assert torch.equal(cpu_bf16.minmax_linear(x[i:i + 1].bfloat16(), q, scale, zero, bits, group), got[i:i + 1])


@pytest.mark.parametrize("bits,group", [(4, 64), (8, 32), (2, 32)])
def test_a_minmax_expert_on_the_cpu_is_the_reference(kernel_on: None, bits: int, group: int) -> None:
    from moeflow.runtime import moe, reference
    from moeflow.store.layout import ExpertView

    g = torch.Generator().manual_seed(bits + group)
    w = _minmax_expert(g, 64, 128, bits, group)
    x = torch.randn(6, 64, generator=g).bfloat16()
    assert cpu_bf16.minmax_takes(w, bits, group, x)
    assert torch.equal(cpu_bf16.minmax_expert_ffn(x, w, bits, group), reference.quantized_expert_ffn(x, w, bits, group))
    view = ExpertView(tensors=w, kind="minmax", bits=bits, group=group)
    assert torch.equal(moe.expert_ffn(view, x), reference.quantized_expert_ffn(x, w, bits, group))


def test_minmax_refusals(kernel_on: None) -> None:
    from moeflow.store import quant

    q, scale, zero = quant.quantize(torch.randn(8, 64), 4, 32)
    with pytest.raises(ValueError, match="rows of 64 "):
        cpu_bf16.minmax_linear(torch.zeros(1, 32), q, scale, zero, 4, 32)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_bf16.minmax_linear(torch.zeros(1, 64), q, scale, zero, 4, 16)
    with pytest.raises(TypeError, match="float16"):
        cpu_bf16.minmax_linear(torch.zeros(1, 64), q, scale.float(), zero, 4, 32)
    with pytest.raises(ValueError, match="groups of 12 over k = 48"):  # the core: not a multiple of 8
        q12, s12, z12 = quant.quantize(torch.randn(8, 48), 4, 12)
        cpu_bf16.minmax_linear(torch.zeros(1, 48), q12, s12, z12, 4, 12)


def test_no_rows_give_an_empty_result(kernel_on: None) -> None:
    from moeflow.store import mxfp4, quant

    w = torch.randn(8, 64).bfloat16()
    assert cpu_bf16.linear(torch.zeros(0, 64).bfloat16(), w).shape == (0, 8)
    blocks, scales = mxfp4.quantize(torch.randn(8, 64))
    assert cpu_bf16.mxfp4_linear(torch.zeros(2, 0, 64).bfloat16(), blocks, scales).shape == (2, 0, 8)
    q, scale, zero = quant.quantize(torch.randn(8, 64), 4, 32)
    assert cpu_bf16.minmax_linear(torch.zeros(0, 64), q, scale, zero, 4, 32).shape == (0, 8)


def test_views_at_odd_byte_offsets_are_copied_not_misread(kernel_on: None) -> None:
    """A tensor made at an odd byte offset (torch.frombuffer) is not aligned to its element
    size; the wrappers hand the core an aligned copy, with the same values."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(8, 64, generator=g).bfloat16()
    x = torch.randn(3, 64, generator=g)
    raw = bytearray(1 + w.numel() * 2)
    odd = torch.frombuffer(raw, dtype=torch.bfloat16, offset=1, count=w.numel()).view(8, 64)
    odd.copy_(w)
    assert odd.data_ptr() % 2 == 1
    assert torch.equal(cpu_bf16.linear(x, odd), cpu_bf16.linear(x, w))
