"""The CPU int4 path (runtime/cpu_quant.py): torch's int4 kernel on the store's codes, repacked per
call, against the dequantizing reference; and when the engine takes it."""

from __future__ import annotations

import pytest
import torch

from moeflow.runtime import cpu_bf16, cpu_quant, moe, reference
from moeflow.store import quant
from moeflow.store.layout import ExpertView

pytestmark = pytest.mark.skipif(not cpu_quant.available(), reason="torch without the CPU int4 kernel")


def _expert(hidden: int, inter: int, group: int, seed: int = 0, bits: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (rows, cols) in (("gate_up", (2 * inter, hidden)), ("down", (hidden, inter))):
        w = torch.randn(rows, cols, generator=g) / cols**0.5
        out[f"{name}.q"], out[f"{name}.scale"], out[f"{name}.zero"] = quant.quantize(w, bits, group)
    return out


def test_repack_is_the_kernels_own_layout() -> None:
    """Byte for byte what torch's converter makes of the same codes, over several row blocks."""
    for rows, cols in ((32, 64), (96, 256), (64, 2 + 62)):
        codes = torch.randint(0, 16, (rows, cols), generator=torch.Generator().manual_seed(rows))
        want = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        assert torch.equal(cpu_quant.repack(quant.pack(codes.to(torch.uint8), 4)), want)


@pytest.mark.parametrize("hidden,inter,group", [(64, 32, 32), (256, 192, 64), (512, 160, 32), (256, 256, 128),
                                                (512, 256, 256)])
def test_int4_linear_matches_the_dequantizing_reference_in_float32(hidden: int, inter: int, group: int) -> None:
    w = _expert(hidden, inter, group)
    for rows in (1, 3, 17):
        x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(rows))
        want = reference.quantized_expert_ffn(x, w, 4, group)
        got = cpu_quant.int4_expert_ffn(x, w, group)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_bfloat16_stays_within_the_rounding_of_its_scales() -> None:
    w = _expert(256, 128, 64)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1))
    want = reference.quantized_expert_ffn(x, w, 4, 64)
    got = cpu_quant.int4_expert_ffn(x.to(torch.bfloat16), w, 64).float()
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()


def test_each_row_does_not_depend_on_the_others() -> None:
    """A token's expert output is the same alone or in a batch of rows (continuous batching)."""
    w = _expert(256, 128, 64)
    x = torch.randn(9, 256, generator=torch.Generator().manual_seed(2))
    batch = cpu_quant.int4_expert_ffn(x, w, 64)
    for i in (0, 4, 8):
        alone = cpu_quant.int4_expert_ffn(x[i : i + 1], w, 64)
        assert (alone[0] - batch[i]).abs().max() <= 1e-6 * batch.abs().max()


def test_the_engine_takes_it_only_where_the_kernel_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    # where moeflow's own CPU kernels are off (CPUs with native bf16, or MOEFLOW_CPU_BF16=torch);
    # with them on, runtime/cpu_bf16.py computes min-max experts (tests/runtime/test_cpu_bf16.py)
    monkeypatch.setattr(cpu_bf16, "ENABLED", False)
    fits = _expert(256, 128, 64)
    assert cpu_quant.fits(fits, 64, torch.float32)
    assert not cpu_quant.fits(fits, 64, torch.float64)
    assert not cpu_quant.fits(_expert(256, 128, 16), 16, torch.float32)  # group the kernel refuses
    odd = _expert(256, 128, 16)
    view = ExpertView(odd, 4, 16, kind="minmax")
    x = torch.randn(2, 256)
    assert torch.equal(moe.expert_ffn(view, x), reference.quantized_expert_ffn(x, odd, 4, 16))  # the fallback
    view = ExpertView(fits, 4, 64, kind="minmax")
    assert torch.equal(moe.expert_ffn(view, x), cpu_quant.int4_expert_ffn(x, fits, 64))


def test_int2_codes_widen_to_the_same_int4_codes() -> None:
    codes = torch.randint(0, 4, (64, 96), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    assert torch.equal(cpu_quant.widen_int2(quant.pack(codes, 2)), quant.pack(codes, 4))


def test_int2_experts_take_the_int4_kernel_with_the_references_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_bf16, "ENABLED", False)  # as above
    w = _expert(256, 128, 32, seed=7, bits=2)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(4))
    want = reference.quantized_expert_ffn(x, w, 2, 32)
    got = cpu_quant.int4_expert_ffn(x, w, 32, bits=2)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(moe.expert_ffn(ExpertView(w, 2, 32, kind="minmax"), x), got)  # the engine's CPU path
