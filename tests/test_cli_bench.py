"""`moeflow bench` repeats its runs after a warm-up and reports prefill and decode tokens/s as
mean ± sample standard deviation, in llama-bench's table (or one JSON object with every run)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from moeflow.cli import main
from moeflow.cli_generate import bench_table
from tests.cli_models import synth_model


@pytest.mark.timeout(180)
def test_bench_json_has_every_run_and_their_mean_and_sd(tmp_path_factory: pytest.TempPathFactory,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    model = synth_model(tmp_path_factory)
    assert main(["bench", str(model), "--device", "cpu", "--prompt-len", "8", "--max-new-tokens", "4",
                 "--repetitions", "2", "--expert-budget", "50%", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["repetitions"] == 2 and len(result["runs"]) == 2
    for key in ("prefill_tokens_per_second", "decode_tokens_per_second"):
        values = [run[key] for run in result["runs"]]
        assert all(v > 0 for v in values)
        assert result[key] == pytest.approx(statistics.fmean(values))
        assert result[f"{key}_sd"] == pytest.approx(statistics.stdev(values))
    assert (result["expert_budget"], result["expert_slots"], result["prompt_tokens"], result["new_tokens"]) == (
        "50%", 8, 8, 4)
    assert main(["bench", str(model), "--device", "cpu", "--prompt-len", "8", "--max-new-tokens", "4",
                 "--repetitions", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [c.strip() for c in out[0].split("|")[1:-1]] == ["model", "budget", "device", "test", "t/s"]
    assert " pp8 " in out[2] and " tg4 " in out[3] and "±" in out[2] and "±" in out[3]
    assert "1 runs after 1 warm-up" in out[-1]

def test_the_table_is_llama_bench_shaped() -> None:
    result = {"model": "/models/olmoe-stdlib", "expert_budget": "25%", "device": "cpu", "prompt_tokens": 32,
              "new_tokens": 32, "prefill_tokens_per_second": 512.333, "prefill_tokens_per_second_sd": 4.2,
              "decode_tokens_per_second": 14.25, "decode_tokens_per_second_sd": 0.31}
    assert bench_table(result).splitlines() == [
        "| model        | budget | device | test |           t/s |",
        "| ------------ | -----: | -----: | ---: | ------------: |",
        "| olmoe-stdlib |    25% |    cpu | pp32 | 512.33 ± 4.20 |",
        "| olmoe-stdlib |    25% |    cpu | tg32 |  14.25 ± 0.31 |",
    ]
