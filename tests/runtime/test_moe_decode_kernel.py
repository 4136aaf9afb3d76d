"""kernels/moe_decode.cu (runtime/gpu_decode.py): several experts' decode rows in two launches,
vector loads, scale and zero once per chunk, no atomics. Against the torch reference on the CPU
emulator (tests/emu) everywhere and on the GPU where there is one; the launches' arguments
against the kernels' signatures; and the shapes it refuses go to the grouped kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeflow.runtime import gpu, gpu_decode, kernels, reference
from tests.runtime.test_kernels import _expert

# (hidden, inter, group): rows of fewer chunks than lanes, and rows that loop over the lanes
SHAPES = {16: (512, 96, 0), 8: (256, 192, 64), 4: (1536, 64, 64), 2: (256, 128, 64)}


def _want(x: torch.Tensor, offsets: list[int], experts: list[dict[str, torch.Tensor]], bits: int, group: int,
          weight: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape[0], x.shape[1])
    for i, w in enumerate(experts):
        lo, hi = offsets[i], offsets[i + 1]
        if hi > lo:
            xs = x[lo:hi].float()
            y = (reference.expert_ffn(xs, w["gate_up"].float(), w["down"].float()) if bits == 16
                 else reference.quantized_expert_ffn(xs, w, bits, group))
            out[lo:hi] = y * weight[lo:hi, None]
    return out


@pytest.mark.parametrize("bits", [16, 8, 4, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_kernels_match_the_reference(bits: int, dtype: torch.dtype, kernel_device: torch.device) -> None:
    hidden, inter, group = SHAPES[bits]
    offsets = [0, 1, 1, 12, 14]  # an expert without rows, one with more rows than a pass holds (8)
    experts = [_expert(hidden, inter, bits, group, 10 * i, dtype) for i in range(len(offsets) - 1)]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(offsets[-1], hidden, generator=gen).to(dtype)
    weight = torch.rand(offsets[-1], generator=gen)
    dev = kernel_device
    got = gpu_decode.expert_rows(x.to(dev), offsets, [{k: v.to(dev) for k, v in w.items()} for w in experts], bits,
                                 group, weight.to(dev))
    torch.testing.assert_close(got.cpu(), _want(x, offsets, experts, bits, group, weight), rtol=2e-2, atol=2e-3)


def test_a_rows_output_does_not_depend_on_the_others(kernel_device: torch.device) -> None:
    """Bit for bit: a token alone, or among others of its expert and other experts' rows."""
    hidden, inter, group = SHAPES[4]
    dev = kernel_device
    experts = [{k: v.to(dev) for k, v in _expert(hidden, inter, 4, group, s).items()} for s in (1, 2)]
    x = torch.randn(5, hidden).to(torch.bfloat16).to(dev)
    batch = gpu_decode.expert_rows(x, [0, 3, 5], experts, 4, group)
    alone = gpu_decode.expert_rows(x[1:2].contiguous(), [0, 1], experts[:1], 4, group)
    assert torch.equal(batch[1], alone[0])


def test_launches_pack_their_arguments_in_signature_order() -> None:
    hidden, inter, group = SHAPES[4]
    experts = [gpu.launcher(_expert(hidden, inter, 4, group, s), 4, group) for s in (1, 2)]
    x = torch.zeros(3, hidden, dtype=torch.bfloat16)
    table = torch.cat([e.table for e in experts], dim=1).contiguous()
    offs = torch.tensor([0, 2, 3], dtype=torch.int32)
    h, y = torch.empty(3, inter), torch.empty(3, hidden)
    gate_up, down = gpu_decode.decode_launches(x, offs, experts, table, h, torch.ones(3), y)
    for launch in (gate_up, down):
        params = kernels.signature(launch.source, launch.entry)
        assert len(params) == len(launch.args)
        for ctype, arg in zip(params, launch.args):
            assert type(arg) is (np.uint64 if "*" in ctype else np.int32), (launch.entry, ctype)
    assert gate_up.entry == "decode_gate_up_int4_bf16" and gate_up.grid == (inter // 8, 2)
    assert down.entry == "decode_down_int4_bf16" and down.grid == (hidden // 8, 2) and down.block == (256,)
    assert int(gate_up.args[5]) == table.data_ptr() and int(down.args[5]) == table.data_ptr() + 3 * 2 * 8


def test_what_the_kernels_cannot_read_goes_to_the_grouped_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A group smaller than a 16-byte chunk of codes, or a misaligned activation view, is refused by
    `fits`, and expert_rows hands those rows to gpu.grouped_expert_ffn."""
    small_group = gpu.launcher(_expert(256, 64, 4, 16, 0), 4, 16)  # 32 int4 codes per chunk > 16 per group
    x = torch.zeros(2, 256, dtype=torch.bfloat16)
    assert not gpu_decode.fits([small_group], x)
    good = gpu.launcher(_expert(256, 64, 4, 64, 0), 4, 64)
    assert gpu_decode.fits([good], x)
    assert not gpu_decode.fits([good], torch.zeros(2 * 256 + 1, dtype=torch.bfloat16)[1:].view(2, 256))
    calls = []
    monkeypatch.setattr(gpu, "grouped_expert_ffn", lambda *a, **k: calls.append(a) or torch.zeros(2, 256))
    gpu_decode.expert_rows(x, [0, 2], [_expert(256, 64, 4, 16, 0)], 4, 16)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="16-byte"):
        gpu_decode.decode_launches(x, torch.tensor([0, 2], dtype=torch.int32), [small_group], small_group.table,
                                   torch.empty(2, 64), torch.ones(2), torch.empty(2, 256))
