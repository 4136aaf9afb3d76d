"""Job files: every malformed line is named by number, the rest run; results survive crashes and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from moeflow import Engine
from moeflow.errors import InvalidRequest
from moeflow.jobs import ResultFile, generate_batch, read_jobs, run_jobs
from tests.conftest import HFCheckpoints

ROOT = Path(__file__).resolve().parents[2]

GOOD: list[dict[str, Any]] = [
    {"id": "a", "prompt": [5, 17, 42, 3], "max_new_tokens": 6},
    {"prompt": [9, 8, 7], "max_new_tokens": 4},  # id: its line number
    {"id": 7, "prompt": [1, 2, 3, 4, 5], "max_new_tokens": 5, "temperature": 0.8, "seed": 3},
    {"id": "d", "prompt": [11, 12], "max_new_tokens": 3, "top_k": 5, "stop_at_eos": False},
]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in path.read_text().splitlines()]


def test_each_malformed_line_is_named_by_number_and_field(tmp_path: Path) -> None:
    bad = [
        "{not json",
        "[1, 2]",
        '{"id": "x"}',
        '{"prompt": [1, 2], "temprature": 0.5}',
        '{"prompt": [1, true]}',
        '{"prompt": "hi", "max_new_tokens": "8"}',
        '{"prompt": "hi", "top_k": true}',
        '{"id": "a", "prompt": "again"}',
        '{"prompt": ""}',
    ]
    path = _write(tmp_path / "in.jsonl", [json.dumps(GOOD[0]), "", *bad, json.dumps(GOOD[1])])
    jobs, errors = read_jobs(path)
    assert [j.id for j in jobs] == ["a", "12"]
    by_line = {e.line: e.reason for e in errors}
    assert sorted(by_line) == list(range(3, 12))
    assert "not JSON" in by_line[3]
    assert "JSON object" in by_line[4]
    assert 'missing "prompt"' in by_line[5]
    assert "temprature" in by_line[6]
    assert "token ids" in by_line[7]
    assert "max_new_tokens='8'" in by_line[8]
    assert "top_k=True" in by_line[9]
    assert "repeats line 1" in by_line[10]
    assert "non-empty" in by_line[11]
    assert all(str(path) in str(e) for e in errors)


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_a_job_file_runs_its_good_lines_equal_to_solo_runs_and_records_the_bad(
    hf_checkpoints: HFCheckpoints, tmp_path: Path
) -> None:
    lines = [json.dumps(g) for g in GOOD]
    lines.insert(2, '{"prompt": [1], "oops": 1}')
    lines.append(json.dumps({"id": "zero", "prompt": [3, 4], "max_new_tokens": 0}))  # refused by the engine
    inp = _write(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    async with Engine.open(hf_checkpoints.path("mixtral"), device="cpu", expert_budget="50%") as eng:
        summary = await run_jobs(eng, inp, out, concurrency=3)
        solo = {}
        for number, g in zip((1, 2, 4, 5), GOOD, strict=True):
            params = {k: v for k, v in g.items() if k not in ("id", "prompt", "max_new_tokens")}
            solo[str(g.get("id", number))] = (await eng.generate(g["prompt"], g["max_new_tokens"], **params)).tokens
        assert eng.stats()["pinned_blocks"] == 0
    assert (summary.done, summary.failed, summary.skipped, summary.total) == (4, 2, 0, 6)
    records = _lines(out)
    results = {r["id"]: r for r in records if "error" not in r}
    assert {k: r["tokens"] for k, r in results.items()} == solo
    errors = {r["line"]: r["error"] for r in records if "error" in r}
    assert set(errors) == {3, 6}
    assert "oops" in errors[3]["message"] and errors[3]["type"] == "JobFileError"
    assert "max_new_tokens" in errors[6]["message"] and errors[6]["type"] == "InvalidRequest"
    assert results["a"]["line"] == 1 and results["a"]["prompt_tokens"] == 4
    assert results["a"]["stats"]["tokens"] == len(results["a"]["tokens"])


def test_a_torn_last_line_is_cut_and_answered_ids_are_known(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "line": 1, "tokens": [1]}\n{"id": "b", "line": 2, "error": {}}\n{"id": "c", "li')
    with ResultFile(out) as results:
        assert results.done == {"a"}  # b failed: it runs again
        results.write({"id": "c", "line": 3, "tokens": [2]})
    assert [r["id"] for r in _lines(out)] == ["a", "b", "c"]


_RUNNER = """
import asyncio, sys
from moeflow import Engine
from moeflow.jobs import run_jobs
async def main():
    async with Engine.open(sys.argv[1], device="cpu", expert_budget="50%") as eng:
        await run_jobs(eng, sys.argv[2], sys.argv[3], concurrency=2)
asyncio.run(main())
"""


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_a_killed_run_loses_no_finished_result_and_a_rerun_finishes_the_rest(
    hf_checkpoints: HFCheckpoints, tmp_path: Path
) -> None:
    path = hf_checkpoints.path("mixtral")
    prompts: list[dict[str, Any]] = [{"id": f"p{i}", "prompt": [3 + i, 7, 11 + i % 5], "max_new_tokens": 24} for i in range(40)]
    inp = _write(tmp_path / "in.jsonl", [json.dumps(p) for p in prompts])
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _RUNNER, str(path), str(inp), str(out)], env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
            assert proc.poll() is None, "the runner ended before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    first = _lines(out) if out.read_text().endswith("\n") else _lines(out)[:-1]
    assert 3 <= len(first) < len(prompts), "kill landed before or after the run"
    async with Engine.open(path, device="cpu", expert_budget="50%") as eng:
        summary = await run_jobs(eng, inp, out, concurrency=4)
        want = {p["id"]: (await eng.generate(p["prompt"], 24)).tokens for p in prompts}
    assert summary.skipped >= len(first) and summary.done == len(prompts) - summary.skipped
    records = _lines(out)
    assert sorted(r["id"] for r in records) == sorted(want)  # each answered exactly once
    assert {r["id"]: r["tokens"] for r in records} == want


class _Refuses:
    """An engine face whose third prompt is refused, to see generate_batch cancel the rest."""

    def __init__(self) -> None:
        self.cancelled = 0

    async def generate(self, prompt: int, max_new_tokens: int = 32, **params: object) -> int:
        import asyncio

        if prompt == 2:
            raise InvalidRequest("prompt 2 refused")
        try:
            await asyncio.sleep(0.05 * prompt)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return prompt



@pytest.mark.asyncio
async def test_generate_batch_keeps_order_bounds_concurrency_and_cancels_on_a_refusal() -> None:
    face = _Refuses()
    assert await generate_batch(face, [5, 1, 3], 4) == [5, 1, 3]
    with pytest.raises(InvalidRequest, match="prompt 2"):
        await generate_batch(face, [4, 5, 2, 6], 4)
    assert face.cancelled >= 2
    with pytest.raises(InvalidRequest, match="concurrency=0"):
        await generate_batch(face, [1], 4, concurrency=0)
