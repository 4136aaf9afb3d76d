"""`moeflow batch`: a prompt file (JSON lines or plain text) through one engine, with a progress bar, resumable."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moeflow.cli_checks import at_least, checkpoint_dir, readable_file, writable_file
from moeflow.jobs import Job, JobFileError, JobSummary, read_jobs, run_jobs


def add_parser(command: Callable[..., argparse.ArgumentParser],
               engine_args: Callable[[argparse.ArgumentParser], None],
               engine_options: Callable[[argparse.Namespace], dict[str, Any]]) -> None:
    """Add `batch`; `command(name, help, description=...)` makes a subcommand's parser."""
    p = command("batch", "generate for every prompt of a prompt file (resumable)",
                description="A .jsonl / .json input holds one JSON object per line: {\"prompt\": text or ids, "
                            "\"id\", \"max_new_tokens\", \"temperature\", \"top_k\", \"top_p\", \"seed\", "
                            "\"min_p\", \"repetition_penalty\", \"presence_penalty\", \"frequency_penalty\", "
                            "\"stop\", \"stop_at_eos\"}; any other file is plain text, one prompt per line. "
                            "Results are appended to --output as each prompt finishes, and a rerun skips those done.")
    engine_args(p)
    p.add_argument("--input", required=True,
                   help="prompts: .jsonl/.json = JSON lines, any other name = one plain-text prompt per line")
    p.add_argument("--output", required=True, help="JSONL of results (appended; reruns resume)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="for lines that give none")
    p.add_argument("--temperature", type=float, default=None, help="for lines that give none (default: 0, greedy)")
    p.add_argument("--concurrency", type=int, default=8, help="prompts in flight at once")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line, no progress bar")
    p.set_defaults(func=lambda args: cmd_batch(args, engine_options))


async def _batch(args: argparse.Namespace, path: Path, jobs: list[Job], bad: list[JobFileError],
                 options: dict[str, Any]) -> tuple[JobSummary, dict[str, Any]]:
    from tqdm import tqdm

    from moeflow.api import Engine

    defaults: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    if args.temperature is not None:
        defaults["temperature"] = args.temperature
    async with Engine.open(path, **options) as eng:
        if not args.json:
            print(eng.session.plan_line(), file=sys.stderr, flush=True)
        bar = tqdm(total=len(jobs) + len(bad), unit="prompt", disable=args.json, file=sys.stderr)

        def progress(summary: JobSummary, _: object) -> None:
            stats = eng.stats()
            bar.n = summary.skipped + summary.done + summary.failed
            bar.set_postfix(tok_s=f"{summary.tokens_per_second:.1f}", hit_rate=f"{stats['hit_rate']:.2f}",
                            failed=summary.failed, refresh=False)
            bar.refresh()

        try:
            summary = await run_jobs(eng, args.input, args.output, concurrency=args.concurrency, defaults=defaults,
                                     on_result=progress)
        finally:
            bar.close()
        return summary, eng.stats().as_dict()


def cmd_batch(args: argparse.Namespace, engine_options: Callable[[argparse.Namespace], dict[str, Any]]) -> int:
    """Check the arguments and read the whole input (a bad line is reported, not fatal) before the
    model loads; exit 1 when a line failed."""
    at_least(args, "max_new_tokens", 1)
    at_least(args, "temperature", 0)
    at_least(args, "concurrency", 1)
    jobs, bad = read_jobs(readable_file("--input", args.input))
    writable_file("--output", args.output)
    options = engine_options(args)
    summary, stats = asyncio.run(_batch(args, checkpoint_dir(args.model), jobs, bad, options))
    line = {"total": summary.total, "done": summary.done, "skipped": summary.skipped, "failed": summary.failed,
            "tokens": summary.tokens, "seconds": round(summary.seconds, 3),
            "tokens_per_second": round(summary.tokens_per_second, 2), "hit_rate": round(stats["hit_rate"], 4),
            "output": str(args.output)}
    if args.json:
        print(json.dumps(line))
    else:
        print(f"{summary.done} done, {summary.skipped} already done, {summary.failed} failed "
              f"({summary.tokens} tokens, {summary.tokens_per_second:.1f} tokens/s, hit rate {stats['hit_rate']:.2f})"
              f" -> {args.output}", file=sys.stderr)
    return 1 if summary.failed else 0
