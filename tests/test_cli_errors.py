"""Arguments are checked before the model loads, and every failure is one `moeflow: error:` line:
exit 1 for errors (bad values, missing files, refused checkpoints), 2 only for argparse usage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moeflow.cli import main
from tests.cli_models import fresh_copy, synth_model


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_model(tmp_path_factory)


@pytest.fixture
def model(shared: Path, tmp_path: Path) -> Path:
    """A checkpoint never opened: opening it would build its expert store in model/.moeflow."""
    return fresh_copy(shared, tmp_path / "model")


def _files(tmp: Path) -> dict[str, str]:
    good = tmp / "prompts.txt"
    good.write_text("one prompt\nanother\n")
    bad = tmp / "prompts.jsonl"
    bad.write_text('{"prompt": "fine"}\n\n{"prompt": "broken"\n')
    return {"good": str(good), "bad": str(bad), "missing": str(tmp / "nope.txt"), "nodir": str(tmp / "no" / "out")}


CASES = [
    (["run", "{model}", "--prompt", "x", "--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
    (["run", "{model}", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens 0: must be >= 1"),
    (["run", "{model}", "--prompt", "x", "--temperature", "-1"], "--temperature -1.0: must be >= 0"),
    (["run", "{model}", "--prompt", "x", "--min-p", "2"], "--min-p 2.0: must be in [0, 1]"),
    (["run", "{model}", "--prompt", "x", "--repetition-penalty", "0"], "--repetition-penalty 0.0: must be > 0"),
    (["run", "{model}"], "no prompt: give --prompt TEXT or --prompt-ids"),
    (["run", "{model}", "--prompt-ids", "1,x"], "--prompt-ids '1,x': expected comma-separated integers"),
    (["run", "{model}", "--prompt", "x", "--expert-budget", "lots"], "--expert-budget 'lots': cannot parse"),
    (["run", "{model}", "--prompt", "x", "--threads", "100000"], "--threads 100000: expected at most"),
    (["bench", "{model}", "--repetitions", "0"], "--repetitions 0: must be >= 1"),
    (["trace", "{model}", "--prompts", "{missing}", "--out", "{tmp}/t.jsonl"], "nope.txt: --prompts: no such file"),
    (["trace", "{model}", "--prompts", "{bad}", "--out", "{tmp}/t.jsonl"], "prompts.jsonl:3: not JSON"),
    (["trace", "{model}", "--prompts", "{good}", "--out", "{nodir}"], "--out: its folder does not exist"),
    (["analyze", "{model}", "--prompts", "{good}", "--plot", "{nodir}"], "--plot: its folder does not exist"),
    (["batch", "{model}", "--input", "{good}", "--output", "{tmp}", ], "--output: is a folder"),
    (["batch", "{model}", "--input", "{good}", "--output", "{tmp}/o.jsonl", "--concurrency", "0"],
     "--concurrency 0: must be >= 1"),
    (["serve", "{model}", "--port", "70000"], "--port 70000: must be in [0, 65535]"),
    (["convert", "{model}", "--precision", "int5"], "--precision 'int5'"),
    (["train-predictor", "{model}", "--traces", "{missing}"], "--traces: no such file"),
]


@pytest.mark.parametrize(("argv", "message"), CASES, ids=[f"{c[0][0]}-{i}" for i, c in enumerate(CASES)])
def test_a_bad_argument_is_refused_before_the_model_loads(argv: list[str], message: str, model: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    names = {"model": str(model), "tmp": str(tmp_path), **_files(tmp_path)}
    assert main([a.format(**names) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moeflow: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (model / ".moeflow").exists(), "the model was opened before the arguments were checked"


def test_a_missing_model_names_where_it_looked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path / "absent"), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moeflow: error: ") and str(tmp_path / "absent") in err


def test_a_text_prompt_for_a_model_without_a_tokenizer_is_refused_before_loading(
        model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (model / "tokenizer.json").unlink()
    assert main(["run", str(model), "--prompt", "hello"]) == 1
    assert "--prompt TEXT needs the checkpoint's tokenizer.json" in capsys.readouterr().err
    assert main(["run", str(model), "--prompt-ids", "1,2", "--stop", "x"]) == 1
    assert "--stop needs the checkpoint's tokenizer.json" in capsys.readouterr().err
    assert not (model / ".moeflow").exists()


def test_os_errors_are_one_clean_line_with_exit_code_1(model: Path, tmp_path: Path) -> None:
    """In a real process: no traceback for a missing prompts file or a store dir that cannot be made."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for argv in (
        ["trace", str(model), "--prompts", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "t.jsonl")],
        ["run", str(model), "--prompt", "x", "--device", "cpu", "--store-dir", str(blocker / "store")],
        ["convert", str(model), "--store-dir", str(blocker / "store")],
    ):
        done = subprocess.run([sys.executable, "-m", "moeflow.cli", *argv], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 1, (argv, done.stderr)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("moeflow: error: "), (argv, done.stderr)
        assert "Traceback" not in done.stderr


def test_a_refused_checkpoint_is_exit_code_1_and_usage_errors_stay_2(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text("{not json")
    assert main(["convert", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("moeflow: error: ")
    with pytest.raises(SystemExit) as usage:
        main(["run"])  # no MODEL: argparse's own usage error
    assert usage.value.code == 2
