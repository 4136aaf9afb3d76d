"""SlabAllocator and BlockHandle from Python: accounting, handles, pins and bad input."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from moeflow import _core
from moeflow.errors import BlockPinned, ForeignHandle, InvalidHandle, OutOfBudget, StaleHandle

if TYPE_CHECKING:
    from tests.memory.conftest import HostPool

MIB = 1 << 20


def test_alloc_free_accounting_is_exact(host_pool: Callable[..., HostPool]) -> None:
    pool = host_pool(arena=8 * MIB, block=MIB)
    small = pool.allocator.add_class(100)
    assert pool.allocator.block_size(small) == 4096
    handles = [pool.alloc() for _ in range(3)] + [pool.allocator.alloc(small)]
    stats: dict[str, Any] = pool.allocator.stats()
    assert stats["used"] == 3 * MIB + 4096 == pool.allocator.used
    assert stats["available"] == stats["budget"] - stats["used"]
    assert stats["live_blocks"] == 4 and stats["allocs"] == 4
    assert [c["live"] for c in stats["classes"]] == [3, 1]
    assert stats["classes"][0]["blocks_per_slab"] == 1 and stats["classes"][1]["slabs"] == 1
    for handle in handles:
        pool.allocator.free(handle)
    stats = pool.allocator.stats()
    assert (stats["used"], stats["live_blocks"], stats["frees"], stats["high_water"]) == (0, 0, 4, 3 * MIB + 4096)
    assert stats["slabs_free"] == stats["slabs_total"]


def test_out_of_budget_names_requested_and_available(host_pool: Callable[..., HostPool]) -> None:
    arena = _core.HostArena(8 * MIB, lock=False)
    allocator = _core.SlabAllocator(arena, 3 * MIB, slab_size=MIB)
    size_class = allocator.add_class(MIB)
    kept = [allocator.alloc(size_class) for _ in range(3)]
    with pytest.raises(OutOfBudget) as info:
        allocator.alloc(size_class)
    assert (info.value.requested, info.value.available) == (MIB, 0)
    assert allocator.try_alloc(size_class) is None
    allocator.free(kept[0])
    assert allocator.try_alloc(size_class) is not None


def test_handles_are_hashable_values(host_pool: Callable[..., HostPool]) -> None:
    pool = host_pool()
    a, b = pool.alloc(), pool.alloc()
    assert a == a and a != b and a != "a handle"
    assert len({a, b, a}) == 2
    assert a.allocator_id == pool.allocator.id and a.size == MIB and a.generation != b.generation
    assert pool.allocator.address(a) == pool.arena.address + a.offset
    assert "BlockHandle(" in repr(a)


def test_double_free_is_a_stale_handle_and_reuse_never_aliases(host_pool: Callable[..., HostPool]) -> None:
    pool = host_pool()
    first = pool.alloc()
    pool.allocator.free(first)
    with pytest.raises(StaleHandle):
        pool.allocator.free(first)
    second = pool.alloc()
    assert second.offset == first.offset and second != first
    for use in (pool.allocator.free, pool.allocator.pin, pool.allocator.address, pool.allocator.view):
        with pytest.raises(StaleHandle):
            use(first)
    assert not pool.allocator.is_live(first) and pool.allocator.is_live(second)
    assert pool.allocator.live_blocks == 1


def test_a_handle_from_another_allocator_is_foreign(host_pool: Callable[..., HostPool]) -> None:
    mine, theirs = host_pool(), host_pool()
    handle = theirs.alloc()
    with pytest.raises(ForeignHandle):
        mine.allocator.free(handle)
    with pytest.raises(InvalidHandle):
        mine.allocator.pin(handle)
    assert not mine.allocator.is_live(handle) and theirs.allocator.is_live(handle)
    assert theirs.allocator.live_blocks == 1 and mine.allocator.live_blocks == 0


def test_pinned_blocks_cannot_be_freed(host_pool: Callable[..., HostPool]) -> None:
    pool = host_pool()
    handle = pool.alloc()
    assert pool.allocator.pin(handle) == 1 and pool.allocator.pin(handle) == 2
    assert pool.allocator.pinned_blocks == 1 and pool.allocator.pin_count(handle) == 2
    with pytest.raises(BlockPinned):
        pool.allocator.free(handle)
    assert pool.allocator.unpin(handle) == 1 and pool.allocator.unpin(handle) == 0
    with pytest.raises(ValueError, match="not pinned"):
        pool.allocator.unpin(handle)
    pool.allocator.free(handle)
    assert pool.allocator.pinned_blocks == 0 and pool.allocator.live_blocks == 0


def test_block_view_writes_into_the_arena(host_pool: Callable[..., HostPool]) -> None:
    pool = host_pool()
    handle = pool.alloc()
    with memoryview(pool.allocator.view(handle)) as mv:
        mv[:4] = b"abcd"
    with memoryview(pool.arena.view(handle.offset, 4)) as mv:
        assert bytes(mv) == b"abcd"


@pytest.mark.parametrize(
    ("budget", "kwargs", "message"),
    [
        (0, {}, "budget must be positive"),
        (9 * MIB, {}, "exceeds the arena size"),
        (MIB, {"align": 3000}, "align must be a power of two, got 3000"),
        (MIB, {"slab_size": 4097}, "got 4097"),
    ],
)
def test_bad_allocator_arguments_are_value_errors(budget: int, kwargs: dict[str, int], message: str) -> None:
    arena = _core.HostArena(8 * MIB, lock=False)
    with pytest.raises(ValueError, match=message):
        _core.SlabAllocator(arena, budget, **kwargs)


def test_a_block_larger_than_a_slab_is_refused(host_pool: Callable[..., HostPool]) -> None:
    pool = host_pool(block=MIB, slab=MIB)
    with pytest.raises(ValueError, match=f"{MIB + 1}.*slab_size {MIB}"):
        pool.allocator.add_class(MIB + 1)
    with pytest.raises(ValueError, match="size class 7 does not exist"):
        pool.allocator.alloc(7)
    with pytest.raises(TypeError):
        _core.SlabAllocator(object(), MIB)  # type: ignore[arg-type]


def test_default_slab_size_and_kind() -> None:
    arena = _core.HostArena(3 * MIB, lock=False)
    allocator = _core.SlabAllocator(arena, MIB)
    assert allocator.slab_size == 3 * MIB and allocator.arena_kind == "host" and allocator.budget == MIB
