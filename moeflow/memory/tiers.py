"""Memory tiers: an arena with a slab allocator over it, and how a block looks as a tensor.

CPU machine: the fast tier is host RAM (`FastTier`), experts come from the store on disk.
GPU machine: the fast tier is device memory (`DeviceTier`); experts come from a pinned host
home holding them all (`HostHome`), or from a pinned host cache with the disk behind it.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm import tqdm

from moeflow import _core
from moeflow.config import MemoryPlan
from moeflow.errors import MoeflowError
from moeflow.memory.transfers import AsyncTransfers
from moeflow.memory.policies import ExpertKey
from moeflow.store.store import ExpertStore, describe_store_error


class FastTier:
    """Host RAM: one page-aligned (mlocked, CUDA-registered when a GPU exists) arena."""

    kind = "host"

    def __init__(self, plan: MemoryPlan, *, lock: bool = True) -> None:
        self.plan = plan
        self.arena = _core.HostArena(plan.arena_bytes, lock=lock)
        self.allocator = _core.SlabAllocator(self.arena, plan.arena_bytes, slab_size=plan.block_bytes)
        self.slots = plan.slots

    @property
    def locked(self) -> bool:
        return self.arena.locked

    def raw(self, handle: _core.BlockHandle) -> torch.Tensor:
        """The block as a uint8 CPU tensor (no copy; keeps the arena alive)."""
        return torch.frombuffer(self.allocator.view(handle), dtype=torch.uint8)


class _DeviceBlock:
    """__cuda_array_interface__ of one device block, so torch can view it without a copy."""

    def __init__(self, pointer: int, nbytes: int, owner: Any) -> None:
        self.owner = owner  # the DeviceArena outlives every view of its memory
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (pointer, False),
            "version": 3,
            "strides": None,
            "stream": None,  # the caller orders access (stream waits on copy events)
        }


class DeviceTier:
    """Device memory: one arena of the budget's size, cuMemAlloc'd in the primary context of a
    GPU, or in host RAM behind the simulated device's copy engine (`sim`)."""

    kind = "device"

    def __init__(self, plan: MemoryPlan, device: int = 0, sim: _core.SimDevice | None = None) -> None:
        self.plan = plan
        self.device = device
        self.sim = sim
        self.arena = _core.DeviceArena(plan.arena_bytes, device=device, sim=sim)
        self.allocator = _core.SlabAllocator(self.arena, plan.arena_bytes, slab_size=plan.block_bytes)
        self.slots = plan.slots
        self.locked = True

    def raw(self, handle: _core.BlockHandle) -> torch.Tensor:
        if self.sim is not None:  # host memory: a CPU view, its reads reported to the checker
            return torch.frombuffer(self.allocator.view(handle), dtype=torch.uint8)
        block = _DeviceBlock(self.allocator.address(handle), handle.size, self.arena)
        return torch.as_tensor(block, device=f"cuda:{self.device}")


class HostHome:
    """Every expert of a store in pinned host memory (the slow tier of a GPU machine): loaded
    once at open from the store on disk, then the source of every host -> device copy."""

    def __init__(self, store: ExpertStore, layers: tuple[int, ...], num_experts: int) -> None:
        self.store = store
        total = store.blob_size * len(store.manifest.crc32)
        self.arena = _core.HostArena(total, cuda_register=True)  # page-locked: DMA reads it
        self.allocator = _core.SlabAllocator(self.arena, total, slab_size=store.blob_size)
        self.size_class = self.allocator.add_class(store.blob_size)
        self.keys = [(layer, e) for layer in layers for e in range(num_experts)]
        self.handles: dict[ExpertKey, _core.BlockHandle] = {}

    def handle(self, key: ExpertKey) -> _core.BlockHandle:
        return self.handles[key]

    async def load(self, transfers: AsyncTransfers, *, direct: str, verify: bool, progress: bool) -> None:
        """Read every blob from the store (in parallel, checksummed)."""
        file_id = transfers.register_file(str(self.store.data_path))
        try:
            bar = tqdm(total=len(self.keys), desc="loading experts into pinned memory", unit="expert",
                       disable=not progress)
            pending = []
            for key in self.keys:
                handle = self.allocator.alloc(self.size_class)
                self.handles[key] = handle
                pending.append(transfers.submit_read(
                    file_id, self.store.offset(*key), self.store.blob_size, self.allocator, handle,
                    priority=_core.PRIORITY_DEMAND, direct=direct,  # type: ignore[arg-type]
                    expect_crc32=self.store.crc32(*key) if verify else None, owned=False,
                ))
            for key, ticket in zip(self.keys, pending, strict=True):
                try:
                    await ticket
                except MoeflowError as e:
                    raise describe_store_error(self.store, key, e) from e
                bar.update(1)
            bar.close()
        finally:
            transfers.unregister_file(file_id)

    def close(self) -> None:
        for handle in self.handles.values():
            self.allocator.free(handle)
        self.handles.clear()

