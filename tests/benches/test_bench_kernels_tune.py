"""benches/bench_kernels.py's kernel table side: `--tune` and the `table_path` each line reports
(the path the device's measured table, runtime/kernel_choice.py, chooses), and the tuning part of
bench_gpu.py --all."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from benches import bench_gpu, bench_kernels as bk
from moeflow.runtime import kernel_choice
from moeflow.runtime.kernel_choice import BUCKETS, FORMAT, VERSION

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_tables() -> Iterator[None]:
    kernel_choice.reset()
    yield
    kernel_choice.reset()


def _line(kernel: str, precision: str, rows: int) -> dict[str, object]:
    return bk.record("small", 128, 64, kernel, precision, rows, 2, us=1.0, weight_bytes=1, baseline="b",
                     baseline_us=1.0, err=0.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="installs the table of the CPU (the kernels' emulator)")
def test_each_line_names_the_path_the_table_chooses(tmp_path: Path) -> None:
    assert _line("prefill", "int4", 3)["table_path"] == "untuned"  # no table
    paths = ["dequant_torch", "moe_decode", "grouped_mma"] + ["moe_decode"] * (len(BUCKETS) - 3)
    doc = {"format": FORMAT, "version": VERSION, "device": "cpu", "buckets": list(BUCKETS),
           "entries": [{"kind": "minmax", "bits": 4, "group": bk.GROUP, "hidden": 128, "inter": 64,
                        "dtype": "bfloat16", "paths": paths}]}
    kernel_choice.install(kernel_choice.parse(doc, tmp_path / "t.json"), torch.device("cpu"))
    assert _line("decode_expert", "int4", 1)["table_path"] == "dequant_torch"
    assert _line("prefill", "int4", 3)["table_path"] == "grouped_mma"  # rows per expert, bucket 4
    assert _line("prefill", "int8", 3)["table_path"] == "untuned"  # no int8 entry
    assert _line("prefill", "bf16", 3)["table_path"] == "untuned"  # float experts have no table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_tune_without_a_gpu_says_so_and_exits_0() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benches" / "bench_kernels.py"), "--tune", "--quick"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["gpu"] is False


@pytest.mark.parametrize("argv", [["--tune", "--precisions", "bf16"], ["--precisions", "int2"],
                                  ["--tune", "--dtypes", "float32"]])
def test_what_a_table_cannot_hold_is_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        bk.main(argv)
    assert raised.value.code == 2


def test_the_prepared_gpu_run_tunes_before_the_kernel_lines_within_its_limit() -> None:
    names = [name for name, _, _ in bench_gpu.ALL_PARTS]
    assert names.index("tune") < names.index("kernels")  # so the kernel lines name the fresh table's choice
    _, argv, limit = bench_gpu.ALL_PARTS[names.index("tune")]
    assert argv[:3] == ["benches/bench_kernels.py", "--tune", "--quick"]
    assert float(argv[argv.index("--budget-s") + 1]) <= limit - 10  # startup and the last entry's run


def test_tune_writes_one_line_per_entry_small_shapes_first(kernel_device: torch.device, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str],
                                                           few_buckets: tuple[int, ...]) -> None:
    if kernel_device.type != "cpu":
        pytest.skip("on a GPU, bench_gpu.py --all runs --tune itself (its tune part)")
    monkeypatch.setitem(bk.SHAPES, "big", (128, 64, 2))  # the smallest sizes both kernels take
    monkeypatch.setitem(bk.SHAPES, "small", (64, 64, 2))
    table = tmp_path / "kernels.json"
    assert bk.tune(["big", "small"], ["int4"], ["bfloat16"], reps=1, warmup=0, table=table, budget_s=1e-3,
                   device=kernel_device) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # the first entry always runs and outlasts the 1 ms budget: the small shape ran, the big one is reported skipped
    assert [(line["shape"], "skipped" in line) for line in lines] == [("small", False), ("big", True)]
    assert lines[0]["bench"] == "kernel_table" and lines[0]["device"] == "cpu" and lines[0]["table"] == str(table)
    assert set(kernel_choice.load(table).choices) == {(4, bk.GROUP, 64, 64, torch.bfloat16)}
