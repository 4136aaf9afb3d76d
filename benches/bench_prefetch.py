"""Prefetch benchmark: every predictor, with lru and the best other policy, at 25% and 50% budgets.

    python benches/bench_prefetch.py [--quick]

Models: the trained OLMoE-style model (benches/models/olmoe-stdlib, real routing) and the
synthesized small Mixtral (random routing; synthesized into .artifacts/ when missing). The store is
read with O_DIRECT. The ExpertFlow predictor of each model is trained first on routing traces of
prompts from the corpus's train split; all measured prompts come from the held-out split.

Prints one JSON line per configuration, then
{"summary": {"best_stall_vs_none": ..., "half_budget_vs_full": ..., ...}} where
best_stall_vs_none is the best configuration's decode stall per token (the one stalling least)
over prefetch="none"'s at the same budget and policy, and half_budget_vs_full the best 50%-budget
tokens/s over the full-budget tokens/s, both on the trained model in this run. The fastest
configuration's stall ratio is reported beside it. --quick runs a reduced sweep (fewer tokens, and
the "best other policy" chosen once on the trained model) with the same summary line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moeflow import Engine, corpus  # noqa: E402
from moeflow.scheduling.traces import TraceHeader  # noqa: E402
from moeflow.config import POLICIES  # noqa: E402
from moeflow.models.synth import synthesize  # noqa: E402
from moeflow.scheduling import expertflow  # noqa: E402
from moeflow.session import model_signature  # noqa: E402

PREDICTORS = ("none", "last-token", "gate-lookahead", "eam", "expertflow")


def prompts(split: str, count: int, chars: int = 240) -> list[str]:
    return corpus.snippets(split, count, chars)


async def train_predictor(model: Path, train_prompts: list[str], new_tokens: int, epochs: int) -> dict[str, float]:
    async with Engine.open(model, device="cpu", prefetch="none") as eng:
        s = eng.session
        header = TraceHeader(model_signature(s.checkpoint, s.arch), s.arch.moe_layers, s.arch.num_experts, s.arch.top_k)
        traces = [await eng.trace(_ids(eng, p), new_tokens) for p in train_prompts]
        vocab = s.arch.vocab_size
    net, metrics = expertflow.train(traces, header, vocab, epochs=epochs, progress=False)
    expertflow.save(net, model, metrics)
    return metrics


def _ids(eng: Engine, text: str) -> list[int]:
    if eng.session.tokenizer is not None:
        return eng.encode(text)[:64]
    return [(ord(c) * 7 + 3) % eng.session.arch.vocab_size for c in text[:64]]


async def measure(model: Path, test_prompts: list[str], new_tokens: int, **options: Any) -> dict[str, Any]:
    async with Engine.open(model, device="cpu", **options) as eng:
        for p in test_prompts[:2]:  # warm-up: code paths, EAM history, policy statistics
            await eng.generate(_ids(eng, p), 8, stop_at_eos=False)
        before = eng.stats()
        tokens = decode = stall = loaded = 0.0
        for p in test_prompts[2:]:
            res = await eng.generate(_ids(eng, p), new_tokens, stop_at_eos=False)
            s = res.stats
            tokens += s["tokens"] - 1
            decode += s["decode_seconds"]
            stall += s["decode_stall_seconds"]
            loaded += s["decode_bytes_loaded"]
        after = eng.stats()
        uses = sum(after[k] - before[k] for k in ("hits", "inflight_hits", "misses"))  # prefill included
        return {
            "tokens_per_second": round(tokens / decode, 3) if decode else 0.0,
            "stall_seconds_per_token": round(stall / tokens, 6) if tokens else 0.0,
            "hit_rate": round((after["hits"] - before["hits"]) / uses, 4) if uses else 0.0,
            "bytes_loaded_per_token": round(loaded / tokens) if tokens else 0,
            # a prefetch_depth of 1 reports no second layer
            **{f"{m}_{d}_ahead": after.get(f"{m}_{d}_ahead", 0.0) for d in (1, 2) for m in ("precision", "recall")},
            "precision_next_token": after["precision_next_token"],
            "recall_next_token": after["recall_next_token"],
            "prefetch_issued": after["prefetch_issued"] - before["prefetch_issued"],
            "prefetch_used": after["prefetch_used"] - before["prefetch_used"],
            "prefetch_wasted": after["prefetch_wasted"] - before["prefetch_wasted"],
            "overlap_fraction": after["overlap_fraction"],
        }


def emit(line: dict[str, Any]) -> None:
    print(json.dumps(line), flush=True)


def run_model(name: str, model: Path, args: argparse.Namespace, policies_for: dict[str, list[str]]) -> dict[str, Any]:
    test = prompts("heldout", 2 + args.prompts)
    started = time.perf_counter()
    metrics = asyncio.run(train_predictor(model, prompts("train", args.train_prompts), args.new_tokens, args.epochs))
    emit({"model": name, "predictor_training": metrics, "seconds": round(time.perf_counter() - started, 1)})
    full = asyncio.run(measure(model, test, args.new_tokens, expert_budget="100%", prefetch="none"))
    emit({"model": name, "budget": "100%", "predictor": "none", "policy": "lru", **full})
    results: dict[tuple[str, str, str], dict[str, Any]] = {}
    for budget in ("25%", "50%"):
        for predictor in PREDICTORS:
            for policy in policies_for[predictor]:
                r = asyncio.run(
                    measure(model, test, args.new_tokens, expert_budget=budget, prefetch=predictor, policy=policy,
                            direct_io="require")
                )
                results[(budget, predictor, policy)] = r
                emit({"model": name, "budget": budget, "predictor": predictor, "policy": policy, **r})
    summary: dict[str, Any] = {"full_budget_tokens_per_second": full["tokens_per_second"]}
    for budget in ("25%", "50%"):
        tag = budget.rstrip("%")
        cands = {k: v for k, v in results.items() if k[0] == budget}
        fastest = max(cands, key=lambda k: cands[k]["tokens_per_second"])
        prefetching = {k: v for k, v in cands.items() if k[1] != "none"}
        least_stall = min(prefetching, key=lambda k: prefetching[k]["stall_seconds_per_token"])

        def vs_none(key: tuple[str, str, str]) -> float | None:
            none = results[(budget, "none", key[2])]["stall_seconds_per_token"]
            return round(cands[key]["stall_seconds_per_token"] / none, 4) if none else None

        summary[f"fastest_{tag}"] = {"predictor": fastest[1], "policy": fastest[2], **cands[fastest]}
        summary[f"least_stall_{tag}"] = {"predictor": least_stall[1], "policy": least_stall[2], **cands[least_stall]}
        summary[f"best_stall_vs_none_{tag}"] = vs_none(least_stall)
        summary[f"fastest_stall_vs_none_{tag}"] = vs_none(fastest)
        summary[f"budget_{tag}_vs_full"] = round(cands[fastest]["tokens_per_second"] / full["tokens_per_second"], 4)
    return summary


def best_other_policy(model: Path, args: argparse.Namespace) -> str:
    """Quick mode: pick the non-LRU policy with the best tokens/s under gate lookahead at 25%."""
    test = prompts("heldout", 2 + max(2, args.prompts // 2))
    scores = {}
    for policy in POLICIES:
        if policy != "lru":
            r = asyncio.run(measure(model, test, args.new_tokens // 2, expert_budget="25%", prefetch="gate-lookahead",
                                    policy=policy, direct_io="require"))
            scores[policy] = r["tokens_per_second"]
    best = max(scores, key=lambda p: scores[p])
    emit({"policy_sweep": scores, "chosen": best})
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced sweep (< 15 minutes here), same summary line")
    ap.add_argument("--mixtral", default=None, help="small Mixtral checkpoint (default: synthesize into .artifacts)")
    args = ap.parse_args()
    args.prompts = 3 if args.quick else 6
    args.new_tokens = 24 if args.quick else 48
    args.train_prompts = 24 if args.quick else 64
    args.epochs = 10 if args.quick else 30
    torch.set_num_threads(2)

    work = ROOT / ".artifacts" / "bench-prefetch"
    trained = work / "olmoe-stdlib"
    if trained.exists():
        shutil.rmtree(trained)
    shutil.copytree(ROOT / "benches" / "models" / "olmoe-stdlib", trained)
    mixtral = Path(args.mixtral) if args.mixtral else ROOT / ".artifacts" / "mixtral-small"
    if not (mixtral / "config.json").exists():
        synthesize(mixtral, "mixtral", "small", progress=False)

    if args.quick:
        other = best_other_policy(trained, args)
        policies_for = {p: ["lru", other] for p in PREDICTORS}
    else:
        policies_for = {p: list(POLICIES) for p in PREDICTORS}
    summary: dict[str, Any] = {}
    trained_summary = run_model("trained-olmoe", trained, args, policies_for)
    mixtral_summary = run_model("mixtral-small", mixtral, args, policies_for)
    summary["best_stall_vs_none"] = trained_summary["best_stall_vs_none_50"]
    summary["half_budget_vs_full"] = trained_summary["budget_50_vs_full"]
    summary["best_stall_vs_none_25"] = trained_summary["best_stall_vs_none_25"]
    summary["quarter_budget_vs_full"] = trained_summary["budget_25_vs_full"]
    summary["trained"] = trained_summary
    summary["mixtral_small"] = mixtral_summary
    summary["quick"] = args.quick
    emit({"summary": summary})


if __name__ == "__main__":
    main()
