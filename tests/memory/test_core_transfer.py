"""TransferEngine from Python (synchronous calls): reads, copies, failures, cancel, promote, close."""

from __future__ import annotations

import errno
import select
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from moeflow import _core
from moeflow.errors import AlignmentError, EngineClosed, StaleHandle, TransferError

if TYPE_CHECKING:
    from tests.memory.conftest import DataFile, HostPool

MIB = 1 << 20
Wait = Callable[..., _core.Completion]


def block_bytes(pool: HostPool, handle: _core.BlockHandle, start: int, length: int) -> bytes:
    with memoryview(pool.allocator.view(handle)) as mv:
        return bytes(mv[start : start + length])


@pytest.mark.parametrize(
    ("offset", "length", "dst_offset", "direct"),
    [
        (0, MIB, 0, True),  # aligned: O_DIRECT, several parts
        (4096, MIB + 100, 0, True),  # aligned body with O_DIRECT, unaligned tail buffered
        (1, 5000, 0, False),  # unaligned start: buffered
        (8192, 3 * 4096, 4096, True),  # aligned destination offset
        (8192, 4096, 100, False),  # unaligned destination address
        (3 * MIB - 777, 777, 0, False),  # the file's unaligned end
    ],
)
def test_reads_are_byte_exact(
    engine: _core.TransferEngine,
    host_pool: Callable[..., HostPool],
    data_file: Callable[[int], DataFile],
    wait_final: Wait,
    offset: int,
    length: int,
    dst_offset: int,
    direct: bool,
) -> None:
    file = data_file(3 * MIB)
    pool = host_pool(block=2 * MIB, slab=2 * MIB)
    file_id = engine.register_file(str(file.path))
    assert engine.file_size(file_id) == 3 * MIB
    handle = pool.alloc()
    transfer = engine.submit_read(file_id, offset, length, pool.allocator, handle, dst_offset=dst_offset, tag=-5)
    done = wait_final(engine, transfer)
    assert (done.status, done.bytes, done.tag, done.error()) == ("done", length, -5, None)
    assert done.direct is direct
    assert block_bytes(pool, handle, dst_offset, length) == file.data[offset : offset + length]
    assert pool.allocator.pinned_blocks == 0 and pool.allocator.is_live(handle)


def test_require_direct_rejects_unaligned_requests_at_submission(
    engine: _core.TransferEngine, host_pool: Callable[..., HostPool], data_file: Callable[[int], DataFile]
) -> None:
    file = data_file(MIB)
    pool = host_pool()
    file_id = engine.register_file(str(file.path))
    handle = pool.alloc()
    for offset, length, dst_offset in [(1, 4096, 0), (0, 4095, 0), (0, 4096, 512)]:
        with pytest.raises(AlignmentError, match="4096"):
            engine.submit_read(
                file_id, offset, length, pool.allocator, handle, dst_offset=dst_offset, direct="require"
            )
    assert pool.allocator.pinned_blocks == 0 and pool.allocator.is_live(handle)
    assert engine.pending() == 0


def test_a_file_shorter_than_the_range_is_a_short_read(
    engine: _core.TransferEngine,
    host_pool: Callable[..., HostPool],
    data_file: Callable[[int], DataFile],
    wait_final: Wait,
) -> None:
    file = data_file(10_000)
    pool = host_pool()
    file_id = engine.register_file(str(file.path))
    handle = pool.alloc()
    done = wait_final(engine, engine.submit_read(file_id, 4096, 200_000, pool.allocator, handle))
    error = done.error()
    assert done.status == "failed" and isinstance(error, _core.ShortRead)
    assert (error.op, error.path, error.offset, error.length, error.got, error.errno) == (
        "read", str(file.path), 4096, 200_000, 10_000 - 4096, None,
    )  # fmt: skip
    assert not pool.allocator.is_live(handle), "the owned block is freed"
    assert pool.allocator.live_blocks == 0 and pool.allocator.pinned_blocks == 0


def test_an_injected_io_error_surfaces_and_frees_its_block(
    engine: _core.TransferEngine,
    host_pool: Callable[..., HostPool],
    data_file: Callable[[int], DataFile],
    wait_final: Wait,
) -> None:
    file = data_file(MIB)
    pool = host_pool()
    file_id = engine.register_file(str(file.path))
    engine.inject_fault(file_id, errno.EIO)
    handle = pool.alloc()
    done = wait_final(engine, engine.submit_read(file_id, 0, 4096, pool.allocator, handle))
    error = done.error()
    assert isinstance(error, TransferError) and not isinstance(error, _core.ShortRead)
    assert (error.op, error.errno, error.path, error.offset, error.length) == ("read", errno.EIO, str(file.path), 0, 4096)
    assert "EIO" in str(error)
    assert pool.allocator.live_blocks == 0
    again = pool.alloc()
    assert wait_final(engine, engine.submit_read(file_id, 0, 4096, pool.allocator, again)).status == "done"
    assert engine.stats()["failed"] == 1


def test_checksums_are_verified(
    engine: _core.TransferEngine,
    host_pool: Callable[..., HostPool],
    data_file: Callable[[int], DataFile],
    wait_final: Wait,
) -> None:
    file = data_file(MIB)
    pool = host_pool()
    file_id = engine.register_file(str(file.path))
    right = zlib.crc32(file.data[10 : 10 + 300_000])
    handle = pool.alloc()
    ok = engine.submit_read(file_id, 10, 300_000, pool.allocator, handle, expect_crc32=right)
    assert wait_final(engine, ok).status == "done"
    bad = engine.submit_read(file_id, 10, 300_000, pool.allocator, handle, expect_crc32=right ^ 0xFF)
    error = wait_final(engine, bad).error()
    assert isinstance(error, _core.ChecksumMismatch)
    assert (error.expected, error.actual, error.offset, error.length) == (right ^ 0xFF, right, 10, 300_000)
    assert not pool.allocator.is_live(handle)


def test_host_copy_and_completion_fields(
    engine: _core.TransferEngine, host_pool: Callable[..., HostPool], wait_final: Wait
) -> None:
    pool = host_pool(block=2 * MIB, slab=2 * MIB)
    src, dst = pool.alloc(), pool.alloc()
    with memoryview(pool.allocator.view(src)) as mv:
        mv[:] = bytes(range(256)) * (len(mv) // 256)
    transfer = engine.submit_copy(pool.allocator, src, pool.allocator, dst, MIB + 3, src_offset=5, dst_offset=1, tag=9)
    assert engine.pending() == 1 or engine.stats()["completed"] == 1
    done = wait_final(engine, transfer)
    assert (done.status, done.bytes, done.tag, done.event) == ("done", MIB + 3, 9, None)
    assert done.nanos > 0 and done.queued_nanos >= 0 and not done.direct and "Completion(" in repr(done)
    assert block_bytes(pool, dst, 1, MIB + 3) == block_bytes(pool, src, 5, MIB + 3)
    assert pool.allocator.pinned_blocks == 0 and pool.allocator.is_live(dst)


def test_cancel_before_start_frees_the_block_and_promote_reorders(
    host_pool: Callable[..., HostPool],
    data_file: Callable[[int], DataFile],
    occupy: Callable[[_core.TransferEngine, HostPool], list[int]],
    wait_final: Wait,
) -> None:
    engine = _core.TransferEngine(workers=1, chunk_size=256 * MIB)
    big = host_pool(arena=256 * MIB, block=96 * MIB, slab=128 * MIB)
    pool = host_pool()
    file_id = engine.register_file(str(data_file(MIB).path))
    busy = occupy(engine, big)
    handles = [pool.alloc() for _ in range(3)]
    ids = [engine.submit_read(file_id, 0, 4096, pool.allocator, h, priority=_core.PRIORITY_BACKGROUND) for h in handles]
    assert engine.stats()["queued_background"] == 3 and pool.allocator.pinned_blocks == 3
    assert engine.cancel(ids[0]) and not engine.cancel(ids[0])
    assert not pool.allocator.is_live(handles[0])
    assert engine.promote(ids[2], _core.PRIORITY_DEMAND)
    with pytest.raises(ValueError, match="priority"):
        engine.promote(ids[1], 3)
    assert not engine.cancel(busy[0]), "a running transfer cannot be cancelled"
    order: list[tuple[int, str]] = []
    while len(order) < len(busy) + 3:
        completion = engine.wait(20)
        assert completion is not None
        order.append((completion.id, completion.status))
    position = {transfer_id: i for i, (transfer_id, _) in enumerate(order)}
    assert dict(order)[ids[0]] == "cancelled" and position[ids[0]] < position[ids[2]]
    assert all(status == "done" for transfer_id, status in order if transfer_id != ids[0])
    assert position[ids[2]] < position[busy[-2]], "the promoted read overtook queued prefetches"
    assert order[-1] == (ids[1], "done"), "background runs last"
    assert engine.pending() == 0 and pool.allocator.pinned_blocks == 0
    engine.close()


def test_close_is_idempotent_and_refuses_new_work(
    engine: _core.TransferEngine, host_pool: Callable[..., HostPool]
) -> None:
    pool = host_pool()
    handle = pool.alloc()
    engine.close()
    engine.close()
    with pytest.raises(EngineClosed):
        engine.submit_copy(pool.allocator, handle, pool.allocator, handle, 0)
    assert pool.allocator.pinned_blocks == 0


def test_eventfd_signals_completions(
    engine: _core.TransferEngine, host_pool: Callable[..., HostPool], wait_final: Wait
) -> None:
    pool = host_pool()
    a, b = pool.alloc(), pool.alloc()
    assert engine.wait(0.01) is None
    engine.submit_copy(pool.allocator, a, pool.allocator, b, 4096)
    readable, _, _ = select.select([engine.eventfd], [], [], 20)
    assert readable == [engine.eventfd]
    drained = engine.drain()
    while not drained:
        drained = engine.drain()
    assert [c.status for c in drained] == ["done"]
    assert select.select([engine.eventfd], [], [], 0)[0] == [], "drain resets the eventfd"
    assert engine.try_pop() is None


def test_bad_submissions_are_typed_errors(
    engine: _core.TransferEngine, host_pool: Callable[..., HostPool], data_file: Callable[[int], DataFile]
) -> None:
    pool = host_pool()
    file_id = engine.register_file(str(data_file(4096).path))
    handle = pool.alloc()
    with pytest.raises(ValueError, match="exceeds"):
        engine.submit_read(file_id, 0, MIB + 1, pool.allocator, handle)
    with pytest.raises(ValueError, match="direct"):
        engine.submit_read(file_id, 0, 1, pool.allocator, handle, direct="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not registered"):
        engine.submit_read(file_id + 100, 0, 1, pool.allocator, handle)
    with pytest.raises(ValueError, match="overlap"):
        engine.submit_copy(pool.allocator, handle, pool.allocator, handle, 100, dst_offset=50)
    with pytest.raises(TransferError) as info:
        engine.register_file("/nonexistent/dir/experts.bin")
    assert (info.value.errno, info.value.path, info.value.op) == (errno.ENOENT, "/nonexistent/dir/experts.bin", "open")
    with pytest.raises(TransferError, match="not a regular file") as info:
        engine.register_file(str(data_file(1).path.parent))
    assert info.value.errno == errno.EISDIR
    pool.allocator.free(handle)
    with pytest.raises(StaleHandle):
        engine.submit_read(file_id, 0, 1, pool.allocator, handle)
    with pytest.raises(ValueError, match="workers"):
        _core.TransferEngine(workers=0)
    with pytest.raises(ValueError, match="chunk_size"):
        _core.TransferEngine(chunk_size=1000)
    assert pool.allocator.pinned_blocks == 0 and engine.pending() == 0


@pytest.mark.gpu
def test_host_device_round_trip_posts_issued_then_done(host_pool: Callable[..., HostPool], wait_final: Wait) -> None:
    pool = host_pool()
    device = _core.DeviceArena(4 * MIB)
    on_device = _core.SlabAllocator(device, device.size, slab_size=MIB)
    device_class = on_device.add_class(MIB)
    engine = _core.TransferEngine(workers=2, device=0)
    src, back = pool.alloc(), pool.alloc()
    with memoryview(pool.allocator.view(src)) as mv:
        mv[:] = bytes(range(256)) * (MIB // 256)
    block = on_device.alloc(device_class)
    up = engine.submit_copy(pool.allocator, src, on_device, block, MIB)
    issued = engine.wait(20)
    assert issued is not None and (issued.id, issued.status) == (up, "issued") and issued.event is not None
    done = wait_final(engine, up)
    assert done.status == "done" and done.event is not None and done.event.query()
    down = wait_final(engine, engine.submit_copy(on_device, block, pool.allocator, back, MIB))
    assert down.status == "done"
    assert block_bytes(pool, back, 0, MIB) == block_bytes(pool, src, 0, MIB)
    with pytest.raises(TypeError):
        on_device.view(block)
    engine.close()
    assert on_device.pinned_blocks == 0 and pool.allocator.pinned_blocks == 0


@pytest.mark.gpu
@pytest.mark.parametrize("size", [1024, 4 * MIB - 1, 4 * MIB, 4 * MIB + 1, 64 * MIB, 5 * 4096 + 321])
def test_gpu_copies_of_every_size_move_every_byte(
    host_pool: Callable[..., HostPool], wait_final: Wait, size: int
) -> None:
    pool = host_pool(160 * MIB, 65 * MIB, 80 * MIB)
    device = _core.DeviceArena(160 * MIB)
    on_device = _core.SlabAllocator(device, device.size, slab_size=80 * MIB)
    device_class = on_device.add_class(65 * MIB)
    engine = _core.TransferEngine(workers=2, chunk_size=4 * MIB, device=0)
    data = bytes(range(251)) * (size // 251) + bytes(size % 251)
    src, back = pool.alloc(), pool.alloc()
    with memoryview(pool.allocator.view(src)) as mv:
        mv[:size] = data
    block, second = on_device.alloc(device_class), on_device.alloc(device_class)
    # A fence recorded on the legacy default stream (0): the copy stream waits on it.
    fence = _core.record_cuda_event(0)
    up = engine.submit_copy(pool.allocator, src, on_device, block, size, priority=0, after=fence)
    done = wait_final(engine, up)
    assert (done.status, done.bytes) == ("done", size) and done.event is not None and done.event.query()
    across = wait_final(engine, engine.submit_copy(on_device, block, on_device, second, size, priority=1))
    assert (across.status, across.bytes) == ("done", size)
    down = wait_final(engine, engine.submit_copy(on_device, second, pool.allocator, back, size))
    assert (down.status, down.bytes) == ("done", size)
    assert block_bytes(pool, back, 0, size) == data
    engine.close()
    assert on_device.pinned_blocks == 0 and pool.allocator.pinned_blocks == 0
