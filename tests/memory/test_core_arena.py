"""HostArena, DeviceArena and ArenaBuffer from Python."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from moeflow import _core
from moeflow.errors import ArenaError, CudaUnavailable

MIB = 1 << 20


def test_host_arena_rounds_to_pages_and_reports_locking() -> None:
    arena = _core.HostArena(MIB + 1)
    assert arena.size == MIB + _core.PAGE_SIZE
    assert arena.address % _core.PAGE_SIZE == 0
    assert arena.locked or arena.lock_error
    assert arena.cuda_registered == _core.cuda_available()


def test_zero_size_is_an_arena_error() -> None:
    with pytest.raises(ArenaError, match="zero") as info:
        _core.HostArena(0)
    assert info.value.requested == 0


def test_a_size_the_machine_cannot_map_is_refused_with_the_numbers() -> None:
    pib = 1 << 50
    with pytest.raises(ArenaError) as info:
        _core.HostArena(pib)
    assert info.value.requested == pib
    assert str(pib) in str(info.value) and "RAM" in str(info.value)


def test_view_is_a_writable_buffer_that_keeps_the_arena_alive() -> None:
    arena = _core.HostArena(2 * MIB, lock=False)
    view = arena.view(4096, 8192)
    assert len(view) == 8192 and view.address == arena.address + 4096
    del arena
    gc.collect()
    array = np.frombuffer(view, dtype=np.uint8)
    assert array.flags.writeable
    array[:] = 7
    with memoryview(view) as mv:
        assert mv.nbytes == 8192 and bytes(mv[:3]) == b"\x07\x07\x07"
    with view.__buffer__(0) as mv:  # PEP 688 spelling
        assert mv.nbytes == 8192


@pytest.mark.parametrize(("offset", "length"), [(0, 2 * MIB + 1), (2 * MIB, 1), (1 << 62, 1 << 62)])
def test_view_out_of_range_is_a_value_error(offset: int, length: int) -> None:
    arena = _core.HostArena(2 * MIB, lock=False)
    with pytest.raises(ValueError, match="exceeds"):
        arena.view(offset, length)


@pytest.mark.skipif(_core.cuda_available(), reason="checks the machine without CUDA")
def test_device_arena_without_cuda_is_cuda_unavailable() -> None:
    assert _core.cuda_device_count() == 0
    with pytest.raises(CudaUnavailable) as info:
        _core.DeviceArena(MIB)
    assert isinstance(info.value.code, int)


@pytest.mark.gpu
def test_device_arena_allocates_on_the_device() -> None:
    arena = _core.DeviceArena(4 * MIB, device=0)
    assert arena.size == 4 * MIB and arena.device == 0 and arena.address != 0
    with pytest.raises(ArenaError):
        _core.DeviceArena(0)


def test_crc32_matches_zlib_and_continues() -> None:
    import zlib

    data = np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8)
    assert _core.crc32(data) == zlib.crc32(data.tobytes())
    assert _core.crc32(data[1000:], _core.crc32(data[:1000])) == zlib.crc32(data.tobytes())
    assert _core.crc32(np.zeros(4, dtype=np.float32)) == zlib.crc32(bytes(16))
