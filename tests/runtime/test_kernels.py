"""CUDA kernels: sources found and compiled by NVRTC anywhere, launch arguments packed in each kernel's
signature order (checked on the CPU), and run against the torch references on a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeflow.runtime import gpu, kernels, reference


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


def _expert(hidden: int, inter: int, bits: int, group: int, seed: int,
            dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """One expert's tensors as a block view holds them: gate_up [2I, H], down [H, I] (or their codes)."""
    if bits == 16:
        gen = torch.Generator().manual_seed(seed)
        return {"gate_up": (torch.randn(2 * inter, hidden, generator=gen) * 0.05).to(dtype),
                "down": (torch.randn(hidden, inter, generator=gen) * 0.05).to(dtype)}
    gu, d = _quantized(2 * inter, hidden, bits, group, seed), _quantized(hidden, inter, bits, group, seed + 1)
    return {"gate_up.q": gu["q"], "gate_up.scale": gu["scale"], "gate_up.zero": gu["zero"],
            "down.q": d["q"], "down.scale": d["scale"], "down.zero": d["zero"]}


def _parts(w: dict[str, torch.Tensor], bits: int) -> list[torch.Tensor]:
    if bits == 16:
        return [w["gate_up"]] * 3 + [w["down"]] * 3
    return [w[f"{m}.{p}"] for m in ("gate_up", "down") for p in ("q", "scale", "zero")]


def _assert_matches_signature(launch: gpu.Launch) -> None:
    """Every argument has the width and kind of the C parameter it lands in."""
    assert launch.entry in kernels.entry_points(launch.source)
    params = kernels.signature(launch.source, launch.entry)
    assert len(launch.args) == len(params), (launch.entry, params)
    for ctype, arg in zip(params, launch.args):
        if "*" in ctype:
            assert type(arg) is np.uint64, (launch.entry, ctype, arg)
        else:
            assert ctype == "int" and type(arg) is np.int32, (launch.entry, ctype, arg)


def test_signatures_are_read_from_the_macro_instances() -> None:
    assert kernels.signature("dequant.cu", "dequant_int4_bf16") == (
        "const uint8_t*", "const uint16_t*", "const uint16_t*", "uint16_t*", "int", "int", "int")
    assert kernels.signature("grouped_ffn.cu", "grouped_down_int2_f16")[5] == "const uint8_t* const*"
    with pytest.raises(KeyError, match="grouped_up_bf16"):
        kernels.signature("grouped_ffn.cu", "grouped_up_bf16")


@pytest.mark.parametrize("bits", [16, 8, 4, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_launch_packs_pointers_and_sizes_in_signature_order(bits: int, dtype: torch.dtype) -> None:
    hidden, inter, group = 128, 96, 32
    w = _expert(hidden, inter, bits, group, 3, dtype)
    x = torch.randn(3, hidden).to(dtype)
    weight, out = torch.rand(3), torch.zeros(3, hidden)
    launch = gpu.launcher(w, bits, group).decode_launch(x, weight, out)
    _assert_matches_signature(launch)
    suffix = "f16" if dtype is torch.float16 else "bf16"
    want = f"{suffix}_{suffix}" if bits == 16 else f"int{bits}_{suffix}"
    assert launch.entry == f"expert_ffn_decode_{want}"
    assert [int(a) for a in launch.args] == [x.data_ptr(), 3, hidden, inter, group,
                                             *(t.data_ptr() for t in _parts(w, bits)), weight.data_ptr(), out.data_ptr()]
    assert launch.grid == ((inter + 63) // 64,) and launch.block == (256,)


def test_a_block_gets_one_launcher_and_a_changed_block_a_new_one() -> None:
    w = _expert(64, 32, 4, 32, 0)
    first = gpu.launcher(w, 4, 32)
    assert gpu.launcher(dict(w), 4, 32) is first  # keyed by the block's pointers, not the dict
    assert gpu.launcher(w, 4, 16) is not first
    moved = {**w, "down.scale": w["down.scale"].clone()}  # one part elsewhere: new arguments
    assert int(gpu.launcher(moved, 4, 32).weights[4]) == moved["down.scale"].data_ptr()
    assert int(first.weights[4]) == w["down.scale"].data_ptr()


@pytest.mark.parametrize("bits", [16, 4])
def test_grouped_launches_read_each_weight_part_from_its_table_row(bits: int) -> None:
    hidden, inter, group = 64, 96, 32
    experts = [_expert(hidden, inter, bits, group, 10 * i) for i in range(3)]
    launchers = [gpu.launcher(w, bits, group) for w in experts]
    table = torch.cat([lc.table for lc in launchers], dim=1)
    x = torch.randn(7, hidden).bfloat16()
    offsets = torch.tensor([0, 2, 2, 7], dtype=torch.int32)
    h, out, rw = torch.empty(7, inter), torch.empty(7, hidden), torch.ones(7)
    gate_up, down = gpu.grouped_launches(x, offsets, 5, launchers, table, h, rw, out)
    for launch in (gate_up, down):
        _assert_matches_signature(launch)
        assert launch.grid[1:] == (1, 3) and launch.block == (32, 32)
    flat = table.view(-1)
    rows = [*gate_up.args[5:8], *down.args[5:8]]
    for part, ptr in enumerate(rows):
        start = (int(ptr) - table.data_ptr()) // 8
        assert flat[start:start + 3].tolist() == [_parts(w, bits)[part].data_ptr() for w in experts]
    assert [int(a) for a in gate_up.args[:5]] == [x.data_ptr(), offsets.data_ptr(), hidden, inter, group]
    assert int(gate_up.args[-1]) == h.data_ptr() and int(down.args[0]) == h.data_ptr()
    assert [int(a) for a in down.args[-2:]] == [rw.data_ptr(), out.data_ptr()]


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_dequant_launch_packs_its_arguments(bits: int) -> None:
    t = _quantized(32, 64, bits, 32, 0)
    out = torch.empty(32, 64, dtype=torch.float16)
    launch = gpu.dequant_launch(t["q"], t["scale"], t["zero"], bits, 32, out)
    _assert_matches_signature(launch)
    assert [int(a) for a in launch.args] == [t["q"].data_ptr(), t["scale"].data_ptr(), t["zero"].data_ptr(),
                                             out.data_ptr(), 32, 64, 32]
    assert launch.grid[0] * 256 >= t["q"].numel()


def test_launches_refuse_inputs_the_kernels_would_misread() -> None:
    w = _expert(64, 32, 16, 0, 0)
    lc = gpu.launcher(w, 16, 0)
    weight = torch.ones(1)
    with pytest.raises(ValueError, match="1 to 8 tokens"):
        lc.decode_launch(torch.zeros(9, 64, dtype=torch.bfloat16), torch.ones(9), torch.zeros(9, 64))
    with pytest.raises(TypeError, match="float32"):
        lc.decode_launch(torch.zeros(1, 64), weight, torch.zeros(1, 64))
    with pytest.raises(TypeError, match="float16"):
        lc.decode_launch(torch.zeros(1, 64, dtype=torch.float16), weight, torch.zeros(1, 64))
    with pytest.raises(ValueError, match=r"contiguous \[n, 64\]"):
        lc.decode_launch(torch.zeros(1, 32, dtype=torch.bfloat16), weight, torch.zeros(1, 32))
    with pytest.raises(ValueError, match="strides"):
        lc.decode_launch(torch.zeros(64, 2, dtype=torch.bfloat16).t(), torch.ones(2), torch.zeros(2, 64))
    with pytest.raises(ValueError, match="activations on meta"):
        lc.decode_launch(torch.zeros(1, 64, dtype=torch.bfloat16, device="meta"), weight, torch.zeros(1, 64))
    with pytest.raises(ValueError, match="out must be"):
        lc.decode_launch(torch.zeros(1, 64, dtype=torch.bfloat16), weight, torch.zeros(1, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="bits=3"):
        gpu.ExpertLauncher(w, 3, 0)
    with pytest.raises(ValueError, match="offsets"):
        gpu.grouped_expert_ffn(torch.zeros(4, 64, dtype=torch.bfloat16), [0, 3], [w], 16, 0)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequant_kernel_matches_reference(bits: int, dtype: torch.dtype, kernel_device: torch.device) -> None:
    t = _quantized(256, 512, bits, 64 if bits > 2 else 32, 0)
    group = 64 if bits > 2 else 32
    want = reference.dequantize(t["q"], t["scale"], t["zero"], bits, group, dtype)
    dev = kernel_device
    got = gpu.dequantize(t["q"].to(dev), t["scale"].to(dev), t["zero"].to(dev), bits, group, dtype)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("bits", [16, 8, 4, 2])
@pytest.mark.parametrize("tokens", [1, 3])
def test_fused_decode_ffn_matches_reference(bits: int, tokens: int, kernel_device: torch.device) -> None:

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
    dev = kernel_device
    got = gpu.expert_ffn_decode({k: v.to(dev) for k, v in w.items()}, x.to(dev), weight.to(dev), bits, group)
    torch.testing.assert_close(got.cpu(), want, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("bits", [16, 4])
def test_grouped_prefill_ffn_matches_reference(bits: int, kernel_device: torch.device) -> None:

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
    dev = kernel_device
    got = gpu.grouped_expert_ffn(x.to(dev), offsets, [{k: v.to(dev) for k, v in w.items()} for w in experts], bits,
                                 group)
    torch.testing.assert_close(got.cpu(), want, rtol=2e-2, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [16, 4])
def test_kernels_run_on_torchs_current_stream_with_launchers_reused(bits: int) -> None:
    """A side stream, an intermediate size with a partial last slice, each launcher called twice."""
    hidden, inter, group = 1024, 2816 if bits == 4 else 2800, 64
    w = {k: v.cuda() for k, v in _expert(hidden, inter, bits, group, 7).items()}
    x = torch.randn(2, hidden, dtype=torch.bfloat16)
    weight = torch.tensor([0.25, 1.0])
    if bits == 16:
        want = reference.expert_ffn(x.float(), w["gate_up"].cpu().float(), w["down"].cpu().float()) * weight[:, None]
    else:
        want = reference.quantized_expert_ffn(x.float(), {k: v.cpu() for k, v in w.items()}, bits, group) * weight[:, None]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        xs, ws = x.cuda(), weight.cuda()
        got = [gpu.expert_ffn_decode(w, xs, ws, bits, group) for _ in range(2)]
        grouped = gpu.grouped_expert_ffn(xs, [0, 2], [w], bits, group, row_weight=ws)
    side.synchronize()
    for out in (*got, grouped):
        torch.testing.assert_close(out.cpu(), want, rtol=2e-2, atol=2e-3)


def test_a_launch_without_cupy_names_the_wheel_to_install() -> None:
    try:
        import cupy  # noqa: F401

        pytest.skip("CuPy is installed")
    except ImportError:
        pass
    from moeflow.errors import CudaUnavailable

    w = _expert(64, 32, 16, 0, 0)
    launch = gpu.launcher(w, 16, 0).decode_launch(torch.zeros(1, 64, dtype=torch.bfloat16), torch.ones(1),
                                                 torch.zeros(1, 64))
    with pytest.raises(CudaUnavailable, match=r"pip install cupy-cuda\d+x"):
        gpu.run(launch, torch.device("cuda", 0))
