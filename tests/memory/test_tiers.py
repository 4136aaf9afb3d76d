"""The tier plumbing of the GPU configuration, exercised host -> host where no GPU exists:
a pinned home holding every expert, and a host cache in front of the disk (three tiers)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moeflow.config import Budget, MemoryPlan
from moeflow.memory.transfers import AsyncTransfers
from moeflow.memory.cache import ExpertCache
from moeflow.memory.policies import LRUPolicy
from moeflow.memory.sources import HomeSource, HostCacheSource, StoreSource
from moeflow.memory.tiers import FastTier, HostHome
from moeflow.models import Checkpoint, parse_arch
from moeflow.store import codec_for, open_or_convert
from tests.scheduling.conftest import TRAINED


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    dst = tmp_path / "model"
    shutil.copytree(TRAINED, dst, ignore=shutil.ignore_patterns(".moeflow", "routing_predictor*"))
    ckpt = Checkpoint(dst)
    arch = parse_arch(ckpt)
    return arch, open_or_convert(ckpt, arch, codec_for("bfloat16"), dst / ".moeflow", progress=False)


def _blob(store, key):  # type: ignore[no-untyped-def]
    with open(store.data_path, "rb") as f:
        f.seek(store.offset(*key))
        return f.read(store.blob_size)


def _plan(store, arch, slots: int) -> MemoryPlan:  # type: ignore[no-untyped-def]
    return MemoryPlan.build(Budget(bytes=slots * store.blob_size), store.blob_size,
                            len(arch.moe_layers) * arch.num_experts, arch.top_k)


@pytest.mark.asyncio
async def test_home_holds_every_expert_and_copies_them_byte_exact(store) -> None:  # type: ignore[no-untyped-def]
    arch, st = store
    async with AsyncTransfers(workers=2) as transfers:
        home = HostHome(st, arch.moe_layers, arch.num_experts)
        await home.load(transfers, direct="auto", verify=True, progress=False)
        cache = ExpertCache(FastTier(_plan(st, arch, 4)), HomeSource(home, transfers), transfers, LRUPolicy())
        for key in [(0, 3), (5, 15), (2, 0), (0, 3), (4, 9), (1, 1)]:
            view = (await cache.acquire(key)).weights
            raw = view["gate_up"].view(-1).view(dtype=__import__("torch").uint8)
            assert bytes(raw.numpy()) == _blob(st, key)[: raw.numel()]
            cache.release(key)
        assert cache.counters.evictions >= 1 and cache.pinned_blocks() == 0
        await cache.aclose()
        home.close()
        assert home.allocator.live_blocks == 0


@pytest.mark.asyncio
async def test_three_tiers_chain_disk_host_and_fast_memory(store) -> None:  # type: ignore[no-untyped-def]
    import torch

    arch, st = store
    async with AsyncTransfers(workers=2) as transfers:
        host = ExpertCache(FastTier(_plan(st, arch, 3)), StoreSource(st, transfers, direct="auto", verify=True),
                           transfers, LRUPolicy())
        fast = ExpertCache(FastTier(_plan(st, arch, 2)), HostCacheSource(host, transfers), transfers, LRUPolicy())
        keys = [(layer, e) for layer in (0, 3) for e in (1, 7, 12)]
        for key in keys * 2:
            view = (await fast.acquire(key)).weights
            raw = view["down"].reshape(-1).view(torch.uint8)
            slot = st.layout.slot("down")
            assert bytes(raw.numpy()) == _blob(st, key)[slot.offset : slot.offset + slot.nbytes]
            fast.release(key)
        assert host.counters.loads >= 6 and fast.counters.loads >= 6  # both tiers moved bytes
        assert host.pinned_blocks() == 0 and fast.pinned_blocks() == 0
        await fast.aclose()  # closes the host tier behind it too
        assert fast.tier.allocator.live_blocks == 0 and host.tier.allocator.live_blocks == 0
