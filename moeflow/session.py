"""Opening a checkpoint into a running session: store, fast tier, transfers, cache, model runner."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from moeflow import _core
from moeflow.config import EngineConfig, MemoryPlan, format_bytes
from moeflow.errors import CheckpointError, ConfigError, CudaUnavailable
from moeflow.memory.transfers import AsyncTransfers
from moeflow.memory.assembly import ExpertMemory, build_memory
from moeflow.memory.cache import ExpertCache, Tier
from moeflow.memory.device import ComputeDevice, make_device
from moeflow.memory.entries import CacheCounters
from moeflow.memory.planner import TierPlan, plan_tiers
from moeflow.memory.sources import HomeSource, HostCacheSource
from moeflow.memory.policies import EvictionPolicy, PredictedPolicy, make_policy
from moeflow.models import Arch, Checkpoint, parse_arch
from moeflow.runtime.cpu_experts import (
    CpuExperts,
    HostExperts,
    calibrate,
    measure_cuda_link,
    pick_path,
    read_expert,
    sim_link,
    worker_cpus,
)
from moeflow.runtime import kernel_choice
from moeflow.runtime.moe import expert_ffn
from moeflow.runtime.runner import ModelRunner
from moeflow.runtime.moe import MissPrecision
from moeflow.runtime.model import DenseModel, load_dense
from moeflow.scheduling import Predictor, Scheduler, make_predictor, router_table
from moeflow.scheduling.scheduler import speculation
from moeflow.scheduling.routers import EntryInputs
from moeflow.scheduling.placement import resolve_cpu_layers
from moeflow.stats import EngineStats, counters_dict, expert_use_share
from moeflow.store import ExpertStore, codec_for, located_store, open_or_convert_async
from moeflow.store.fp8 import native_precision
from moeflow.store import mxfp4
from moeflow.store.layout import DTYPE_NAMES

log = logging.getLogger("moeflow")


@dataclass
class Session:
    """Everything an open engine owns; closed in reverse order of opening."""

    config: EngineConfig
    checkpoint: Checkpoint
    arch: Arch
    dtype: torch.dtype
    device: str
    store: ExpertStore
    tiers: TierPlan
    model: DenseModel
    memory: ExpertMemory
    runner: ModelRunner
    tokenizer: Tokenizer | None
    scheduler: Scheduler
    tokens_generated: int = 0
    steps: int = 0
    store_root: Path | None = None  # where the expert store lives
    store_note: str | None = None  # why it lives elsewhere than the checkpoint's .moeflow (read-only, cache)

    @property
    def plan(self) -> MemoryPlan:
        return self.tiers.fast

    @property
    def compute(self) -> ComputeDevice:
        return self.memory.device

    @property
    def cache(self) -> ExpertCache:
        return self.memory.cache

    @property
    def low_cache(self) -> ExpertCache | None:
        return self.memory.low_cache

    @property
    def transfers(self) -> AsyncTransfers:
        return self.memory.transfers

    @property
    def tier(self) -> Tier:
        return self.memory.cache.tier

    @property
    def kv_budget(self) -> int | None:
        """Bytes of KV cache all admitted requests may hold: kv_budget as set, or the share of the
        memory reserve the auto plan gave the KV cache; None: no bound."""
        return self.tiers.kv_budget if self.tiers.kv_budget is not None else self.config.kv_budget

    def plan_report(self) -> dict[str, Any]:
        """The memory plan as JSON-able values (the CLI prints plan_line, the server shows this at
        /v1/models): budget as asked and resolved, slots per tier, predictor, policy, KV capacity."""
        kv_per_token = self.runner.kv_bytes_per_token()
        kv_budget = self.kv_budget
        slots = {"fast": self.tiers.fast.slots}
        if self.tiers.low is not None:
            slots["low_precision"] = self.tiers.low.slots
        if self.tiers.host is not None:
            slots["host"] = self.tiers.host.slots
        report: dict[str, Any] = {
            "expert_budget": str(self.config.expert_budget),
            "budget_bytes": self.plan.budget_bytes,
            "block_bytes": self.plan.block_bytes,
            "experts_total": self.plan.experts_total,
            "slots": slots,
            "predictor": self.scheduler.predictor.name,
            "policy": self.cache.policy.name,
            "device": self.device,
            "kv_bytes_per_token": kv_per_token,
            "kv_budget_bytes": kv_budget,
            "kv_capacity_tokens": kv_budget // kv_per_token if kv_budget is not None and kv_per_token else None,
        }
        cpu = self.runner.cpu_experts
        if cpu is not None:  # where misses run (left out when they are copied, the default)
            report.update(miss_compute=self.config.miss_compute, cpu_layers=sorted(cpu.layers), cpu_path=cpu.path)
        if self.tiers.fit is not None:
            report.update(self.tiers.fit.as_dict())
        return report

    def plan_line(self) -> str:
        """One line for a start-up log: budget, slots per tier, predictor, policy, KV capacity."""
        r = self.plan_report()
        budget = f"{r['expert_budget']} = {format_bytes(r['budget_bytes'])}"
        if "free_bytes" in r:
            capped = ", capped at all experts" if r["slots"]["fast"] == r["experts_total"] else ""
            budget += (f" (free {format_bytes(r['free_bytes'])} - reserve {format_bytes(r['reserve_bytes'])}"
                       f" - dense {format_bytes(r['dense_bytes'])}{capped})")
        slots = ", ".join(f"{n} {tier}" for tier, n in r["slots"].items())
        kv = "unbounded" if r["kv_capacity_tokens"] is None else f"{r['kv_capacity_tokens']} tokens"
        misses = ""
        if "miss_compute" in r:
            misses = f"; misses: {r['miss_compute']}"
            if r["cpu_layers"]:
                misses += f", CPU layers {','.join(map(str, r['cpu_layers']))}"
        return (f"plan: budget {budget}; slots {slots} of {r['experts_total']} experts; "
                f"predictor {r['predictor']}; policy {r['policy']}; KV capacity {kv}; device {r['device']}{misses}")

    def counters_snapshot(self) -> CacheCounters:
        return dataclasses.replace(self.cache.counters)

    def end_step(self) -> None:
        """After the step's token was read back: land the transfers that finished during the
        step (their bytes count in it) and add the stall the device measured."""
        self.transfers.poll()
        self.cache.counters.stall_seconds += self.compute.collect()
        self.steps += 1

    def stats(self, *, requests: int, **batching: Any) -> EngineStats:
        """Engine-wide figures; `batching` adds the step batcher's counters (Engine.stats)."""
        alloc = self.tier.allocator
        cpu = self.runner.cpu_experts
        c = self.cache.counters
        low_uses = self.runner.precision_counters.low_precision_uses
        return EngineStats.build(
            counters_dict(self.cache.counters),
            tokens=self.tokens_generated,
            requests=requests,
            pinned_blocks=self.cache.pinned_blocks() + (self.low_cache.pinned_blocks() if self.low_cache else 0)
            + (cpu.host.pinned_blocks() if cpu is not None else 0),
            transfer_pinned_blocks=alloc.pinned_blocks,  # pinned by loads in flight
            loads_in_flight=self.cache.loading(),
            blocks_in_use=alloc.live_blocks,
            resident_experts=len(self.cache.resident()),
            expert_slots=self.plan.slots,
            budget_bytes=self.plan.budget_bytes,
            block_bytes=self.plan.block_bytes,
            experts_total=self.plan.experts_total,
            arena_locked=self.tier.locked,
            device=self.device,
            expert_precision=self.store.precision,
            policy=self.cache.policy.name,
            prefetch=self.scheduler.predictor.name,
            predictor_source=getattr(self.scheduler.predictor, "source", None),
            prefetch_depth=self.scheduler.depth,
            budget_split=self.config.budget_split,
            overlap_fraction=overlap_fraction(self.cache.counters),
            host_syncs=self.compute.host_syncs,
            host_syncs_per_token=self.compute.host_syncs / self.steps if self.steps else 0.0,
            low_precision_uses=self.runner.precision_counters.low_precision_uses,
            skipped_experts=self.runner.precision_counters.skipped_experts,
            low_precision_bytes_loaded=self.low_cache.counters.bytes_loaded if self.low_cache else 0,
            miss_precision=self.config.miss_precision,
            miss_compute=self.config.miss_compute,
            cpu_layers=sorted(cpu.layers) if cpu is not None else [],
            cpu_expert_uses=cpu.counters.uses if cpu is not None else 0,
            cpu_expert_rows=cpu.counters.rows if cpu is not None else 0,
            cpu_expert_seconds=cpu.counters.seconds if cpu is not None else 0.0,
            cpu_seconds_per_expert=cpu.speed.seconds_fixed if cpu is not None else None,
            cpu_seconds_per_row=cpu.speed.seconds_per_row if cpu is not None else None,
            link_bytes_per_second=cpu.link.bytes_per_second if cpu is not None else None,
            link_source=cpu.link.source if cpu is not None else None,
            cpu_path=cpu.path if cpu is not None else None,
            expert_use_share=expert_use_share(c.hits + c.inflight_hits, c.misses,
                                              cpu.counters.uses if cpu is not None else 0, low_uses),
            **self.scheduler.metrics.as_dict(),
            **batching,
        )

    async def aclose(self) -> None:
        try:
            if self.runner.cpu_experts is not None:
                self.runner.cpu_experts.close()  # its jobs ended with their steps: this only stops the worker
            await self.memory.aclose()
        finally:
            self.checkpoint.close()


def overlap_fraction(c: CacheCounters) -> float:
    """Hidden transfer time / total transfer time: 1 - (time compute waited for transfers /
    time transfers ran), both measured (on a GPU, the waits are timed with CUDA events)."""
    if c.load_seconds <= 0:
        return 1.0
    return max(0.0, 1.0 - min(c.stall_seconds, c.load_seconds) / c.load_seconds)


def _resolve_device(requested: str) -> str:
    """'auto' picks the GPU when the CUDA driver and torch both see one ('sim' is only ever
    asked for: it is a test device)."""
    if requested in ("cpu", "sim"):
        return requested
    available = _core.cuda_available() and torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise CudaUnavailable("device='cuda' was requested but no CUDA device is available")
    return "cuda" if available else "cpu"


def _tokenizer(path: Path) -> Tokenizer | None:
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception subclass
        raise CheckpointError(f"{file}: cannot load tokenizer ({e})", path=str(file)) from e


async def open_session(path: Path, config: EngineConfig) -> Session:
    """Open `path` under `config`: validate, convert or reuse the store, allocate the fast tier."""
    device = _resolve_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    ckpt = await asyncio.to_thread(Checkpoint, path)
    path = ckpt.path  # a repo id resolves to its snapshot folder in the Hugging Face cache
    arch = parse_arch(ckpt)
    dtype = config.dtype or arch.dtype
    # an FP8 checkpoint's experts stay FP8 unless a precision is asked for (store/fp8.py)
    codec = codec_for(config.precision or native_precision(ckpt) or DTYPE_NAMES[dtype], config.group_size)
    if config.precision is None and mxfp4.native_precision(ckpt):  # gpt-oss's MXFP4 experts stay MXFP4
        codec = codec_for("mxfp4")
    experts_total = len(arch.moe_layers) * arch.num_experts
    if experts_total == 0:
        raise ConfigError(f"{path}: the model has no MoE layers")
    low_codec = codec_for(config.miss_precision, config.group_size) if config.miss_precision else None
    block = codec.layout(arch.hidden_size, arch.expert_intermediate, arch.swiglu).size
    low_block = low_codec.layout(arch.hidden_size, arch.expert_intermediate, arch.swiglu).size if low_codec else None
    expert_elements = experts_total * 3 * arch.hidden_size * arch.expert_intermediate  # gate, up, down
    tiers = plan_tiers(config, device, block, low_block, experts_total, arch.top_k,
                       dense_bytes=dense_weight_bytes(ckpt, expert_elements, dtype))
    location = await asyncio.to_thread(located_store, path, config.store_dir, identity=ckpt.fingerprint)
    root = location.root
    # Cancelling the open (Ctrl-C under asyncio.run) stops a conversion within an expert and
    # removes its temporary folder before the cancellation completes.
    store = await open_or_convert_async(ckpt, arch, codec, root, mode=config.store_mode, progress=config.progress)
    low_store = None
    if low_codec is not None:
        low_store = await open_or_convert_async(ckpt, arch, low_codec, root, mode=config.store_mode,
                                                progress=config.progress)
    model = await asyncio.to_thread(load_dense, ckpt, arch, dtype)
    compute = make_device(device, sim_bandwidth_gbps=config.sim_bandwidth_gbps, sim_latency_us=config.sim_latency_us)
    if device == "cuda":  # the GPU's measured kernel table, if tuned: a malformed one fails the open, not a step
        kernel_choice.open_for(compute.torch_device)
    if compute.torch_device.type != "cpu":
        model.to(compute.torch_device)
    tokenizer = _tokenizer(path)
    policy = make_policy(
        config.policy, moe_layers=arch.moe_layers, num_layers=arch.num_layers, num_experts=arch.num_experts,
        top_k=arch.top_k, slots=tiers.fast.slots,
    )
    first = model.layers[arch.moe_layers[0]]
    routers = router_table(
        {layer.index: layer.router.weight for layer in model.layers if layer.router is not None},
        top_k=arch.top_k, scoring=arch.router.scoring, dtype=model.dtype,
        entry=EntryInputs(model.embed, first.post_norm, first.post_norm_bias, arch.rms_norm_eps),
    )
    width, in_flight = speculation(arch.top_k, tiers.fast.block_bytes, config.io_chunk)
    width, in_flight = config.prefetch_width or width, config.max_speculative_loads or in_flight
    predictor = make_predictor(
        config.prefetch, routers, config.prefetch_depth, Path(config.predictor_dir or path),
        model_signature(ckpt, arch), width,
    )
    memory = await build_memory(config, tiers, compute, store, low_store, policy, arch.moe_layers, arch.num_experts)
    try:
        session = _assemble(config, ckpt, arch, dtype, device, store, tiers, model, memory, policy, predictor,
                            tokenizer, (width, in_flight))
        session.store_root, session.store_note = root, location.note
        session.runner.cpu_experts = await _cpu_experts(config, arch, device, store, tiers, memory, dtype)
        log.info("%s", session.plan_line())
        return session
    except BaseException:
        await memory.aclose()
        raise


def _assemble(
    config: EngineConfig,
    ckpt: Checkpoint,
    arch: Arch,
    dtype: torch.dtype,
    device: str,
    store: ExpertStore,
    tiers: TierPlan,
    model: DenseModel,
    memory: ExpertMemory,
    policy: EvictionPolicy,
    predictor: Predictor,
    tokenizer: Tokenizer | None,
    speculate: tuple[int, int],
) -> Session:
    cache, low_cache = memory.cache, memory.low_cache
    width, in_flight = speculate  # guesses loaded for the next layer, speculative loads in flight
    scheduler = Scheduler(
        predictor,
        tiers.fast.slots,
        arch.moe_layers,
        arch.top_k,
        config.prefetch_depth,
        split_budget=config.budget_split == "plec",
        next_width=width,
        max_speculative=in_flight,
        experts_total=len(arch.moe_layers) * arch.num_experts,
    )
    if isinstance(policy, PredictedPolicy):
        policy.upcoming = scheduler.upcoming
    miss = None
    if low_cache is not None:
        miss = MissPrecision(config.miss_thresholds[0], config.miss_thresholds[1], low_cache)
    runner = ModelRunner(model, cache, memory.device, scheduler, miss, config.prefill_chunk)
    return Session(config, ckpt, arch, dtype, device, store, tiers, model, memory, runner, tokenizer, scheduler)


async def _cpu_experts(config: EngineConfig, arch: Arch, device: str, store: ExpertStore, tiers: TierPlan,
                       memory: ExpertMemory, dtype: torch.dtype) -> CpuExperts | None:
    """miss_compute / cpu_layers: the CPU worker, calibrated on a real expert of the store, and the
    link's speed (configured on the simulated device, measured on a GPU). None when both are off."""
    if config.miss_compute == "copy" and not config.cpu_layers:
        return None
    if device == "cpu":  # device='auto' resolved to the CPU (an explicit 'cpu' is refused earlier)
        name = "miss_compute" if config.miss_compute != "copy" else "cpu_layers"
        raise ConfigError(f"{name}={getattr(config, name)!r}: the engine runs on the CPU (no GPU found for "
                          "device='auto'), where experts already run on the CPU; drop the option")
    try:
        layers = resolve_cpu_layers(config.cpu_layers, arch.moe_layers)
    except ValueError as e:
        raise ConfigError(f"cpu_layers={config.cpu_layers!r}: {e}") from None
    source = memory.cache.source
    if isinstance(source, HomeSource):
        host = HostExperts(home=source.home)
    elif isinstance(source, HostCacheSource):
        host = HostExperts(host_cache=source.host)
    else:
        raise ConfigError(f"miss_compute={config.miss_compute!r}: the experts have no host copy to compute from")
    compute = memory.device
    # On a GPU the worker leaves one CPU to the event loop (which launches the GPU's work and lands
    # copies): one thread fewer, pinned off that CPU. The simulated device computes the device's
    # experts on the CPU too, with the device path's thread counts (the same bits): no pinning.
    cpus = worker_cpus() if device == "cuda" else None
    threads = min(torch.get_num_threads(), len(cpus)) if cpus else torch.get_num_threads()
    weights = await asyncio.to_thread(read_expert, store, (arch.moe_layers[0], 0))
    block = tiers.fast.block_bytes
    if device == "cuda":  # the CPU's fastest path: results differ from the GPU's whichever it is
        path, ffn, speed = await asyncio.to_thread(pick_path, weights, arch.hidden_size, dtype, expert_ffn, threads)
        link = await asyncio.to_thread(measure_cuda_link, block, compute.torch_device)
    else:  # sim: the device path's own arithmetic, so every placement gives the same bits
        path, ffn = "as_device", None
        speed = await asyncio.to_thread(calibrate, weights, arch.hidden_size, dtype, expert_ffn, threads)
        link = sim_link(config.sim_bandwidth_gbps, config.sim_latency_us, block, config.io_chunk)
    memory.cache.host_layers = layers
    low_block = tiers.low.block_bytes if tiers.low is not None else None
    return CpuExperts(config.miss_compute, host, speed, link, block_bytes=block, low_block_bytes=low_block,
                      layers=layers, device=compute, threads=threads, path=path, ffn=ffn, cpus=cpus)


def dense_weight_bytes(ckpt: Checkpoint, expert_elements: int, dtype: torch.dtype) -> int:
    """Bytes of the weights outside the routed experts (attention, norms, embeddings, shared experts)
    in the compute dtype: they live in the fast tier beside the expert slots."""
    elements = sum(math.prod(info.shape) for info in ckpt.tensors.values())
    # MXFP4 experts (GPT-OSS) are held as uint8 blocks and scales, not 3 * H * I elements each
    packed = sum(math.prod(info.shape) for name, info in ckpt.tensors.items()
                 if name.endswith(("_blocks", "_scales")))
    return max(0, elements - (packed or expert_elements)) * dtype.itemsize


def model_signature(ckpt: Checkpoint, arch: Arch) -> str:
    """Identifies a model's routing for predictors and traces: family and a hash of its config."""
    digest = hashlib.sha256(json.dumps(ckpt.config, sort_keys=True).encode()).hexdigest()[:16]
    return f"{arch.family}:{digest}"

