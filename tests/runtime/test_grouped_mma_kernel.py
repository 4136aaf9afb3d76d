"""kernels/grouped_mma.cu (runtime/gpu_mma.py): the grouped prefill FFN on tensor cores, against
the torch reference on the CPU emulator (tests/emu, which computes mma.sync from PTX's fragment
layout) and on the GPU where there is one; its launches against the kernels' signatures; and the
shapes it refuses go to the older grouped kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeflow.runtime import gpu, gpu_mma, kernels
from tests.runtime.test_kernels import _expert
from tests.runtime.test_moe_decode_kernel import _want


@pytest.mark.parametrize("bits", [16, 8, 4, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grouped_mma_matches_the_reference(bits: int, dtype: torch.dtype, kernel_device: torch.device,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # two K steps of phase 1 and three of phase 2; an expert of 70 rows (two row tiles, the second
    # partial), one without rows, one of 3
    hidden, inter, group = 128, 192, 64
    monkeypatch.setattr(gpu, "grouped_expert_ffn", None)  # the tensor-core kernels, never the fallback
    offsets = [0, 70, 70, 73]
    experts = [_expert(hidden, inter, bits, group, 7 * i + 1, dtype) for i in range(len(offsets) - 1)]
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(offsets[-1], hidden, generator=gen).to(dtype)
    weight = torch.rand(offsets[-1], generator=gen)
    dev = kernel_device
    got = gpu_mma.grouped_expert_ffn(x.to(dev), offsets, [{k: v.to(dev) for k, v in w.items()} for w in experts],
                                     bits, group, weight.to(dev))
    torch.testing.assert_close(got.cpu(), _want(x, offsets, experts, bits, group, weight), rtol=3e-2, atol=3e-3)


def test_launches_pack_their_arguments_in_signature_order() -> None:
    experts = [gpu.launcher(_expert(128, 64, 4, 64, s), 4, 64) for s in (1, 2)]
    x = torch.zeros(40, 128, dtype=torch.bfloat16)
    table = torch.cat([e.table for e in experts], dim=1).contiguous()
    offs = torch.tensor([0, 33, 40], dtype=torch.int32)
    h, y = torch.empty(40, 64, dtype=torch.bfloat16), torch.empty(40, 128)
    gate_up, down = gpu_mma.mma_launches(x, offs, 65, experts, table, h, torch.ones(40), y)
    for launch in (gate_up, down):
        params = kernels.signature(launch.source, launch.entry)
        assert len(params) == len(launch.args)
        for ctype, arg in zip(params, launch.args):
            assert type(arg) is (np.uint64 if "*" in ctype else np.int32), (launch.entry, ctype)
    assert gate_up.grid == (1, 2, 2) and down.grid == (2, 2, 2) and gate_up.block == (128,)
    with pytest.raises(ValueError, match="h must be"):
        gpu_mma.mma_launches(x, offs, 33, experts, table, torch.empty(40, 64), torch.ones(40), y)


def test_what_the_kernels_cannot_take_goes_to_the_older_grouped_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    odd = _expert(96, 64, 4, 32, 0)  # hidden 96: not a multiple of the 64-wide K step
    assert not gpu_mma.fits([gpu.launcher(odd, 4, 32)], torch.zeros(2, 96, dtype=torch.bfloat16))
    calls = []
    monkeypatch.setattr(gpu, "grouped_expert_ffn", lambda *a, **k: calls.append(a) or torch.zeros(2, 96))
    gpu_mma.grouped_expert_ffn(torch.zeros(2, 96, dtype=torch.bfloat16), [0, 2], [odd], 4, 32)
    assert len(calls) == 1
