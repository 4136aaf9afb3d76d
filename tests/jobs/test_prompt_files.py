"""Prompt files are JSON lines (by a .jsonl / .json name) or plain text, one prompt per line: never guessed from the content."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeflow.jobs import JobFileError, read_jobs, read_prompts


def test_a_plain_text_file_is_one_prompt_per_line_even_with_blank_lines_and_json_looking_lines(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text('first prompt\n\n\nsecond\n  indented third\n{"prompt": "looks like JSON"}\n   \n')
    jobs = read_prompts(path)
    assert [j.prompt for j in jobs] == ["first prompt", "second", "  indented third", '{"prompt": "looks like JSON"}']
    assert [j.line for j in jobs] == [1, 4, 5, 6] and [j.id for j in jobs] == ["1", "4", "5", "6"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".JSONL"])
def test_a_jsonl_file_holds_objects_with_prompt_text_or_ids(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"prompts{suffix}"
    path.write_text(json.dumps({"prompt": "def f(x):\n    return"}) + "\n\n" + json.dumps({"prompt": [1, 2, 3]}) + "\n")
    assert [j.prompt for j in read_prompts(path)] == ["def f(x):\n    return", [1, 2, 3]]


@pytest.mark.parametrize(("text", "message"), [
    ('{"prompt": "ok"}\nplain text line\n', r"prompts\.jsonl:2: not JSON"),
    ('{"prompt": "ok"}\n\n["a list"]\n', r"prompts\.jsonl:3: a line must be a JSON object"),
    ('{"text": "no prompt key"}\n', r'prompts\.jsonl:1: unknown field\(s\) text'),
    ('{"prompt": ""}\n', r'prompts\.jsonl:1: "prompt" must be non-empty'),
    ("\n\n", r"prompts\.jsonl: no prompts in the file"),
])
def test_a_malformed_jsonl_line_names_the_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(text)
    with pytest.raises(JobFileError, match=message):
        read_prompts(path)


def test_an_empty_text_file_has_no_prompts(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("\n  \n")
    with pytest.raises(JobFileError, match=r"prompts\.txt: no prompts in the file \(one prompt per line\)"):
        read_prompts(path)


def test_a_batch_job_file_may_be_plain_text(tmp_path: Path) -> None:
    path = tmp_path / "jobs.txt"
    path.write_text("a\nb\n")
    jobs, bad = read_jobs(path)
    assert bad == [] and [(j.id, j.prompt, j.params) for j in jobs] == [("1", "a", {}), ("2", "b", {})]
