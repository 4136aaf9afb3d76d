"""The measurements of bench_gpu.py on a machine with an NVIDIA GPU (see its docstring).

Models, synthesized locally with random weights: a Mixtral-8x7B-shaped one (its layer shapes,
`--mixtral-layers` of its 32 layers to fit the machine's disk) with int4 experts, and an
OLMoE-1B-7B-shaped one in bf16. For each, budgets of 25% and 50% of the experts:
decode tokens/s, hit rate, achieved host -> device GB/s against the peak pinned bandwidth measured
in the same run, and ratios against (a) transformers with accelerate offloading (device_map with
CPU offload, in the same run) and (b) on-demand LRU without prefetch (the mixtral-offloading design).
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from pathlib import Path
from typing import Any

import torch

from moeflow import Engine, _core
from moeflow.models.synth import synthesize

ROOT = Path(__file__).resolve().parents[1]
MIXTRAL_8X7B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                    num_local_experts=8, num_experts_per_tok=2, vocab_size=32000)
OLMOE_1B_7B = dict(hidden_size=2048, intermediate_size=1024, num_attention_heads=16, num_key_value_heads=16,
                   num_experts=64, num_experts_per_tok=8, vocab_size=50304, num_hidden_layers=16)


def peak_pinned_gbps(size: int = 1 << 30) -> float:
    """Host -> device GB/s of one large copy from pinned memory (the PCIe/NVLink peak)."""
    host = torch.empty(size, dtype=torch.uint8).pin_memory()
    dev = torch.empty(size, dtype=torch.uint8, device="cuda")
    for _ in range(2):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(5):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return 5 * size / (time.perf_counter() - started) / 1e9


async def moeflow_decode(model: Path, new_tokens: int, **options: Any) -> dict[str, Any]:
    async with Engine.open(model, device="cuda", **options) as eng:
        prompt = [(37 * i + 11) % 30000 + 3 for i in range(32)]
        await eng.generate(prompt, 4, stop_at_eos=False)
        before = eng.stats()
        res = await eng.generate(prompt, new_tokens, stop_at_eos=False)
        after = eng.stats()
        copied = after["bytes_loaded"] - before["bytes_loaded"]
        busy = after["load_seconds"] - before["load_seconds"]
        return {
            "tokens_per_second": round(res.stats["decode_tokens_per_second"], 3),
            "hit_rate": round(res.stats["decode_hit_rate"], 4),
            "h2d_gb_per_second": round(copied / busy / 1e9, 3) if busy else 0.0,
            "stall_seconds_per_token": round(res.stats["decode_stall_seconds_per_token"], 5),
        }


def accelerate_decode(model: Path, budget_bytes: int, new_tokens: int) -> float:
    """transformers + accelerate: layers that do not fit `budget_bytes` of GPU stay on the CPU."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        model, dtype=torch.bfloat16, device_map="auto",
        max_memory={0: budget_bytes, "cpu": 120 << 30},
    ).eval()
    ids = torch.tensor([[(37 * i + 11) % 30000 + 3 for i in range(32)]], device="cuda")

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - started

    timed(2)
    tps = new_tokens / max(1e-9, timed(new_tokens + 1) - timed(1))
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    return tps


def run_gpu(quick: bool = False) -> int:
    if not (_core.cuda_available() and torch.cuda.is_available()):
        print(json.dumps({"skipped": "no CUDA device"}))
        return 0
    work = ROOT / ".artifacts" / "gpu"
    peak = peak_pinned_gbps()
    new_tokens = 16 if quick else 48
    models = [
        ("mixtral-8x7b-shaped", "mixtral", dict(MIXTRAL_8X7B, num_hidden_layers=2 if quick else 4), "int4"),
        ("olmoe-1b-7b-shaped", "olmoe", OLMOE_1B_7B, None),
    ]
    for name, arch, shape, precision in models:
        path = work / name
        if not (path / "config.json").exists():
            synthesize(path, arch, "small", dtype=torch.bfloat16, progress=False, **shape)
        options = {"precision": precision} if precision else {}
        for budget in ("25%", "50%"):
            ours = asyncio.run(moeflow_decode(path, new_tokens, expert_budget=budget, **options))
            on_demand = asyncio.run(moeflow_decode(path, new_tokens, expert_budget=budget, prefetch="none",
                                                   policy="lru", **options))
            async def plan_bytes() -> int:
                async with Engine.open(path, device="cuda", expert_budget=budget, **options) as eng:
                    return eng.plan.budget_bytes
            budget_bytes = asyncio.run(plan_bytes())
            acc = accelerate_decode(path, budget_bytes, max(4, new_tokens // 4))
            print(json.dumps({
                "model": name, "precision": precision or "bfloat16", "budget": budget,
                "device": torch.cuda.get_device_name(), **ours,
                "peak_pinned_gb_per_second": round(peak, 3),
                "h2d_vs_peak": round(ours["h2d_gb_per_second"] / peak, 3),
                "vs_accelerate_offload": round(ours["tokens_per_second"] / acc, 3),
                "vs_on_demand_lru": round(ours["tokens_per_second"] / on_demand["tokens_per_second"], 3),
                "accelerate_tokens_per_second": round(acc, 3),
                "on_demand_tokens_per_second": on_demand["tokens_per_second"],
            }), flush=True)
    return 0
