"""`moeflow run` takes --miss-compute and --cpu-layers (a count, or layer indices), checked before the model loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from moeflow.cli import main
from tests.cli_models import synth_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_model(tmp_path_factory)


def _run(model: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["run", str(model), "--prompt", "The quick brown fox", "--max-new-tokens", "4", "--device", "sim",
                 "--expert-budget", "25%", "--ignore-eos", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.timeout(120)
def test_run_computes_misses_on_the_cpu_with_the_same_tokens(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copied = _run(model, capsys)
    on_cpu = _run(model, capsys, "--miss-compute", "cpu")
    first = _run(model, capsys, "--cpu-layers", "1")
    assert on_cpu["tokens"] == copied["tokens"] == first["tokens"]
    stats = on_cpu["stats"]
    assert stats["miss_compute"] == "cpu" and stats["cpu_expert_uses"] > 0 and stats["expert_use_share"]["cpu"] > 0
    assert first["stats"]["cpu_layers"] == [0] and copied["stats"]["cpu_expert_uses"] == 0


def test_bad_placement_flags_are_named(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for flags, message in ((["--device", "sim", "--cpu-layers", "3-1"], "--cpu-layers '3-1': the range '3-1' runs backwards"),
                           (["--device", "cpu", "--miss-compute", "cpu"], "--miss-compute 'cpu' with device='cpu'")):
        capsys.readouterr()
        assert main(["run", str(model), "--prompt", "x", *flags]) != 0
        assert f"moeflow: error: {message}" in capsys.readouterr().err
