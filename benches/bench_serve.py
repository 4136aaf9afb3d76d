"""The HTTP server against the engine it serves: what streaming clients cost, in the same run.

    python benches/bench_serve.py [--clients 32] [--new-tokens 32] [--budget 25%] [--rounds 3]

On the trained model (benches/models/olmoe-stdlib, copied to .artifacts), `--clients` held-out
prompts run through `Engine.generate_batch` (the baseline), then as as many concurrent
streaming clients of `/v1/completions` on a live uvicorn server over the same engine (greedy,
so both give the same tokens), `--rounds` times alternately. Prints one JSON line:
  serve_vs_generate_batch   aggregate tokens/s of the clients over the baseline's, in the median
                            round (goal >= 0.9); every round's in serve_vs_generate_batch_rounds;
  ttft_p50/p95_seconds      from a client's request to its first text;
  itl_p50/p95_seconds       between a client's consecutive text events;
  outputs_equal             every client's text equals the baseline's for its prompt.
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

import httpx  # noqa: E402

from benches.bench_batch import heldout_prompts  # noqa: E402
from moeflow import Engine  # noqa: E402
from moeflow.serve import create_app  # noqa: E402
from moeflow.serve.server import running  # noqa: E402


async def client(http: httpx.AsyncClient, prompt: str, new_tokens: int) -> dict[str, Any]:
    # ignore_eos: the same work as the generate_batch baseline (stop_at_eos=False), token for token
    body = {"model": "olmoe-stdlib", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    stamps: list[float] = []
    text, tokens = "", 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[len("data: "):])
            if event["choices"] and event["choices"][0]["text"]:
                stamps.append(time.perf_counter())
                text += event["choices"][0]["text"]
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"started": started, "stamps": stamps, "text": text, "tokens": tokens}


def quantile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


async def _round(eng: Engine, http: httpx.AsyncClient, prompts: list[str], new_tokens: int
                 ) -> tuple[float, float, list[Any], list[dict[str, Any]]]:
    """One baseline pass then one served pass over the same prompts: tokens/s of each, and their outputs."""
    started = time.perf_counter()
    baseline = await eng.generate_batch(prompts, new_tokens, temperature=0.0, stop_at_eos=False)
    batch_tps = sum(len(r.tokens) for r in baseline) / (time.perf_counter() - started)
    started = time.perf_counter()
    served = await asyncio.gather(*(client(http, p, new_tokens) for p in prompts))
    serve_tps = sum(s["tokens"] for s in served) / (time.perf_counter() - started)
    return batch_tps, serve_tps, baseline, served


async def run(args: argparse.Namespace) -> dict[str, Any]:
    model = ROOT / ".artifacts" / "bench-serve" / "olmoe-stdlib"
    if not model.exists():  # a copy: the bench's stores do not go into the repository
        shutil.copytree(ROOT / "benches" / "models" / "olmoe-stdlib", model)
    prompts = heldout_prompts(args.clients)
    rounds = []
    async with Engine.open(model, expert_budget=args.budget, device="cpu") as eng:
        await eng.generate(prompts[0], 4, stop_at_eos=False)  # warm up
        async with running(create_app(eng, model_name="olmoe-stdlib")) as url:
            limits = httpx.Limits(max_connections=args.clients)
            async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
                # Alternating rounds: a machine that slows down for a while hits both sides.
                for _ in range(args.rounds):
                    rounds.append(await _round(eng, http, prompts, args.new_tokens))
    ratios = [serve / batch for batch, serve, _, _ in rounds]
    median = sorted(range(len(rounds)), key=lambda i: ratios[i])[len(rounds) // 2]
    batch_tps, serve_tps, baseline, served = rounds[median]
    ttft = [s["stamps"][0] - s["started"] for s in served if s["stamps"]]
    itl = [b - a for s in served for a, b in zip(s["stamps"], s["stamps"][1:])]
    return {
        "model": "olmoe-stdlib", "budget": args.budget, "clients": args.clients, "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "generate_batch_tokens_per_second": round(batch_tps, 2),
        "serve_tokens_per_second": round(serve_tps, 2),
        "serve_vs_generate_batch": round(ratios[median], 3),  # the median round's
        "serve_vs_generate_batch_rounds": [round(r, 3) for r in ratios],
        "ttft_p50_seconds": round(quantile(ttft, 50), 4), "ttft_p95_seconds": round(quantile(ttft, 95), 4),
        "itl_p50_seconds": round(quantile(itl, 50), 4), "itl_p95_seconds": round(quantile(itl, 95), 4),
        "outputs_equal": all([s["text"] for s in served] == [r.text for r in baseline]
                             for _, _, baseline, served in rounds),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--rounds", type=int, default=3, help="alternating baseline/served rounds; the median is reported")
    print(json.dumps(asyncio.run(run(ap.parse_args()))))


if __name__ == "__main__":
    main()
