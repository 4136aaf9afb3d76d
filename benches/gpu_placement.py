"""bench_gpu.py --placement: where misses run (issue 13, item 4). Wall-clock decode tokens/s of the
cost model (miss_compute='auto'), always copy, always CPU, and every static cpu_layers (the first N
MoE layers on the CPU, llama.cpp's --n-cpu-moe), measured in the same run; one JSON line per model,
precision and budget, with the goals checked: the cost model within 5% of the best of the others,
and at least 1.3x always-copy at 25%.

On device='cuda' (the measurement): a Mixtral-8x7B-shaped model (4 layers; --quick: 2, bf16 and
25% only) in bf16 and int4, and an OLMoE-1B-7B-shaped one in bf16, at 25% and 50%. On device='sim'
(a dry run of this script where no GPU is, its figures meaning nothing about a GPU): a small
Mixtral-shaped model over a 1 GB/s simulated link.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Literal

import torch

from moeflow import Engine
from moeflow.models.synth import synthesize

ROOT = Path(__file__).resolve().parents[1]
MIXTRAL_8X7B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                    num_local_experts=8, num_experts_per_tok=2, vocab_size=32000)
OLMOE_1B_7B = dict(hidden_size=2048, intermediate_size=1024, num_attention_heads=16, num_key_value_heads=16,
                   num_experts=64, num_experts_per_tok=8, vocab_size=50304, num_hidden_layers=16)
SMALL_MIXTRAL = dict(hidden_size=512, intermediate_size=1792, num_attention_heads=8, num_key_value_heads=4,
                     num_local_experts=8, num_experts_per_tok=2, vocab_size=1024, num_hidden_layers=4)
SIM = dict(sim_bandwidth_gbps=1.0, sim_latency_us=10.0)
Device = Literal["cuda", "sim"]
Model = tuple[str, str, dict[str, int], list[str | None], list[str]]  # name, arch, shape, precisions, budgets


def _sync(device: Device) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


async def _tokens_per_second(path: Path, device: Device, new_tokens: int, **options: Any) -> dict[str, Any]:
    """Decode tokens/s by wall clock, (generate(n + 1) - generate(1)) / n after a warm-up, each
    timed up to the device's last kernel; with where the experts ran."""
    async with Engine.open(path, device=device, **options) as eng:
        vocab = eng.session.arch.vocab_size
        prompt = [(37 * i + 11) % (vocab - 3) + 3 for i in range(32)]
        await eng.generate(prompt, 2, stop_at_eos=False)
        times = []
        for n in (1, new_tokens + 1):
            _sync(device)
            started = time.perf_counter()
            await eng.generate(prompt, n, stop_at_eos=False)
            _sync(device)
            times.append(time.perf_counter() - started)
        s = eng.stats()
        return {"tokens_per_second": round(new_tokens / max(times[1] - times[0], 1e-9), 3),
                "expert_use_share": {k: round(v, 3) for k, v in s.expert_use_share.items()},
                "cpu_path": s.cpu_path, "cpu_seconds_per_row": s.cpu_seconds_per_row,
                "cpu_seconds_per_expert": s.cpu_seconds_per_expert, "link_bytes_per_second": s.link_bytes_per_second}


def _compare(path: Path, device: Device, layers: int, new_tokens: int, **options: Any) -> dict[str, Any]:
    runs: dict[str, dict[str, Any]] = {}
    for name, extra in (("auto", {"miss_compute": "auto"}), ("copy", {"miss_compute": "copy"}),
                        ("cpu", {"miss_compute": "cpu"})):
        runs[name] = asyncio.run(_tokens_per_second(path, device, new_tokens, **options, **extra))
    static = {n: asyncio.run(_tokens_per_second(path, device, new_tokens, cpu_layers=n, **options))
              for n in range(1, layers + 1)}
    best_n = max(static, key=lambda n: static[n]["tokens_per_second"])
    tps = {name: run["tokens_per_second"] for name, run in runs.items()}
    best_other = max(tps["copy"], tps["cpu"], static[best_n]["tokens_per_second"])
    return {
        "tokens_per_second": {**tps, "best_static": static[best_n]["tokens_per_second"]},
        "best_static_cpu_layers": best_n,
        "static_tokens_per_second": {n: r["tokens_per_second"] for n, r in static.items()},
        "auto_vs_best_other": round(tps["auto"] / best_other, 3) if best_other > 0 else None,
        "auto_vs_copy": round(tps["auto"] / tps["copy"], 3) if tps["copy"] > 0 else None,
        "auto": runs["auto"],
    }


def run_placement(device: Device = "cuda", quick: bool = False) -> int:
    if device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"placement": "skipped", "reason": "no CUDA device"}))
        return 0
    work = ROOT / ".artifacts" / ("gpu" if device == "cuda" else "sim-placement")
    new_tokens = 16 if quick or device == "sim" else 32
    if device == "sim":
        models: list[Model] = [("small-mixtral-shaped", "mixtral", SMALL_MIXTRAL, [None], ["25%"])]
        options: dict[str, Any] = dict(SIM)
    else:
        mixtral = dict(MIXTRAL_8X7B, num_hidden_layers=2 if quick else 4)
        models = [("mixtral-8x7b-shaped", "mixtral", mixtral, [None] if quick else [None, "int4"],
                   ["25%"] if quick else ["25%", "50%"])]
        if not quick:
            models.append(("olmoe-1b-7b-shaped", "olmoe", OLMOE_1B_7B, [None], ["25%", "50%"]))
        options = {}
    for name, arch, shape, precisions, budgets in models:
        path = work / name
        if not (path / "config.json").exists():
            synthesize(path, arch, "small", dtype=torch.bfloat16, progress=False,
                       device="cuda" if device == "cuda" else "cpu", **shape)
        layers = int(json.loads((path / "config.json").read_text())["num_hidden_layers"])  # as synthesized
        for precision in precisions:
            for budget in budgets:
                extra: dict[str, Any] = {"precision": precision} if precision else {}
                # quantized experts on the CPU run the dequantizing reference (tens of ms a Mixtral
                # expert on a CPU: benches/bench_cpu_experts.py): fewer tokens keep the run bounded
                tokens = new_tokens if precision is None else max(4, new_tokens // 4)
                figures = _compare(path, device, layers, tokens, expert_budget=budget, **options, **extra)
                line = {"placement": name, "precision": precision or "bfloat16", "budget": budget, "new_tokens": tokens,
                        "device": torch.cuda.get_device_name() if device == "cuda" else "sim", **figures}
                if device == "cuda":
                    line["goal_within_5pct_of_best"] = (figures["auto_vs_best_other"] or 0) >= 0.95
                    if budget == "25%":
                        line["goal_1_3x_copy"] = (figures["auto_vs_copy"] or 0) >= 1.3
                print(json.dumps(line), flush=True)
    return 0
