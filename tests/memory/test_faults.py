"""Faults injected under AsyncTransfers (the core's test-only fault plan, and a done callback
that raises): each reaches the awaiting task as a typed error naming the file, frees the owned
block, and the next transfer on the same engine lands byte for byte."""

from __future__ import annotations

import asyncio
import errno
import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from moeflow.errors import ChecksumMismatch, ShortRead, TransferError
from moeflow.memory import AsyncTransfers, TransferTicket

if TYPE_CHECKING:
    from tests.memory.conftest import DataFile, HostPool

CHUNK = 64 * 1024
LENGTH = 5 * CHUNK + 1000  # six parts
AIM = 2 * CHUNK + 777  # inside the third part


async def _read(transfers: AsyncTransfers, file_id: int, file: DataFile, pool: HostPool) -> bytes:
    handle = pool.alloc()
    await asyncio.wait_for(
        transfers.read(file_id, 0, LENGTH, pool.allocator, handle, expect_crc32=zlib.crc32(file.data[:LENGTH])),
        10,
    )
    with memoryview(pool.allocator.view(handle)) as mv:
        got = bytes(mv[:LENGTH])
    pool.allocator.free(handle)
    return got


@pytest.mark.timeout(60)
@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("kind", "error", "words"),
    [
        ("errno", TransferError, "EIO"),
        ("short_read", ShortRead, "short read"),
        ("corrupt", ChecksumMismatch, "checksum mismatch"),
        ("panic", TransferError, "panicked"),
    ],
)
async def test_an_injected_read_fault_fails_the_awaiting_task_then_reads_are_exact(
    host_pool: Callable[..., HostPool], data_file: Callable[[int], DataFile], kind: str,
    error: type[TransferError], words: str,
) -> None:
    file, pool = data_file(LENGTH + 4096), host_pool()
    async with AsyncTransfers(workers=2, chunk_size=CHUNK) as transfers:
        file_id = transfers.register_file(str(file.path))
        transfers.engine.add_test_fault(kind, file_id=file_id, offset=AIM, errno=errno.EIO)
        with pytest.raises(error) as info:
            await _read(transfers, file_id, file, pool)
        assert type(info.value) is error, info.value
        assert words in str(info.value) and info.value.path == str(file.path)
        assert pool.allocator.live_blocks == 0 and pool.allocator.pinned_blocks == 0
        assert transfers.engine.test_fault_hits() == 1
        assert await _read(transfers, file_id, file, pool) == file.data[:LENGTH]


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_a_delayed_read_lands_late_and_close_waits_only_for_the_delay(
    host_pool: Callable[..., HostPool], data_file: Callable[[int], DataFile]
) -> None:
    file, pool = data_file(LENGTH + 4096), host_pool()
    transfers = AsyncTransfers(workers=2, chunk_size=CHUNK)
    file_id = transfers.register_file(str(file.path))
    transfers.engine.add_test_fault("delay", file_id=file_id, offset=AIM, delay=0.3)
    began = time.perf_counter()
    assert await _read(transfers, file_id, file, pool) == file.data[:LENGTH]
    assert time.perf_counter() - began >= 0.3
    transfers.engine.add_test_fault("delay", file_id=file_id, count=0, delay=0.3)
    ticket = transfers.submit_read(file_id, 0, LENGTH, pool.allocator, pool.alloc())
    await asyncio.sleep(0.05)  # its first parts are running (sleeping)
    began = time.perf_counter()
    await asyncio.wait_for(transfers.aclose(), 5)
    assert time.perf_counter() - began < 2.0
    assert ticket.done() and pool.allocator.pinned_blocks == 0


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_a_done_callback_that_raises_fails_the_ticket_and_wakes_every_waiter(
    host_pool: Callable[..., HostPool], data_file: Callable[[int], DataFile]
) -> None:
    """Before: the exception was logged and swallowed, and a consumer got a 'done' transfer
    whose callbacks never finished their work (the expert cache's entry stayed loading)."""
    file, pool = data_file(LENGTH + 4096), host_pool()
    async with AsyncTransfers(workers=2, chunk_size=CHUNK) as transfers:
        file_id = transfers.register_file(str(file.path))
        ticket = transfers.submit_read(file_id, 0, LENGTH, pool.allocator, pool.alloc())
        later: list[TransferTicket] = []

        def broken(t: TransferTicket) -> None:
            raise RuntimeError("the layout does not fit")

        ticket.add_done_callback(broken)
        ticket.add_done_callback(later.append)  # still runs
        observer = asyncio.ensure_future(ticket.wait_done())
        with pytest.raises(TransferError) as info:
            await asyncio.wait_for(ticket.wait(), 10)
        assert "broken" in str(info.value) and "the layout does not fit" in str(info.value)
        assert isinstance(info.value.__cause__, RuntimeError)
        await asyncio.wait_for(observer, 1)
        assert later == [ticket] and ticket.error() is info.value
        # the consumer never received the block: the ticket gave it back
        assert pool.allocator.live_blocks == 0 and pool.allocator.pinned_blocks == 0
        assert await _read(transfers, file_id, file, pool) == file.data[:LENGTH]


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_a_panic_in_a_host_copy_fails_that_copy_only(host_pool: Callable[..., HostPool]) -> None:
    pool = host_pool()
    async with AsyncTransfers(workers=1, chunk_size=CHUNK) as transfers:
        src, dst = pool.alloc(), pool.alloc()
        transfers.engine.add_test_fault("panic", op="copy")
        with pytest.raises(TransferError, match="panicked"):
            await asyncio.wait_for(transfers.copy(pool.allocator, src, pool.allocator, dst, CHUNK, owned=False), 10)
        done = await asyncio.wait_for(transfers.copy(pool.allocator, src, pool.allocator, dst, CHUNK, owned=False), 10)
        assert done.status == "done" and pool.allocator.pinned_blocks == 0


def test_a_fault_rule_that_cannot_apply_is_refused() -> None:
    from moeflow import _core

    engine = _core.TransferEngine(workers=1, chunk_size=CHUNK)
    try:
        with pytest.raises(ValueError, match="reads only"):
            engine.add_test_fault("short_read", op="copy")
        with pytest.raises(ValueError, match="fault kind"):
            engine.add_test_fault("meltdown")
        with pytest.raises(ValueError, match="not registered"):
            engine.add_test_fault("errno", file_id=42)
        with pytest.raises(ValueError, match="delay"):
            engine.add_test_fault("delay", delay=float("nan"))
    finally:
        engine.close()
