// The CUDA subset moeflow's kernels use, on the CPU: so the kernels' arithmetic and indexing run,
// and are checked against their torch references, on machines without a GPU (CI, 2 cores).
//
// A launch runs its blocks one after another, on the calling thread. The threads of a block are
// fibers (each started once with makecontext/swapcontext, then switched with _setjmp/_longjmp,
// which skip the signal-mask system call) switched only at __syncthreads and at warp shuffles, so both are real barriers
// and `__shared__` (made `static`) is really shared by the block; a run is deterministic. A warp
// shuffle exchanges through a per-warp slot array between two warp barriers: every live lane of the
// warp must reach it, as CUDA's full-mask shuffles also require. A thread that returns early is
// dropped from the barriers still to come (a GPU counts exited threads as arrived). A barrier that
// can never complete (threads of one block waiting at different barriers) ends the launch with an
// error instead of hanging. Not modelled: timing, coalescing, bank conflicts, and the GPU's weak
// memory order (a missing __syncthreads can pass here when the fibers happen to run in a safe order).
#pragma once

#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#define MOEFLOW_EMU 1

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

// CUDA's built-in vector types, with their alignment
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };

#define __device__
#define __host__
#define __forceinline__ inline
#define __global__
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

namespace moeflow_emu {
struct Barrier {
    unsigned alive = 0, arrived = 0;
    unsigned long long generation = 0;
};
struct Fiber {
    ucontext_t context;
    jmp_buf env;
    bool started = false;
    std::unique_ptr<char[]> stack;  // uninitialized: a kernel's frames are small
    dim3 index;
    bool done = false;
};
struct Scheduler {
    ucontext_t main;  // written by each fiber's first swapcontext, never resumed
    jmp_buf main_env;
    std::vector<Fiber> fibers;
    unsigned current = 0;
    Barrier block;
    std::vector<Barrier> warps;
    std::vector<unsigned long long> slots;  // 32 per warp
    std::vector<uint32_t> mma;              // 32 lanes x 6 fragment words per warp
    const std::function<void()>* body = nullptr;
    unsigned long long progress = 0;  // barrier releases and thread exits: a round without any is a deadlock
};
inline Scheduler* scheduler = nullptr;

inline void yield() {
    if (!_setjmp(scheduler->fibers[scheduler->current].env)) _longjmp(scheduler->main_env, 1);
}

// Run fiber t until it yields or ends; both come back here through main_env.
__attribute__((noinline)) inline void resume(Scheduler& s, Fiber& f) {
    if (!_setjmp(s.main_env)) {
        if (!f.started) {
            f.started = true;
            swapcontext(&s.main, &f.context);
        } else {
            _longjmp(f.env, 1);
        }
    }
}

inline void release_if_complete(Barrier& b) {
    if (b.arrived > 0 && b.arrived == b.alive) {
        b.arrived = 0;
        ++b.generation;
        ++scheduler->progress;
    }
}

inline void wait(Barrier& b) {
    const auto seen = b.generation;
    ++b.arrived;
    release_if_complete(b);
    while (b.generation == seen) yield();
}
}  // namespace moeflow_emu

inline void __syncthreads() { moeflow_emu::wait(moeflow_emu::scheduler->block); }

template <typename T>
inline T moeflow_shuffle(T v, int src_of_lane(int lane, int arg), int arg) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    moeflow_emu::Scheduler& s = *moeflow_emu::scheduler;
    const unsigned warp = s.current / 32;
    const int lane = (int)(s.current % 32);
    unsigned long long* slot = &s.slots[warp * 32];
    std::memcpy(&slot[lane], &v, sizeof(T));
    moeflow_emu::wait(s.warps[warp]);
    T out;
    std::memcpy(&out, &slot[src_of_lane(lane, arg) & 31], sizeof(T));
    moeflow_emu::wait(s.warps[warp]);  // nobody overwrites a slot before every lane has read
    return out;
}
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: d += A (16x16) x B (16x8) for the warp, each
// lane holding PTX's fragments (lane = 4 g + t): a = {A[g][2t..], A[g+8][2t..], A[g][2t+8..],
// A[g+8][2t+8..]}, b = {B[2t..][g], B[2t+8..][g]}, d = {D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1]};
// two 16-bit values per word, the lower k in the low half.
inline float moeflow_half(uint32_t word, int high, bool bf16) {
    const uint16_t v = (uint16_t)(high ? word >> 16 : word & 0xffffu);
    if (bf16) {
        const uint32_t bits = (uint32_t)v << 16;
        float f;
        std::memcpy(&f, &bits, 4);
        return f;
    }
    _Float16 h;
    std::memcpy(&h, &v, 2);
    return (float)h;
}
inline void moeflow_mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16) {
    moeflow_emu::Scheduler& s = *moeflow_emu::scheduler;
    const unsigned warp = s.current / 32;
    const int lane = (int)(s.current % 32);
    uint32_t* frag = &s.mma[warp * 32 * 6];
    for (int i = 0; i < 4; ++i) frag[lane * 6 + i] = a[i];
    for (int i = 0; i < 2; ++i) frag[lane * 6 + 4 + i] = b[i];
    moeflow_emu::wait(s.warps[warp]);
    const int g = lane / 4, t = lane % 4;
    for (int c = 0; c < 4; ++c) {
        const int row = g + 8 * (c / 2), col = 2 * t + c % 2;
        float sum = 0.f;
        for (int k = 0; k < 16; ++k) {
            const int kw = k / 2;
            const float av = moeflow_half(frag[((row % 8) * 4 + kw % 4) * 6 + (row / 8) + 2 * (kw / 4)], k % 2, bf16);
            const float bv = moeflow_half(frag[(col * 4 + kw % 4) * 6 + 4 + kw / 4], k % 2, bf16);
            sum += av * bv;
        }
        d[c] += sum;
    }
    moeflow_emu::wait(s.warps[warp]);  // every lane has read the fragments before any writes new ones
}

inline int moeflow_xor_lane(int lane, int mask) { return lane ^ mask; }
inline int moeflow_down_lane(int lane, int delta) { return lane + delta < 32 ? lane + delta : lane; }
inline int moeflow_up_lane(int lane, int delta) { return lane - delta >= 0 ? lane - delta : lane; }
inline int moeflow_src_lane(int, int src) { return src; }

template <typename T> inline T __shfl_xor_sync(unsigned, T v, int mask, int = 32) { return moeflow_shuffle(v, moeflow_xor_lane, mask); }
template <typename T> inline T __shfl_down_sync(unsigned, T v, unsigned d, int = 32) { return moeflow_shuffle(v, moeflow_down_lane, (int)d); }
template <typename T> inline T __shfl_up_sync(unsigned, T v, unsigned d, int = 32) { return moeflow_shuffle(v, moeflow_up_lane, (int)d); }
template <typename T> inline T __shfl_sync(unsigned, T v, int src, int = 32) { return moeflow_shuffle(v, moeflow_src_lane, src); }

// CUDA's integer and float min / max overloads (one template: the kernels pass like types)
template <typename A, typename B> inline auto min(A a, B b) { return a < b ? a : b; }
template <typename A, typename B> inline auto max(A a, B b) { return a < b ? b : a; }

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __expf(float v) { return std::exp(v); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float exp2f_(float v) { return std::exp2(v); }
template <typename T> inline T __ldg(const T* p) { return *p; }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }

namespace moeflow_emu {
inline void fiber_main() {
    Scheduler& s = *scheduler;
    (*s.body)();
    // this thread has returned: the barriers still to come wait for the others only
    --s.block.alive;
    release_if_complete(s.block);
    Barrier& w = s.warps[s.current / 32];
    --w.alive;
    release_if_complete(w);
    s.fibers[s.current].done = true;
    ++s.progress;
    _longjmp(s.main_env, 1);  // never returns: its stack is reused by the next block
}

// Every block of the grid in order, each with block.x * block.y * block.z threads. Returns 0, or
// 1 when a block deadlocked (reported on stderr).
constexpr size_t STACK = 64 << 10;

inline int launch(const unsigned* dims, const std::function<void()>& body) {
    const dim3 grid{dims[0], dims[1], dims[2]}, blk{dims[3], dims[4], dims[5]};
    const unsigned threads = blk.x * blk.y * blk.z;
    Scheduler s;
    s.body = &body;
    s.fibers.resize(threads);
    s.warps.resize((threads + 31) / 32);
    s.slots.resize(s.warps.size() * 32);
    s.mma.resize(s.warps.size() * 32 * 6);
    for (unsigned t = 0; t < threads; ++t) {
        s.fibers[t].stack.reset(new char[STACK]);
        s.fibers[t].index = dim3{t % blk.x, (t / blk.x) % blk.y, t / (blk.x * blk.y)};
    }
    Scheduler* outer = scheduler;
    scheduler = &s;
    blockDim = blk;
    gridDim = grid;
    int status = 0;
    for (unsigned bz = 0; bz < grid.z && !status; ++bz)
        for (unsigned by = 0; by < grid.y && !status; ++by)
            for (unsigned bx = 0; bx < grid.x && !status; ++bx) {
                blockIdx = dim3{bx, by, bz};
                s.block = Barrier{threads};
                for (unsigned w = 0; w < s.warps.size(); ++w) s.warps[w] = Barrier{std::min(32u, threads - w * 32)};
                for (unsigned t = 0; t < threads; ++t) {
                    Fiber& f = s.fibers[t];
                    f.done = false;
                    f.started = false;
                    getcontext(&f.context);
                    f.context.uc_stack.ss_sp = f.stack.get();
                    f.context.uc_stack.ss_size = STACK;
                    f.context.uc_link = nullptr;
                    makecontext(&f.context, fiber_main, 0);
                }
                for (unsigned live = threads; live > 0 && !status;) {
                    const auto before = s.progress;
                    live = 0;
                    for (unsigned t = 0; t < threads; ++t) {
                        if (s.fibers[t].done) continue;
                        s.current = t;
                        threadIdx = s.fibers[t].index;
                        resume(s, s.fibers[t]);
                        live += !s.fibers[t].done;
                    }
                    if (live > 0 && s.progress == before) {
                        std::fprintf(stderr, "cuda emulator: block (%u, %u, %u) deadlocked: %u threads wait at "
                                     "barriers that cannot complete\n", bx, by, bz, live);
                        status = 1;
                    }
                }
            }
    scheduler = outer;
    return status;
}
}  // namespace moeflow_emu
