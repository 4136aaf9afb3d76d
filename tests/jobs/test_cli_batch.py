"""`moeflow batch`: runs a job file, reports a summary, exits 1 when a line failed, resumes on rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeflow.cli import main
from tests.conftest import HFCheckpoints


@pytest.mark.timeout(120)
def test_batch_command_runs_resumes_and_reports_bad_lines(hf_checkpoints: HFCheckpoints, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": "a", "prompt": [4, 5, 6]}\n{"prompt": [7, 8], "max_new_tokens": 3}\n{"prompt": 5}\n')
    argv = ["batch", str(hf_checkpoints.path("mixtral")), "--input", str(inp), "--output", str(out),
            "--device", "cpu", "--max-new-tokens", "5", "--json"]
    assert main(argv) == 1  # line 3 failed
    first = json.loads(capsys.readouterr().out)
    assert (first["done"], first["failed"], first["skipped"], first["tokens"]) == (2, 1, 0, 8)
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(records["a"]["tokens"]) == 5 and len(records["2"]["tokens"]) == 3
    assert records["3"]["line"] == 3 and "prompt" in records["3"]["error"]["message"]
    inp.write_text('{"id": "a", "prompt": [4, 5, 6]}\n{"prompt": [7, 8], "max_new_tokens": 3}\n{"prompt": [5]}\n')
    assert main(argv) == 0  # the fixed line runs; the others were done
    second = json.loads(capsys.readouterr().out)
    assert (second["done"], second["failed"], second["skipped"]) == (1, 0, 2)
    done = [r for r in map(json.loads, out.read_text().splitlines()) if "error" not in r]
    assert sorted(r["id"] for r in done) == ["2", "3", "a"]


def test_batch_command_names_a_missing_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["batch", str(tmp_path), "--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o")])
    assert code == 1 and "nope.jsonl" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_batch_takes_a_plain_text_file_one_prompt_per_line(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from tests.cli_models import synth_model

    model = synth_model(tmp_path_factory)
    inp, out = tmp_path / "prompts.txt", tmp_path / "out.jsonl"
    inp.write_text('The quick brown fox\n\n{"prompt": "not JSON here: a prompt like any other"}\n')
    assert main(["batch", str(model), "--input", str(inp), "--output", str(out), "--device", "cpu",
                 "--max-new-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["done"] == 2
    records = sorted(map(json.loads, out.read_text().splitlines()), key=lambda r: r["line"])
    assert [(r["id"], r["line"], len(r["tokens"])) for r in records] == [("1", 1, 3), ("3", 3, 3)]
