"""A job line takes every sampling option of Engine.generate: min_p, the penalties and stop strings."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from moeflow.jobs import JobFileError, parse_job, run_jobs
from tests.cli_models import synth_model


def test_job_lines_take_the_sampling_options_and_check_their_types(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    job = parse_job(path, 1, json.dumps({"prompt": "x", "min_p": 0.1, "repetition_penalty": 1.2, "presence_penalty": 1,
                                         "frequency_penalty": -0.5, "stop": ["\n\n", "END"], "temperature": None}))
    assert job.params == {"min_p": 0.1, "repetition_penalty": 1.2, "presence_penalty": 1.0, "frequency_penalty": -0.5,
                          "stop": ["\n\n", "END"], "temperature": None}
    assert parse_job(path, 1, '{"prompt": "x", "stop": "END"}').params == {"stop": "END"}
    for bad, message in (('"stop": 3', "stop=3: must be a non-empty string"), ('"stop": [""]', "stop=['']"),
                         ('"min_p": "high"', "min_p='high': must be float")):
        with pytest.raises(JobFileError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_job(path, 4, '{"prompt": "x", %s}' % bad)


@pytest.mark.timeout(120)
def test_a_stop_string_of_a_job_line_ends_its_text(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    from moeflow.api import Engine

    model = synth_model(tmp_path_factory)

    async def run() -> None:
        async with Engine.open(model, device="cpu") as eng:
            full = (await eng.generate("The quick brown fox", 12, stop_at_eos=False)).text
            assert full is not None
            stop = full[4:6]
            inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
            inp.write_text(json.dumps({"id": "s", "prompt": "The quick brown fox", "max_new_tokens": 12,
                                       "stop_at_eos": False, "stop": stop}) + "\n")
            summary = await run_jobs(eng, inp, out)
            assert summary.done == 1
            record = json.loads(out.read_text())
            assert record["text"] == full[: full.index(stop)] and record["finish_reason"] == "stop"

    asyncio.run(run())
