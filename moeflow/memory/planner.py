"""Tier planning, in one place and once per engine: how the expert budget splits between
precisions, and which tiers hold the experts (device, pinned host, disk)."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moeflow.config import KV_SHARE_OF_RESERVE, Budget, EngineConfig, MemoryPlan, default_reserve, format_bytes
from moeflow.errors import ConfigError

log = logging.getLogger("moeflow.memory")

MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True)
class FitPlan:
    """How expert_budget='auto' was sized: what the fast tier had free, what was kept back, where
    the free figure came from."""

    free_bytes: int
    reserve_bytes: int  # left for the KV cache and activations (memory_reserve)
    dense_bytes: int  # the non-expert weights, which live in the fast tier too
    source: str  # the probe: torch.cuda.mem_get_info, /proc/meminfo MemAvailable, ...
    host_free_bytes: int | None = None  # a GPU's host side: what sized the pinned host tier

    def as_dict(self) -> dict[str, int | str]:
        out: dict[str, int | str] = {"free_bytes": self.free_bytes, "reserve_bytes": self.reserve_bytes,
                                     "dense_bytes": self.dense_bytes, "free_source": self.source}
        if self.host_free_bytes is not None:
            out["host_free_bytes"] = self.host_free_bytes
        return out


def free_memory(device: str) -> tuple[int, str]:
    """Bytes the fast tier of `device` has free, and where the figure comes from. 'cuda': the
    driver's free device memory; 'cpu' and 'sim' (whose device memory is host memory): the
    kernel's MemAvailable (what can be allocated without swapping)."""
    if device == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info()
        return int(free), "torch.cuda.mem_get_info"
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, f"{MEMINFO} MemAvailable"
    except OSError:
        pass
    try:  # not Linux: free physical pages
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "sysconf SC_AVPHYS_PAGES"
    except (ValueError, OSError, AttributeError) as e:
        raise ConfigError(f"expert_budget='auto': cannot tell how much memory is free on {device} ({e}); "
                          "give expert_budget as a size or a percentage") from e


@dataclass(frozen=True)
class TierPlan:
    """Where every expert lives for one engine.

    - `device` "cpu": the fast tier is RAM (`fast`), the store on disk is the home of every expert.
    - `device` "cuda" or "sim": the fast tier is device memory (`fast`); the slow tier is a pinned
      host home holding every expert, or, when `host` is set, a pinned host cache of that size
      with the disk behind it (three tiers).
    - `low`: HOBBIT's low-precision cache, carved out of the expert budget (miss_precision).
    """

    device: str
    fast: MemoryPlan
    low: MemoryPlan | None = None
    host: MemoryPlan | None = None
    fit: FitPlan | None = None  # set when expert_budget='auto'
    kv_budget: int | None = None  # auto: the KV cache's share of the reserve, when kv_budget was not set

    @property
    def on_device(self) -> bool:
        return self.device != "cpu"


def fit_budget(
    config: EngineConfig, device: str, block_bytes: int, experts_total: int, top_k: int, dense_bytes: int,
    probe: Callable[[str], tuple[int, str]] | None = None,
) -> tuple[Budget, FitPlan]:
    """expert_budget='auto': the fast tier's free bytes, minus the reserve (memory_reserve, at least
    kv_budget's share) and the dense weights, capped at all experts. ConfigError naming the free
    bytes, the reserve and the minimum when that leaves less than the top-k experts of one layer."""
    free, source = (probe or free_memory)(device)
    reserve = config.memory_reserve if config.memory_reserve is not None else default_reserve(free)
    if config.kv_budget is not None:
        reserve = max(reserve, int(config.kv_budget / KV_SHARE_OF_RESERVE))
    fit = FitPlan(free, reserve, dense_bytes, source)
    minimum = block_bytes * top_k
    left = free - reserve - dense_bytes
    if left < minimum:
        raise ConfigError(
            f"expert_budget='auto' on {device}: {format_bytes(free)} free ({free} bytes, {source}) minus "
            f"memory_reserve {format_bytes(reserve)} ({reserve} bytes) and the dense weights "
            f"{format_bytes(dense_bytes)} leaves {format_bytes(max(left, 0))}, below the minimum of {minimum} bytes "
            f"({format_bytes(minimum)}: the top-{top_k} experts of one layer); lower memory_reserve, free memory, "
            f"or give expert_budget as a size"
        )
    return Budget(bytes=min(left, block_bytes * experts_total)), fit


def fit_host(
    fit: FitPlan, block_bytes: int, experts_total: int, top_k: int, probe: Callable[[str], tuple[int, str]] | None,
) -> tuple[MemoryPlan | None, FitPlan]:
    """expert_budget='auto' on a GPU with host_budget unset: pinned host memory holds every expert when
    the host's free memory has room for them beside a reserve (10%, at least 1 GiB); else it is a
    pinned cache of what is free, with the disk behind it. (The simulated device is left out: its
    device memory is host memory too, and its host home is sized as asked.)"""
    free, _source = (probe or free_memory)("cpu")
    left = free - default_reserve(free)
    fit = dataclasses.replace(fit, host_free_bytes=free)
    if left >= block_bytes * experts_total:
        return None, fit
    if left < block_bytes * top_k:
        raise ConfigError(
            f"expert_budget='auto': the host has {format_bytes(free)} free ({free} bytes); after a reserve of "
            f"{format_bytes(default_reserve(free))} that is below the minimum pinned host cache of "
            f"{block_bytes * top_k} bytes (the top-{top_k} experts of one layer); free host memory or set host_budget"
        )
    return MemoryPlan.build(Budget(bytes=left), block_bytes, experts_total, top_k, option="host_budget"), fit


def plan_tiers(
    config: EngineConfig, device: str, block_bytes: int, low_block_bytes: int | None, experts_total: int, top_k: int,
    *, dense_bytes: int = 0, probe: Callable[[str], tuple[int, str]] | None = None,
) -> TierPlan:
    """The tiers for `config` on `device`, given one expert's block size in the store's precision
    (and in the low precision when `config.miss_precision` is set). Raises ConfigError naming the
    option for a budget below the top-k experts of one layer. expert_budget='auto' is sized by
    fit_budget against `probe` (default free_memory: what `device` has free); `dense_bytes` are the weights
    outside the experts, which share the fast tier."""
    budget, fit, kv_budget = config.expert_budget, None, None
    if budget.auto:
        budget, fit = fit_budget(config, device, block_bytes, experts_total, top_k, dense_bytes, probe)
        if config.kv_budget is None:
            kv_budget = int(fit.reserve_bytes * KV_SHARE_OF_RESERVE)
    if config.miss_precision is None or low_block_bytes is None:
        fast = MemoryPlan.build(budget, block_bytes, experts_total, top_k)
        low = None
    else:
        total = budget.resolve(block_bytes * experts_total)
        low_bytes = int(total * config.low_precision_share)
        try:
            fast = MemoryPlan.build(Budget(bytes=total - low_bytes), block_bytes, experts_total, top_k)
            low = MemoryPlan.build(Budget(bytes=low_bytes), low_block_bytes, experts_total, top_k)
        except ConfigError as e:
            raise ConfigError(
                f"expert_budget={budget} split {1 - config.low_precision_share:.0%} high / "
                f"{config.low_precision_share:.0%} low precision ({config.miss_precision}): {e}"
            ) from e
    host = None
    if device != "cpu" and config.host_budget is not None:
        total = block_bytes * experts_total
        if config.host_budget.resolve(total) < total:
            host = MemoryPlan.build(config.host_budget, block_bytes, experts_total, top_k, option="host_budget")
    elif device == "cuda" and fit is not None:
        host, fit = fit_host(fit, block_bytes, experts_total, top_k, probe)
    plan = TierPlan(device, fast, low, host, fit, kv_budget)
    if fit is not None:
        log.info("expert_budget=auto on %s: %s free (%s) - reserve %s - dense weights %s -> %s, %d of %d experts",
                 device, format_bytes(fit.free_bytes), fit.source, format_bytes(fit.reserve_bytes),
                 format_bytes(fit.dense_bytes), format_bytes(fast.budget_bytes), fast.slots, experts_total)
    return plan
