"""Decode speed of moeflow against transformers, and under 50% / 25% expert budgets.

    python benches/bench_decode.py [--model DIR] [--new-tokens 32] [--prefetch gate-lookahead]

On `moeflow synth --arch mixtral --size small` (about 1.4 GB of bf16 experts; synthesized into
.artifacts/ when --model is not given), in one run:
  - transformers' generate at full budget, and moeflow at full budget: `full_budget_vs_transformers`;
  - moeflow at 50% and 25% budgets with the store read with O_DIRECT: decode tokens/s, hit rate,
    bytes loaded per token, stall seconds per token (decode steps), and the I/O bound: bytes missed
    per token divided by the disk's O_DIRECT bandwidth measured (dd) on the store file in the same run.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moeflow import Engine  # noqa: E402
from moeflow.models.synth import synthesize  # noqa: E402


def dd_bandwidth(path: Path, runs: int = 2) -> float:
    """O_DIRECT read bandwidth of `path` in bytes/s (best of `runs`)."""
    best = 0.0
    for _ in range(runs):
        out = subprocess.run(
            ["dd", f"if={path}", "of=/dev/null", "bs=4M", "iflag=direct"], capture_output=True, text=True, check=True
        ).stderr
        m = re.search(r"(\d+) bytes .* copied, ([0-9.]+) s", out)
        if m:
            best = max(best, int(m.group(1)) / float(m.group(2)))
    return best


class TransformersDecode:
    """transformers' generate on the same checkpoint; decode time = generate(n+1) - generate(1)."""

    def __init__(self, model_dir: Path, prompt: list[int]) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
        self.ids = torch.tensor([prompt])

    def _timed(self, n: int) -> float:
        started = time.perf_counter()
        with torch.no_grad():
            self.model.generate(self.ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - started

    def tokens_per_second(self, new_tokens: int) -> float:
        return new_tokens / max(1e-9, self._timed(new_tokens + 1) - self._timed(1))


async def moeflow_decode(eng: Engine, prompt: list[int], new_tokens: int) -> dict[str, Any]:
    res = await eng.generate(prompt, new_tokens, stop_at_eos=False)
    s = res.stats
    return {  # decode steps only (the prefill step loads most experts of every layer)
        "tokens_per_second": round(s["decode_tokens_per_second"], 3),
        "hit_rate": round(s["decode_hit_rate"], 4),
        "bytes_loaded_per_token": round(s["decode_bytes_loaded_per_token"]),
        "stall_seconds_per_token": round(s["decode_stall_seconds_per_token"], 5),
    }


async def full_budget_vs_transformers(model_dir: Path, prompt: list[int], new_tokens: int, rounds: int) -> dict[str, Any]:
    """Both in one process, alternating round by round (the machine's memory bandwidth drifts
    over minutes); the best round of each is kept."""
    hf = TransformersDecode(model_dir, prompt)
    hf.tokens_per_second(2)  # warm-up
    ours: list[float] = []
    theirs: list[float] = []
    async with Engine.open(model_dir, device="cpu", expert_budget="100%") as eng:
        await eng.generate(prompt, 8, stop_at_eos=False)  # warm-up: every expert resident
        store = str(eng.session.store.data_path)
        for _ in range(rounds):
            theirs.append(hf.tokens_per_second(new_tokens))
            ours.append((await moeflow_decode(eng, prompt, new_tokens))["tokens_per_second"])
    del hf
    gc.collect()
    return {"ours": max(ours), "transformers": max(theirs), "store": store,
            "ours_rounds": ours, "transformers_rounds": [round(t, 3) for t in theirs]}


async def budget_run(
    model_dir: Path, prompt: list[int], new_tokens: int, rounds: int, budget: str, prefetch: str
) -> dict[str, Any]:
    async with Engine.open(model_dir, device="cpu", expert_budget=budget, direct_io="require", prefetch=prefetch) as eng:
        await eng.generate(prompt, 8, stop_at_eos=False)  # warm-up
        runs = [await moeflow_decode(eng, prompt, new_tokens) for _ in range(rounds)]
        best = max(runs, key=lambda r: r["tokens_per_second"])
        return {**best, "slots": eng.plan.slots, "experts_total": eng.plan.experts_total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: synthesize a small Mixtral)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds (best kept)")
    # Named, not "auto": a routing predictor left beside the model (bench_prefetch trains one)
    # would otherwise change what this benchmark measures.
    ap.add_argument("--prefetch", default="gate-lookahead",
                    help="predictor of the budgeted runs (default: the engine's default without a trained predictor)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model_dir = Path(args.model) if args.model else ROOT / ".artifacts" / "mixtral-small"
    if not (model_dir / "config.json").exists():
        synthesize(model_dir, "mixtral", "small", progress=False)
    prompt = [(31 * i + 7) % 1000 + 3 for i in range(args.prompt_len)]

    both = asyncio.run(full_budget_vs_transformers(model_dir, prompt, args.new_tokens, args.rounds))
    disk = dd_bandwidth(Path(both["store"]))
    result: dict[str, Any] = {
        "model": str(model_dir),
        "new_tokens": args.new_tokens,
        "transformers_tokens_per_second": round(both["transformers"], 3),
        "full_budget_tokens_per_second": both["ours"],
        "full_budget_vs_transformers": round(both["ours"] / both["transformers"], 3),
        "rounds": {"moeflow": both["ours_rounds"], "transformers": both["transformers_rounds"]},
        "disk_direct_gb_per_second": round(disk / 1e9, 3),
    }
    for label, budget in (("half", "50%"), ("quarter", "25%")):
        r = asyncio.run(budget_run(model_dir, prompt, args.new_tokens, args.rounds, budget, args.prefetch))
        bound = r["bytes_loaded_per_token"] / disk if disk else 0.0
        result[label] = {
            "budget": budget,
            "prefetch": args.prefetch,
            "tokens_per_second": r["tokens_per_second"],
            "vs_full_budget": round(r["tokens_per_second"] / both["ours"], 3),
            "hit_rate": r["hit_rate"],
            "bytes_loaded_per_token": r["bytes_loaded_per_token"],
            "stall_seconds_per_token": r["stall_seconds_per_token"],
            "io_bound_seconds_per_token": round(bound, 5),
            "slots": r["slots"],
            "experts_total": r["experts_total"],
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
