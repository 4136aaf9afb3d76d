"""kernels/moe_decode_kslice.cu (runtime/gpu_kslice.py): the K-sliced decode FFN of min-max
experts, against the torch reference on the CPU emulator (tests/emu) everywhere and on the GPU
where there is one: int8, int4 and int2, several experts in one launch, 1 to 16 rows per expert,
K split over 1, 2 and 8 warps with chunks left over at every edge; a row's bits alone and in any
batch; the launches' arguments against the kernels' signatures; the shapes it refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moeflow.runtime import gpu, gpu_kslice, kernels, reference
from tests.runtime.test_kernels import _expert

# (hidden, inter, group) per bits; per phase, K's 16-byte chunks and the warps splitting them (one
# per 64 chunks):
# int4: gate/up 130 chunks over 2 warps (2 left past 128: two lanes take a third chunk), down 10
#       chunks over 1 warp (fewer chunks than lanes);
# int8: gate/up 12 chunks over 1 warp, down 516 chunks over 8 warps (4 left past 512);
# int2: gate/up 4 chunks, down 2 chunks, group 128 (two chunks per group).
SHAPES = {4: (4160, 320, 64), 8: (192, 8256, 64), 2: (256, 128, 128)}
SMALL = (256, 64, 64)  # int4: the many-launch tests


def _experts(hidden: int, inter: int, bits: int, group: int, n: int, dev: torch.device,
             dtype: torch.dtype = torch.bfloat16) -> list[dict[str, torch.Tensor]]:
    return [{k: v.to(dev) for k, v in _expert(hidden, inter, bits, group, 10 * i + 3, dtype).items()}
            for i in range(n)]


def _want(x: torch.Tensor, offsets: list[int], experts: list[dict[str, torch.Tensor]], bits: int, group: int,
          weight: torch.Tensor) -> torch.Tensor:
    cpu = [{k: v.cpu() for k, v in w.items()} for w in experts]
    return reference.grouped_expert_ffn(x.float().cpu(), offsets, cpu, bits, group) * weight.cpu()[:, None]


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kslice_kernels_match_the_reference(bits: int, dtype: torch.dtype, kernel_device: torch.device) -> None:
    hidden, inter, group = SHAPES[bits]
    offsets = [0, 1, 1, 6, 22]  # one row, none, five (two passes of 4), sixteen
    dev = kernel_device
    experts = _experts(hidden, inter, bits, group, len(offsets) - 1, dev, dtype)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(offsets[-1], hidden, generator=gen).to(dtype)
    weight = torch.rand(offsets[-1], generator=gen)
    got = gpu_kslice.expert_rows(x.to(dev), offsets, experts, bits, group, weight.to(dev))
    torch.testing.assert_close(got.cpu(), _want(x, offsets, experts, bits, group, weight), rtol=2e-2, atol=2e-3)


def test_every_row_count_from_1_to_16(kernel_device: torch.device) -> None:
    """Each count of rows per expert (both kernel instances, passes of 4 cut at every point),
    against the reference, two experts per launch."""
    hidden, inter, group = SMALL
    dev = kernel_device
    experts = _experts(hidden, inter, 4, group, 2, dev)
    gen = torch.Generator().manual_seed(11)
    for rows in range(1, 17):
        x = torch.randn(2 * rows, hidden, generator=gen).to(torch.bfloat16)
        offsets = [0, rows, 2 * rows]
        got = gpu_kslice.expert_rows(x.to(dev), offsets, experts, 4, group)
        want = _want(x, offsets, experts, 4, group, torch.ones(2 * rows))
        torch.testing.assert_close(got.cpu(), want, rtol=2e-2, atol=2e-3, msg=lambda m: f"{rows} rows: {m}")


@pytest.mark.parametrize("bits", [8, 4])
def test_a_rows_bits_do_not_depend_on_the_others(bits: int, kernel_device: torch.device) -> None:
    """Bit for bit: a token alone (the one-row instance), among 16 rows of its expert (the
    four-row instance, at every position of a pass) and among other experts' rows."""
    hidden, inter, group = SMALL
    dev = kernel_device
    experts = _experts(hidden, inter, bits, group, 3, dev)
    x = torch.randn(16, hidden, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(dev)
    batch = gpu_kslice.expert_rows(x, [0, 3, 16, 16], experts, bits, group)
    for r in (0, 3, 4, 6, 15):
        e = 0 if r < 3 else 1
        alone = gpu_kslice.expert_rows(x[r:r + 1].contiguous(), [0, 1], experts[e:e + 1], bits, group)
        assert torch.equal(batch[r], alone[0]), r
    again = gpu_kslice.expert_rows(x, [0, 3, 16, 16], experts, bits, group)
    assert torch.equal(batch, again)


def test_launches_pack_their_arguments_in_signature_order() -> None:
    hidden, inter, group = SHAPES[4]
    experts = [gpu.launcher(_expert(hidden, inter, 4, group, s), 4, group) for s in (1, 2)]
    x = torch.zeros(3, hidden, dtype=torch.bfloat16)
    table = torch.cat([e.table for e in experts], dim=1).contiguous()
    offs = torch.tensor([0, 2, 3], dtype=torch.int32)
    h, y = torch.empty(3, inter), torch.empty(3, hidden)
    for longest, tok in ((1, 1), (2, 4), (16, 4)):
        gate_up, down = gpu_kslice.decode_launches(x, offs, experts, table, h, torch.ones(3), y, longest)
        for launch in (gate_up, down):
            assert launch.entry in kernels.entry_points(launch.source)
            params = kernels.signature(launch.source, launch.entry)
            assert len(params) == len(launch.args)
            for ctype, arg in zip(params, launch.args):
                assert type(arg) is (np.uint64 if "*" in ctype else np.int32), (launch.entry, ctype)
        assert gate_up.entry == f"kslice_gate_up_int4_bf16_t{tok}" and down.entry == f"kslice_down_int4_bf16_t{tok}"
    assert gate_up.grid == (inter // 4, 2) and gate_up.block == (64,)  # 130 chunks: 2 warps
    assert down.grid == (hidden // 8, 2) and down.block == (32,)  # 10 chunks: 1 warp
    assert int(gate_up.args[5]) == table.data_ptr() and int(down.args[5]) == table.data_ptr() + 3 * 2 * 8


def test_warps_depend_on_the_shape_alone() -> None:
    assert [gpu_kslice.warps_for(cols, 4) for cols in (64, 2048, 4096, 14336, 65536)] == [1, 1, 2, 7, 8]
    assert gpu_kslice.warps_for(4096, 8) == 4 and gpu_kslice.warps_for(4096, 2) == 1


def test_what_the_kernels_cannot_take() -> None:
    """A group smaller than a chunk's codes or float weights: ValueError (the tuner never chooses
    the path there); a misaligned view of x: the grouped kernel, which computes the same."""
    assert not gpu_kslice.shape_fits(4, 16, 256, 64)  # 32 int4 codes per chunk > 16 per group
    assert not gpu_kslice.shape_fits(16, 64, 256, 64)
    assert gpu_kslice.shape_fits(4, 64, 256, 64) and gpu_kslice.shape_fits(8, 16, 256, 64)
    x = torch.zeros(2, 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiples of 32 codes"):
        gpu_kslice.expert_rows(x, [0, 2], [_expert(256, 64, 4, 16, 0)], 4, 16)
    good = gpu.launcher(_expert(256, 64, 4, 64, 0), 4, 64)
    assert gpu_kslice.fits([good], x)
    assert not gpu_kslice.fits([good], torch.zeros(2 * 256 + 1, dtype=torch.bfloat16)[1:].view(2, 256))


def test_a_misaligned_view_goes_to_the_grouped_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(gpu, "grouped_expert_ffn", lambda *a, **k: calls.append(a) or torch.zeros(2, 256))
    x = torch.zeros(2 * 256 + 1, dtype=torch.bfloat16)[1:].view(2, 256)
    gpu_kslice.expert_rows(x, [0, 2], [_expert(256, 64, 4, 64, 0)], 4, 64)
    assert len(calls) == 1


def test_a_table_of_kslice_runs_a_steps_experts_in_one_launch_with_their_own_bits(
        kernel_device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    """moe.layer_launch takes this kernel for all of a step's experts where the table picks it
    for each, and gives each expert the bits expert_out gives it alone."""
    import contextlib

    from moeflow.runtime import kernel_choice, moe
    from moeflow.store.layout import ExpertView

    if kernel_device.type != "cpu":
        pytest.skip("the emulator's run: the table is the CPU's")
    hidden, inter, group = SMALL
    monkeypatch.setattr(moe, "gpu_kernels", lambda x: True)
    doc = {"format": kernel_choice.FORMAT, "version": kernel_choice.VERSION, "device": "cpu",
           "buckets": list(kernel_choice.BUCKETS),
           "entries": [{"kind": "minmax", "bits": 4, "group": group, "hidden": hidden, "inter": inter,
                        "dtype": "bfloat16", "paths": [kernel_choice.KSLICE] * len(kernel_choice.BUCKETS)}]}
    kernel_choice.install(kernel_choice.parse(doc, Path("table.json")), torch.device("cpu"))
    launches: list[int] = []
    real = gpu_kslice.expert_rows

    def counted(x: torch.Tensor, offsets: list[int], experts: list[dict[str, torch.Tensor]], *a: object,
                **k: object) -> torch.Tensor:
        launches.append(len(experts))
        return real(x, offsets, experts, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(gpu_kslice, "expert_rows", counted)
    try:
        gen = torch.Generator().manual_seed(9)
        for tokens in (1, 3):
            ids = torch.tensor([[0, 2], [2, 1], [0, 1]][:tokens])
            weights = torch.rand(tokens, 2, generator=gen).to(torch.bfloat16)
            routing = moe.Routing.group(ids, weights, ids.tolist(), weights.tolist())
            views = {e: ExpertView(w, 4, group, sum(t.nbytes for t in w.values()), kind="minmax")
                     for e, w in enumerate(_experts(hidden, inter, 4, group, 3, kernel_device))}
            x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
            wide = lambda n: contextlib.nullcontext()  # noqa: E731
            launches.clear()
            together = moe.layer_launch(routing, [views[e] for e in routing.experts], x, wide)
            assert together is not None and launches == [len(routing.experts)]
            for e in routing.experts:
                assert torch.equal(together[e], moe.expert_out(routing, e, views[e], x, wide)), (tokens, e)
    finally:
        kernel_choice.reset()
