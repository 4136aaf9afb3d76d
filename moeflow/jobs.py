"""Batch jobs over a JSONL file of prompts: checked input, whole-line results, resumable runs.

Input, one JSON object per line:
    {"id": "q1", "prompt": "text" | [token ids], "max_new_tokens": 64,
     "temperature": 0.0, "top_k": null, "top_p": null, "seed": null, "min_p": null,
     "repetition_penalty": null, "presence_penalty": 0.0, "frequency_penalty": 0.0,
     "stop": "text" | ["text", ...], "stop_at_eos": true}
Only "prompt" is required; "id" defaults to the line number. A file whose name ends in .jsonl or
.json is read so; any other file is plain text, one prompt per line (its id the line number), with
empty lines skipped: no guessing from the content. Output, one line per prompt as it
finishes (not in input order):
    {"id", "line", "prompt_tokens", "tokens", "text", "finish_reason", "stats"}
or, for a line that could not run, {"id", "line", "error": {"type", "message"}}.

Each output line reaches the file in one append-mode write followed by fsync, so a crash or a
Ctrl-C loses no finished result; a rerun with the same files skips every id already answered
without an error (a failed line runs again, e.g. once fixed) and cuts a torn last line first.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from moeflow.errors import InvalidRequest, MoeflowError

PARAMS = {"max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float, "seed": int,
          "min_p": float, "repetition_penalty": float, "presence_penalty": float, "frequency_penalty": float,
          "stop": list, "stop_at_eos": bool}
OPTIONAL = ("temperature", "top_k", "top_p", "seed", "min_p", "repetition_penalty", "stop")  # null: the default
KEYS = {"id", "prompt", *PARAMS}


class JobFileError(InvalidRequest):
    """A line of a job file that cannot run; `line` is its 1-based number (0: the whole file)."""

    def __init__(self, path: Path, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")
        self.path, self.line, self.reason = path, line, message


@dataclass(frozen=True)
class Job:
    """One prompt of a job file."""

    line: int
    id: str
    prompt: str | list[int]
    params: dict[str, Any] = field(default_factory=dict)


def _check_value(key: str, value: Any) -> Any:
    want = PARAMS[key]
    if value is None and key in OPTIONAL:
        return None
    if want is list:  # stop: one string or a list of strings
        if isinstance(value, str) and value or (
                isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)):
            return value
        raise ValueError(f"{key}={value!r}: must be a non-empty string or a list of non-empty strings")
    if want is bool:
        ok = isinstance(value, bool)
    elif want is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise ValueError(f"{key}={value!r}: must be {want.__name__}")
    return float(value) if want is float else value


def parse_job(path: Path, number: int, text: str) -> Job:
    """The job on line `number` of `path`; JobFileError naming the line and field otherwise."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise JobFileError(path, number, f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise JobFileError(path, number, f"a line must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - KEYS)
    if unknown:
        raise JobFileError(path, number, f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(KEYS))}")
    if "prompt" not in obj:
        raise JobFileError(path, number, 'missing "prompt" (text or a list of token ids)')
    prompt = obj["prompt"]
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise JobFileError(path, number, '"prompt" as a list must be non-empty token ids (integers)')
    elif not isinstance(prompt, str) or not prompt:
        raise JobFileError(path, number, '"prompt" must be non-empty text or a list of token ids')
    job_id = obj.get("id", number)
    if not isinstance(job_id, (str, int)) or isinstance(job_id, bool):
        raise JobFileError(path, number, f'"id" must be a string or an integer, got {job_id!r}')
    params = {}
    for key in PARAMS:
        if key in obj:
            try:
                params[key] = _check_value(key, obj[key])
            except ValueError as e:
                raise JobFileError(path, number, str(e)) from None
    return Job(number, str(job_id), prompt, params)


def job_from_row(row: dict[str, Any], index: int) -> Job:
    """A job from a table row (Ray Data, pandas): numpy scalars and arrays become Python values,
    a missing value (None, NaN) leaves its parameter at the default, and the id defaults to
    `index`. JobFileError (line = index) otherwise."""
    clean: dict[str, Any] = {}
    for key, value in row.items():
        if key not in KEYS:
            continue  # other columns pass through the table untouched
        if hasattr(value, "tolist"):  # numpy scalar or array
            value = value.tolist()
        if value is None or (isinstance(value, float) and value != value):
            continue
        if key in PARAMS and PARAMS[key] is int and isinstance(value, float) and value.is_integer():
            value = int(value)  # a column with missing values holds its integers as floats
        clean[key] = value
    clean.setdefault("id", index)
    return parse_job(Path("<row>"), index, json.dumps(clean))


JSONL_SUFFIXES = (".jsonl", ".json")


def is_jsonl(path: Path) -> bool:
    """Whether a prompt file is JSON lines (by its name alone) rather than one plain prompt per line."""
    return path.suffix.lower() in JSONL_SUFFIXES


def read_jobs(path: Path) -> tuple[list[Job], list[JobFileError]]:
    """Every runnable job of the file, and an error per line that cannot run (blank lines skipped;
    a repeated id is an error on its later line). A .jsonl / .json file holds one JSON object per
    line; any other file one plain-text prompt per line."""
    jobs: list[Job] = []
    errors: list[JobFileError] = []
    seen: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"cannot read the job file {path}: {e}") from e
    jsonl = is_jsonl(path)
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        if not jsonl:
            jobs.append(Job(number, str(number), text))
            continue
        try:
            job = parse_job(path, number, text)
            if job.id in seen:
                raise JobFileError(path, number, f"id {job.id!r} repeats line {seen[job.id]}")
        except JobFileError as e:
            errors.append(e)
            continue
        seen[job.id] = number
        jobs.append(job)
    return jobs, errors


def read_prompts(path: Path) -> list[Job]:
    """The prompts of a prompt file (`moeflow trace --prompts`): JSON lines with "prompt", or plain
    text, one prompt per line (see `read_jobs`). JobFileError naming file:line for the first line
    that cannot run, or for a file with no prompt."""
    jobs, errors = read_jobs(path)
    if errors:
        raise errors[0]
    if not jobs:
        raise JobFileError(path, 0, "no prompts in the file" + (
            ' (one JSON object with "prompt" per line)' if is_jsonl(path) else " (one prompt per line)"))
    return jobs


class ResultFile:
    """The output file: one whole line per result, appended and synced; reads what a previous run
    finished, cutting a torn last line (a kill in the middle of a write) first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: set[str] = set()
        if path.exists():
            self._recover()
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise InvalidRequest(f"cannot open the output file {path}: {e.strerror}") from e

    def _recover(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a torn last line: no result was finished there
            with open(self.path, "r+b") as f:
                f.truncate(end)
        for raw in data[:end].splitlines():
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "id" in rec and "error" not in rec:
                self.done.add(str(rec["id"]))

    def write(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        view = memoryview(data)
        while view:  # O_APPEND: each write lands at the end, whole unless the disk fills
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ResultFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Generator(Protocol):
    """What a job run needs of an engine (moeflow.Engine has it)."""

    @property
    def generate(self) -> Callable[..., Awaitable[Any]]: ...


@dataclass
class JobSummary:
    total: int = 0  # lines with a prompt (runnable or not)
    skipped: int = 0  # answered by an earlier run
    done: int = 0
    failed: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def result_record(job: Job, result: Any) -> dict[str, Any]:
    return {"id": job.id, "line": job.line, "prompt_tokens": len(result.prompt_tokens), "tokens": result.tokens,
            "text": result.text, "finish_reason": result.finish_reason, "stats": result.stats.as_dict()}


def error_record(job_id: str, line: int, error: BaseException) -> dict[str, Any]:
    message = error.reason if isinstance(error, JobFileError) else str(error)
    return {"id": job_id, "line": line, "error": {"type": type(error).__name__, "message": message}}


async def run_job(engine: Generator, job: Job, defaults: dict[str, Any] | None = None) -> Any:
    """The job's GenerationResult, or the MoeflowError that refused it (returned, not raised)."""
    params = {**(defaults or {}), **job.params}
    max_new = params.pop("max_new_tokens", 32)
    try:
        return await engine.generate(job.prompt, max_new, **params)
    except MoeflowError as e:
        return e


async def run_jobs(
    engine: Generator,
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    concurrency: int = 8,
    defaults: dict[str, Any] | None = None,
    on_result: Callable[[JobSummary, Any], None] | None = None,
) -> JobSummary:
    """Run every job of `input_path` not yet answered in `output_path`, `concurrency` at a time,
    appending each result as it finishes. Bad lines and refused requests become error lines
    (and count as failed); the others still run. `defaults` fill parameters a line leaves out."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise InvalidRequest(f"concurrency={concurrency!r}: must be a positive integer")
    inp, out = Path(input_path), Path(output_path)
    jobs, bad = read_jobs(inp)
    summary = JobSummary(total=len(jobs) + len(bad))
    base = dict(defaults or {})
    with ResultFile(out) as results:
        for error in bad:
            results.write(error_record(str(error.line), error.line, error))
            summary.failed += 1
            if on_result is not None:
                on_result(summary, error)
        todo = [job for job in jobs if job.id not in results.done]
        summary.skipped = len(jobs) - len(todo)
        gate = asyncio.Semaphore(concurrency)
        started = time.perf_counter()

        async def one(job: Job) -> None:
            async with gate:
                outcome = await run_job(engine, job, base)
            if isinstance(outcome, MoeflowError):  # this prompt cannot run; the others go on
                results.write(error_record(job.id, job.line, outcome))
                summary.failed += 1
            else:
                results.write(result_record(job, outcome))
                summary.done += 1
                summary.tokens += len(outcome.tokens)
            summary.seconds = time.perf_counter() - started
            if on_result is not None:
                on_result(summary, outcome)

        await asyncio.gather(*(one(job) for job in todo))
        summary.seconds = time.perf_counter() - started
    return summary


async def generate_batch(engine: Generator, prompts: Sequence[Any], max_new_tokens: int = 32, *,
                         concurrency: int | None = None, **params: Any) -> list[Any]:
    """Results of every prompt, in order; all in flight at once unless `concurrency` bounds them.
    A refused prompt raises (the others are cancelled): a job file (`run_jobs`) isolates them."""
    if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)
                                    or concurrency < 1):
        raise InvalidRequest(f"concurrency={concurrency!r}: must be a positive integer")
    gate = asyncio.Semaphore(concurrency or max(1, len(prompts)))

    async def one(prompt: Any) -> Any:
        async with gate:
            return await engine.generate(prompt, max_new_tokens, **params)

    tasks = [asyncio.ensure_future(one(p)) for p in prompts]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
