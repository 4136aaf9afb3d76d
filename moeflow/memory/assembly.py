"""Putting the tiers of a `TierPlan` together: CPU (RAM over disk) or GPU / simulated GPU
(device over pinned host, optionally over disk), with HOBBIT's optional low-precision cache."""

from __future__ import annotations

from dataclasses import dataclass, field

from moeflow.config import EngineConfig
from moeflow.memory.cache import ExpertCache
from moeflow.memory.device import ComputeDevice, SimDevice
from moeflow.memory.planner import TierPlan
from moeflow.memory.policies import EvictionPolicy, LRUPolicy
from moeflow.memory.sources import HomeSource, HostCacheSource, Source, StoreSource
from moeflow.memory.tiers import DeviceTier, FastTier, HostHome
from moeflow.memory.transfers import AsyncTransfers
from moeflow.store.store import ExpertStore


@dataclass
class ExpertMemory:
    """Everything that holds experts; `aclose` frees it all."""

    transfers: AsyncTransfers
    cache: ExpertCache
    device: ComputeDevice
    low_cache: ExpertCache | None = None
    homes: list[HostHome] = field(default_factory=list)

    async def aclose(self) -> None:
        try:
            await self.cache.aclose()
            if self.low_cache is not None:
                await self.low_cache.aclose()
        finally:
            try:
                # Every transfer has finished or been cancelled before the homes go: a device
                # copy still running (a slow or failed one) pins the home block it reads.
                await self.transfers.aclose()
                for home in self.homes:
                    home.close()
            finally:
                self.device.close()


async def build_memory(
    config: EngineConfig,
    tiers: TierPlan,
    device: ComputeDevice,
    store: ExpertStore,
    low_store: ExpertStore | None,
    policy: EvictionPolicy,
    layers: tuple[int, ...],
    num_experts: int,
) -> ExpertMemory:
    sim = device.sim if isinstance(device, SimDevice) else None
    transfers = AsyncTransfers(
        workers=config.io_workers, chunk_size=config.io_chunk, device=0 if tiers.device == "cuda" else None, sim=sim
    )
    homes: list[HostHome] = []
    try:
        if not tiers.on_device:
            cache = ExpertCache(FastTier(tiers.fast), _store_source(config, store, transfers), transfers, policy,
                                device)
            memory = ExpertMemory(transfers, cache, device)
            if tiers.low is not None and low_store is not None:
                low_source = _store_source(config, low_store, transfers)
                memory.low_cache = ExpertCache(FastTier(tiers.low), low_source, transfers, LRUPolicy(), device)
            return memory

        async def load_home(home_store: ExpertStore) -> HomeSource:
            home = HostHome(home_store, layers, num_experts)
            homes.append(home)
            await home.load(transfers, direct=config.direct_io, verify=config.verify_checksums,
                            progress=config.progress)
            return HomeSource(home, transfers)

        if tiers.host is None:
            source: Source = await load_home(store)
        else:  # three tiers: device <- pinned host cache <- disk
            host_cache = ExpertCache(FastTier(tiers.host), _store_source(config, store, transfers), transfers,
                                     LRUPolicy())
            source = HostCacheSource(host_cache, transfers)
        fast = DeviceTier(tiers.fast, sim=sim)
        memory = ExpertMemory(transfers, ExpertCache(fast, source, transfers, policy, device), device, homes=homes)
        if tiers.low is not None and low_store is not None:
            memory.low_cache = ExpertCache(DeviceTier(tiers.low, sim=sim), await load_home(low_store), transfers,
                                           LRUPolicy(), device)
        return memory
    except BaseException:
        await transfers.aclose()  # cancels queued reads and waits for running ones: blocks unpin
        for home in homes:
            home.close()
        raise


def _store_source(config: EngineConfig, store: ExpertStore, transfers: AsyncTransfers) -> StoreSource:
    return StoreSource(store, transfers, direct=config.direct_io, verify=config.verify_checksums)
