"""Experts computed on the CPU from their host home while the device runs the rest of the layer
(Fiddler, HybriMoE): the host blocks they read, the worker thread, the calibration at open, and
which of a layer's misses go there (scheduling/placement.py decides)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import math
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from moeflow.memory.cache import ExpertCache
from moeflow.memory.device import ComputeDevice
from moeflow.memory.entries import EntryState, usable
from moeflow.memory.policies import ExpertKey
from moeflow.memory.tiers import HostHome
from moeflow.runtime.layers import silu_mlp
from moeflow.scheduling.placement import CpuSpeed, LinkSpeed, Miss, place
from moeflow.store.layout import ExpertView
from moeflow.store.store import ExpertStore

if TYPE_CHECKING:
    from moeflow.runtime.moe import Routing

# T = tokens of the step, H = hidden.

ExpertFfn = Callable[[ExpertView, torch.Tensor], torch.Tensor]
ExpertOut = Callable[..., torch.Tensor]  # moe.expert_out(routing, e, weights, x, wide, ffn=...)


def _no_wide(nbytes: int) -> AbstractContextManager[None]:
    return nullcontext()


@dataclass
class CpuCounters:
    uses: int = 0  # expert uses computed on the CPU
    rows: int = 0  # token rows they computed
    seconds: float = 0.0  # the worker's time computing them


class HostExperts:
    """The host copies a CPU expert reads: every expert in the pinned host home, or (three tiers)
    those the pinned host cache holds now. A block is pinned only while an expert computes on it."""

    def __init__(self, home: HostHome | None = None, host_cache: ExpertCache | None = None) -> None:
        if (home is None) == (host_cache is None):
            raise ValueError("give the pinned host home or the host cache")
        self.home = home
        self.host_cache = host_cache
        self._views: dict[ExpertKey, ExpertView] = {}
        self.pins: dict[ExpertKey, int] = {}

    def available(self, key: ExpertKey) -> bool:
        if self.home is not None:
            return True
        assert self.host_cache is not None
        return self.host_cache.state(key) is EntryState.READY

    def acquire(self, key: ExpertKey) -> ExpertView:
        if self.home is not None:
            handle = self.home.handle(key)
            self.home.allocator.pin(handle)  # a block being read is never freed under the reader
            view = self._views.get(key)
            if view is None:
                raw = torch.frombuffer(self.home.allocator.view(handle), dtype=torch.uint8)
                view = self._views[key] = self.home.store.layout.expert_view(raw)
        else:
            assert self.host_cache is not None
            entry = self.host_cache.entry(key)
            assert entry is not None and entry.state is EntryState.READY
            view = self.host_cache.pin(entry, "hit")
        self.pins[key] = self.pins.get(key, 0) + 1
        return view

    def release(self, key: ExpertKey) -> None:
        if self.home is not None:
            self.home.allocator.unpin(self.home.handle(key))
        else:
            assert self.host_cache is not None
            self.host_cache.release(key)
        left = self.pins[key] - 1
        if left:
            self.pins[key] = left
        else:
            del self.pins[key]

    def pinned_blocks(self) -> int:
        return len(self.pins)


@dataclass
class Job:
    """One expert computing on the worker: `done` resolves, on the event loop, with its output
    [n, H] (on the compute device) once the worker finished and the host block was released."""

    key: ExpertKey
    rows: int
    done: asyncio.Future[torch.Tensor]


def _pin(cpus: frozenset[int] | None) -> None:
    """On the worker thread, before torch starts its OpenMP team there (whose threads inherit it)."""
    if cpus is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)  # 0: the calling thread on Linux


def cpu_worker(cpus: frozenset[int] | None) -> concurrent.futures.ThreadPoolExecutor:
    """The one worker thread CPU experts run on, kept to `cpus` (None: any CPU)."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeflow-cpu-experts",
                                                 initializer=_pin, initargs=(cpus,))


def worker_cpus() -> frozenset[int] | None:
    """A GPU's CPU experts run on every CPU the process may use but one, which stays free for the
    event loop (it launches the GPU's work and lands copies); None where there is no second CPU
    or no affinity call."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return frozenset(cpus[1:]) if len(cpus) > 1 else None


def _compute(fn: Callable[[], torch.Tensor], threads: int) -> tuple[torch.Tensor, float]:
    """On the worker thread: `fn` with `threads` intra-op threads (torch's count is per thread
    under OpenMP), timed."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    with torch.inference_mode():  # thread-local: the worker sets its own
        out = fn()
    return out, time.perf_counter() - started


class CpuExperts:
    """Runs chosen experts of a layer on one worker thread (torch releases the GIL in its
    matmuls, so the event loop goes on launching the device's experts), each from its host home.

    `mode`: "cpu" runs every miss here, "auto" asks the cost model; `layers` (cpu_layers) run all
    their experts here. On the simulated device the compute device is the CPU: an expert runs
    the very arithmetic the device path would (same function, rows, dtype and thread count), so
    results are bit-identical whatever the placement. On a GPU the token rows are read back once
    per layer and each result copied to the device; CPU and GPU arithmetic differ there."""

    def __init__(self, mode: str, host: HostExperts, speed: CpuSpeed, link: LinkSpeed, *, block_bytes: int,
                 low_block_bytes: int | None, layers: frozenset[int], device: ComputeDevice, threads: int,
                 path: str = "as_device", ffn: ExpertFfn | None = None, cpus: frozenset[int] | None = None) -> None:
        self.mode = mode
        self.path = path  # the CPU compute path (a GPU's: the fastest measured at open; else the device's)
        self.ffn = ffn
        self.host = host
        self.speed = speed
        self.link = link
        self.block_bytes = block_bytes
        self.low_block_bytes = low_block_bytes
        self.layers = layers
        self.device = device
        self.threads = threads
        self.counters = CpuCounters()
        # `cpus`: the CPUs the worker (and the OpenMP team it starts) may run on; None: any
        self.cpus = cpus
        self.pool = cpu_worker(cpus)

    # ---- which experts -----------------------------------------------------------------------
    def choose(self, layer: int, routing: Routing, cache: ExpertCache, high: list[int], low: list[int],
               low_cache: ExpertCache | None) -> list[int]:
        """The experts of `layer` to compute here, ascending. Only misses move: an expert resident
        or in flight on the device (landing soon) stays there; one whose host copy is not at hand
        (a host cache without it) is copied."""
        if layer in self.layers:
            return sorted(e for e in high + low if self.host.available((layer, e)))
        misses = []
        for e in high:
            if cache.entry((layer, e)) is None and self.host.available((layer, e)):
                misses.append(Miss(e, _rows(routing, e), self.block_bytes))
        if low and low_cache is not None and self.low_block_bytes is not None:
            for e in low:
                entry = low_cache.entry((layer, e))
                if (entry is None or not usable(entry)) and self.host.available((layer, e)):
                    misses.append(Miss(e, _rows(routing, e), self.low_block_bytes, low=True))
        if not misses:
            return []
        if self.mode == "cpu":
            return sorted(m.expert for m in misses)
        ways = place(misses, self.speed, self.link, cache.queued_bytes())
        return sorted(e for e, way in ways.items() if way == "cpu")

    # ---- running them ------------------------------------------------------------------------
    def start(self, layer: int, experts: list[int], routing: Routing, x: torch.Tensor,
              wide: Callable[[int], AbstractContextManager[None]], expert_out: ExpertOut) -> list[Job]:
        """Submit `experts` to the worker; each host block is pinned until its expert finished."""
        if not experts:
            return []
        loop = asyncio.get_running_loop()
        on_cpu = x.device.type == "cpu"
        if not on_cpu:  # a GPU: the token rows come down once per layer, on host copies of the routing
            x, routing = self.device.host_tensor(x), routing.on_host()
        jobs = []
        for e in experts:
            key = (layer, e)
            weights = self.host.acquire(key)
            try:
                if on_cpu:  # as many threads as the device path would give this expert
                    with wide(weights.nbytes):
                        threads = torch.get_num_threads()
                    fn = functools.partial(expert_out, routing, e, weights, x, _no_wide)
                else:
                    threads = self.threads
                    fn = functools.partial(expert_out, routing, e, weights, x, _no_wide, **(
                        {"ffn": self.ffn} if self.ffn is not None else {}))
                future = self.pool.submit(_compute, fn, threads)
            except BaseException:
                self.host.release(key)
                raise
            job = Job(key, _rows(routing, e), loop.create_future())
            future.add_done_callback(functools.partial(self._finished, loop, job))
            jobs.append(job)
        return jobs

    def _finished(self, loop: asyncio.AbstractEventLoop, job: Job,
                  future: concurrent.futures.Future[tuple[torch.Tensor, float]]) -> None:
        loop.call_soon_threadsafe(self._settle, job, future)

    def _settle(self, job: Job, future: concurrent.futures.Future[tuple[torch.Tensor, float]]) -> None:
        """On the loop: release the host block, count the use, resolve the job."""
        self.host.release(job.key)
        error = future.exception()
        if job.done.done():
            return
        if error is not None:
            job.done.set_exception(error)
            return
        out, seconds = future.result()
        c = self.counters
        c.uses += 1
        c.rows += job.rows
        c.seconds += seconds
        job.done.set_result(out)

    async def result(self, job: Job, device: torch.device) -> torch.Tensor:
        """A job's output on `device`; cancelling the caller leaves the job running to its end."""
        out = await asyncio.shield(job.done)
        return out if out.device == device else out.to(device)

    @staticmethod
    async def settle(jobs: list[Job]) -> None:
        """Wait until every job finished and released its block (after an error or a cancel)."""
        pending = [job.done for job in jobs if not job.done.done()]
        if pending:
            await asyncio.wait(pending)
        for job in jobs:  # retrieved: an unawaited failure is not reported as lost
            if not job.done.cancelled():
                job.done.exception()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _rows(routing: Routing, e: int) -> int:
    return 1 if routing.host_slots is not None else int(routing.tokens[e].shape[0])


# ---- measuring at open ---------------------------------------------------------------------------
def read_expert(store: ExpertStore, key: ExpertKey) -> ExpertView:
    """One expert's weights read from the store file into CPU memory (for calibration)."""
    raw = np.fromfile(store.data_path, dtype=np.uint8, count=store.blob_size, offset=store.offset(*key))
    return store.layout.expert_view(torch.from_numpy(raw))


def calibrate(weights: ExpertView, hidden: int, dtype: torch.dtype, expert_ffn: Callable[..., torch.Tensor],
              threads: int, rows: int = 16, reps: int = 3) -> CpuSpeed:
    """Time one real expert on 1 and `rows` token rows (best of `reps`, after a warm-up) on the
    calling thread with `threads` threads: the fixed and per-row seconds of a CPU expert."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = []
        with torch.inference_mode():
            for n in (1, rows):
                x = torch.full((n, hidden), 0.01, dtype=dtype)
                expert_ffn(weights, x)  # warm-up: first-touch of the weights, oneDNN's primitive cache
                best = math.inf
                for _ in range(reps):
                    started = time.perf_counter()
                    expert_ffn(weights, x)
                    best = min(best, time.perf_counter() - started)
                times.append(best)
    finally:
        torch.set_num_threads(saved)
    # the one-row time is kept exactly (decode's case); the slope, noisy on a busy machine, is
    # bounded by it, so neither part goes negative
    per_row = min(max(0.0, (times[1] - times[0]) / (rows - 1)), times[0])
    return CpuSpeed(seconds_fixed=times[0] - per_row, seconds_per_row=per_row)


def upcast_ffn(weights: ExpertView, x: torch.Tensor) -> torch.Tensor:
    """A 16-bit expert in float32: both weights upcast on each call, then float32 F.linear (MKL's
    sgemm). Without AVX512-BF16/AMX torch's bf16 matmul falls back to slow loops, and this is
    faster (benches/bench_cpu_experts.py measures both)."""
    return silu_mlp(x.float(), weights["gate_up"].float(), weights["down"].float()).to(x.dtype)


def own_path_name(weights: ExpertView, dtype: torch.dtype) -> str:
    """What expert_ffn runs for these weights and rows on the CPU, as stats() names it:
    "<format>_moeflow" for moeflow's kernels (runtime/cpu_bf16.py), "int4_torch" for torch's
    int4 kernel, "<format>_dequant" for dequantize-then-F.linear, "<dtype>_linear" for torch's
    float product."""
    from moeflow.runtime import cpu_bf16, cpu_quant

    if weights.kind == "dense":
        # moe._in casts the weights to the rows' dtype, except bf16 weights with float32 rows, which
        # the kernel takes as they are: bf16 rows always get bf16 weights
        ours = cpu_bf16.ENABLED and (dtype == torch.bfloat16
                                     or (dtype == torch.float32 and weights["gate_up"].dtype == torch.bfloat16))
        return "bfloat16_moeflow" if ours else f"{str(dtype).removeprefix('torch.')}_linear"
    if weights.kind == "minmax":
        x = torch.empty(0, 1, dtype=dtype)
        if cpu_bf16.minmax_takes(weights.tensors, weights.bits, weights.group, x):
            return f"int{weights.bits}_moeflow"
        if weights.bits in (4, 2) and cpu_quant.available() and cpu_quant.fits(weights.tensors, weights.group, dtype):
            return f"int{weights.bits}_torch"
        return f"int{weights.bits}_dequant"
    if weights.kind == "mxfp4" and cpu_bf16.ENABLED and dtype == torch.bfloat16:
        return "mxfp4_moeflow"
    return f"{weights.kind}_dequant"


def pick_path(weights: ExpertView, hidden: int, dtype: torch.dtype, expert_ffn: ExpertFfn,
              threads: int) -> tuple[str, ExpertFfn, CpuSpeed]:
    """For a GPU's CPU experts: the faster of the device path's own arithmetic (bf16 F.linear, or
    the dequantizing reference for quantized stores) and, for 16-bit weights, float32 upcast;
    compared on one decode row of a real expert (the case the CPU takes)."""
    dense = weights.kind == "dense"
    name = own_path_name(weights, dtype)
    candidates: list[tuple[str, ExpertFfn]] = [(name, expert_ffn)]
    if dense and dtype in (torch.bfloat16, torch.float16) and weights.swiglu is None:  # SiLU only
        candidates.append(("fp32_upcast", upcast_ffn))
    timed = [(calibrate(weights, hidden, dtype, fn, threads), path, fn) for path, fn in candidates]
    speed, path, fn = min(timed, key=lambda t: t[0].seconds(1))
    return path, fn, speed


def sim_link(bandwidth_gbps: float, latency_us: float, block_bytes: int, io_chunk: int) -> LinkSpeed:
    """The simulated device's copy engine as configured (it pays the latency once per part)."""
    parts = max(1, -(-block_bytes // io_chunk))
    return LinkSpeed(bandwidth_gbps * 1e9, parts * latency_us * 1e-6, "sim_bandwidth_gbps")


def measure_cuda_link(block_bytes: int, device: torch.device, reps: int = 3) -> LinkSpeed:
    """Host -> device bandwidth measured at open: one expert's bytes from pinned memory, best of
    `reps` synchronised copies (the copy engine's rate when idle)."""
    src = torch.empty(block_bytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(block_bytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)  # warm-up
    torch.cuda.synchronize(device)
    best = math.inf
    for _ in range(reps):
        started = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return LinkSpeed(block_bytes / best, 0.0, "measured at open (pinned copy of one expert)")
