"""`moeflow trace`, `train-predictor` and `analyze`: routing paths of prompts, and what follows from them."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from moeflow.cli_checks import (
    at_least,
    checkpoint_dir,
    engine_options,
    plot_available,
    readable_file,
    writable_dir,
    writable_file,
)
from moeflow.errors import InvalidRequest
from moeflow.jobs import Job, read_prompts


def _checked_prompts(args: argparse.Namespace) -> list[Job]:
    at_least(args, "max_new_tokens", 1)
    at_least(args, "max_prompt_tokens", 1)
    return read_prompts(readable_file("--prompts", args.prompts))


def _prompt_ids(eng: Any, job: Job) -> list[int]:
    if isinstance(job.prompt, list):
        return job.prompt
    if eng.session.tokenizer is not None:
        return list(eng.encode(job.prompt))
    try:  # a model without tokenizer.json: a plain-text line holds its token ids
        return [int(x) for x in job.prompt.split(",") if x.strip()]
    except ValueError:
        raise InvalidRequest(f"{job.prompt!r} (prompt on line {job.line}): the model has no tokenizer.json; "
                             "give token ids, e.g. 1,2,3 or {\"prompt\": [1, 2, 3]}") from None


async def _trace_all(args: argparse.Namespace, path: Path, jobs: list[Job],
                     options: dict[str, Any]) -> tuple[Any, list[Any], int]:
    from tqdm import tqdm

    from moeflow.api import Engine
    from moeflow.scheduling.traces import TraceHeader
    from moeflow.session import model_signature

    options = {**options, "prefetch": "none", "progress": False}
    async with Engine.open(path, **options) as eng:
        session = eng.session
        header = TraceHeader(model_signature(session.checkpoint, session.arch), session.arch.moe_layers,
                             session.arch.num_experts, session.arch.top_k)
        traces = []
        for job in tqdm(jobs, desc="tracing", unit="prompt", disable=getattr(args, "json", False), file=sys.stderr):
            ids = _prompt_ids(eng, job)
            traces.append(await eng.trace(ids[: args.max_prompt_tokens], args.max_new_tokens))
        return header, traces, session.plan.block_bytes


def cmd_trace(args: argparse.Namespace) -> int:
    from moeflow.scheduling.traces import write_trace

    jobs = _checked_prompts(args)
    out = writable_file("--out", args.out)
    options = engine_options(args)
    header, traces, _ = asyncio.run(_trace_all(args, checkpoint_dir(args.model), jobs, options))
    write_trace(out, header, traces)
    tokens = sum(len(t.prompt) + len(t.decode) for t in traces)
    print(f"wrote {len(traces)} routing traces ({tokens} tokens) to {out}")
    return 0


def cmd_train_predictor(args: argparse.Namespace) -> int:
    from moeflow.models import Checkpoint, parse_arch
    from moeflow.scheduling import expertflow
    from moeflow.scheduling.traces import TraceError, read_trace
    from moeflow.session import model_signature

    at_least(args, "epochs", 1)
    for trace in args.traces:
        readable_file("--traces", trace)
    path = checkpoint_dir(args.model)
    out = writable_dir("--out", args.out or path)
    ckpt = Checkpoint(path)
    arch = parse_arch(ckpt)
    signature = model_signature(ckpt, arch)
    traces = []
    header = None
    for trace in args.traces:
        header, seqs = read_trace(trace)
        if header.model != signature:
            raise TraceError(f"{trace}: traces of model {header.model!r}, not {signature!r} ({args.model}); "
                             f"record them with `moeflow trace {args.model}`")
        traces.extend(seqs)
    assert header is not None  # argparse requires one trace file at least
    model, metrics = expertflow.train(traces, header, arch.vocab_size, epochs=args.epochs, seed=args.seed)
    saved = expertflow.save(model, out, metrics)
    print(json.dumps({"saved": str(saved), "sequences": len(traces), **metrics}))
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from moeflow.analysis.advisor import analyze, plot, summary

    jobs = _checked_prompts(args)
    plot_path = writable_file("--plot", args.plot) if args.plot else None
    note = plot_available() if plot_path is not None else None
    options = engine_options(args)
    header, traces, block_bytes = asyncio.run(_trace_all(args, checkpoint_dir(args.model), jobs, options))
    reports = analyze(header, traces)
    result = summary(header, reports, block_bytes)
    png = None
    if plot_path is not None and note is None:
        png = plot(reports, header.top_k, plot_path, f"{Path(args.model).name}: hit rate vs cache size")
    result["plot"] = str(png) if png is not None else None
    if note is not None:
        result["plot_note"] = f"no plot: {note}"
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'layer':>6} " + " ".join(f"SRP{s:<4}" for s in (4, 16, 64, 256)) + "  flattens at")
    for layer in result["layers"]:
        srps = " ".join(
            f"{v:<7.3f}" if (v := layer["srp"][str(s)]) is not None else "n/a    " for s in (4, 16, 64, 256)
        )
        print(f"{layer['layer']:>6} {srps}  {layer['flattens_at']} experts")
    print(f"recommended: {result['recommended_flag']}  (or {result['recommended_flag_bytes']}: "
          f"{result['recommended_experts']} of {len(header.moe_layers) * header.num_experts} experts)")
    if png is not None:
        print(f"plot: {png}")
    elif note is not None:
        print(f"moeflow: note: no plot: {note}", file=sys.stderr)
    else:
        print("(add --plot locality.png for a plot of hit rate against cache size)")
    return 0
