"""Every exception class of the core: where it lives, what it derives from, which attributes it carries."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from moeflow import _core, errors

if TYPE_CHECKING:
    from tests.memory.conftest import DataFile, HostPool

MIB = 1 << 20

HIERARCHY = {
    "MoeflowError": Exception,
    "OutOfBudget": errors.MoeflowError,
    "InvalidHandle": errors.MoeflowError,
    "StaleHandle": errors.InvalidHandle,
    "ForeignHandle": errors.InvalidHandle,
    "BlockPinned": errors.MoeflowError,
    "ArenaError": errors.MoeflowError,
    "AlignmentError": errors.MoeflowError,
    "TransferError": errors.MoeflowError,
    "ShortRead": errors.TransferError,
    "ChecksumMismatch": errors.TransferError,
    "CudaError": errors.MoeflowError,
    "CudaUnavailable": errors.CudaError,
    "EngineClosed": errors.MoeflowError,
}


@pytest.mark.parametrize(("name", "base"), sorted(HIERARCHY.items()))
def test_classes_are_created_once_in_core_and_reexported(name: str, base: type) -> None:
    cls = getattr(_core, name)
    assert getattr(errors, name) is cls
    assert cls.__module__ == "moeflow._core" and cls.__bases__ == (base,)
    assert cls(f"{name} message").args == (f"{name} message",)


def test_attributes_of_every_raised_error(
    host_pool: Callable[..., HostPool],
    data_file: Callable[[int], DataFile],
    wait_final: Callable[..., _core.Completion],
) -> None:
    pool, other = host_pool(arena=2 * MIB), host_pool()
    engine = _core.TransferEngine(workers=1, chunk_size=MIB)
    file = data_file(8192)
    file_id = engine.register_file(str(file.path))

    kept = [pool.alloc(), pool.alloc()]
    with pytest.raises(errors.OutOfBudget) as budget:
        pool.alloc()
    assert (budget.value.requested, budget.value.available) == (MIB, 0)

    pool.allocator.free(kept.pop())
    stale = pool.alloc()
    pool.allocator.free(stale)
    with pytest.raises(errors.StaleHandle, match="double free"):
        pool.allocator.free(stale)
    with pytest.raises(errors.ForeignHandle, match="allocator"):
        pool.allocator.free(other.alloc())

    pool.allocator.pin(kept[0])
    with pytest.raises(errors.BlockPinned, match="pinned"):
        pool.allocator.free(kept[0])
    pool.allocator.unpin(kept[0])

    with pytest.raises(errors.ArenaError) as arena:
        _core.HostArena(0)
    assert arena.value.requested == 0

    with pytest.raises(errors.AlignmentError):
        engine.submit_read(file_id, 1, 4096, pool.allocator, kept[0], direct="require")

    with pytest.raises(errors.TransferError) as opening:
        engine.register_file(str(file.path) + ".missing")
    assert (opening.value.op, opening.value.errno, opening.value.offset, opening.value.length) == (
        "open", errno.ENOENT, None, None,
    )  # fmt: skip

    short = wait_final(engine, engine.submit_read(file_id, 0, 9000, pool.allocator, kept[0], owned=False)).error()
    assert isinstance(short, errors.ShortRead)
    assert (short.op, short.path, short.errno, short.offset, short.length, short.got) == (
        "read", str(file.path), None, 0, 9000, 8192,
    )  # fmt: skip

    crc = wait_final(
        engine, engine.submit_read(file_id, 0, 100, pool.allocator, kept[0], expect_crc32=1, owned=False)
    ).error()
    assert isinstance(crc, errors.ChecksumMismatch) and crc.expected == 1 and crc.path == str(file.path)
    assert isinstance(crc.actual, int) and crc.offset == 0 and crc.length == 100

    if not _core.cuda_available():
        with pytest.raises(errors.CudaUnavailable) as cuda:
            _core.TransferEngine(device=0)
        assert isinstance(cuda.value, errors.CudaError) and cuda.value.code == 100

    engine.close()
    with pytest.raises(errors.EngineClosed):
        engine.submit_read(file_id, 0, 1, pool.allocator, kept[0])
    assert pool.allocator.pinned_blocks == 0 and pool.allocator.live_blocks == 1
