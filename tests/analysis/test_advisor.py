"""`moeflow trace`, `train-predictor` and `analyze` end to end on the trained model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moeflow.cli import main
from tests.scheduling.conftest import PROMPTS, TRAINED


@pytest.fixture
def model(tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(TRAINED, dst, ignore=shutil.ignore_patterns(".moeflow", "routing_predictor*"))
    return dst


def test_trace_train_predictor_and_analyze(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.jsonl"  # the prompts span lines: JSON lines keep each whole
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    trace = tmp_path / "routes.jsonl"
    assert main(["trace", str(model), "--prompts", str(prompts), "--out", str(trace), "--max-new-tokens", "16"]) == 0
    lines = trace.read_text().splitlines()
    assert json.loads(lines[0])["format"] == "moeflow.routing-trace" and len(lines) == 1 + len(PROMPTS)
    capsys.readouterr()
    assert main(["train-predictor", str(model), "--traces", str(trace), "--epochs", "2"]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= trained["precision@k"] <= 1.0 and (model / "routing_predictor.safetensors").is_file()
    plot = tmp_path / "locality.png"
    assert main(["analyze", str(model), "--prompts", str(prompts), "--plot", str(plot), "--json",
                 "--max-new-tokens", "16"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report["srp"]) == {"4", "16", "64", "256"}
    assert report["srp"]["256"] is None  # no traced sequence is 256 tokens long
    assert 0 < report["srp"]["16"] <= 1
    assert len(report["layers"]) == 6 and 0 < report["recommended_fraction"] <= 1
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
