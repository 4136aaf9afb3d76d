"""benches/bench_cpu_experts.py end to end on a small shape: every path runs, the baseline is
torch's own product, and moeflow's int4 path agrees with the (torch-only) dequantizing reference
to bf16 rounding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from moeflow import _core

ROOT = Path(__file__).resolve().parents[2]


def test_the_bench_times_every_path() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benches" / "bench_cpu_experts.py"), "--shapes", "256x128",
                           "--tokens", "1,5", "--reps", "1", "--threads", "1"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    (shape,) = line["shapes"]
    for rows in ("1", "5"):
        per = shape["tokens"][rows]
        assert per["bf16_linear"]["vs_bf16_linear"] == 1.0
        assert {"fp32_upcast", "int8_dequant", "int4_dequant"} <= per.keys()
        if _core.bf16_linear_available():
            assert {"bf16_moeflow", "int8_moeflow", "int4_moeflow"} <= per.keys()
            # the same weight values; torch sums them in another order, so bf16 rounding apart
            assert per["int4_moeflow"]["max_err_vs_dequant"] < 2e-2
