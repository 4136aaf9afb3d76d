"""Quality and speed of quantized experts, and of HOBBIT's mixed precision on a miss.

    python benches/bench_quality.py [--model DIR] [--quick]

On the trained model (benches/models/olmoe-stdlib: real routing, real text), in one run:
  - each expert format (int8-g64, int4-g64, int2-g32) with every expert in that format, against
    the unquantized model on the test prompts: mean KL(p_ref || p_q) of the next-token
    distributions, top-1 agreement, and perplexity on a held-out text (the corpus's held-out split);
  - miss_precision (HOBBIT, T1 0.6 / T2 0.9, int4 copies) at a 25% budget: the same quality
    figures, plus decode tokens/s against the exact engine at the same budget and the share of
    expert uses served by a low-precision copy or skipped.
Prints one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moeflow import Engine, corpus  # noqa: E402

PRECISIONS = ("int8-g64", "int4-g64", "int2-g32")


async def teacher_forced(model: Path, samples: list[list[int]], stepwise: bool, **options: Any) -> list[torch.Tensor]:
    async with Engine.open(model, device="cpu", **options) as eng:
        return [await eng.score(ids, stepwise=stepwise) for ids in samples]


def compare(ref: list[torch.Tensor], got: list[torch.Tensor], samples: list[list[int]]) -> dict[str, float]:
    kls, agree, nll, count = [], 0, 0.0, 0
    for r, g, ids in zip(ref, got, samples, strict=True):
        p_ref, logp_g = torch.log_softmax(r, -1), torch.log_softmax(g, -1)
        kls.append(float((p_ref.exp() * (p_ref - logp_g)).sum(-1).mean()))
        agree += int((r.argmax(-1) == g.argmax(-1)).sum())
        targets = torch.tensor(ids[1:])
        nll -= float(logp_g[:-1].gather(1, targets[:, None]).sum())
        count += len(ids) - 1
    return {
        "mean_kl": round(sum(kls) / len(kls), 5),
        "top1_agreement": round(agree / sum(len(s) for s in samples), 4),
        "perplexity": round(math.exp(nll / count), 3),
    }


async def decode_speed(model: Path, prompts: list[list[int]], new_tokens: int, **options: Any) -> dict[str, float]:
    async with Engine.open(model, device="cpu", **options) as eng:
        await eng.generate(prompts[0], 8, stop_at_eos=False)
        tokens = seconds = 0.0
        for ids in prompts[1:]:
            res = await eng.generate(ids, new_tokens, stop_at_eos=False)
            tokens += res.stats["tokens"] - 1
            seconds += res.stats["decode_seconds"]
        s = eng.stats()
        uses = s["hits"] + s["misses"] + s["low_precision_uses"] + s["skipped_experts"]
        return {
            "tokens_per_second": round(tokens / seconds, 2),
            "low_precision_share": round(s["low_precision_uses"] / uses, 4) if uses else 0.0,
            "skipped_share": round(s["skipped_experts"] / uses, 4) if uses else 0.0,
        }


async def main_async(args: argparse.Namespace) -> None:
    model = Path(args.model)
    async with Engine.open(model, device="cpu") as eng:
        encode = eng.encode
        test = [encode(t)[: args.tokens] for t in corpus.snippets("heldout", args.samples, 2000)]
    ref = await teacher_forced(model, test, False, expert_budget="100%")
    for precision in PRECISIONS:
        got = await teacher_forced(model, test, False, expert_budget="100%", precision=precision)
        print(json.dumps({"format": precision, "experts": "all", **compare(ref, got, test)}), flush=True)
    print(json.dumps({"format": "bfloat16", "experts": "all", **compare(ref, ref, test)}), flush=True)

    budget = "25%"
    exact_step = await teacher_forced(model, test, True, expert_budget=budget)
    mixed_step = await teacher_forced(model, test, True, expert_budget=budget, miss_precision="int4")
    prompts = [ids[:48] for ids in test]
    exact = await decode_speed(model, prompts, args.new_tokens, expert_budget=budget, direct_io="require")
    mixed = await decode_speed(model, prompts, args.new_tokens, expert_budget=budget, direct_io="require",
                               miss_precision="int4")
    print(json.dumps({
        "format": "miss_precision=int4 (HOBBIT T1 0.6, T2 0.9)",
        "budget": budget,
        **compare(exact_step, mixed_step, test),
        "exact_tokens_per_second": exact["tokens_per_second"],
        "mixed_tokens_per_second": mixed["tokens_per_second"],
        "speedup": round(mixed["tokens_per_second"] / exact["tokens_per_second"], 3),
        "low_precision_share": mixed["low_precision_share"],
        "skipped_share": mixed["skipped_share"],
    }), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "benches" / "models" / "olmoe-stdlib"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    args.samples = 3 if args.quick else 8
    args.tokens = 128 if args.quick else 256
    args.new_tokens = 24 if args.quick else 64
    torch.set_num_threads(2)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
