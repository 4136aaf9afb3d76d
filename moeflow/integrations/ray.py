"""Ray Data batch inference: `MoeflowPredictor` for `Dataset.map_batches`, one Engine per actor.

    import ray
    from moeflow.integrations.ray import MoeflowPredictor

    ds = ray.data.read_json("prompts.jsonl")  # the columns of a moeflow job file
    out = ds.map_batches(
        MoeflowPredictor,
        fn_constructor_kwargs={"model": "/models/mixtral", "expert_budget": "25%", "device": "cuda"},
        compute=ray.data.ActorPoolStrategy(size=4),  # actors, each with its own engine, budget and device
        num_gpus=1,  # per actor
        batch_size=64,
    )
    out.write_json("results/")

A row's columns are those of a job-file line (`moeflow.jobs`): "prompt" (text or token ids) and
optionally "id", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop_at_eos";
other columns pass through. Added: "tokens", "text", "finish_reason", "prompt_tokens" and
"error" (None, or the typed error that refused the row: one bad row does not fail the batch).
Run as a script: `python -m moeflow.integrations.ray MODEL --input in.jsonl --output DIR`.
Needs `pip install moeflow[ray]`.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import numpy as np

from moeflow.errors import MoeflowError
from moeflow.jobs import Job, JobFileError, job_from_row
from moeflow.llm import LLM


class MoeflowPredictor:
    """A callable class for `ray.data.Dataset.map_batches` (batch_format "numpy" or "pandas").
    Constructor keywords other than the sampling defaults are Engine.open's options."""

    def __init__(self, model: str | os.PathLike[str], *, max_new_tokens: int = 32, concurrency: int | None = None,
                 sampling: dict[str, Any] | None = None, **engine_options: Any) -> None:
        self.llm = LLM(model, **engine_options)
        self.defaults = {"max_new_tokens": max_new_tokens, **(sampling or {})}
        self.concurrency = concurrency
        self.rows_seen = 0

    def __call__(self, batch: Any) -> Any:
        columns = {name: list(batch[name]) for name in batch}  # dict of arrays or a DataFrame
        n = len(next(iter(columns.values()), []))
        jobs: list[Job | JobFileError] = []
        for i in range(n):
            row = {name: values[i] for name, values in columns.items()}
            try:
                jobs.append(job_from_row(row, self.rows_seen + i))
            except JobFileError as e:
                jobs.append(e)
        self.rows_seen += n
        runnable = [j for j in jobs if isinstance(j, Job)]
        outcomes = iter(self.llm.run(runnable, concurrency=self.concurrency, **self.defaults))
        added: dict[str, list[Any]] = {k: [] for k in ("id", "tokens", "text", "finish_reason", "prompt_tokens",
                                                         "error")}
        for job in jobs:
            outcome: Any = next(outcomes) if isinstance(job, Job) else job
            added["id"].append(job.id if isinstance(job, Job) else str(job.line))
            if isinstance(outcome, MoeflowError):
                message = outcome.reason if isinstance(outcome, JobFileError) else str(outcome)
                row = {"tokens": [], "text": None, "finish_reason": None, "prompt_tokens": 0,
                       "error": f"{type(outcome).__name__}: {message}"}
            else:
                row = {"tokens": outcome.tokens, "text": outcome.text, "finish_reason": outcome.finish_reason,
                       "prompt_tokens": len(outcome.prompt_tokens), "error": None}
            for key, value in row.items():
                added[key].append(value)
        out = {name: _column(values) for name, values in columns.items() if name != "id"}
        out.update({name: _objects(values) if name != "prompt_tokens" else np.asarray(values)
                    for name, values in added.items()})
        return out

    def __del__(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()


def _column(values: list[Any]) -> np.ndarray:
    """A passed-through column: numeric or text as is, lists or arrays (token ids) as objects."""
    if any(isinstance(v, (list, tuple)) or getattr(v, "ndim", 0) > 0 for v in values):
        return _objects(values)
    return np.asarray(values)


def _objects(values: list[Any]) -> np.ndarray:
    """A 1-d object array of arbitrary items (lists of ids stay lists, never a 2-d array)."""
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        arr[i] = v.tolist() if hasattr(v, "tolist") else v
    return arr


def main(argv: list[str] | None = None) -> int:
    import ray

    ap = argparse.ArgumentParser(description="Run a JSONL of prompts through moeflow engines on a Ray cluster.")
    ap.add_argument("model")
    ap.add_argument("--input", required=True, help="JSONL job file (moeflow.jobs format)")
    ap.add_argument("--output", required=True, help="output folder (Ray writes JSONL parts into it)")
    ap.add_argument("--actors", type=int, default=1, help="engines (Ray actors)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--expert-budget", default="25%")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor")
    ap.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per actor")
    ap.add_argument("--engine-options", default="{}", help="more Engine.open options, as JSON")
    args = ap.parse_args(argv)
    options = {"expert_budget": args.expert_budget, "device": args.device, **json.loads(args.engine_options)}
    ds = ray.data.read_json(args.input)
    out = ds.map_batches(MoeflowPredictor, fn_constructor_args=(args.model,),
                         fn_constructor_kwargs={"max_new_tokens": args.max_new_tokens, **options},
                         compute=ray.data.ActorPoolStrategy(size=args.actors), batch_size=args.batch_size,
                         num_gpus=args.num_gpus, num_cpus=args.num_cpus)
    out.write_json(args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
