"""kernels/fp8.cu: launch arguments in each entry point's signature order (checked on the CPU), and
on a GPU the dequant and decode FFN kernels against their torch references (runtime/reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeflow.runtime import gpu, kernels, reference
from moeflow.store.fp8 import Fp8Codec

HIDDEN, INTER = 200, 160  # both cross a 128 block edge: partial edge blocks in every scale grid


def _expert(seed: int, hidden: int = HIDDEN, inter: int = INTER) -> dict[str, torch.Tensor]:
    """One FP8 expert's tensors as a store block holds them (Fp8Codec's layout)."""
    gen = torch.Generator().manual_seed(seed)
    # columns of growing magnitude: each block gets its own scale
    gate, up = (torch.randn(inter, hidden, generator=gen) * torch.linspace(0.01, 0.2, hidden) for _ in range(2))
    down = torch.randn(hidden, inter, generator=gen) * 0.05
    codec = Fp8Codec()
    layout = codec.layout(hidden, inter)
    blob = torch.zeros(layout.size, dtype=torch.uint8)
    for slot in layout.slots:
        t = codec.encode(gate, up, down)[slot.name].contiguous()
        blob[slot.offset:slot.offset + slot.nbytes] = t.view(torch.uint8).reshape(-1)
    return layout.views(blob)


def _assert_matches_signature(launch: gpu.Launch) -> None:
    assert launch.entry in kernels.entry_points(launch.source)
    params = kernels.signature(launch.source, launch.entry)
    assert len(launch.args) == len(params), (launch.entry, params)
    for ctype, arg in zip(params, launch.args):
        assert (type(arg) is np.uint64) if "*" in ctype else (ctype == "int" and type(arg) is np.int32), (ctype, arg)


def test_fp8_source_is_listed_and_compiles() -> None:
    assert "fp8.cu" in kernels.SOURCES
    try:
        kernels.nvrtc()
    except Exception as e:  # no torch CUDA build: nothing to compile with
        pytest.skip(f"no NVRTC: {e}")
    for arch in ("sm_80", "sm_90"):
        result = kernels.compile_source("fp8.cu", arch)
        assert result.ok, result.log


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequant_launch_packs_codes_scales_and_sizes(dtype: torch.dtype) -> None:
    w = _expert(0)
    out = torch.empty(HIDDEN, INTER, dtype=dtype)
    launch = gpu.fp8_dequant_launch(w["down.q"], w["down.scale"], out)
    _assert_matches_signature(launch)
    assert [int(a) for a in launch.args] == [w["down.q"].data_ptr(), w["down.scale"].data_ptr(), out.data_ptr(),
                                             HIDDEN, INTER]
    assert launch.grid == ((HIDDEN * INTER + 255) // 256,)
    with pytest.raises(ValueError, match="scales"):
        gpu.fp8_dequant_launch(w["down.q"], w["gate.scale"][:1], out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_launch_packs_the_blob_views_in_signature_order(dtype: torch.dtype) -> None:
    w = _expert(1)
    x = torch.randn(3, HIDDEN).to(dtype)
    weight, out = torch.rand(3), torch.zeros(3, HIDDEN)
    launch = gpu.fp8_decode_launch(w, x, weight, out)
    _assert_matches_signature(launch)
    parts = [w[k].data_ptr() for k in ("gate_up.q", "gate.scale", "up.scale", "down.q", "down.scale")]
    assert [int(a) for a in launch.args] == [x.data_ptr(), 3, HIDDEN, INTER, *parts, weight.data_ptr(), out.data_ptr()]
    assert launch.grid == ((INTER + 63) // 64,) and launch.block == (256,)
    with pytest.raises(ValueError, match="tokens|activations"):
        gpu.fp8_decode_launch(w, torch.randn(9, HIDDEN).to(dtype), torch.rand(9), torch.zeros(9, HIDDEN))


# kernel_device (tests/conftest.py): on the GPU where there is one, and on the CPU through tests/emu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequant_kernel_equals_the_reference(dtype: torch.dtype, kernel_device: torch.device) -> None:
    w = _expert(2)
    for q, s in ((w["gate_up.q"][:INTER], w["gate.scale"]), (w["gate_up.q"][INTER:], w["up.scale"]),
                 (w["down.q"], w["down.scale"])):
        got = gpu.fp8_dequantize(q.to(kernel_device), s.to(kernel_device), dtype).cpu()
        assert torch.equal(got, reference.fp8_dequantize(q, s, dtype))  # one float32 product, then rounded


@pytest.mark.parametrize("n", [1, 3, 8, 20])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_expert_ffn_kernels_match_the_reference(n: int, dtype: torch.dtype, kernel_device: torch.device) -> None:
    w = _expert(3)
    x = torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(n)).to(dtype)
    got = gpu.fp8_expert_ffn({k: v.to(kernel_device) for k, v in w.items()}, x.to(kernel_device)).float().cpu()
    want = reference.fp8_expert_ffn(x.float(), w).float()  # float32 reference of the same weights
    tol = 1e-4 if dtype is torch.float32 else 2e-2
    assert (got - want).abs().max() <= tol * want.abs().max(), (n, dtype)
