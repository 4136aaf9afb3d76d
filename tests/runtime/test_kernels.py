"""CUDA kernels: sources found and compiled by NVRTC anywhere; run against the torch references on a GPU."""

from __future__ import annotations

import pytest
import torch

from moeflow.runtime import kernels, reference


def test_every_kernel_source_is_found_and_declares_its_entry_points() -> None:
    d = kernels.kernel_dir()
    for name in kernels.SOURCES:
        assert (d / name).is_file()
        assert kernels.entry_points(name)
    assert "dequant_int4_bf16" in kernels.entry_points("dequant.cu")


def test_every_kernel_compiles_for_sm80_and_sm90() -> None:
    try:
        kernels.nvrtc()
    except Exception as e:  # a machine without torch's CUDA build: nothing to compile with
        pytest.skip(f"no NVRTC: {e}")
    results = kernels.compile_check(("sm_80", "sm_90"))
    failed = [(r.source, r.arch, r.log) for r in results if not r.ok]
    assert not failed
    assert all(r.binary_bytes > 0 for r in results)


def _quantized(rows: int, cols: int, bits: int, group: int, seed: int) -> dict[str, torch.Tensor]:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05
    q, s, z = reference.quantize(w, bits, group)
    return {"q": q, "scale": s, "zero": z}


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequant_kernel_matches_reference(bits: int, dtype: torch.dtype) -> None:
    from moeflow.runtime import gpu

    t = _quantized(256, 512, bits, 64 if bits > 2 else 32, 0)
    group = 64 if bits > 2 else 32
    want = reference.dequantize(t["q"], t["scale"], t["zero"], bits, group, dtype)
    got = gpu.dequantize(t["q"].cuda(), t["scale"].cuda(), t["zero"].cuda(), bits, group, dtype)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-2, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [16, 8, 4, 2])
@pytest.mark.parametrize("tokens", [1, 3])
def test_fused_decode_ffn_matches_reference(bits: int, tokens: int) -> None:
    from moeflow.runtime import gpu

    hidden, inter, group = 256, 192, 64 if bits != 2 else 32
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    weight = torch.rand(tokens)
    if bits == 16:
        w = {"gate_up": (torch.randn(2 * inter, hidden) * 0.05).bfloat16(), "down": (torch.randn(hidden, inter) * 0.05).bfloat16()}
        want = reference.expert_ffn(x.float(), w["gate_up"].float(), w["down"].float()) * weight[:, None]
    else:
        gu, d = _quantized(2 * inter, hidden, bits, group, 1), _quantized(hidden, inter, bits, group, 2)
        w = {"gate_up.q": gu["q"], "gate_up.scale": gu["scale"], "gate_up.zero": gu["zero"],
             "down.q": d["q"], "down.scale": d["scale"], "down.zero": d["zero"]}
        want = reference.quantized_expert_ffn(x.float(), w, bits, group) * weight[:, None]
    got = gpu.expert_ffn_decode({k: v.cuda() for k, v in w.items()}, x.cuda(), weight.cuda(), bits, group)
    torch.testing.assert_close(got.cpu(), want, rtol=2e-2, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [16, 4])
def test_grouped_prefill_ffn_matches_reference(bits: int) -> None:
    from moeflow.runtime import gpu

    hidden, inter, group = 128, 96, 32
    offsets = [0, 5, 5, 17, 40]
    x = torch.randn(offsets[-1], hidden, dtype=torch.bfloat16)
    experts = []
    for i in range(len(offsets) - 1):
        if bits == 16:
            experts.append({"gate_up": (torch.randn(2 * inter, hidden) * 0.05).bfloat16(),
                            "down": (torch.randn(hidden, inter) * 0.05).bfloat16()})
        else:
            gu, d = _quantized(2 * inter, hidden, bits, group, 10 + i), _quantized(hidden, inter, bits, group, 20 + i)
            experts.append({"gate_up.q": gu["q"], "gate_up.scale": gu["scale"], "gate_up.zero": gu["zero"],
                            "down.q": d["q"], "down.scale": d["scale"], "down.zero": d["zero"]})
    want = torch.empty(offsets[-1], hidden)
    for i, w in enumerate(experts):
        lo, hi = offsets[i], offsets[i + 1]
        if hi > lo:
            if bits == 16:
                want[lo:hi] = reference.expert_ffn(x[lo:hi].float(), w["gate_up"].float(), w["down"].float())
            else:
                want[lo:hi] = reference.quantized_expert_ffn(x[lo:hi].float(), w, bits, group)
    got = gpu.grouped_expert_ffn(x.cuda(), offsets, [{k: v.cuda() for k, v in w.items()} for w in experts], bits, group)
    torch.testing.assert_close(got.cpu(), want, rtol=2e-2, atol=2e-3)
