// Decode expert FFN for min-max quantized experts (int8/int4/int2), a candidate beside
// moe_decode.cu that the measured kernel choice (runtime/kernel_choice.py) times and picks only
// where it is faster. Same contract: rows sorted by expert, offsets[e]..offsets[e+1] through expert
// e, two launches (gate/up with SiLU*up into fp32 h, then down scaled by the row's weight into fp32 y).
//
// Why another kernel: moe_decode.cu gives each weight row a warp and each lane reads, per 16 bytes
// of codes, the matching 32 activations (64 bytes in bf16) and shifts, masks and converts every
// code; measured on an H200 that is bound by instructions and activation reads (0.6 TB/s of codes).
// Here:
// - A block owns KS_ROWS weight rows (phase 1: KS_ROWS / 2 gate/up pairs). Its warps split K:
//   warp w, lane l reads the 16-byte chunks (32 * w + l) + 32 * warps * n of every one of its
//   rows, so all KS_ROWS rows' codes of a chunk are loaded (16-byte loads, KS_ROWS in flight per
//   lane) before any is used, and the chunk's activations are read once per token row and reused
//   by all KS_ROWS rows from registers: activation reads fall from 4x to 4/KS_ROWS x the code bytes
//   per token row (int4, bf16).
// - A code becomes a float with one shift and one mask-or (no integer-to-float conversion):
//   placing q in the top mantissa bits of 1.0f gives f = 1 + q / 2^B exactly, so over a chunk
//   sum_k x_k f_k = X + (sum_k x_k q_k) / 2^B with X = sum_k x_k, and with the chunk's scale s and
//   zero z (a chunk lies inside one group)
//       sum_k x_k (q_k - z) s = s 2^B sum_k x_k f_k - s (2^B + z) X,
//   two multiply-adds per chunk and weight row; X is summed once per chunk and token row for all
//   the block's rows.
// - Deterministic, no atomics: a lane's partial sums run over its chunks in order, a warp's are
//   added by a fixed shuffle tree (warp_sum), the warps' in warp order through shared memory. The
//   number of warps depends only on the expert's shape (the launcher's `warps_for`), and token rows
//   never mix, so a row's output bits do not depend on the other rows of the launch, on how many
//   rows its expert has (TOK rows per pass: only their count of passes changes), or the budget.
// Requirements (runtime/gpu_kslice.py `fits`): 16-byte aligned weights, x and h; hidden and inter
// multiples of a chunk's codes; the group a multiple of them.
// Reference: moeflow/runtime/reference.py::grouped_expert_ffn.

#define KS_ROWS 8       // weight rows per block
#define KS_PAIRS 4      // phase 1: gate/up pairs per block (KS_ROWS / 2)
#define KS_MAX_WARPS 8  // warps splitting K (runtime/gpu_kslice.py MAX_WARPS)

struct KslicePtrs {
    const uint8_t* const* q;  // [experts] packed codes
    const uint16_t* const* scale;  // [experts] fp16 scales
    const uint16_t* const* zero;
};

// Weight reads: read-only for the kernel's life (the non-coherent path), and volatile so that
// the compiler keeps them in program order, before the arithmetic: left to itself it sank the
// scale/zero loads below the first row's dot products, exposing their latency once more per chunk.
__device__ __forceinline__ uint4 load_weights(const uint8_t* p) {
#ifdef MOEFLOW_EMU
    return *reinterpret_cast<const uint4*>(p);
#else
    uint4 v;
    asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
#endif
}
__device__ __forceinline__ uint16_t load_half(const uint16_t* p) {
#ifdef MOEFLOW_EMU
    return *p;
#else
    uint16_t v;
    asm volatile("ld.global.nc.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return v;
#endif
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Code j of a 32-bit word (lowest bits first) as 1 + q / 2^BITS: the code moved to the top of the
// mantissa of 1.0f. J is a constant after unrolling, so this is one shift and one lop3.
template <int BITS>
__device__ __forceinline__ float code_plus_one(uint32_t word, int j) {
    constexpr int TOP = 23 - BITS;  // the code's lowest bit in the float
    constexpr uint32_t MASK = ((1u << BITS) - 1u) << TOP;
    const int at = j * BITS;
    const uint32_t moved = at <= TOP ? word << (TOP - at) : word >> (at - TOP);
    return __uint_as_float((moved & MASK) | 0x3f800000u);
}

// PER activations starting at p: 16-bit (phase 1) or fp32 (phase 2), in 16-byte vectors where
// PER fills them, else 8-byte.
template <int PER, typename T>
__device__ __forceinline__ void load_acts(const uint16_t* p, float (&v)[PER], T) {
    if constexpr (PER == 4) {
        const uint2 a = *reinterpret_cast<const uint2*>(p);
        v[0] = to_float((uint16_t)(a.x & 0xffffu), T());
        v[1] = to_float((uint16_t)(a.x >> 16), T());
        v[2] = to_float((uint16_t)(a.y & 0xffffu), T());
        v[3] = to_float((uint16_t)(a.y >> 16), T());
    } else {
#pragma unroll
        for (int b = 0; b < PER / 8; ++b) {
            const uint4 a = reinterpret_cast<const uint4*>(p)[b];
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const uint32_t w = word_of(a, i / 2);
                v[b * 8 + i] = to_float((uint16_t)(i % 2 ? w >> 16 : w & 0xffffu), T());
            }
        }
    }
}
template <int PER, typename T>
__device__ __forceinline__ void load_acts(const float* p, float (&v)[PER], T) {
#pragma unroll
    for (int b = 0; b < PER / 4; ++b) {
        const float4 a = reinterpret_cast<const float4*>(p)[b];
        v[b * 4] = a.x;
        v[b * 4 + 1] = a.y;
        v[b * 4 + 2] = a.z;
        v[b * 4 + 3] = a.w;
    }
}

// The block's weight rows: two runs of KS_PAIRS consecutive rows (phase 1: gate rows, up rows;
// phase 2: rows j0.. and j0 + KS_PAIRS..), found from two bases and a row stride rather than one
// pointer triple per row, which held 48 registers.
struct RowTile {
    const uint8_t* q[2];
    const uint16_t* s[2];
    const uint16_t* z[2];
    long row_bytes;
    int groups;
};

// acc[w][r] += (this lane's chunks of) row_w . act_r for the block's KS_ROWS rows and nr
// (<= TOK) token rows of act [nr, cols]. The lane's chunks: first, first + stride, ...
template <int BITS, typename T, int TOK, typename A>
__device__ __forceinline__ void kslice_dot(const RowTile& t, int cols, int group, const A* act, int nr, int first,
                                           int stride, float (&acc)[KS_ROWS][TOK]) {
    constexpr int CODES = 128 / BITS;  // per 16-byte chunk
    constexpr int PER = 32 / BITS;     // per 32-bit word
    constexpr float LEVELS = (float)(1 << BITS);
    const int chunks = cols / CODES;
#pragma unroll 1
    for (int c = first; c < chunks; c += stride) {
        uint4 code[KS_ROWS];
        float a[KS_ROWS], b[KS_ROWS];
#pragma unroll
        for (int w = 0; w < KS_ROWS; ++w)  // every row's codes requested before any is used
            code[w] = load_weights(t.q[w / KS_PAIRS] + (w % KS_PAIRS) * t.row_bytes + (long)c * 16);
        const int g = c * CODES / group;
        uint16_t sh[KS_ROWS], zh[KS_ROWS];
#pragma unroll
        for (int w = 0; w < KS_ROWS; ++w) {
            const long at = (long)(w % KS_PAIRS) * t.groups + g;
            sh[w] = load_half(t.s[w / KS_PAIRS] + at);
            zh[w] = load_half(t.z[w / KS_PAIRS] + at);
        }
#pragma unroll
        for (int w = 0; w < KS_ROWS; ++w) {
            const float s = half_to_float(sh[w]);
            a[w] = s * LEVELS;
            b[w] = s * (LEVELS + half_to_float(zh[w]));
        }
#pragma unroll
        for (int r = 0; r < TOK; ++r) {
            if (r < nr) {  // uniform over the block
                const A* x = act + (long)r * cols + (long)c * CODES;
                float f[KS_ROWS] = {};
                float xs = 0.f;
#pragma unroll
                for (int wd = 0; wd < 4; ++wd) {
                    float v[PER];
                    load_acts<PER>(x + wd * PER, v, T());
#pragma unroll
                    for (int j = 0; j < PER; ++j) xs += v[j];
#pragma unroll
                    for (int w = 0; w < KS_ROWS; ++w) {
                        const uint32_t word = word_of(code[w], wd);
#pragma unroll
                        for (int j = 0; j < PER; ++j) f[w] = fmaf(v[j], code_plus_one<BITS>(word, j), f[w]);
                    }
                }
#pragma unroll
                for (int w = 0; w < KS_ROWS; ++w) acc[w][r] = fmaf(a[w], f[w], fmaf(-b[w], xs, acc[w][r]));
            }
        }
    }
}

// The block's sums of acc over its warps, in warp order, into red[w][r] (valid after the call's
// final barrier; the caller ends its use of red with another barrier).
template <int TOK>
__device__ __forceinline__ void block_reduce(float (&acc)[KS_ROWS][TOK], int nr,
                                             float (&red)[KS_MAX_WARPS][KS_ROWS][TOK]) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int w = 0; w < KS_ROWS; ++w) {
#pragma unroll
        for (int r = 0; r < TOK; ++r) {
            if (r < nr) {
                const float v = warp_sum(acc[w][r]);
                if (lane == 0) red[warp][w][r] = v;
            }
        }
    }
    __syncthreads();
}

template <int TOK>
__device__ __forceinline__ float warps_total(const float (&red)[KS_MAX_WARPS][KS_ROWS][TOK], int w, int r) {
    const int warps = blockDim.x / 32;
    float v = red[0][w][r];
    for (int k = 1; k < warps; ++k) v += red[k][w][r];
    return v;
}

template <int BITS, typename T, int TOK>
__device__ void kslice_gate_up(const uint16_t* __restrict__ x, const int* __restrict__ offsets, int hidden, int inter,
                               int group, KslicePtrs gu, float* __restrict__ h) {
    __shared__ float red[KS_MAX_WARPS][KS_ROWS][TOK];
    const int e = blockIdx.y;
    const int i0 = blockIdx.x * KS_PAIRS;
    const int r0 = offsets[e], r1 = offsets[e + 1];
    if (r0 >= r1) return;  // uniform over the block: its barriers see every thread or none
    // whole tiles: runtime/gpu_kslice.py `fits` takes inter a multiple of KS_PAIRS
    RowTile t;
    t.row_bytes = (long)hidden * BITS / 8;
    t.groups = hidden / group;
    for (int half = 0; half < 2; ++half) {
        const long row = i0 + half * (long)inter;  // gate rows, then up rows
        t.q[half] = gu.q[e] + row * t.row_bytes;
        t.s[half] = gu.scale[e] + row * t.groups;
        t.z[half] = gu.zero[e] + row * t.groups;
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int rb = r0; rb < r1; rb += TOK) {
        const int nr = min(TOK, r1 - rb);
        float acc[KS_ROWS][TOK] = {};
        kslice_dot<BITS, T, TOK, uint16_t>(t, hidden, group, x + (long)rb * hidden, nr, warp * 32 + lane,
                                      blockDim.x, acc);
        block_reduce(acc, nr, red);
        if (threadIdx.x < KS_PAIRS * TOK) {
            const int p = threadIdx.x / TOK, r = threadIdx.x % TOK;
            if (r < nr && i0 + p < inter) {
                const float gate = warps_total(red, p, r), up = warps_total(red, KS_PAIRS + p, r);
                h[(long)(rb + r) * inter + i0 + p] = silu(gate) * up;
            }
        }
        __syncthreads();  // red is read before the next pass writes it
    }
}

template <int BITS, typename T, int TOK>
__device__ void kslice_down(const float* __restrict__ h, const int* __restrict__ offsets, int hidden, int inter,
                            int group, KslicePtrs d, const float* __restrict__ row_weight, float* __restrict__ y) {
    __shared__ float red[KS_MAX_WARPS][KS_ROWS][TOK];
    const int e = blockIdx.y;
    const int j0 = blockIdx.x * KS_ROWS;
    const int r0 = offsets[e], r1 = offsets[e + 1];
    if (r0 >= r1) return;
    // whole tiles: runtime/gpu_kslice.py `fits` takes hidden a multiple of KS_ROWS
    RowTile t;
    t.row_bytes = (long)inter * BITS / 8;
    t.groups = inter / group;
    for (int half = 0; half < 2; ++half) {
        const long row = j0 + half * KS_PAIRS;
        t.q[half] = d.q[e] + row * t.row_bytes;
        t.s[half] = d.scale[e] + row * t.groups;
        t.z[half] = d.zero[e] + row * t.groups;
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int rb = r0; rb < r1; rb += TOK) {
        const int nr = min(TOK, r1 - rb);
        float acc[KS_ROWS][TOK] = {};
        kslice_dot<BITS, T, TOK, float>(t, inter, group, h + (long)rb * inter, nr, warp * 32 + lane, blockDim.x,
                                   acc);
        block_reduce(acc, nr, red);
        if (threadIdx.x < KS_ROWS * TOK) {
            const int w = threadIdx.x / TOK, r = threadIdx.x % TOK;
            if (r < nr && j0 + w < hidden)
                y[(long)(rb + r) * hidden + j0 + w] = warps_total(red, w, r) * row_weight[rb + r];
        }
        __syncthreads();
    }
}

// TOK token rows per pass over the weights: 1 (the launch's experts have one row each: 96
// registers on sm_90) or 4 (164). A row's arithmetic is the same in both (explicit fmaf, fixed
// sums), so a row alone and the same row among others give the same bits.
#define MOE_DECODE_KSLICE(BITS, NAME, T)                                                                   \
    extern "C" __global__ void kslice_gate_up_##NAME##_t1(                                                 \
        const uint16_t* x, const int* offsets, int hidden, int inter, int group, const uint8_t* const* q,   \
        const uint16_t* const* scale, const uint16_t* const* zero, float* h) {                             \
        kslice_gate_up<BITS, T, 1>(x, offsets, hidden, inter, group, KslicePtrs{q, scale, zero}, h);       \
    }                                                                                                      \
    extern "C" __global__ void kslice_gate_up_##NAME##_t4(                                                 \
        const uint16_t* x, const int* offsets, int hidden, int inter, int group, const uint8_t* const* q,   \
        const uint16_t* const* scale, const uint16_t* const* zero, float* h) {                             \
        kslice_gate_up<BITS, T, 4>(x, offsets, hidden, inter, group, KslicePtrs{q, scale, zero}, h);       \
    }                                                                                                      \
    extern "C" __global__ void kslice_down_##NAME##_t1(                                                    \
        const float* h, const int* offsets, int hidden, int inter, int group, const uint8_t* const* q,     \
        const uint16_t* const* scale, const uint16_t* const* zero, const float* row_weight, float* y) {    \
        kslice_down<BITS, T, 1>(h, offsets, hidden, inter, group, KslicePtrs{q, scale, zero}, row_weight, y); \
    }                                                                                                      \
    extern "C" __global__ void kslice_down_##NAME##_t4(                                                    \
        const float* h, const int* offsets, int hidden, int inter, int group, const uint8_t* const* q,     \
        const uint16_t* const* scale, const uint16_t* const* zero, const float* row_weight, float* y) {    \
        kslice_down<BITS, T, 4>(h, offsets, hidden, inter, group, KslicePtrs{q, scale, zero}, row_weight, y); \
    }

MOE_DECODE_KSLICE(8, int8_f16, F16)
MOE_DECODE_KSLICE(8, int8_bf16, BF16)
MOE_DECODE_KSLICE(4, int4_f16, F16)
MOE_DECODE_KSLICE(4, int4_bf16, BF16)
MOE_DECODE_KSLICE(2, int2_f16, F16)
MOE_DECODE_KSLICE(2, int2_bf16, BF16)
