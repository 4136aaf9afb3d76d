"""benches/bench_kernels.py's parts that run without a GPU: shapes, goals, the derived figures, the
L2 cycling, and the torch._grouped_mm baseline's arithmetic against the per-expert loop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benches import bench_kernels as bk
from moeflow.runtime.layers import silu_mlp

ROOT = Path(__file__).resolve().parents[2]


def test_the_issue_shapes_and_goals() -> None:
    assert bk.SHAPES["mixtral"] == (4096, 14336, 2)
    assert bk.SHAPES["olmoe"] == (2048, 1024, 8)
    assert bk.SHAPES["qwen3_30b_a3b"] == (2048, 768, 8)
    assert bk.SHAPES["deepseek_v2_lite"] == (2048, 1408, 6)
    assert bk.GOALS[("decode_expert", "int4")] == 2.5 and bk.GOALS[("prefill", "int4")] == 0.7


def test_record_derives_rates_ratio_and_goal() -> None:
    line = bk.record("olmoe", 2048, 1024, "decode_expert", "int4", 1, 1, us=10.0, weight_bytes=3_000_000,
                     baseline="torch_bf16_linear", baseline_us=30.0, err=1e-3)
    assert line["weight_gbps"] == 300.0  # 3 MB in 10 us
    assert line["tflops"] == pytest.approx(2 * 3 * 2048 * 1024 / 10e-6 / 1e12, rel=1e-3)
    assert line["vs_baseline"] == 3.0 and line["goal"] == 2.5 and line["goal_met"] is True
    slow = bk.record("olmoe", 2048, 1024, "decode_expert", "int8", 1, 1, us=20.0, weight_bytes=1,
                     baseline="torch_bf16_linear", baseline_us=30.0, err=0.0)
    assert slow["goal"] == 1.6 and slow["goal_met"] is False
    assert "goal" not in bk.record("olmoe", 2048, 1024, "decode_expert", "bf16", 1, 1, us=1.0, weight_bytes=1,
                                   baseline="b", baseline_us=1.0, err=0.0)


def test_weights_cycle_past_twice_the_l2() -> None:
    assert bk.copies_past_l2(100 << 20, 50 << 20) == 1
    assert bk.copies_past_l2(30 << 20, 50 << 20) == 4  # 120 MB >= 100 MB
    assert bk.copies_past_l2(0, 50 << 20) >= 1


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")
def test_grouped_mm_baseline_computes_the_per_expert_loop() -> None:
    g = torch.Generator().manual_seed(0)
    experts, rows, hidden, inter = 3, 16, 64, 32
    gate_up = [torch.randn(2 * inter, hidden, generator=g).to(torch.bfloat16) for _ in range(experts)]
    down = [torch.randn(hidden, inter, generator=g).to(torch.bfloat16) for _ in range(experts)]
    x = torch.randn(experts * rows, hidden, generator=g).to(torch.bfloat16)
    ends = torch.tensor([rows * (e + 1) for e in range(experts)], dtype=torch.int32)
    got = bk.grouped_mm_ffn(x, torch.stack(gate_up).transpose(1, 2), torch.stack(down).transpose(1, 2), ends)
    want = torch.cat([silu_mlp(x[e * rows:(e + 1) * rows], gate_up[e], down[e]) for e in range(experts)])
    assert bk.max_err(got, want) < 2e-2  # bf16 accumulation order only


def test_reference_of_a_quantized_expert_is_the_dequantizing_one() -> None:
    e = bk.make_expert(128, 64, "int4", torch.device("cpu"), seed=1)
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    assert set(e.stored) == {f"{m}.{p}" for m in ("gate_up", "down") for p in ("q", "scale", "zero")}
    assert e.nbytes < 3 * 128 * 64 * 2 / 3  # packed int4 with fp16 scales/zeros per 64
    want = bk.reference_ffn(x, bk.make_expert(128, 64, "bf16", torch.device("cpu"), seed=1), "bf16")
    assert bk.max_err(bk.reference_ffn(x, e, "int4"), want) < 0.35  # int4's error; another matrix is O(1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_without_a_gpu_it_says_so_and_exits_0() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benches" / "bench_kernels.py"), "--quick"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["gpu"] is False


def test_the_prepared_gpu_run_fits_eight_minutes_and_names_real_scripts() -> None:
    from benches import bench_gpu

    assert sum(limit for _, _, limit in bench_gpu.ALL_PARTS) <= 8 * 60
    for _, argv, _ in bench_gpu.ALL_PARTS:
        assert (ROOT / argv[0]).is_file()


def test_a_whole_shape_runs_on_the_emulated_kernels(kernel_device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_shape end to end on a small shape: every kernel line is there, with its baseline, and
    the kernels agree with the float32 reference (the emulator on the CPU; the GPU where there is one)."""
    if kernel_device.type != "cpu":
        pytest.skip("the GPU runs the real shapes in bench_gpu.py --all")
    monkeypatch.setitem(bk.SHAPES, "small", (128, 64, 2))  # multiples of the tensor-core kernel's K step
    monkeypatch.setattr(bk, "PREFILL_EXPERTS", 2)
    monkeypatch.setattr(bk, "PREFILL_ROWS", 3)
    with torch.inference_mode():
        lines = bk.bench_shape("small", "int4", reps=1, device=kernel_device)
    kinds = [(line["kernel"], line.get("kernel_source")) for line in lines]
    assert kinds == [("decode_expert", "moe_decode.cu"), ("decode_layer", "moe_decode.cu"),
                     ("decode_expert", "expert_ffn.cu"), ("decode_layer", "expert_ffn.cu"),
                     ("prefill", "grouped_mma.cu"), ("prefill", "grouped_ffn.cu"),
                     ("decode_expert", "moe_decode_kslice.cu"), ("decode_layer", "moe_decode_kslice.cu")]
    for line in lines:
        assert line["max_err"] < 1e-2, line
        assert line["us"] > 0 and line["baseline_us"] > 0
    assert "goal" in lines[0] and "goal" not in lines[2]  # the goals are the engine's kernel's
    assert lines[0]["kernels_only_us"] > 0
    assert lines[6]["kernels_only_us"] > 0 and "goal" not in lines[6]  # the candidate: timed, not held to the goals
    prefill = lines[4]  # 2 experts x 3 rows each: `tokens` is per expert, so the flops count 6 rows, not 2 x 6
    assert prefill["tokens"] == 3 and prefill["experts"] == 2
