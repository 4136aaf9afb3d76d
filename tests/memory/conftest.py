"""Fixtures of the memory-core tests: arenas, allocators, engines and files on a real disk."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from moeflow import _core

MIB = 1 << 20


@dataclass
class HostPool:
    """A host arena with an allocator and one size class."""

    arena: _core.HostArena
    allocator: _core.SlabAllocator
    size_class: int

    def alloc(self) -> _core.BlockHandle:
        return self.allocator.alloc(self.size_class)


@dataclass
class DataFile:
    path: Path
    data: bytes


@pytest.fixture
def host_pool() -> Callable[..., HostPool]:
    """Factory: HostPool(arena bytes, block bytes, slab bytes); unlocked, so creation is instant."""

    def make(arena: int = 8 * MIB, block: int = MIB, slab: int | None = None) -> HostPool:
        host = _core.HostArena(arena, lock=False)
        allocator = _core.SlabAllocator(host, host.size, slab_size=slab or max(block, MIB))
        return HostPool(host, allocator, allocator.add_class(block))

    return make


@pytest.fixture
def disk_dir() -> Iterator[Path]:
    """A directory on a real filesystem (tmpfs refuses O_DIRECT): /var/tmp when writable."""
    root = "/var/tmp" if os.access("/var/tmp", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="moeflow-test-", dir=root) as path:
        yield Path(path)


@pytest.fixture
def data_file(disk_dir: Path) -> Callable[[int], DataFile]:
    """Factory: a file of `size` random bytes on a real disk."""
    counter = iter(range(1_000_000))

    def make(size: int) -> DataFile:
        data = os.urandom(size)
        path = disk_dir / f"data{next(counter)}.bin"
        path.write_bytes(data)
        return DataFile(path, data)

    return make


@pytest.fixture
def engine() -> Iterator[_core.TransferEngine]:
    """Two workers, 64 KiB parts (so small reads still split)."""
    eng = _core.TransferEngine(workers=2, chunk_size=64 * 1024)
    yield eng
    eng.close()


def _wait_final(engine: _core.TransferEngine, transfer_id: int, timeout: float = 20.0) -> _core.Completion:
    while True:
        completion = engine.wait(timeout)
        assert completion is not None, f"no completion for transfer {transfer_id} within {timeout} s"
        if completion.id == transfer_id and completion.status != "issued":
            return completion


def _occupy(engine: _core.TransferEngine, pool: HostPool, copies: int = 24) -> list[int]:
    # One block-sized memcpy takes a few ms; a run of them keeps the worker busy for
    # well over 100 ms, and the first is taken (its pop is polled) before returning.
    src, dst = pool.alloc(), pool.alloc()
    ids = [engine.submit_copy(pool.allocator, src, pool.allocator, dst, src.size, owned=False) for _ in range(copies)]
    while sum(v for k, v in engine.stats().items() if k.startswith("queued_")) == copies:
        time.sleep(0.0005)
    time.sleep(0.002)  # the claim follows the pop within nanoseconds
    return ids


@pytest.fixture
def wait_final() -> Callable[..., _core.Completion]:
    """Blocking wait for the final completion of a transfer (others are dropped)."""
    return _wait_final


@pytest.fixture
def occupy() -> Callable[[_core.TransferEngine, HostPool], list[int]]:
    """Keep a one-worker engine busy with single-part copies between two `pool` blocks;
    returns their ids once the worker took the first, so what is submitted next at the
    same or a lower priority stays queued behind them."""
    return _occupy


@dataclass
class SimPool:
    """A simulated device arena with an allocator and one size class."""

    sim: _core.SimDevice
    arena: _core.DeviceArena
    allocator: _core.SlabAllocator
    size_class: int

    def alloc(self) -> _core.BlockHandle:
        return self.allocator.alloc(self.size_class)


@pytest.fixture
def sim_pool() -> Callable[..., SimPool]:
    """Factory: SimPool(sim, arena bytes, block bytes, slab bytes) on a simulated device."""

    def make(sim: _core.SimDevice, arena: int = 8 * MIB, block: int = MIB, slab: int | None = None) -> SimPool:
        device = _core.DeviceArena(arena, sim=sim)
        allocator = _core.SlabAllocator(device, device.size, slab_size=slab or max(block, MIB))
        return SimPool(sim, device, allocator, allocator.add_class(block))

    return make
