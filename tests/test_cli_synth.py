"""`moeflow synth` never overwrites a checkpoint unless told to (--force)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeflow.cli import main


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def test_synth_refuses_to_overwrite_a_checkpoint_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model"
    assert main(["synth", "--arch", "mixtral", "--out", str(out), "--quiet", "--seed", "1"]) == 0
    before = _snapshot(out)
    assert main(["synth", "--arch", "mixtral", "--out", str(out), "--quiet", "--seed", "2"]) == 1
    err = capsys.readouterr().err
    assert "already holds a checkpoint" in err and "--force" in err and str(out) in err
    assert _snapshot(out) == before
    assert main(["synth", "--arch", "mixtral", "--out", str(out), "--quiet", "--seed", "2", "--force"]) == 0
    after = _snapshot(out)
    assert after["model.safetensors"] != before["model.safetensors"]


def test_synth_into_an_empty_or_unrelated_folder_is_fine(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "README.txt").write_text("mine")
    assert main(["synth", "--arch", "olmoe", "--out", str(out), "--quiet"]) == 0
    assert (out / "README.txt").read_text() == "mine"


def test_synth_onto_a_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "model"
    file.write_text("x")
    assert main(["synth", "--arch", "mixtral", "--out", str(file), "--quiet"]) == 1
    assert "not a folder" in capsys.readouterr().err
    assert file.read_text() == "x"


def test_make_demo_skips_synth_when_its_checkpoint_exists() -> None:
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    demo = makefile[makefile.index("\ndemo:") :].split("\n\n")[0]
    synth = next(line for line in demo.splitlines() if "moeflow synth" in line)
    assert "--force" in synth or synth.strip().startswith("test -f $(DEMO)/config.json ||")
