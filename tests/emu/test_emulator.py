"""The CUDA CPU emulator itself (tests/emu): barriers, shuffles, shared memory, early returns and a
deadlock, on small kernels written for these tests; the real kernels' checks use it elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import emu

pytestmark = pytest.mark.skipif(emu.unavailable() is not None, reason=str(emu.unavailable()))

CODE = r"""
typedef unsigned int uint32_t;
extern "C" __global__ void block_reverse(const float* x, float* out, int n) {
    // shared memory, a barrier, and the block index: each block reverses its own slice
    __shared__ float tile[64];
    const int base = blockIdx.x * blockDim.x;
    tile[threadIdx.x] = x[base + threadIdx.x];
    __syncthreads();
    out[base + threadIdx.x] = tile[blockDim.x - 1 - threadIdx.x];
}
extern "C" __global__ void warp_shuffles(const float* x, float* sums, float* downs) {
    float v = x[threadIdx.x];
    const float own = v;
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    sums[threadIdx.x] = v;  // every lane of a warp holds its warp's sum
    downs[threadIdx.x] = __shfl_down_sync(0xffffffffu, own, 1);  // the next lane's; the last keeps its own
}
extern "C" __global__ void early_return(int* out, int keep) {
    // threads past `keep` leave before the barrier; the rest still pass it
    if ((int)threadIdx.x >= keep) return;
    __shared__ int count;
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    atomicAdd(&count, 1);
    __syncthreads();
    out[threadIdx.x] = count;
}
extern "C" __global__ void deadlock(int* out) {
    // lane 0 waits in a warp shuffle, the others at the block's barrier: neither can complete, a
    // bug the emulator must report rather than hang on
    if (threadIdx.x == 0) { out[0] = __shfl_xor_sync(0xffffffffu, 1, 1); } else { __syncthreads(); out[1] = 2; }
}
"""
SIGNATURES = {
    "block_reverse": ("const float*", "float*", "int"),
    "warp_shuffles": ("const float*", "float*", "float*"),
    "early_return": ("int*", "int"),
    "deadlock": ("int*",),
}


@pytest.fixture(scope="module")
def lib():  # type: ignore[no-untyped-def]
    return emu.build("emu_selftest", CODE, SIGNATURES)


def _ptr(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


def test_shared_memory_and_barriers_per_block(lib) -> None:  # type: ignore[no-untyped-def]
    x = torch.arange(3 * 64, dtype=torch.float32)
    out = torch.zeros_like(x)
    emu.call(lib, "block_reverse", (3,), (64,), (_ptr(x), _ptr(out), np.int32(x.numel())))
    assert torch.equal(out, x.view(3, 64).flip(1).reshape(-1))


def test_warp_shuffles_follow_cuda(lib) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(64)
    sums, downs = torch.zeros(64), torch.zeros(64)
    emu.call(lib, "warp_shuffles", (1,), (64,), (_ptr(x), _ptr(sums), _ptr(downs)))
    for w in range(2):
        lanes = x[32 * w : 32 * (w + 1)]
        torch.testing.assert_close(sums[32 * w : 32 * (w + 1)], lanes.sum().expand(32), rtol=1e-5, atol=1e-5)
        assert torch.equal(downs[32 * w : 32 * w + 31], lanes[1:]) and downs[32 * w + 31] == lanes[31]


def test_threads_that_return_early_do_not_hold_the_barrier(lib) -> None:  # type: ignore[no-untyped-def]
    out = torch.full((96,), -1, dtype=torch.int32)
    emu.call(lib, "early_return", (2,), (96,), (_ptr(out), np.int32(40)))
    assert out[:40].tolist() == [40] * 40 and out[40:].tolist() == [-1] * 56


def test_a_deadlock_is_an_error_not_a_hang(lib) -> None:  # type: ignore[no-untyped-def]
    out = torch.zeros(2, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="deadlocked"):
        emu.call(lib, "deadlock", (1,), (32,), (_ptr(out),))


def test_a_launch_argument_must_be_a_sized_scalar(lib) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError, match="sized numpy scalar"):
        emu.call(lib, "early_return", (1,), (32,), (np.uint64(0), 5))
