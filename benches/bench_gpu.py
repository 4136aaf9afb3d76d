"""GPU benchmark, GPU check and kernel compile check.

    python benches/bench_gpu.py --check-compile
        compiles every kernel for sm_80 and sm_90 with NVRTC (no GPU needed) and prints
        {"kernels_compiled": N, "failed": M}; exits 1 if any failed. CI runs this.

    python benches/bench_gpu.py --check [--wheels .gpu-wheels]
        the GPU check, under 4 minutes, one JSON line (benches/gpu_check.py): the GPU tests, a
        2-layer Mixtral-8x7B-shaped model's logits on cuda against the CPU engine at 25% and full
        budget, the physics check against the pinned link peak, wall-clock decode against
        prefetch='none' and transformers + accelerate offloading. Without a GPU it prints
        {"gpu": false, ...} and exits 0. Exits 1 if any part failed. --wheels DIR first installs,
        from DIR alone (the GPU machine has no network), the test dependencies that machine lacks:
        `make gpu-wheels` downloads them here (pytest-asyncio, pytest-timeout, hypothesis, xxhash
        for CPython 3.12); carry DIR with the run.

    python benches/bench_gpu.py [--quick]
        the full benchmark, on a machine with an NVIDIA GPU: one JSON line per configuration
        (benches/gpu_runs.py).

    python benches/bench_gpu.py --all [--wheels .gpu-wheels]
        the one prepared GPU run, under 8 minutes: --check, then benches/bench_kernels.py --tune
        --quick (this GPU's kernel table, runtime/kernel_choice.py, in $MOEFLOW_CACHE; its entries
        print as JSON lines), then benches/bench_kernels.py --quick (its lines name the table's
        choice), then --placement --quick, each a time-limited subprocess whose JSON lines pass
        through; a part that fails or runs out of time is reported ({"part": ..., "rc": ...}) and
        the next still runs. Exits 1 if any part failed.

    python benches/bench_gpu.py --placement [--quick] [--placement-device sim]
        a separate section, run only when asked (never by --check): where misses run, decode
        tokens/s of miss_compute='auto' against always copy, always CPU and the best static
        cpu_layers, one JSON line per model, precision and budget (benches/gpu_placement.py).
        --placement-device sim dry-runs it on the simulated GPU where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def check_compile(archs: tuple[str, ...]) -> int:
    from moeflow.runtime import kernels

    compiled = failed = 0
    failures = []
    for result in kernels.compile_check(archs):
        n = len(kernels.entry_points(result.source))
        if result.ok:
            compiled += n
        else:
            failed += n
            failures.append({"source": result.source, "arch": result.arch, "log": result.log[-2000:]})
    line: dict[str, object] = {"kernels_compiled": compiled, "failed": failed, "archs": list(archs)}
    if failures:
        line["failures"] = failures
    print(json.dumps(line))
    return 1 if failed else 0


TEST_DEPS = {"pytest_asyncio": "pytest-asyncio", "pytest_timeout": "pytest-timeout", "hypothesis": "hypothesis",
             "xxhash": "xxhash"}


def install_missing(wheels: Path) -> list[str]:
    """pip-install, from `wheels` only, each test dependency that does not import; returns them."""
    import importlib.util
    import subprocess

    missing = [pkg for module, pkg in TEST_DEPS.items() if importlib.util.find_spec(module) is None]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels),
                        *missing], check=True)
    return missing


# (name, arguments after the interpreter, seconds): the --all parts, 480 s in all
ALL_PARTS = (
    ("check", ["benches/bench_gpu.py", "--check"], 240),
    # the small shapes first, no entry started after 20 s: what is measured by then is written
    ("tune", ["benches/bench_kernels.py", "--tune", "--quick", "--budget-s", "20"], 30),
    ("kernels", ["benches/bench_kernels.py", "--quick"], 120),
    ("placement", ["benches/bench_gpu.py", "--placement", "--quick"], 90),
)


def run_all(wheels: Path | None) -> int:
    """Every GPU measurement in one bounded run (the GPU machine is lent for minutes)."""
    import subprocess
    import time

    if wheels is not None:
        print(json.dumps({"installed": install_missing(wheels)}), file=sys.stderr)
    root = Path(__file__).resolve().parents[1]
    failed = 0
    for name, argv, limit in ALL_PARTS:
        started = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, *argv], cwd=root, timeout=limit, check=False)
            rc: int | str = done.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        failed += rc != 0
        print(json.dumps({"part": name, "rc": rc, "seconds": round(time.perf_counter() - started, 1)}), flush=True)
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check-compile", action="store_true", help="NVRTC-compile every kernel, no GPU needed")
    ap.add_argument("--check", action="store_true", help="the bounded GPU check (under 4 minutes)")
    ap.add_argument("--archs", default="sm_80,sm_90")
    ap.add_argument("--wheels", type=Path, default=None, help="--check: install missing test deps from this folder")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--all", action="store_true", help="--check, bench_kernels --quick, --placement --quick")
    ap.add_argument("--placement", action="store_true", help="only the miss placement comparison")
    ap.add_argument("--placement-device", default="cuda", choices=("cuda", "sim"),
                    help="--placement: 'sim' dry-runs it on the simulated GPU")
    args = ap.parse_args()
    if args.check_compile:
        return check_compile(tuple(a.strip() for a in args.archs.split(",")))
    if args.all:
        return run_all(args.wheels)
    if args.check:
        from benches.gpu_check import run_check

        if args.wheels is not None:
            print(json.dumps({"installed": install_missing(args.wheels)}), file=sys.stderr)

        return run_check()
    if args.placement:
        from benches.gpu_placement import run_placement

        return run_placement(args.placement_device, quick=args.quick)
    from benches.gpu_runs import run_gpu  # the GPU measurements live beside this script

    return run_gpu(quick=args.quick)


if __name__ == "__main__":
    raise SystemExit(main())
