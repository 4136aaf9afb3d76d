"""AsyncTransfers: awaiting transfers on the event loop, cancellation, closing, and a stress run."""

from __future__ import annotations

import asyncio
import errno
import random
import time
import zlib
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING

import pytest

from moeflow import _core
from moeflow._core import Completion
from moeflow.errors import (
    AlignmentError,
    BlockPinned,
    EngineClosed,
    ForeignHandle,
    HazardError,
    MoeflowError,
    StaleHandle,
    TransferError,
)
from moeflow.memory import AsyncTransfers, TransferTicket
from moeflow.memory.transfers import DirectMode

if TYPE_CHECKING:
    from tests.memory.conftest import DataFile, HostPool, SimPool

MIB = 1 << 20
Occupy = Callable[[_core.TransferEngine, "HostPool"], list[int]]


async def settle(transfers: AsyncTransfers, timeout: float = 20.0) -> None:
    """Let the loop drain completions until nothing submitted through `transfers` is pending."""
    async with asyncio.timeout(timeout):
        while transfers.pending():
            await asyncio.sleep(0.001)


@pytest.mark.asyncio
async def test_await_a_read(host_pool: Callable[..., HostPool], data_file: Callable[[int], DataFile]) -> None:
    file, pool = data_file(MIB), host_pool()
    async with AsyncTransfers(workers=2, chunk_size=64 * 1024) as transfers:
        file_id = transfers.register_file(str(file.path))
        handle = pool.alloc()
        done = await transfers.read(file_id, 0, MIB, pool.allocator, handle, expect_crc32=zlib.crc32(file.data))
        assert (done.status, done.bytes) == ("done", MIB)
        with memoryview(pool.allocator.view(handle)) as mv:
            assert bytes(mv) == file.data
    assert transfers.closing and pool.allocator.pinned_blocks == 0
    with pytest.raises(EngineClosed):
        transfers.submit_read(file_id, 0, 1, pool.allocator, handle)


@pytest.mark.asyncio
async def test_a_failed_read_raises_its_typed_error(
    host_pool: Callable[..., HostPool], data_file: Callable[[int], DataFile]
) -> None:
    file, pool = data_file(MIB), host_pool()
    async with AsyncTransfers(workers=1) as transfers:
        file_id = transfers.register_file(str(file.path))
        transfers.engine.inject_fault(file_id, errno.EIO, 1)
        with pytest.raises(TransferError) as info:
            await transfers.read(file_id, 0, 4096, pool.allocator, pool.alloc())
        assert info.value.errno == errno.EIO and info.value.path == str(file.path)
        assert pool.allocator.live_blocks == 0, "the owned block was freed"


@pytest.mark.asyncio
async def test_cancelling_the_awaiting_task_before_start_cancels_the_transfer(
    host_pool: Callable[..., HostPool], data_file: Callable[[int], DataFile], occupy: Occupy
) -> None:
    big, pool = host_pool(arena=256 * MIB, block=96 * MIB, slab=128 * MIB), host_pool()
    async with AsyncTransfers(workers=1, chunk_size=256 * MIB) as transfers:
        file_id = transfers.register_file(str(data_file(MIB).path))
        occupy(transfers.engine, big)
        handle = pool.alloc()
        background = _core.PRIORITY_BACKGROUND  # behind the busy copies
        task = asyncio.create_task(transfers.read(file_id, 0, MIB, pool.allocator, handle, priority=background))
        await asyncio.sleep(0.01)
        assert pool.allocator.pin_count(handle) == 1, "queued behind the busy worker"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not pool.allocator.is_live(handle), "the core freed the owned block at once"
        assert transfers.engine.stats()["cancelled"] == 1
        await settle(transfers)
    assert pool.allocator.live_blocks == 0 and pool.allocator.pinned_blocks == 0


@pytest.mark.asyncio
async def test_cancelling_the_awaiting_task_mid_flight_frees_the_block_on_arrival(
    host_pool: Callable[..., HostPool],
) -> None:
    pool = host_pool(arena=256 * MIB, block=96 * MIB, slab=128 * MIB)
    src, dst = pool.alloc(), pool.alloc()
    async with AsyncTransfers(workers=1, chunk_size=16 * MIB) as transfers:
        task = asyncio.create_task(transfers.copy(pool.allocator, src, pool.allocator, dst, src.size))
        while transfers.engine.stats()["busy_nanos"] == 0 and not transfers.engine.stats()["bytes"]:
            await asyncio.sleep(0.0005)  # wait until the first part ran
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert transfers.engine.stats()["cancelled"] == 0, "it had started: it runs to the end"
        await settle(transfers)
        assert not pool.allocator.is_live(dst), "freed when the completion arrived"
    assert pool.allocator.is_live(src) and pool.allocator.live_blocks == 1 and pool.allocator.pinned_blocks == 0


@pytest.mark.asyncio
async def test_ticket_cancel_makes_the_await_raise_cancelled_error(
    host_pool: Callable[..., HostPool], data_file: Callable[[int], DataFile], occupy: Occupy
) -> None:
    big, pool = host_pool(arena=256 * MIB, block=96 * MIB, slab=128 * MIB), host_pool()
    async with AsyncTransfers(workers=1, chunk_size=256 * MIB) as transfers:
        file_id = transfers.register_file(str(data_file(MIB).path))
        occupy(transfers.engine, big)
        ticket = transfers.submit_read(file_id, 0, MIB, pool.allocator, pool.alloc())
        assert transfers.cancel(ticket) and not ticket.cancel()
        with pytest.raises(asyncio.CancelledError):
            await ticket
        assert isinstance(ticket.error(), asyncio.CancelledError) and ticket.completion().status == "cancelled"
    assert pool.allocator.live_blocks == 0


@pytest.mark.asyncio
async def test_the_loop_keeps_running_while_a_transfer_is_awaited(host_pool: Callable[..., HostPool]) -> None:
    pool = host_pool(arena=256 * MIB, block=96 * MIB, slab=128 * MIB)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    background = asyncio.create_task(ticker())
    async with AsyncTransfers(workers=1, chunk_size=256 * MIB) as transfers:
        src, dst = pool.alloc(), pool.alloc()
        started = time.perf_counter()
        tickets = [transfers.submit_copy(pool.allocator, src, pool.allocator, dst, src.size) for _ in range(16)]
        done = [await ticket for ticket in tickets]
        elapsed = time.perf_counter() - started
    background.cancel()
    assert [c.status for c in done] == ["done"] * 16
    assert ticks >= min(5, elapsed / 0.004), f"the loop was blocked: {ticks} ticks in {elapsed:.3f} s"


@pytest.mark.asyncio
async def test_closing_with_pending_waiters_raises_engine_closed(
    host_pool: Callable[..., HostPool], data_file: Callable[[int], DataFile], occupy: Occupy
) -> None:
    big, pool = host_pool(arena=256 * MIB, block=96 * MIB, slab=128 * MIB), host_pool()
    transfers = AsyncTransfers(workers=1, chunk_size=256 * MIB)
    file_id = transfers.register_file(str(data_file(MIB).path))
    occupy(transfers.engine, big)
    tickets = [transfers.submit_read(file_id, 0, 4096, pool.allocator, pool.alloc()) for _ in range(3)]
    waiters = [asyncio.create_task(t.wait()) for t in tickets[:2]]
    observer = asyncio.create_task(tickets[2].wait_done())
    await asyncio.sleep(0)
    await transfers.aclose()
    for waiter in waiters:
        with pytest.raises(EngineClosed):
            await waiter
    await observer
    assert isinstance(tickets[2].error(), EngineClosed)
    assert pool.allocator.live_blocks == 0 and pool.allocator.pinned_blocks == 0
    transfers.close()  # idempotent


@pytest.mark.asyncio
async def test_observers_and_callbacks_do_not_cancel_the_transfer(
    host_pool: Callable[..., HostPool], data_file: Callable[[int], DataFile], occupy: Occupy
) -> None:
    big, pool = host_pool(arena=256 * MIB, block=96 * MIB, slab=128 * MIB), host_pool()
    async with AsyncTransfers(workers=1, chunk_size=256 * MIB) as transfers:
        file_id = transfers.register_file(str(data_file(MIB).path))
        occupy(transfers.engine, big)
        handle = pool.alloc()
        ticket = transfers.submit_read(file_id, 0, MIB, pool.allocator, handle, priority=_core.PRIORITY_BACKGROUND)
        seen: list[TransferTicket] = []
        ticket.add_done_callback(seen.append)
        impatient = asyncio.create_task(ticket.wait_done())
        patient = asyncio.create_task(ticket.wait_done())
        await asyncio.sleep(0)
        impatient.cancel()
        assert transfers.promote(ticket) and not ticket.done()
        await patient
        assert seen == [ticket] and ticket.result().status == "done" and pool.allocator.is_live(handle)
        late: list[TransferTicket] = []
        ticket.add_done_callback(late.append)
        await asyncio.sleep(0)
        assert late == [ticket]


def test_a_loop_closed_under_a_waiter_leaves_no_block_behind(
    host_pool: Callable[..., HostPool], data_file: Callable[[int], DataFile]
) -> None:
    pool = host_pool()
    transfers = AsyncTransfers(workers=1)
    file_id = transfers.register_file(str(data_file(MIB).path))
    handle = pool.alloc()

    async def start() -> tuple[TransferTicket, Coroutine[object, None, Completion]]:
        ticket = transfers.submit_read(file_id, 0, MIB, pool.allocator, handle)
        waiter = ticket.wait()
        waiter.send(None)  # run the waiter until it parks on its future, as a task would
        return ticket, waiter

    loop = asyncio.new_event_loop()
    ticket, waiter = loop.run_until_complete(start())
    loop.close()  # the read finishes with nobody left to receive it
    asyncio.run(transfers.aclose())  # a new loop drains the completion
    # Closing cancels the read if the worker had not started it yet (a loaded machine).
    assert ticket.done() and ticket.completion().status in ("done", "cancelled")
    assert pool.allocator.live_blocks == 0 and pool.allocator.pinned_blocks == 0
    waiter.close()  # what the garbage collector would do to the dead task's coroutine


async def _consume(ticket: TransferTicket) -> None:
    try:
        await ticket
    except (MoeflowError, asyncio.CancelledError):
        pass


@pytest.mark.asyncio
async def test_stress_random_operations_leave_no_block_in_use(
    host_pool: Callable[..., HostPool], data_file: Callable[[int], DataFile]
) -> None:
    rng = random.Random(20240601)
    file = data_file(2 * MIB + 333)
    arena = _core.HostArena(32 * MIB, lock=False)
    allocator = _core.SlabAllocator(arena, 24 * MIB, slab_size=MIB)
    classes = [allocator.add_class(size) for size in (4096, 64 * 1024, 256 * 1024)]
    foreign = host_pool().alloc()
    transfers = AsyncTransfers(workers=2, chunk_size=64 * 1024)
    file_id = transfers.register_file(str(file.path))
    idle: list[_core.BlockHandle] = []
    dead: list[_core.BlockHandle] = []
    pins: Counter[_core.BlockHandle] = Counter()
    inflight: dict[int, TransferTicket] = {}
    consumers: dict[int, asyncio.Task[None]] = {}
    seen: Counter[str] = Counter()

    def finished(ticket: TransferTicket, handles: list[_core.BlockHandle]) -> None:
        # Final once the ticket resolved and its consumer (if any) is done: a consumer
        # cancelled around the completion frees an owned block after the callbacks ran.
        consumer = consumers.get(ticket.id)
        if not ticket.done() or (consumer is not None and not consumer.done()):
            return
        inflight.pop(ticket.id)
        consumers.pop(ticket.id, None)
        seen[ticket.completion().status] += 1
        for handle in handles:
            (idle if allocator.is_live(handle) else dead).append(handle)

    def track(ticket: TransferTicket, handles: list[_core.BlockHandle]) -> None:
        inflight[ticket.id] = ticket
        ticket.add_done_callback(lambda t: finished(t, handles))
        if rng.random() < 0.5:
            consumer = consumers[ticket.id] = asyncio.create_task(_consume(ticket))
            consumer.add_done_callback(lambda _: finished(ticket, handles))

    def take_idle() -> _core.BlockHandle:
        return idle.pop(rng.randrange(len(idle)))

    ops = ["alloc", "free", "read", "copy", "cancel", "pin", "unpin", "stale", "foreign", "fault"]
    weights = [22, 14, 22, 10, 10, 6, 6, 5, 2, 1]
    for step in range(10_000):
        op = rng.choices(ops, weights)[0]
        seen[op] += 1
        if op == "alloc":
            handle = allocator.try_alloc(rng.choice(classes))
            if handle is not None:
                idle.append(handle)
        elif op == "free" and idle:
            handle = take_idle()
            if pins[handle]:
                with pytest.raises(BlockPinned):
                    allocator.free(handle)
                idle.append(handle)
            else:
                allocator.free(handle)
                dead.append(handle)
        elif op == "read" and idle:
            handle = take_idle()
            length = rng.randint(1, handle.size)
            offset = rng.choice([0, 4096 * rng.randrange(256), rng.randrange(2 * MIB)])
            direct: DirectMode = rng.choice(["auto", "auto", "never", "require"])
            crc = zlib.crc32(file.data[offset : offset + length]) ^ rng.choice([0, 0, 0, 1])
            try:
                ticket = transfers.submit_read(
                    file_id, offset, length, allocator, handle, priority=rng.randrange(3), direct=direct,
                    expect_crc32=crc if rng.random() < 0.3 else None, owned=rng.random() < 0.8,
                )  # fmt: skip
            except AlignmentError:
                idle.append(handle)
                continue
            track(ticket, [handle])
        elif op == "copy" and len(idle) >= 2:
            src, dst = take_idle(), take_idle()
            length = rng.randint(0, min(src.size, dst.size))
            ticket = transfers.submit_copy(allocator, src, allocator, dst, length, owned=rng.random() < 0.8)
            track(ticket, [src, dst])
        elif op == "cancel" and inflight:
            transfer_id = rng.choice(list(inflight))
            task = consumers.get(transfer_id)
            if task is not None and rng.random() < 0.5:
                seen["consumer_cancelled"] += task.cancel()
            else:
                seen["cancel_ok"] += inflight[transfer_id].cancel()
        elif op == "pin" and idle:
            handle = rng.choice(idle)
            pins[handle] += 1
            assert allocator.pin(handle) == pins[handle]
        elif op == "unpin" and idle:
            handle = rng.choice(idle)
            if pins[handle]:
                pins[handle] -= 1
                assert allocator.unpin(handle) == pins[handle]
        elif op == "stale" and dead:
            handle = rng.choice(dead)
            with pytest.raises(StaleHandle):
                rng.choice([allocator.free, allocator.pin, allocator.view])(handle)
            with pytest.raises(StaleHandle):
                transfers.submit_read(file_id, 0, 1, allocator, handle)
        elif op == "foreign":
            with pytest.raises(ForeignHandle):
                allocator.free(foreign)
        elif op == "fault":
            transfers.engine.inject_fault(file_id, errno.EIO, 1)
        if step % 8 == 0:
            await asyncio.sleep(0)

    async with asyncio.timeout(30):
        while inflight:
            await asyncio.sleep(0.001)
    for handle in idle:
        for _ in range(pins[handle]):
            allocator.unpin(handle)
        allocator.free(handle)
    await transfers.aclose()
    stats = allocator.stats()
    assert (stats["live_blocks"], stats["pinned_blocks"], stats["used"]) == (0, 0, 0)
    assert stats["slabs_free"] == stats["slabs_total"]
    assert transfers.engine.pending() == 0 and transfers.pending() == 0
    # The run exercised what it claims to.
    assert seen["done"] > 500 and seen["failed"] > 20 and seen["cancelled"] > 20 and seen["stale"] > 100


@pytest.mark.asyncio
async def test_sim_device_copies_through_async_transfers_honour_after(
    host_pool: Callable[..., HostPool], sim_pool: Callable[..., SimPool]
) -> None:
    sim = _core.SimDevice(bandwidth_gbps=10.0, latency_us=10.0)
    host, device = host_pool(16 * MIB, 6 * MIB, 8 * MIB), sim_pool(sim, 16 * MIB, 6 * MIB, 8 * MIB)
    data = random.Random(7).randbytes(6 * MIB - 5)
    async with AsyncTransfers(workers=2, chunk_size=MIB, device=None, sim=sim) as transfers:
        src, block = host.alloc(), device.alloc()
        with memoryview(host.allocator.view(src)) as mv:
            mv[: len(data)] = data
        ticket = transfers.submit_copy(host.allocator, src, device.allocator, block, len(data), priority=0)
        issued: list[TransferTicket] = []
        ticket.add_issued_callback(issued.append)
        done = await ticket
        assert (done.status, done.bytes) == ("done", len(data)) and issued == [ticket]
        assert ticket.event is not None and ticket.event.simulated
        address = device.allocator.address(block)
        sim.compute_read(address, len(data))  # the awaited 'done' ordered compute after the copy
        with memoryview(device.allocator.view(block)) as mv:
            assert bytes(mv[: len(data)]) == data
        # The block is reused: without a fence the copy fails with the checker's error...
        with pytest.raises(HazardError) as hazard:
            await transfers.copy(host.allocator, src, device.allocator, block, len(data), owned=False)
        assert hazard.value.kind == "copy-over-read"
        # ...and with the event recorded at release it waits for compute and succeeds.
        released = sim.record_compute()
        done = await transfers.copy(host.allocator, src, device.allocator, block, len(data), after=released)
        assert done.status == "done" and sim.hazards == 1
    assert device.allocator.pinned_blocks == 0


@pytest.mark.asyncio
async def test_cancelling_a_partly_issued_device_copy_frees_its_block_after_the_issued_parts(
    host_pool: Callable[..., HostPool], sim_pool: Callable[..., SimPool]
) -> None:
    # One 8 MiB part takes ~420 ms: a loaded machine that wakes the test late (it delayed a
    # 17 ms part's cancel past the whole copy once) still cancels while the first part copies.
    sim = _core.SimDevice(bandwidth_gbps=0.02, latency_us=10.0)
    host, device = host_pool(32 * MIB, 32 * MIB, 32 * MIB), sim_pool(sim, 32 * MIB, 32 * MIB, 32 * MIB)
    async with AsyncTransfers(workers=1, chunk_size=32 * MIB, sim=sim) as transfers:
        block = device.alloc()
        ticket = transfers.submit_copy(host.allocator, host.alloc(), device.allocator, block, 32 * MIB)
        waiter = asyncio.ensure_future(ticket.wait())
        await asyncio.sleep(0.005)  # the first 8 MiB part is on the copy stream, the next waits
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await ticket.wait_done()
        completion = ticket.completion()
        assert completion.status == "cancelled" and completion.bytes == _core.SPECULATIVE_PART
        assert not device.allocator.is_live(block)
    assert device.allocator.live_blocks == 0 and device.allocator.pinned_blocks == 0
