"""kernels/mxfp4.cu: launches packed in the kernels' signature order, the dequant kernel bit for bit
and the decode FFN against runtime/reference.py on kernel_device (tests/conftest.py: the GPU where
there is one, the CPU emulator tests/emu everywhere)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeflow.runtime import kernels, mxfp4_gpu, reference
from moeflow.store import mxfp4

SWIGLU = (1.702, 0.5)  # a small limit: the clamps bind at this scale


def _matrix(rows: int, cols: int, seed: int, std: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    return mxfp4.quantize(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * std)


def _expert(hidden: int, inter: int, seed: int = 0, biases: bool = True) -> dict[str, torch.Tensor]:
    (gb, gs), (db, ds) = _matrix(2 * inter, hidden, seed), _matrix(hidden, inter, seed + 1)
    w = {"gate_up.blocks": gb, "gate_up.scales": gs, "down.blocks": db, "down.scales": ds}
    if biases:
        gen = torch.Generator().manual_seed(seed + 2)
        w["gate_up_bias"] = torch.randn(2 * inter, generator=gen) * 0.1
        w["down_bias"] = torch.randn(hidden, generator=gen) * 0.1
    return w


def _assert_matches_signature(launch: mxfp4_gpu.Launch) -> None:
    assert launch.entry in kernels.entry_points(launch.source)
    params = kernels.signature(launch.source, launch.entry)
    assert len(launch.args) == len(params), (launch.entry, params)
    for ctype, arg in zip(params, launch.args):
        want = np.uint64 if "*" in ctype else {"int": np.int32, "float": np.float32}[ctype]
        assert type(arg) is want, (launch.entry, ctype, arg)


@pytest.mark.parametrize("swiglu", [SWIGLU, None])
def test_decode_launches_pack_pointers_sizes_and_floats_in_signature_order(swiglu: tuple[float, float] | None) -> None:
    w = _expert(64, 96)
    x = torch.randn(3, 64)
    h, out = torch.empty(3, 96), torch.empty(3, 64)
    gate_up, down = mxfp4_gpu.decode_launches(w, x, swiglu, h, out)
    for launch in (gate_up, down):
        _assert_matches_signature(launch)
    assert gate_up.grid == (12,) and down.grid == (8,) and gate_up.block == (256,)
    assert int(gate_up.args[6]) == (w["gate_up_bias"].data_ptr() if swiglu else 0)
    assert gate_up.args[7] == np.int32(swiglu is not None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequant_launch_packs_its_arguments(dtype: torch.dtype) -> None:
    blocks, scales = _matrix(10, 96, 0)
    out = torch.empty(10, 96, dtype=dtype)
    launch = mxfp4_gpu.dequant_launch(blocks, scales, out)
    _assert_matches_signature(launch)
    assert launch.grid == ((10 * 48 + 255) // 256,)


def test_launches_refuse_inputs_the_kernels_would_misread() -> None:
    w = _expert(64, 96)
    with pytest.raises(ValueError, match="do not fill"):
        mxfp4_gpu.dequant_launch(w["down.blocks"], w["down.scales"], torch.empty(64, 64, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        mxfp4_gpu.dequant_launch(w["down.blocks"], w["down.scales"], torch.empty(64, 96))
    with pytest.raises(ValueError, match="1..8"):
        mxfp4_gpu.decode_launches(w, torch.randn(9, 64), SWIGLU, torch.empty(9, 96), torch.empty(9, 64))
    bad = dict(w, down_bias=w["down_bias"].bfloat16())
    with pytest.raises(ValueError, match="down_bias"):
        mxfp4_gpu.decode_launches(bad, torch.randn(2, 64), SWIGLU, torch.empty(2, 96), torch.empty(2, 64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequant_kernel_is_bit_identical_to_the_reference(dtype: torch.dtype, kernel_device: torch.device) -> None:
    gen = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (30, 90, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(118, 136, (30, 90), generator=gen, dtype=torch.uint8)  # in float16's range
    want = mxfp4.dequantize(blocks, scales, dtype)
    got = mxfp4_gpu.dequantize(blocks.to(kernel_device), scales.to(kernel_device), dtype)
    assert torch.equal(got.cpu().view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("swiglu", [SWIGLU, None])
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_decode_ffn_kernel_matches_reference(tokens: int, swiglu: tuple[float, float] | None,
                                             kernel_device: torch.device) -> None:
    hidden, inter = 2880 // 10, 320  # gpt-oss's 2880 / 10: 9 blocks a row; 10 a row of down
    w = _expert(hidden, inter, biases=swiglu is not None)
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    want = reference.mxfp4_expert_ffn(x.float(), w, swiglu)
    got = mxfp4_gpu.expert_ffn_decode({k: v.to(kernel_device) for k, v in w.items()}, x.to(kernel_device), swiglu)
    torch.testing.assert_close(got.cpu(), want, rtol=2e-3, atol=2e-4)


@pytest.mark.gpu
def test_expert_ffn_on_cuda_takes_the_kernels_for_decode_and_prefill() -> None:
    from moeflow.runtime.moe import expert_ffn
    from moeflow.store.layout import ExpertView

    w = {k: v.cuda() for k, v in _expert(128, 96).items()}
    view = ExpertView(w, 4, 32, 0, SWIGLU, "mxfp4")
    for tokens in (2, 40):  # 2: the GEMV kernel; 40: the dequant kernel, then torch
        x = torch.randn(tokens, 128, dtype=torch.bfloat16)
        want = reference.mxfp4_expert_ffn(x.float(), {k: v.cpu() for k, v in w.items()}, SWIGLU)
        got = expert_ffn(view, x.cuda())
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float().cpu(), want, rtol=3e-2, atol=3e-3)
