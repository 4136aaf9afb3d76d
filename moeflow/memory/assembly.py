"""Putting the tiers together for one engine: CPU (RAM over disk) or GPU (device over pinned host,
optionally over disk), with the optional low-precision cache of HOBBIT's miss policy."""

from __future__ import annotations

from dataclasses import dataclass, field

from moeflow.config import Budget, EngineConfig, MemoryPlan
from moeflow.memory.transfers import AsyncTransfers
from moeflow.memory.cache import ExpertCache
from moeflow.memory.policies import EvictionPolicy, LRUPolicy
from moeflow.memory.sources import HomeSource, HostCacheSource, Source, StoreSource
from moeflow.memory.tiers import DeviceTier, FastTier, HostHome
from moeflow.store.store import ExpertStore


@dataclass
class ExpertMemory:
    """Everything that holds experts; `aclose` frees it all."""

    transfers: AsyncTransfers
    cache: ExpertCache
    low_cache: ExpertCache | None = None
    homes: list[HostHome] = field(default_factory=list)

    async def aclose(self) -> None:
        try:
            await self.cache.aclose()
            if self.low_cache is not None:
                await self.low_cache.aclose()
            for home in self.homes:
                home.close()
        finally:
            await self.transfers.aclose()


async def build_memory(
    config: EngineConfig,
    device: str,
    plan: MemoryPlan,
    store: ExpertStore,
    policy: EvictionPolicy,
    low: tuple[MemoryPlan, ExpertStore] | None,
    layers: tuple[int, ...],
    num_experts: int,
    top_k: int,
) -> ExpertMemory:
    transfers = AsyncTransfers(
        workers=config.io_workers, chunk_size=config.io_chunk, device=0 if device == "cuda" else None
    )
    homes: list[HostHome] = []
    try:
        if device == "cpu":
            cache = ExpertCache(FastTier(plan), _store_source(config, store, transfers), transfers, policy)
            memory = ExpertMemory(transfers, cache)
            if low is not None:
                low_source = _store_source(config, low[1], transfers)
                memory.low_cache = ExpertCache(FastTier(low[0]), low_source, transfers, LRUPolicy())
            return memory
        async def load_home(home_store: ExpertStore) -> HomeSource:
            home = HostHome(home_store, layers, num_experts)
            homes.append(home)
            await home.load(transfers, direct=config.direct_io, verify=config.verify_checksums,
                            progress=config.progress)
            return HomeSource(home, transfers)

        host_budget = config.host_budget or Budget(fraction=1.0)
        if host_budget.resolve(plan.total_expert_bytes) >= plan.total_expert_bytes:
            source: Source = await load_home(store)
        else:  # three tiers: device <- pinned host cache <- disk
            host_plan = MemoryPlan.build(host_budget, store.blob_size, plan.experts_total, top_k)
            host_cache = ExpertCache(FastTier(host_plan), _store_source(config, store, transfers), transfers,
                                     LRUPolicy())
            source = HostCacheSource(host_cache, transfers)
        memory = ExpertMemory(transfers, ExpertCache(DeviceTier(plan), source, transfers, policy), homes=homes)
        if low is not None:
            memory.low_cache = ExpertCache(DeviceTier(low[0]), await load_home(low[1]), transfers, LRUPolicy())
        return memory
    except BaseException:
        await transfers.aclose()  # cancels queued reads and waits for running ones: blocks unpin
        for home in homes:
            home.close()
        raise


def _store_source(config: EngineConfig, store: ExpertStore, transfers: AsyncTransfers) -> StoreSource:
    return StoreSource(store, transfers, direct=config.direct_io, verify=config.verify_checksums)
