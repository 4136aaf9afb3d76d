"""benches/bench_cpu_int4.py end to end on the tiny model: every path runs and they agree on the
tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from moeflow.runtime import cpu_bf16, cpu_quant

ROOT = Path(__file__).resolve().parents[2]


def test_the_bench_prints_both_paths_and_their_ratio() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benches" / "bench_cpu_int4.py"), "--size", "tiny",
                           "--new-tokens", "3", "--rounds", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    if not cpu_quant.available():
        assert "skipped" in line
        return
    assert line["int4_kernel_tokens_per_second"] > 0 and line["dequant_reference_tokens_per_second"] > 0
    assert line["ratio"] == round(line["int4_kernel_tokens_per_second"] / line["dequant_reference_tokens_per_second"], 3) or \
        abs(line["ratio"] - line["int4_kernel_tokens_per_second"] / line["dequant_reference_tokens_per_second"]) < 0.01
    assert line["same_tokens"] is True
    if cpu_bf16.ENABLED:
        assert line["moeflow_kernel_tokens_per_second"] > 0
        assert line["moeflow_same_tokens_as_reference"] is True
