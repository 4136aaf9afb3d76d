"""The simulated GPU from Python: whole copies of every size, its hazard checker, and
demand copies overtaking queued prefetches at its copy engine."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from moeflow import _core
from moeflow.errors import HazardError

if TYPE_CHECKING:
    from tests.memory.conftest import HostPool, SimPool

KIB, MIB = 1 << 10, 1 << 20
CHUNK = 4 * MIB
Wait = Callable[..., _core.Completion]


def read_block(allocator: _core.SlabAllocator, handle: _core.BlockHandle) -> bytes:
    with memoryview(allocator.view(handle)) as mv:
        return bytes(mv)


def write_block(allocator: _core.SlabAllocator, handle: _core.BlockHandle, data: bytes) -> None:
    with memoryview(allocator.view(handle)) as mv:
        mv[: len(data)] = data


def issued_then_done(engine: _core.TransferEngine, transfer_id: int) -> _core.Completion:
    seen: list[str] = []
    while True:
        completion = engine.wait(20)
        assert completion is not None, f"no completion for transfer {transfer_id}"
        if completion.id != transfer_id:
            continue
        seen.append(completion.status)
        if completion.status != "issued":
            assert seen == ["issued", completion.status], seen
            return completion


@pytest.mark.parametrize("priority", [_core.PRIORITY_DEMAND, _core.PRIORITY_PREFETCH])
@pytest.mark.parametrize("size", [KIB, CHUNK - 1, CHUNK, CHUNK + 1, 64 * MIB, 5 * 4096 + 321])
def test_device_copies_move_every_byte_of_any_size(
    host_pool: Callable[..., HostPool], sim_pool: Callable[..., SimPool], size: int, priority: int
) -> None:
    sim = _core.SimDevice(bandwidth_gbps=50.0, latency_us=5.0)
    host = host_pool(160 * MIB, 65 * MIB, 80 * MIB)
    device = sim_pool(sim, 160 * MIB, 65 * MIB, 80 * MIB)
    engine = _core.TransferEngine(workers=2, chunk_size=CHUNK, sim=sim)
    data = os.urandom(size)
    src, back = host.alloc(), host.alloc()
    block, second = device.alloc(), device.alloc()
    write_block(host.allocator, src, data)
    up = engine.submit_copy(host.allocator, src, device.allocator, block, size, priority=priority, owned=False)
    done = issued_then_done(engine, up)
    assert (done.status, done.bytes) == ("done", size)
    assert done.event is not None and done.event.simulated and done.event.query()
    on_device = read_block(device.allocator, block)
    assert on_device[:size] == data, "every byte landed"
    assert set(on_device[size:]) <= {0xFF}, "bytes past the copy stay poison"
    across = engine.submit_copy(device.allocator, block, device.allocator, second, size, priority=priority)
    assert issued_then_done(engine, across).bytes == size
    down = engine.submit_copy(device.allocator, second, host.allocator, back, size, priority=priority)
    assert issued_then_done(engine, down).bytes == size
    assert read_block(host.allocator, back)[:size] == data
    sim.compute_read(device.allocator.address(second), size)  # the popped 'done' ordered compute after it
    engine.close()
    assert sim.hazards == 0 and sim.bytes_copied == 3 * size
    assert device.allocator.pinned_blocks == 0 and host.allocator.pinned_blocks == 0


def test_sim_device_options_and_arena(sim_pool: Callable[..., SimPool]) -> None:
    sim = _core.SimDevice(bandwidth_gbps=12.5, latency_us=3.0, check_hazards=True)
    assert (sim.bandwidth_gbps, sim.latency_us, sim.check_hazards) == (12.5, 3.0, True)
    assert (sim.hazards, sim.last_hazard, sim.bytes_copied, sim.busy_seconds) == (0, None, 0, 0.0)
    pool = sim_pool(sim)
    assert pool.arena.sim is sim and pool.allocator.arena_kind == "device"
    assert pool.arena.address % _core.PAGE_SIZE == 0
    assert set(read_block(pool.allocator, pool.alloc())) == {0xFF}, "fresh memory is poison (NaN)"
    with pytest.raises(ValueError, match="bandwidth_gbps"):
        _core.SimDevice(bandwidth_gbps=0.0)
    with pytest.raises(ValueError, match="latency_us"):
        _core.SimDevice(latency_us=-1.0)
    with pytest.raises(ValueError, match="exclusive"):
        _core.TransferEngine(device=0, sim=sim)


def test_each_hazard_fires_without_its_ordering_and_not_with_it(
    host_pool: Callable[..., HostPool], sim_pool: Callable[..., SimPool], wait_final: Wait
) -> None:
    sim = _core.SimDevice(bandwidth_gbps=0.1, latency_us=10.0)  # 1 MiB stays in flight ~10 ms
    host, device = host_pool(), sim_pool(sim)
    engine = _core.TransferEngine(workers=1, chunk_size=MIB, sim=sim)
    src, block = host.alloc(), device.alloc()
    address = device.allocator.address(block)
    with pytest.raises(HazardError) as poison:
        sim.compute_read(address, 4096)
    assert (poison.value.kind, poison.value.address, poison.value.length) == ("poison", address, 4096)
    up = engine.submit_copy(host.allocator, src, device.allocator, block, MIB, priority=0, owned=False)
    issued = engine.wait(20)
    assert issued is not None and issued.status == "issued" and issued.event is not None
    with pytest.raises(HazardError) as early:
        sim.compute_read(address, MIB)
    assert early.value.kind == "read-before-copy"
    sim.wait(issued.event)  # the compute stream waits on the copy: ordered, silent
    sim.compute_read(address, MIB)
    assert wait_final(engine, up).status == "done"
    # Reusing the block while compute may still read it, with no fence: the copy fails.
    reuse = wait_final(engine, engine.submit_copy(host.allocator, src, device.allocator, block, MIB, owned=False))
    assert reuse.status == "failed"
    error = reuse.error()
    assert isinstance(error, HazardError) and error.kind == "copy-over-read"
    # Fenced after the read by an event recorded at release: silent.
    fence = sim.record_compute()
    fenced = engine.submit_copy(host.allocator, src, device.allocator, block, MIB, owned=False, after=fence)
    assert wait_final(engine, fenced).status == "done"
    assert sim.hazards == 3 and "copy-over-read" in (sim.last_hazard or "")
    # A freed and reallocated block is poison again until a copy lands in it.
    sim.compute_read(address, MIB)
    device.allocator.free(block)
    again = device.alloc()
    assert device.allocator.address(again) == address
    with pytest.raises(HazardError, match="poison"):
        sim.compute_read(address, 1)
    assert set(read_block(device.allocator, again)) == {0xFF}
    sim.synchronize()  # the host waited for compute: the old reads are retired
    refill = engine.submit_copy(host.allocator, src, device.allocator, again, MIB, owned=False)
    assert wait_final(engine, refill).status == "done"
    sim.compute_read(address, MIB)
    assert sim.hazards == 4
    engine.close()


def test_an_unchecked_device_never_raises(sim_pool: Callable[..., SimPool]) -> None:
    sim = _core.SimDevice(check_hazards=False)
    pool = sim_pool(sim)
    sim.compute_read(pool.allocator.address(pool.alloc()), MIB)
    assert sim.hazards == 0


def test_events_of_another_device_are_refused(
    host_pool: Callable[..., HostPool], sim_pool: Callable[..., SimPool]
) -> None:
    sim, other = _core.SimDevice(), _core.SimDevice()
    host, device = host_pool(), sim_pool(sim)
    engine = _core.TransferEngine(workers=1, sim=sim)
    with pytest.raises(ValueError, match="another simulated device"):
        sim.wait(other.record_compute())
    with pytest.raises(ValueError, match="another simulated device"):
        engine.submit_copy(host.allocator, host.alloc(), device.allocator, device.alloc(), MIB,
                           after=other.record_compute())
    with pytest.raises(ValueError, match="not inside an arena"):
        sim.compute_read(host.arena.address, 16)
    assert device.allocator.pinned_blocks == 0
    engine.close()


def test_a_demand_copy_waits_behind_one_speculative_part_not_ten_prefetches(
    host_pool: Callable[..., HostPool], sim_pool: Callable[..., SimPool], wait_final: Wait
) -> None:
    gbps = 1.0
    sim = _core.SimDevice(bandwidth_gbps=gbps, latency_us=10.0)
    host, device = host_pool(16 * MIB, 16 * MIB, 16 * MIB), sim_pool(sim, 192 * MIB, 16 * MIB, 16 * MIB)
    engine = _core.TransferEngine(workers=2, chunk_size=16 * MIB, sim=sim)
    src = host.alloc()
    prefetches = [
        engine.submit_copy(host.allocator, src, device.allocator, device.alloc(), 16 * MIB, priority=1)
        for _ in range(10)
    ]
    time.sleep(0.002)
    start = time.perf_counter()
    demand = engine.submit_copy(host.allocator, src, device.allocator, device.alloc(), MIB, priority=0)
    done = wait_final(engine, demand)
    waited = time.perf_counter() - start
    bound = (_core.SPECULATIVE_PART + MIB) / (gbps * 1e9) + 10e-6
    everything = 160 * MIB / (gbps * 1e9)
    assert done.status == "done"
    assert waited < bound * 1.5 + 0.020, f"demand waited {waited:.4f} s; bound {bound:.4f} s, all {everything:.3f} s"
    assert all(wait_final(engine, p).status == "done" for p in prefetches)
    engine.close()


def test_cancel_and_promote_act_on_unissued_parts(
    host_pool: Callable[..., HostPool], sim_pool: Callable[..., SimPool], wait_final: Wait
) -> None:
    sim = _core.SimDevice(bandwidth_gbps=0.5, latency_us=10.0)  # one 8 MiB part: ~17 ms
    host, device = host_pool(16 * MIB, 16 * MIB, 16 * MIB), sim_pool(sim, 128 * MIB, 16 * MIB, 16 * MIB)
    engine = _core.TransferEngine(workers=1, chunk_size=16 * MIB, sim=sim)
    src, block = host.alloc(), device.alloc()
    first = engine.submit_copy(host.allocator, src, device.allocator, block, 16 * MIB)
    queued = [engine.submit_copy(host.allocator, src, device.allocator, device.alloc(), 16 * MIB) for _ in range(3)]
    time.sleep(0.005)  # the first 8 MiB part of `first` is on the stream, the second waits
    assert engine.cancel(first) and not engine.cancel(first)
    cancelled = wait_final(engine, first)
    assert (cancelled.status, cancelled.bytes) == ("cancelled", _core.SPECULATIVE_PART)
    assert not device.allocator.is_live(block), "the owned block is freed once the issued part landed"
    assert engine.promote(queued[-1], _core.PRIORITY_DEMAND)
    order: list[int] = []
    while len(order) < len(queued):
        completion = engine.wait(20)
        assert completion is not None
        if completion.status != "issued":
            order.append(completion.id)
    assert order.index(queued[-1]) <= 1, order
    engine.close()
    assert device.allocator.pinned_blocks == 0
