"""`moeflow run` (text streamed as it comes, after a one-line plan) and `moeflow bench` (llama-bench-style repeats)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from moeflow.cli_checks import at_least, checkpoint_dir, engine_options, flagged
from moeflow.errors import ConfigError, InvalidRequest


def _prompt(args: argparse.Namespace) -> str | list[int]:
    if args.prompt is not None and args.prompt_ids is not None:
        raise ConfigError("give --prompt TEXT or --prompt-ids 1,2,3, not both")
    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--prompt-ids {args.prompt_ids!r}: expected comma-separated integers") from None
        if not ids:
            raise ConfigError(f"--prompt-ids {args.prompt_ids!r}: no token ids")
        return ids
    if not args.prompt:
        raise ConfigError("no prompt: give --prompt TEXT or --prompt-ids 1,2,3")
    return str(args.prompt)


SAMPLING = ("temperature", "top_k", "top_p", "seed", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty")


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The run's sampling keywords for generate / stream_steps, checked now by the engine's own
    SamplingParams (a ConfigError naming the flag); left-out options take generation_config.json's."""
    from moeflow.runtime.sampling import SamplingParams  # imports torch: after --help, before the model

    at_least(args, "max_new_tokens", 1)
    given = {name: getattr(args, name) for name in SAMPLING if getattr(args, name) is not None}
    try:
        SamplingParams(**given)
    except InvalidRequest as e:
        raise ConfigError(flagged(str(e), given)) from e
    return {**given, "stop": args.stop, "stop_at_eos": not args.ignore_eos}


async def _stream(eng: Any, prompt: str | list[int], args: argparse.Namespace, out: TextIO) -> dict[str, Any]:
    """Write the text (or token ids, without a tokenizer) to `out` as each token comes, flushed;
    the figures of the stream: tokens, seconds to the first token, decode tokens/s, finish."""
    has_text = eng.session.tokenizer is not None
    started = time.perf_counter()
    first = last = started
    count = 0
    finish = "length"
    steps = eng.stream_steps(prompt, args.max_new_tokens, **sampling(args))
    async with contextlib.aclosing(steps):
        async for step in steps:
            count += 1
            last = time.perf_counter()
            if count == 1:
                first = last
            out.write(step.text if has_text else f"{step.token} ")
            out.flush()
            finish = step.finish_reason or finish
    out.write("\n")
    out.flush()
    decode = last - first
    return {"tokens": count, "first_token_seconds": first - started, "finish_reason": finish,
            "decode_tokens_per_second": (count - 1) / decode if count > 1 and decode > 0 else 0.0}


async def _run(args: argparse.Namespace, path: Path, prompt: str | list[int], options: dict[str, Any]) -> int:
    from moeflow.api import Engine

    async with Engine.open(path, **options) as eng:
        if args.json:
            res = await eng.generate(prompt, args.max_new_tokens, **sampling(args))
            print(json.dumps({
                "tokens": res.tokens,
                **({"text": res.text} if res.text is not None else {}),
                "prompt_tokens": len(res.prompt_tokens),
                "finish_reason": res.finish_reason,
                "plan": eng.session.plan_report(),
                "request": res.stats.as_dict(),
                "stats": eng.stats().as_dict(),
            }))
            return 0
        print(eng.session.plan_line(), file=sys.stderr, flush=True)
        figures = await _stream(eng, prompt, args, sys.stdout)
        stats = eng.stats()
        print(f"[{figures['tokens']} tokens ({figures['finish_reason']}), first token "
              f"{figures['first_token_seconds']:.2f}s, {figures['decode_tokens_per_second']:.2f} tok/s decode, "
              f"hit rate {stats['hit_rate']:.2f}, stall {stats['stall_seconds']:.3f}s]", file=sys.stderr)
        return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Check every argument, then load the model, print the plan and stream the text."""
    prompt = _prompt(args)
    options = engine_options(args)
    path = checkpoint_dir(args.model)  # before sampling's check, which imports torch (seconds)
    sampling(args)
    if not (path / "tokenizer.json").is_file():
        needs = "--prompt TEXT" if isinstance(prompt, str) else "--stop" if args.stop else None
        if needs:
            raise ConfigError(f"{needs} needs the checkpoint's tokenizer.json, which {path} lacks; "
                              "give the prompt as --prompt-ids 1,2,3 (the output is then token ids)")
    return asyncio.run(_run(args, path, prompt, options))


# ---- bench ---------------------------------------------------------------------------------------

def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value), as llama-bench reports them."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


async def _bench(args: argparse.Namespace, path: Path, options: dict[str, Any]) -> dict[str, Any]:
    from moeflow.api import Engine

    async with Engine.open(path, **options) as eng:
        prompt = [(7 * i + 3) % eng.session.arch.vocab_size for i in range(args.prompt_len)]
        if not args.json:
            print(eng.session.plan_line(), file=sys.stderr, flush=True)
        # greedy whatever generation_config.json says: the runs time the same tokens
        await eng.generate(prompt, args.max_new_tokens, temperature=0.0, stop_at_eos=False)  # warm-up, not counted
        runs = []
        for _ in range(args.repetitions):
            s = (await eng.generate(prompt, args.max_new_tokens, temperature=0.0, stop_at_eos=False)).stats
            runs.append({
                "prefill_tokens_per_second": args.prompt_len / s["prefill_seconds"] if s["prefill_seconds"] else 0.0,
                "decode_tokens_per_second": s["decode_tokens_per_second"],
                "prefill_seconds": s["prefill_seconds"],
                "decode_seconds": s["decode_seconds"],
                "hit_rate": s["hit_rate"],
                "decode_hit_rate": s["decode_hit_rate"],
                "bytes_loaded_per_token": s["bytes_loaded_per_token"],
                "stall_seconds_per_token": s["stall_seconds_per_token"],
            })
        out: dict[str, Any] = {
            "model": str(args.model),
            "expert_budget": str(eng.config.expert_budget),
            "budget_bytes": eng.plan.budget_bytes,
            "expert_slots": eng.plan.slots,
            "experts_total": eng.plan.experts_total,
            "device": eng.session.device,
            "prompt_tokens": args.prompt_len,
            "new_tokens": args.max_new_tokens,
            "repetitions": args.repetitions,
        }
        for key in ("prefill_tokens_per_second", "decode_tokens_per_second", "decode_hit_rate"):
            mean, sd = mean_sd([r[key] for r in runs])
            out[key], out[f"{key}_sd"] = mean, sd
        out["runs"] = runs
        out["stats"] = eng.stats().as_dict()
        return out


def bench_table(result: dict[str, Any]) -> str:
    """The result as llama-bench prints it: one markdown row per test, t/s as mean ± sd."""
    model = Path(result["model"]).name or result["model"]
    rows = [(model, result["expert_budget"], result["device"], f"pp{result['prompt_tokens']}",
             f"{result['prefill_tokens_per_second']:.2f} ± {result['prefill_tokens_per_second_sd']:.2f}"),
            (model, result["expert_budget"], result["device"], f"tg{result['new_tokens']}",
             f"{result['decode_tokens_per_second']:.2f} ± {result['decode_tokens_per_second_sd']:.2f}")]
    head = ("model", "budget", "device", "test", "t/s")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "| " + " | ".join("-" * w if i == 0 else "-" * (w - 1) + ":" for i, w in enumerate(widths)) + " |"
    return "\n".join([line(head), rule, *(line(r) for r in rows)])


def cmd_bench(args: argparse.Namespace) -> int:
    at_least(args, "max_new_tokens", 2)  # decode speed needs a token after the first
    at_least(args, "prompt_len", 1)
    at_least(args, "repetitions", 1)
    options = engine_options(args)
    result = asyncio.run(_bench(args, checkpoint_dir(args.model), options))
    if args.json:
        print(json.dumps(result))
        return 0
    print(bench_table(result))
    print(f"\n{result['repetitions']} runs after 1 warm-up; decode hit rate {result['decode_hit_rate']:.2f} ± "
          f"{result['decode_hit_rate_sd']:.2f}; {result['expert_slots']} of {result['experts_total']} expert slots")
    return 0
