"""`moeflow tune-kernels MODEL` (moeflow/cli_tune.py): its refusals without a GPU or with a
precision no table covers, its row-range summary, its help without torch; on a GPU, the table it
writes for a checkpoint's expert shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeflow import cli_tune
from moeflow.cli import main
from moeflow.runtime import kernel_choice
from tests.cli_models import synth_model
from tests.test_cli_startup import PROBE


def test_the_summary_gives_row_ranges() -> None:
    paths = ["moe_decode", "moe_decode", "dequant_torch", "dequant_torch", "dequant_torch", "grouped_mma",
             "grouped_mma", "grouped_mma", "grouped_mma", "grouped_mma"]
    assert cli_tune.summary(paths) == "1-2 rows moe_decode, 3-16 rows dequant_torch, 17+ rows grouped_mma"
    assert cli_tune.summary(["dequant_torch"] + ["grouped_mma"] * 8 + ["moe_decode"]) == \
        "1 row dequant_torch, 2-256 rows grouped_mma, 257+ rows moe_decode"


@pytest.mark.parametrize(("argv", "message"), [
    (["--precision", "bfloat16"], "covers min-max precisions"),
    (["--precision", "int3"], "unknown expert precision"),
    (["--precision", "int4", "--reps", "0"], "--reps 0"),
])
def test_what_no_table_holds_is_refused(argv: list[str], message: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune-kernels", str(tmp_path), *argv]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_without_a_gpu_it_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune-kernels", str(tmp_path)]) == 1
    assert "no CUDA device" in capsys.readouterr().err


def test_its_help_never_imports_torch() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE.format(argv=["tune-kernels", "--help"])],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.gpu
def test_it_writes_the_table_of_the_models_shape(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    model = synth_model(tmp_path_factory)
    config = json.loads((model / "config.json").read_text())
    out = tmp_path / "table.json"
    assert main(["tune-kernels", str(model), "--precision", "int4,int2", "--reps", "2", "--out", str(out),
                 "--dtype", "bfloat16"]) == 0
    table = kernel_choice.load(out)
    assert table.device == torch.cuda.get_device_name()
    inter = config.get("moe_intermediate_size") or config["intermediate_size"]
    assert set(table.choices) == {(4, 64, config["hidden_size"], inter, torch.bfloat16),
                                  (2, 32, config["hidden_size"], inter, torch.bfloat16)}
    assert f"wrote {out}" in capsys.readouterr().out
