"""Decode host overhead per layer: moeflow against transformers' generate on the same tiny weights.

    python benches/bench_overhead.py [--device cpu|sim] [--tokens 32] [--repeats 5] [--threads 1]
                                     [--arch mixtral|olmoe] [--profile]

The model is synthesized by moeflow itself (hidden 64, 32 layers, 8 experts, top-2, expert
intermediate 128, vocabulary 512, float32), so every matrix product is tiny and the time per
layer is what the host spends launching work. moeflow runs at full expert budget with no
prefetch. Both sides are timed the same way: the wall time from the first generated token to the
last (N decode steps, each including its sampled token's readback), divided by N and by the
number of layers. A third baseline, for --arch mixtral, is the eager-PyTorch floor
(benches/eager_floor.py: the fewest torch calls that decode a token of this model, with no
engine around them; its logits are checked against transformers' first): `vs_floor` is
moeflow's own overhead, `floor_vs_transformers` the best any eager engine can reach here.
The three alternate over --repeats rounds and the medians are printed, of wall
time (`us_per_layer`) and, steadier on a shared machine, of the process's CPU time
(`cpu_us_per_layer`; equal to the wall time on an idle machine with one thread).
--profile adds, on stderr, where moeflow's decode time goes per layer (a sampling profiler on
the engine's thread: every 200 us it charges the innermost moeflow frame), split by source file.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moeflow import Engine  # noqa: E402
from moeflow.errors import MoeflowError  # noqa: E402
from moeflow.models.synth import synthesize  # noqa: E402

sys.path.insert(0, str(ROOT / "benches"))
from eager_floor import EagerMixtral  # type: ignore[import-not-found]  # noqa: E402

LAYERS = 32
SHAPE: dict[str, dict[str, Any]] = {
    "mixtral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=512),
    "olmoe": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, vocab_size=512),
}
PROMPT = [(31 * i + 7) % 500 + 3 for i in range(16)]


def model_dir(arch: str) -> Path:
    out = ROOT / ".artifacts" / f"overhead-{arch}-h64-l{LAYERS}"
    if not (out / "config.json").exists():
        synthesize(out, arch, "tiny", dtype=torch.float32, progress=False, **SHAPE[arch])
    return out


def now() -> tuple[float, float]:
    """(wall, process CPU) seconds: on a loaded machine the CPU time is the steadier figure."""
    return time.perf_counter(), time.process_time()


def elapsed(first: tuple[float, float], last: tuple[float, float]) -> tuple[float, float]:
    return last[0] - first[0], last[1] - first[1]


class _Clock:
    """transformers streamer: the time of each generated token as generate hands it out."""

    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate puts the prompt first
            self.prompt_seen = True
            return
        self.times.append(now())

    def end(self) -> None:
        pass


def transformers_decode_seconds(model: Any, tokens: int) -> tuple[float, float]:
    """(wall, CPU) seconds from the first generated token to the last of tokens + 1 (N decode steps)."""
    clock = _Clock()
    ids = torch.tensor([PROMPT])
    model.generate(ids, max_new_tokens=tokens + 1, min_new_tokens=tokens + 1, do_sample=False,
                   use_cache=True, pad_token_id=0, streamer=clock)
    assert len(clock.times) == tokens + 1, len(clock.times)
    return elapsed(clock.times[0], clock.times[-1])


async def moeflow_decode_seconds(eng: Engine, tokens: int) -> tuple[float, float]:
    """The same window on moeflow: each yielded token has been sampled and read back."""
    times = []
    async for _ in eng.stream(PROMPT, tokens + 1, stop_at_eos=False):
        times.append(now())
    return elapsed(times[0], times[-1])


@contextmanager
def sampled(thread_id: int, interval_s: float = 2e-4) -> Iterator[Counter[tuple[str, str]]]:
    """Samples the engine's thread (`thread_id`: the engine runs on its own thread, which a SIGPROF
    handler, always run on the main thread, never sees) every interval from a sampler thread;
    each sample is charged to the innermost frame in moeflow/ (file, function), or ('other',
    name) when no moeflow frame is on the stack. The sampler takes the GIL for each sample, so
    the profiled run is slower than the timed ones; the shares are what it reports."""
    samples: Counter[tuple[str, str]] = Counter()
    package = str(ROOT / "moeflow") + "/"
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval_s):
            frame = sys._current_frames().get(thread_id)
            f = frame
            while f is not None and not f.f_code.co_filename.startswith(package):
                f = f.f_back
            if f is None:
                samples[("other", frame.f_code.co_name if frame else "?")] += 1
            else:
                samples[(f.f_code.co_filename[len(package):], f.f_code.co_name)] += 1

    sampler = threading.Thread(target=sample, name="bench-overhead-sampler", daemon=True)
    sampler.start()
    try:
        yield samples
    finally:
        stop.set()
        sampler.join()


def report_profile(samples: Counter[tuple[str, str]], us_per_layer: float) -> None:
    total = sum(samples.values()) or 1
    by_file: Counter[str] = Counter()
    for (file, _), n in samples.items():
        by_file[file] += n
    print(f"profile: {total} samples; us per layer by file (of {us_per_layer:.0f}):", file=sys.stderr)
    for file, n in by_file.most_common():
        print(f"  {us_per_layer * n / total:7.1f}  {file}", file=sys.stderr)
    print("top functions:", file=sys.stderr)
    for (file, func), n in samples.most_common(25):
        print(f"  {us_per_layer * n / total:7.1f}  {file}:{func}", file=sys.stderr)


def floor_decode_seconds(floor: EagerMixtral, tokens: int) -> tuple[float, float]:
    """The same window on the floor: the prompt fed token by token, then N decode steps timed."""
    _, times = floor.generate(PROMPT, tokens + 1, clock=now)
    first, last = times[0], times[-1]
    assert isinstance(first, tuple) and isinstance(last, tuple)
    return elapsed(first, last)


def check_floor(floor: EagerMixtral, hf: Any) -> None:
    """The floor is a real decoder: its first logits match transformers' forward on the prompt."""
    floor.generate(PROMPT, 1)
    with torch.inference_mode():
        want = hf(torch.tensor([PROMPT])).logits[0, -1].float()
    assert floor.first_logits is not None
    rel = float((floor.first_logits - want).abs().max() / want.abs().max())
    if rel > 1e-4:
        raise SystemExit(f"bench_overhead: the eager floor's logits differ from transformers' by {rel:.1e}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    path = model_dir(args.arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    floor = EagerMixtral(hf) if args.arch == "mixtral" else None
    if floor is not None:
        check_floor(floor, hf)
    ours: list[tuple[float, float]] = []
    theirs: list[tuple[float, float]] = []
    floors: list[tuple[float, float]] = []
    try:
        eng = await Engine.open(path, expert_budget=1.0, device=args.device, prefetch="none")
    except MoeflowError as e:  # e.g. device="sim" before the simulated GPU lands
        raise SystemExit(f"bench_overhead: Engine.open(device={args.device!r}) refused: {e}") from e
    async with eng:
        await moeflow_decode_seconds(eng, 4)  # warm-up: every expert resident, tables grown
        transformers_decode_seconds(hf, 4)
        for _ in range(args.repeats):
            theirs.append(transformers_decode_seconds(hf, args.tokens))
            ours.append(await moeflow_decode_seconds(eng, args.tokens))
            if floor is not None:
                floors.append(floor_decode_seconds(floor, args.tokens))
        if args.profile:
            with sampled(await eng.call(threading.get_ident)) as samples:
                seconds, _ = await moeflow_decode_seconds(eng, args.tokens)
            report_profile(samples, seconds / args.tokens / LAYERS * 1e6)
        stats = eng.stats()
        syncs = stats.get("host_syncs_per_token")
    def per_layer(runs: list[tuple[float, float]], which: int) -> list[float]:
        return [r[which] / args.tokens / LAYERS * 1e6 for r in runs]

    us, hf_us = statistics.median(per_layer(ours, 0)), statistics.median(per_layer(theirs, 0))
    cpu_us, hf_cpu_us = statistics.median(per_layer(ours, 1)), statistics.median(per_layer(theirs, 1))
    floor_figures: dict[str, Any] = {}
    if floors:
        floor_us = statistics.median(per_layer(floors, 0))
        floor_figures = {
            "floor_us_per_layer": round(floor_us, 1),
            "vs_floor": round(us / floor_us, 3),
            "floor_vs_transformers": round(floor_us / hf_us, 3),
            "floor_cpu_us_per_layer": round(statistics.median(per_layer(floors, 1)), 1),
        }
    return {
        "bench": "overhead",
        "arch": args.arch,
        "shape": {"hidden": 64, "layers": LAYERS, "experts": 8, "top_k": 2, "expert_intermediate": 128,
                  "vocab": 512, "dtype": "float32"},
        "device": args.device,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "threads": args.threads,
        "us_per_layer": round(us, 1),
        "transformers_us_per_layer": round(hf_us, 1),
        "vs_transformers": round(us / hf_us, 3),
        "host_syncs_per_token": syncs,
        "cpu_us_per_layer": round(cpu_us, 1),
        "transformers_cpu_us_per_layer": round(hf_cpu_us, 1),
        "cpu_vs_transformers": round(cpu_us / hf_cpu_us, 3),
        **floor_figures,
        "rounds_us_per_layer": {"moeflow": [round(x, 1) for x in per_layer(ours, 0)],
                                "transformers": [round(x, 1) for x in per_layer(theirs, 0)],
                                "floor": [round(x, 1) for x in per_layer(floors, 0)]},
        "torch": torch.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "sim"))
    ap.add_argument("--arch", default="mixtral", choices=tuple(SHAPE))
    ap.add_argument("--tokens", type=int, default=32, help="decode steps timed per round")
    ap.add_argument("--repeats", type=int, default=5, help="alternating rounds (medians reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    ap.add_argument("--profile", action="store_true", help="per-file breakdown of moeflow's decode on stderr")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
