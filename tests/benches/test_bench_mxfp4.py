"""bench_decode --arch gpt_oss: its line also holds the MXFP4 store's bytes per expert against bf16
and decode at a 25% budget of the mxfp4 store against the bf16 store, measured in the same run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benches import bench_decode
from moeflow.models.synth import synthesize

PROMPT = [(31 * i + 7) % 500 + 3 for i in range(8)]


def test_gpt_oss_line_compares_the_mxfp4_store_with_bf16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def tiny(out: Path, arch: str, size: str, **kw: Any) -> Any:  # a tiny model stands in for "small"
        return synthesize(out, arch, "tiny", **kw)

    monkeypatch.setattr(bench_decode, "ROOT", tmp_path)
    monkeypatch.setattr(bench_decode, "synthesize", tiny)
    line = bench_decode.arch_line("gpt-oss", PROMPT, 4, 1)
    assert line["arch"] == "gpt_oss" and line["transformers_tokens_per_second"] > 0
    sizes = line["store_bytes_per_expert"]
    assert sizes["mxfp4"] < sizes["bfloat16"] and sizes["ratio"] == pytest.approx(sizes["mxfp4"] / sizes["bfloat16"],
                                                                                   abs=1e-4)
    quarter = line["quarter_budget_mxfp4_vs_bf16"]
    assert quarter["budget"] == "25%" and quarter["mxfp4"]["slots"] == quarter["bfloat16"]["slots"]
    assert quarter["mxfp4"]["tokens_per_second"] > 0 and quarter["bfloat16"]["tokens_per_second"] > 0
    assert quarter["mxfp4_vs_bfloat16"] == pytest.approx(
        quarter["mxfp4"]["tokens_per_second"] / quarter["bfloat16"]["tokens_per_second"], abs=1e-3)
    json.dumps(line)
