"""`bench_gpu.py --check`: the whole GPU check in one bounded run (under 4 minutes), one JSON line out.

Parts, each recorded in the JSON (a part that fails or runs out of time is reported, the rest go on):
  gpu_tests   pytest -m gpu in a subprocess, started first and time-limited; it runs while this
              process synthesizes the model (CPU work) and is waited for before any timing;
  model       a 2-layer Mixtral-8x7B-shaped checkpoint (hidden 4096, intermediate 14336, 8 experts,
              top-2, bf16: 352 MB experts), small vocabulary;
  logits      prefill and stepwise (decode path) logits on device='cuda' (bf16) at 25% and full
              budget against device='cpu' computing in float32 on the same bf16 weights:
              max |diff| / max |logit| reported; checked <= 2e-2 against the CPU's own bf16 run (the
              GPU tests' bf16 tolerance); and 25% against full budget on the GPU within 1e-3;
  link_peak   pinned host -> device bytes/s (physics.py); every decode figure passes the check;
  decode      wall-clock decode tokens/s at 25% with gate-lookahead prefetch, against
              prefetch='none' and against transformers + accelerate offloading at the same GPU budget.
A watchdog prints what was measured and exits if the whole run nears its limit.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LIMIT_SECONDS = 225.0  # the whole check; the issue allows 4 minutes
TESTS_SECONDS = 140.0
# bf16 on two devices, two layers of hidden 4096 deep: the CPU engine keeps attention and its KV
# cache in float32 and the GPU in bf16. Measured on an H200: 0.0119 (prefill), 0.0104 (stepwise)
# against the CPU's bf16 run, 0.0178 / 0.0117 against its float32 run, the same at every budget.
LOGIT_TOLERANCE = 2e-2
BUDGET_TOLERANCE = 1e-3  # 25% against full budget on the GPU: the same kernels; a bad copy is O(1)
MODEL = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
             num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=1024)
NEW_TOKENS = 16


class Check:
    """The JSON being built, the clock, and the parts' error handling."""

    def __init__(self, limit: float) -> None:
        self.started = time.perf_counter()
        self.limit = limit
        self.report: dict[str, Any] = {"gpu": True, "ok": True, "errors": {}}
        self.lock = threading.Lock()
        self.emitted = False

    def left(self) -> float:
        return self.limit - (time.perf_counter() - self.started)

    def run(self, name: str, body: Callable[[dict[str, Any]], None], needs: float = 0.0) -> None:
        """Run one part; its figures go into report[name]. An exception fails the check, not the run."""
        if self.left() < needs:
            self.fail(name, f"skipped: {self.left():.0f} s left, the part needs about {needs:.0f} s")
            return
        out: dict[str, Any] = {}
        self.report[name] = out
        t0 = time.perf_counter()
        try:
            body(out)
        except Exception as e:  # reported in the JSON; the other parts still run
            self.fail(name, f"{type(e).__name__}: {e}"[:2000])
        out["seconds"] = round(time.perf_counter() - t0, 2)

    def fail(self, name: str, why: str) -> None:
        self.report["ok"] = False
        self.report["errors"][name] = why

    def emit(self) -> None:
        with self.lock:
            if self.emitted:
                return
            self.emitted = True
            self.report["seconds"] = round(time.perf_counter() - self.started, 1)
            print(json.dumps(self.report, default=str), flush=True)


def rel_err(got: Any, want: Any) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def environment() -> dict[str, Any] | None:
    """Versions of what the check uses; None with a printed JSON line when moeflow does not import."""
    import torch

    env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import moeflow._core  # noqa: F401
    except Exception as e:
        print(json.dumps({"gpu": torch.cuda.is_available(), "ok": False, "error": f"moeflow does not import: {e}",
                          "install": "make install-test (pip install -e '.[test]' builds the Rust extension)"}))
        return None
    major = (torch.version.cuda or "12").split(".")[0]
    for name, hint in (("cupy", f"pip install cupy-cuda{major}x (the quantized-expert kernels)"),
                       ("accelerate", "pip install accelerate (the offloading baseline)")):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
            env[f"{name}_install"] = hint
    return env


def start_gpu_tests() -> tuple[subprocess.Popen[bytes], Any]:
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return proc, log


def finish_gpu_tests(proc: subprocess.Popen[bytes], log: Any, deadline: float, out: dict[str, Any]) -> bool:
    try:
        proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        out["timed_out"] = True
    log.seek(0)
    text = log.read().decode(errors="replace")
    for count, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text.splitlines()[-1] if text else ""):
        out[what] = int(count)
    out["rc"] = proc.returncode
    ok = proc.returncode == 0 and not out.get("timed_out")
    if not ok:
        out["tail"] = text[-3000:]
    return ok


async def engine_figures(path: Path, peak: float | None, *, logits: bool, dtype: str = "bfloat16",
                         **options: Any) -> dict[str, Any]:
    """Prefill and stepwise logits (when `logits`), and decode figures (when a link peak is given)."""
    from benches.gpu_runs import prompt_ids, wall_decode
    from moeflow import Engine

    prompt = prompt_ids(12, MODEL["vocab_size"])
    out: dict[str, Any] = {}
    async with Engine.open(path, dtype=dtype, **options) as eng:
        if logits:
            out["prefill"] = await eng.logits(prompt)
            out["stepwise"] = await eng.score(prompt[:8], stepwise=True)
        if peak is not None:
            out["decode"] = await wall_decode(eng, prompt, NEW_TOKENS, peak)
        out["budget_bytes"] = eng.plan.budget_bytes
        out["pinned_blocks"] = eng.stats()["pinned_blocks"]
    return out


def run_check(limit: float = LIMIT_SECONDS) -> int:
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"gpu": False, "reason": "no CUDA device visible to torch: nothing to check"}))
        return 0
    env = environment()
    if env is None:
        return 1
    from benches import physics
    from benches.gpu_runs import accelerate_decode, prompt_ids
    from moeflow import _core
    from moeflow.models.synth import synthesize

    check = Check(limit)
    check.report.update(device=torch.cuda.get_device_name(), **env)
    if not _core.cuda_available():
        check.fail("moeflow", "moeflow._core does not see CUDA (libcuda not loadable)")
    proc, log = start_gpu_tests()

    def watchdog() -> None:
        check.fail("watchdog", f"the check reached its {limit:.0f} s limit; figures so far are above")
        if proc.poll() is None:
            proc.kill()
        check.emit()
        os._exit(1)

    timer = threading.Timer(limit, watchdog)
    timer.daemon = True
    timer.start()
    path = ROOT / ".artifacts" / "gpu-check" / "mixtral-8x7b-2l"
    ref: dict[str, Any] = {}
    bf16: dict[str, Any] = {}
    gpu_logits: dict[str, dict[str, Any]] = {}
    decode: dict[str, Any] = {}
    check.report["decode"] = decode  # filled as the parts run: a watchdog report shows what was measured
    peak: list[float] = []
    budget_bytes: list[int] = []

    def model(out: dict[str, Any]) -> None:
        if not any((path / name).exists() for name in ("model.safetensors.index.json", "model.safetensors")):
            synthesize(path, "mixtral", "small", dtype=torch.bfloat16, progress=False, device="cuda", **MODEL)
        out.update(expert_mb=round(3 * MODEL["hidden_size"] * MODEL["intermediate_size"] * 2 / 1e6, 1), experts=16)

    def cpu_reference(out: dict[str, Any]) -> None:
        # The CPU engine computing in float32 on the same bf16 weights: the exact result, so the
        # tolerance bounds the GPU's own bf16 rounding (a CPU bf16 run adds its own on top: both
        # are reported). A wrong or partial copy is off by O(1), far beyond either.
        ref.update(asyncio.run(engine_figures(path, None, logits=True, device="cpu", dtype="float32")))
        bf16.update(asyncio.run(engine_figures(path, None, logits=True, device="cpu")))

    def gpu_tests(out: dict[str, Any]) -> None:
        if not finish_gpu_tests(proc, log, check.started + TESTS_SECONDS, out):
            check.fail("gpu_tests", f"pytest -m gpu: rc {out['rc']}" + (" (timed out)" if out.get("timed_out") else ""))

    def link_peak(out: dict[str, Any]) -> None:
        peak.append(physics.pinned_h2d_peak())
        out["gb_per_second"] = round(peak[0] / 1e9, 2)

    def cuda(name: str, options: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
        def body(out: dict[str, Any]) -> None:
            if not peak:
                raise RuntimeError("no link peak measured: decode figures cannot be checked against physics")
            got = asyncio.run(engine_figures(path, peak[0], logits=name != "25%_prefetch_none", device="cuda",
                                             **options))
            decode[name] = got["decode"]
            budget_bytes.append(got["budget_bytes"])
            if "refused" in got["decode"]:
                check.fail(f"cuda_{name}", "physics: " + "; ".join(got["decode"]["refused"]))
            if got["pinned_blocks"]:
                check.fail(f"cuda_{name}", f"{got['pinned_blocks']} blocks still pinned after the requests")
            if "prefill" in got:
                if not ref:
                    raise RuntimeError("no CPU reference logits to compare with")
                out["prefill_rel_err"] = round(rel_err(got["prefill"], ref["prefill"]), 5)
                out["stepwise_rel_err"] = round(rel_err(got["stepwise"], ref["stepwise"]), 5)
                if bf16:
                    out["prefill_rel_err_vs_cpu_bf16"] = round(rel_err(got["prefill"], bf16["prefill"]), 5)
                    out["stepwise_rel_err_vs_cpu_bf16"] = round(rel_err(got["stepwise"], bf16["stepwise"]), 5)
                worst = max(out["prefill_rel_err_vs_cpu_bf16"], out["stepwise_rel_err_vs_cpu_bf16"])
                if worst > LOGIT_TOLERANCE:
                    check.fail(f"cuda_{name}", f"logits differ from the CPU engine's bf16 run by {worst:.4f} "
                                               f"> {LOGIT_TOLERANCE}")
                gpu_logits[name] = got
                if name == "100%" and "25%" in gpu_logits:  # every budget gives the same logits
                    low = gpu_logits["25%"]
                    diff = max(rel_err(low[k], got[k]) for k in ("prefill", "stepwise"))
                    out["rel_diff_25_vs_100"] = diff
                    if diff > BUDGET_TOLERANCE:
                        check.fail("budgets", f"25% and full budget logits differ by {diff:.2e} > {BUDGET_TOLERANCE}")
        return body

    def accelerate_offload(out: dict[str, Any]) -> None:
        if env.get("accelerate") is None:
            raise RuntimeError(env["accelerate_install"])
        # The GPU holds what moeflow's 25% run held for experts, plus the dense weights and working room.
        files = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        dense = files - 16 * 3 * MODEL["hidden_size"] * MODEL["intermediate_size"] * 2
        out["gpu_bytes"] = (budget_bytes[0] if budget_bytes else 0) + dense + (512 << 20)
        tps = accelerate_decode(path, out["gpu_bytes"], 4, prompt_ids(12, MODEL["vocab_size"]))
        decode["accelerate_offload"] = {"tokens_per_second": round(tps, 3)}

    check.run("model", model)
    check.run("cpu_reference", cpu_reference, needs=20)
    check.run("gpu_tests", gpu_tests)  # waited for before anything is timed on the GPU
    check.run("link_peak", link_peak)
    check.run("cuda_25%", cuda("25%", dict(expert_budget="25%", prefetch="gate-lookahead")), needs=15)
    check.run("cuda_25%_prefetch_none", cuda("25%_prefetch_none", dict(expert_budget="25%", prefetch="none")), needs=15)
    check.run("cuda_100%", cuda("100%", dict(expert_budget="100%", prefetch="gate-lookahead")), needs=15)
    check.run("accelerate_offload", accelerate_offload, needs=40)
    ours = decode.get("25%", {}).get("tokens_per_second")
    for key, base in (("vs_prefetch_none", "25%_prefetch_none"), ("vs_accelerate_offload", "accelerate_offload")):
        theirs = decode.get(base, {}).get("tokens_per_second")
        if ours and theirs:
            check.report[key] = round(ours / theirs, 3)
    check.report["logit_tolerance"] = LOGIT_TOLERANCE
    timer.cancel()
    check.emit()
    return 0 if check.report["ok"] else 1
