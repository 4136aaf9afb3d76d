"""bench_decode --arch: one line per family with both speeds, the ratio and the greedy-token check;
the family's model is synthesized once (never reused half-written) and then reused."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from benches import bench_decode
from moeflow.models.synth import synthesize

PROMPT = [(31 * i + 7) % 500 + 3 for i in range(8)]


def test_arch_line_reports_both_speeds_and_the_greedy_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []

    def tiny(out: Path, arch: str, size: str, **kw: Any) -> Any:  # a tiny model stands in for "small"
        assert size == "small" and Path(out).name.endswith(".partial")
        made.append(arch)
        return synthesize(out, arch, "tiny", **kw)

    monkeypatch.setattr(bench_decode, "ROOT", tmp_path)
    monkeypatch.setattr(bench_decode, "synthesize", tiny)
    (tmp_path / ".artifacts" / "bench-decode" / "glm4_moe-small.partial").mkdir(parents=True)  # interrupted
    line = bench_decode.arch_line("glm4-moe", PROMPT, 4, 1)
    assert made == ["glm4_moe"]
    assert line["arch"] == "glm4_moe" and line["model"] == ".artifacts/bench-decode/glm4_moe-small"
    assert line["new_tokens"] == 4 and line["budget"] == "100%"
    assert line["moeflow_tokens_per_second"] > 0 and line["transformers_tokens_per_second"] > 0
    ratio = line["moeflow_tokens_per_second"] / line["transformers_tokens_per_second"]
    assert line["full_budget_vs_transformers"] == pytest.approx(ratio, abs=1e-3)
    assert line["meets_goal"] == (line["full_budget_vs_transformers"] >= 1.2)
    assert isinstance(line["greedy_tokens_equal"], bool)
    assert line["greedy_tokens_equal"] == (line["first_divergence"] is None)
    assert line["synth_seconds"] is not None
    json.dumps(line)
    assert not (tmp_path / ".artifacts" / "bench-decode" / "glm4_moe-small.partial").exists()

    again = bench_decode.arch_line("glm4_moe", PROMPT, 4, 1)  # reused, not synthesized again
    assert made == ["glm4_moe"] and again["synth_seconds"] is None


def test_an_unknown_family_is_a_line_with_its_error_and_a_failing_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench_decode, "ROOT", tmp_path)
    monkeypatch.setattr(sys, "argv", ["bench_decode.py", "--arch", "nosuch"])
    with pytest.raises(SystemExit) as exit_:
        bench_decode.main()
    assert exit_.value.code == 1
    line = json.loads(capsys.readouterr().out.strip())
    assert line["arch"] == "nosuch" and "nosuch" in line["error"]
