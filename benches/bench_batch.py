"""Batch throughput: continuous batching against the same prompts run one at a time, in the same run.

    python benches/bench_batch.py [--prompts 64] [--new-tokens 64] [--models trained,mixtral]
                                  [--budget 25%] [--streams 32] [--dtype float32] [--only regroup]
                                  [--device sim --sim-bandwidth-gbps 1]

For each model (the trained OLMoE-style benches/models/olmoe-stdlib, and the synthesized small
Mixtral), at the budget with the store read with O_DIRECT, on held-out corpus prompts:
  throughput_vs_sequential       generated tokens/s of Engine.generate_batch over the same prompts
                                 generated one at a time (each run on a freshly opened engine);
  bytes_per_token_vs_sequential  expert bytes loaded per generated token, batched over sequential;
  p50/p95_inter_token_seconds    the gaps between consecutive tokens of `--streams` concurrent
                                 streams (all started together);
  batched/sequential steps and the outputs' equality (greedy: every prompt's tokens must match);
  regrouping_vs_fifo             tokens/s with token regrouping (batch_order='regroup') over plain
                                 continuous batching in arrival order ('fifo'), the same prompts
                                 with `--regroup-batch` (16) sequences a step, so that more wait
                                 than a step takes and the order matters; with the p95 gap between
                                 a stream's tokens under each (regrouping bounds every wait);
                                 regrouped_split_steps / _sent_ahead count the resident-first
                                 steps, and unsplit_* is regrouping without them, in the same run.
Prints one JSON line per model, then {"summary": ...}. `--only regroup` runs only the last
comparison (its outputs checked against each other, not against sequential runs). `--device sim`
runs on the simulated GPU (experts copied over a link of `--sim-bandwidth-gbps`), a setting where
loading, not the CPU's matmuls, takes the time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moeflow import Engine, corpus  # noqa: E402
from moeflow.models.synth import synthesize  # noqa: E402


def heldout_prompts(count: int, chars: int = 240) -> list[str]:
    """`count` held-out prompts: consecutive windows of `chars` characters of the held-out
    documents (the split has fewer long documents than a batch of 64)."""
    out: list[str] = []
    for doc in corpus.documents("heldout"):
        text = doc.strip()
        for start in range(0, len(text) - chars + 1, chars):
            out.append(text[start:start + chars])
            if len(out) == count:
                return out
    raise SystemExit(f"bench_batch: the held-out split has only {len(out)} prompts of {chars} characters")


def prompt_ids(eng: Engine, texts: list[str]) -> list[list[int]]:
    if eng.session.tokenizer is not None:
        return [eng.encode(t)[:64] for t in texts]
    vocab = eng.session.arch.vocab_size
    return [[(ord(c) * 7 + 3) % vocab for c in t[:64]] for t in texts]


async def sequential(model: Path, texts: list[str], new_tokens: int, options: dict[str, Any]) -> dict[str, Any]:
    async with Engine.open(model, **options) as eng:
        ids = prompt_ids(eng, texts)
        steps, before = eng.session.steps, eng.stats()["bytes_loaded"]
        started = time.perf_counter()
        outs = [(await eng.generate(p, new_tokens, stop_at_eos=False)).tokens for p in ids]
        seconds = time.perf_counter() - started
        return {"outs": outs, "seconds": seconds, "steps": eng.session.steps - steps,
                "bytes": eng.stats()["bytes_loaded"] - before}


async def batched(model: Path, texts: list[str], new_tokens: int, options: dict[str, Any]) -> dict[str, Any]:
    async with Engine.open(model, **options) as eng:
        ids = prompt_ids(eng, texts)
        steps, before = eng.session.steps, eng.stats()["bytes_loaded"]
        started = time.perf_counter()
        results = await eng.generate_batch(ids, new_tokens, stop_at_eos=False)
        seconds = time.perf_counter() - started
        return {"outs": [r.tokens for r in results], "seconds": seconds, "steps": eng.session.steps - steps,
                "bytes": eng.stats()["bytes_loaded"] - before}


async def ordered(model: Path, texts: list[str], new_tokens: int, options: dict[str, Any]) -> dict[str, Any]:
    """generate_batch under `options` (batch_order, max_batch_sequences): tokens/s, outputs and
    each token's gap to the previous one of its request, from the streams' arrival times."""
    resident_first = options.pop("resident_first", True)
    async with Engine.open(model, **options) as eng:
        ids = prompt_ids(eng, texts)
        gaps: list[float] = []
        outs: list[list[int]] = [[] for _ in ids]
        batcher = eng._batcher
        assert batcher is not None
        batcher.resident_first = resident_first
        step_seconds: list[float] = []
        batcher.on_step = lambda record: step_seconds.append(record.seconds)

        async def one(i: int) -> None:
            last = None
            async for tok in eng.stream(ids[i], new_tokens, stop_at_eos=False):
                outs[i].append(tok)
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now

        before = eng.stats()["bytes_loaded"]
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(ids))))
        seconds = time.perf_counter() - started
        return {"outs": outs, "tps": sum(map(len, outs)) / seconds, "bytes": eng.stats()["bytes_loaded"] - before,
                "p95_gap": statistics.quantiles(gaps, n=20)[18], "steps": batcher.steps,
                "p95_step": statistics.quantiles(step_seconds, n=20)[18],
                "split_steps": batcher.split_steps, "sent_ahead": batcher.sent_ahead,
                "early_loads": batcher.early_loads}


async def streams(model: Path, texts: list[str], new_tokens: int, options: dict[str, Any]) -> list[float]:
    """Gaps between consecutive tokens of every stream, all streams started together."""
    async with Engine.open(model, **options) as eng:
        ids = prompt_ids(eng, texts)
        gaps: list[float] = []

        async def one(p: list[int]) -> None:
            last = None
            async for _ in eng.stream(p, new_tokens, stop_at_eos=False):
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now

        await asyncio.gather(*(one(p) for p in ids))
        return gaps


def run_model(name: str, model: Path, args: argparse.Namespace) -> dict[str, Any]:
    texts = heldout_prompts(args.prompts)
    options = dict(device=args.device, expert_budget=args.budget, direct_io="require", prefetch="none")
    if args.device == "sim":
        options["sim_bandwidth_gbps"] = args.sim_bandwidth_gbps
    if args.dtype:
        options["dtype"] = args.dtype
    fifo = asyncio.run(ordered(model, texts, args.new_tokens,
                               dict(options, batch_order="fifo", max_batch_sequences=args.regroup_batch)))
    regrouped = asyncio.run(ordered(model, texts, args.new_tokens,
                                    dict(options, batch_order="regroup", max_batch_sequences=args.regroup_batch)))
    unsplit = asyncio.run(ordered(model, texts, args.new_tokens,
                                  dict(options, batch_order="regroup", max_batch_sequences=args.regroup_batch,
                                       resident_first=False)))
    compared = regrouping(fifo, regrouped, unsplit, args)
    if args.only == "regroup":
        return {"model": name, "budget": args.budget, "device": args.device, "dtype": args.dtype or "checkpoint",
                "prompts": len(texts), "new_tokens": args.new_tokens, **compared,
                "regrouped_outputs_equal": regrouped["outs"] == fifo["outs"] == unsplit["outs"]}
    seq = asyncio.run(sequential(model, texts, args.new_tokens, options))
    bat = asyncio.run(batched(model, texts, args.new_tokens, options))
    gaps = asyncio.run(streams(model, texts[: args.streams], args.new_tokens, options))
    tokens = sum(len(o) for o in bat["outs"])
    seq_tps, bat_tps = tokens / seq["seconds"], tokens / bat["seconds"]
    q = statistics.quantiles(gaps, n=20)
    return {
        "model": name,
        "budget": args.budget,
        "device": args.device,
        "dtype": args.dtype or "checkpoint",
        "prompts": len(texts),
        "new_tokens": args.new_tokens,
        "sequential_tokens_per_second": round(seq_tps, 2),
        "batched_tokens_per_second": round(bat_tps, 2),
        "throughput_vs_sequential": round(bat_tps / seq_tps, 3),
        "sequential_bytes_per_token": round(seq["bytes"] / tokens),
        "batched_bytes_per_token": round(bat["bytes"] / tokens),
        "bytes_per_token_vs_sequential": round(bat["bytes"] / seq["bytes"], 4) if seq["bytes"] else None,
        "sequential_steps": seq["steps"],
        "batched_steps": bat["steps"],
        "outputs_equal": bat["outs"] == seq["outs"],
        "streams": args.streams,
        "p50_inter_token_seconds": round(statistics.median(gaps), 5),
        "p95_inter_token_seconds": round(q[18], 5),
        **compared,
        "regrouped_outputs_equal": regrouped["outs"] == fifo["outs"] == unsplit["outs"] == seq["outs"],
    }


def regrouping(fifo: dict[str, Any], regrouped: dict[str, Any], unsplit: dict[str, Any],
               args: argparse.Namespace) -> dict[str, Any]:
    """The regrouping figures; `unsplit` is regrouping without resident-first steps (as before them)."""
    return {
        "regroup_batch": args.regroup_batch,
        "regrouping_vs_fifo": round(regrouped["tps"] / fifo["tps"], 3),
        "fifo_tokens_per_second": round(fifo["tps"], 2),
        "regrouped_tokens_per_second": round(regrouped["tps"], 2),
        "regrouped_bytes_vs_fifo": round(regrouped["bytes"] / fifo["bytes"], 4) if fifo["bytes"] else None,
        "fifo_p95_inter_token_seconds": round(fifo["p95_gap"], 5),
        "regrouped_p95_inter_token_seconds": round(regrouped["p95_gap"], 5),
        "fifo_p95_step_seconds": round(fifo["p95_step"], 5),
        "regrouped_p95_step_seconds": round(regrouped["p95_step"], 5),
        "unsplit_regrouped_p95_step_seconds": round(unsplit["p95_step"], 5),
        "regrouped_steps": regrouped["steps"],
        "regrouped_split_steps": regrouped["split_steps"],
        "regrouped_sent_ahead": regrouped["sent_ahead"],
        "regrouped_early_loads": regrouped["early_loads"],
        "unsplit_regrouping_vs_fifo": round(unsplit["tps"] / fifo["tps"], 3),
        "unsplit_regrouped_tokens_per_second": round(unsplit["tps"], 2),
        "unsplit_regrouped_p95_inter_token_seconds": round(unsplit["p95_gap"], 5),
        "unsplit_regrouped_steps": unsplit["steps"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--models", default="trained,mixtral")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--dtype", default=None, help="compute dtype (default the checkpoint's, bf16 for both models)")
    ap.add_argument("--regroup-batch", type=int, default=16, help="sequences a step for the regrouping comparison")
    ap.add_argument("--device", choices=("cpu", "sim"), default="cpu")
    ap.add_argument("--sim-bandwidth-gbps", type=float, default=1.0, help="the simulated link (--device sim)")
    ap.add_argument("--only", choices=("all", "regroup"), default="all",
                    help="'regroup': only the regrouping-vs-fifo comparison (minutes less)")
    args = ap.parse_args()
    work = ROOT / ".artifacts" / "bench-batch"
    lines = {}
    for name in args.models.split(","):
        if name == "trained":
            model = work / "olmoe-stdlib"
            if not model.exists():  # a copy: the bench's stores do not go into the repository
                shutil.copytree(ROOT / "benches" / "models" / "olmoe-stdlib", model)
        elif name == "mixtral":
            model = ROOT / ".artifacts" / "mixtral-small"
            if not (model / "config.json").exists():
                synthesize(model, "mixtral", "small", progress=False)
        else:
            raise SystemExit(f"bench_batch: unknown model {name!r} (trained, mixtral)")
        line = run_model(name, model, args)
        print(json.dumps(line), flush=True)
        lines[name] = line
    keys = ("throughput_vs_sequential", "bytes_per_token_vs_sequential", "p50_inter_token_seconds",
            "p95_inter_token_seconds", "outputs_equal", "regrouping_vs_fifo")
    print(json.dumps({"summary": {name: {k: line[k] for k in keys if k in line} for name, line in lines.items()}}))


if __name__ == "__main__":
    main()
