"""The measurements of bench_gpu.py on a machine with an NVIDIA GPU (see its docstring).

Models, synthesized locally with random weights: a Mixtral-8x7B-shaped one (its layer shapes,
`--mixtral-layers` of its 32 layers to fit the machine's disk) with int4 experts, and an
OLMoE-1B-7B-shaped one in bf16. For each, budgets of 25% and 50% of the experts: decode tokens/s
by wall clock, hit rate, achieved host -> device GB/s against the pinned peak measured in the same
run (physics.py refuses a figure above it), and ratios against (a) transformers with accelerate
offloading (device_map with CPU offload, in the same run) and (b) on-demand LRU without prefetch
(the mixtral-offloading design). Every time is wall clock up to torch.cuda.synchronize().
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from pathlib import Path
from typing import Any

import torch

from benches import physics
from moeflow import Engine, _core
from moeflow.models.synth import synthesize

ROOT = Path(__file__).resolve().parents[1]
MIXTRAL_8X7B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                    num_local_experts=8, num_experts_per_tok=2, vocab_size=32000)
OLMOE_1B_7B = dict(hidden_size=2048, intermediate_size=1024, num_attention_heads=16, num_key_value_heads=16,
                   num_experts=64, num_experts_per_tok=8, vocab_size=50304, num_hidden_layers=16)


def prompt_ids(n: int, vocab: int) -> list[int]:
    return [(37 * i + 11) % (vocab - 3) + 3 for i in range(n)]


async def timed_generate(eng: Engine, prompt: list[int], n: int) -> tuple[float, Any]:
    """Wall seconds of one generate, up to the device's last kernel, and its result."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    res = await eng.generate(prompt, n, stop_at_eos=False)
    torch.cuda.synchronize()
    return time.perf_counter() - started, res


async def wall_decode(eng: Engine, prompt: list[int], new_tokens: int, peak: float) -> dict[str, Any]:
    """Decode tokens/s by wall clock: (generate(n + 1) - generate(1)) / n, after a warm-up; the
    engine's own figures beside it; every bytes/s figure through the physics check.

    The decode-only check forgives the loads that may straddle the prefill/decode boundary (issued
    in prefill, landed in decode: at most the speculative and demand loads of one layer, 2 x top-k
    blocks); a figure off by the factor of a partial-copy bug stays far outside that."""
    straddle = 2 * eng.plan.top_k * eng.plan.block_bytes
    await eng.generate(prompt, 2, stop_at_eos=False)
    one, _ = await timed_generate(eng, prompt, 1)
    many, res = await timed_generate(eng, prompt, new_tokens + 1)
    s = res.stats
    decode_wall = many - one
    figure: dict[str, Any] = {
        "tokens_per_second": round(new_tokens / decode_wall, 3) if decode_wall > 0 else None,
        "engine_decode_tokens_per_second": round(s["decode_tokens_per_second"], 3),
        "hit_rate": round(s["decode_hit_rate"], 4),
        "bytes_loaded_per_token": round(s["decode_bytes_loaded_per_token"]),
        "stall_seconds_per_token": round(s["decode_stall_seconds_per_token"], 5),
        "overlap_fraction": s.get("decode_overlap_fraction"),
        "h2d_gb_per_second": round(s["bytes_loaded"] / many / 1e9, 3),
    }
    refused = [r for r in (
        physics.refusal("request bytes_loaded / wall seconds", s["bytes_loaded"], many, peak),
        physics.refusal("request bytes_loaded / engine seconds", s["bytes_loaded"], s["seconds"], peak),
        physics.refusal("decode bytes_loaded / decode seconds", max(0, s["decode_bytes_loaded"] - straddle),
                        s["decode_seconds"], peak),
    ) if r]
    if refused:  # a result that breaks physics is not printed as one
        return {"refused": refused}
    return figure


def accelerate_decode(model: Path, budget_bytes: int, new_tokens: int, prompt: list[int]) -> float:
    """transformers + accelerate: modules that do not fit `budget_bytes` of GPU stay on the CPU and
    are copied in for every forward (accelerate's offload hooks). Decode tokens/s by wall clock."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        model, dtype=torch.bfloat16, device_map="auto",
        max_memory={0: budget_bytes, "cpu": 120 << 30},
    ).eval()
    ids = torch.tensor([prompt], device="cuda")

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - started

    try:
        timed(2)
        return new_tokens / max(1e-9, timed(new_tokens + 1) - timed(1))
    finally:
        del hf
        gc.collect()
        torch.cuda.empty_cache()


async def _decode(model: Path, new_tokens: int, peak: float, **options: Any) -> tuple[dict[str, Any], int]:
    async with Engine.open(model, device="cuda", **options) as eng:
        figure = await wall_decode(eng, prompt_ids(32, 30000), new_tokens, peak)
        return figure, eng.plan.budget_bytes


def _ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 3) if isinstance(a, float) and isinstance(b, float) and b > 0 else None


def run_gpu(quick: bool = False) -> int:
    if not (_core.cuda_available() and torch.cuda.is_available()):
        print(json.dumps({"skipped": "no CUDA device"}))
        return 0
    work = ROOT / ".artifacts" / "gpu"
    peak = physics.pinned_h2d_peak()
    new_tokens = 16 if quick else 48
    models = [
        ("mixtral-8x7b-shaped", "mixtral", dict(MIXTRAL_8X7B, num_hidden_layers=2 if quick else 4), "int4"),
        ("olmoe-1b-7b-shaped", "olmoe", OLMOE_1B_7B, None),
    ]
    for name, arch, shape, precision in models:
        path = work / name
        if not (path / "config.json").exists():
            synthesize(path, arch, "small", dtype=torch.bfloat16, progress=False, device="cuda", **shape)
        options = {"precision": precision} if precision else {}
        for budget in ("25%", "50%"):
            ours, budget_bytes = asyncio.run(_decode(path, new_tokens, peak, expert_budget=budget, **options))
            on_demand, _ = asyncio.run(_decode(path, new_tokens, peak, expert_budget=budget, prefetch="none",
                                               policy="lru", **options))
            acc = accelerate_decode(path, budget_bytes, max(4, new_tokens // 4), prompt_ids(32, 30000))
            print(json.dumps({
                "model": name, "precision": precision or "bfloat16", "budget": budget,
                "device": torch.cuda.get_device_name(), **ours,
                "peak_pinned_gb_per_second": round(peak / 1e9, 3),
                "vs_accelerate_offload": _ratio(ours.get("tokens_per_second"), acc),
                "vs_on_demand_lru": _ratio(ours.get("tokens_per_second"), on_demand.get("tokens_per_second")),
                "accelerate_tokens_per_second": round(acc, 3),
                "on_demand": on_demand,
            }), flush=True)
    return 0
