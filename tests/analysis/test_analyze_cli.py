"""`moeflow analyze` without matplotlib (no plot, a note saying why), a PNG only with --plot, and
its recommendation as an `--expert-budget` flag to paste."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from moeflow.analysis.advisor import budget_flags
from moeflow.cli import main
from moeflow.config import parse_budget, parse_size
from tests.cli_models import synth_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_model(tmp_path_factory)


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("The quick brown fox\n\nimport os\nclass Queue:\n")
    return path


def _analyze(model: Path, prompts: Path, *extra: str) -> list[str]:
    return ["analyze", str(model), "--prompts", str(prompts), "--max-new-tokens", "4", "--device", "cpu", *extra]


@pytest.mark.timeout(120)
def test_analyze_without_matplotlib_says_why_and_writes_nothing(model: Path, prompts: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails as if not installed
    png = tmp_path / "locality.png"
    assert main(_analyze(model, prompts, "--plot", str(png))) == 0
    captured = capsys.readouterr()
    assert "matplotlib is not installed: pip install 'moeflow[plot]'" in captured.err
    assert "recommended: --expert-budget " in captured.out and not png.exists()
    assert main(_analyze(model, prompts, "--plot", str(png), "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["plot"] is None and "matplotlib is not installed" in result["plot_note"]


@pytest.mark.timeout(120)
def test_analyze_writes_a_png_only_when_asked(model: Path, prompts: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    assert main(_analyze(model, prompts, "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["plot"] is None and "plot_note" not in result
    assert list(tmp_path.glob("*.png")) == []
    assert result["recommended_flag"].startswith("--expert-budget ") and result["recommended_flag"].endswith("%")
    assert main(_analyze(model, prompts, "--plot", "hits.png")) == 0
    assert (tmp_path / "hits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot: hits.png" in capsys.readouterr().out


@pytest.mark.parametrize(("experts", "total", "block"), [(1, 16, 98304), (37, 100, 4096), (45, 96, 1 << 20),
                                                          (29, 29, 12288), (3, 4096, 3 << 20), (7, 1000, 4096)])
def test_the_recommended_flags_give_at_least_the_recommended_experts(experts: int, total: int, block: int) -> None:
    percent, size = budget_flags(experts, total, block)
    assert percent.startswith("--expert-budget ") and size.startswith("--expert-budget ")
    budget = parse_budget(percent.split()[-1])
    assert budget.resolve(total * block) // block >= experts
    smaller = int(percent.split()[-1].rstrip("%")) - 1
    if smaller >= 1:  # and it is the smallest whole percentage that does
        assert parse_budget(f"{smaller}%").resolve(total * block) // block < experts
    assert experts * block <= parse_size(size.split()[-1]) < experts * block * 1.1 + 4096
