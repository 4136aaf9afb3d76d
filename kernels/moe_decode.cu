// Decode expert FFN at the memory-bandwidth limit: a few token rows per expert, any number of
// experts in one launch per phase, weights read in 16-byte vectors and dequantized in registers.
// Rows are sorted by expert: rows offsets[e]..offsets[e+1] of x go through expert e, whose matrices
// are found through per-expert pointer tables (as grouped_ffn.cu).
//   phase 1 decode_gate_up_*: h[r][i] = silu(gate_i . x_r) * (up_i . x_r)     (h: fp32 [rows, inter])
//   phase 2 decode_down_*:    y[r][j] = w_r * (down_j . h_r)                  (y: fp32 [rows, hidden])
// One warp per weight row (a gate/up pair in phase 1): its lanes take the row's 16-byte chunks in
// turn, so a warp reads 512 contiguous bytes per step. A quantized chunk (32 int4, 16 int8 or 64
// int2 codes) lies inside one group, so its scale and zero are read once and applied to the chunk's
// whole dot product: sum_k x_k (q_k - z) s = s (sum_k x_k q_k - z sum_k x_k).
// Deterministic: every output is one warp's fixed-order sum (no atomics), and no row's result
// depends on the other rows, so a token's output is the same in any batch and at any budget.
// Requirements (checked by runtime/gpu.py): 16-byte aligned weights, x and h; hidden and inter
// multiples of the chunk's codes; the group size a multiple of them.
// Reference: moeflow/runtime/reference.py::grouped_expert_ffn.

#define DEC_WARPS 8      // warps (weight rows) per block
#define DEC_ROWS 8       // token rows held in registers at once; more rows of an expert loop

struct DecodePtrs {
    const uint8_t* const* q;       // [experts] packed codes or 16-bit weights
    const uint16_t* const* scale;  // [experts] fp16 scales (unused for 16-bit weights)
    const uint16_t* const* zero;
};

// Activations of one 32-bit weight word's PER codes: 16-bit (phase 1, x) or fp32 (phase 2, h),
// loaded as one vector where the size allows.
template <int PER, typename T>
__device__ __forceinline__ void load_act(const uint16_t* p, float (&v)[PER], T) {
    if constexpr (PER == 2) {
        const uint32_t a = *reinterpret_cast<const uint32_t*>(p);
        v[0] = to_float((uint16_t)(a & 0xffffu), T());
        v[1] = to_float((uint16_t)(a >> 16), T());
    } else if constexpr (PER == 4) {
        const uint2 a = *reinterpret_cast<const uint2*>(p);
        const uint32_t w[2] = {a.x, a.y};
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] = to_float((uint16_t)(w[i / 2] >> (16 * (i % 2))), T());
    } else {
#pragma unroll
        for (int b = 0; b < PER / 8; ++b) {
            const uint4 a = reinterpret_cast<const uint4*>(p)[b];
            const uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
            for (int i = 0; i < 8; ++i) v[b * 8 + i] = to_float((uint16_t)(w[i / 2] >> (16 * (i % 2))), T());
        }
    }
}
template <int PER, typename T>
__device__ __forceinline__ void load_act(const float* p, float (&v)[PER], T) {
    if constexpr (PER == 2) {
        const float2 a = *reinterpret_cast<const float2*>(p);
        v[0] = a.x;
        v[1] = a.y;
    } else {
#pragma unroll
        for (int b = 0; b < PER / 4; ++b) {
            const float4 a = reinterpret_cast<const float4*>(p)[b];
            v[b * 4] = a.x;
            v[b * 4 + 1] = a.y;
            v[b * 4 + 2] = a.z;
            v[b * 4 + 3] = a.w;
        }
    }
}

// acc[w][r] += row_w . act_r over the whole row, for NW weight rows and nr (<= DEC_ROWS) token rows.
// Each lane takes chunks lane, lane + 32, ...; the caller reduces acc over the warp.
template <int BITS, typename T, typename A, int NW>
__device__ __forceinline__ void dot_rows(const uint8_t* const (&wq)[NW], const uint16_t* const (&ws)[NW],
                                         const uint16_t* const (&wz)[NW], int cols, int group, const A* act,
                                         int nr, int lane, float (&acc)[NW][DEC_ROWS]) {
    constexpr int CODES = 128 / BITS;  // per 16-byte chunk
    constexpr int PER = 32 / BITS;     // per 32-bit word
    const int chunks = cols / CODES;
    for (int c = lane; c < chunks; c += 32) {
        const int k0 = c * CODES;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            const uint4 chunk = reinterpret_cast<const uint4*>(wq[w])[c];
            const uint32_t words[4] = {chunk.x, chunk.y, chunk.z, chunk.w};
            float s = 1.f, z = 0.f;
            if constexpr (BITS != 16) {
                s = half_to_float(ws[w][k0 / group]);
                z = half_to_float(wz[w][k0 / group]);
            }
#pragma unroll
            for (int r = 0; r < DEC_ROWS; ++r) {
                if (r < nr) {
                    const A* a = act + (long)r * cols + k0;
                    float dot = 0.f, sum = 0.f;
#pragma unroll
                    for (int wd = 0; wd < 4; ++wd) {
                        float v[PER];
                        load_act<PER>(a + wd * PER, v, T());
#pragma unroll
                        for (int j = 0; j < PER; ++j) {
                            float wv;
                            if constexpr (BITS == 16) {
                                wv = to_float((uint16_t)(words[wd] >> (16 * j)), T());
                            } else {
                                wv = (float)((words[wd] >> (j * BITS)) & ((1u << BITS) - 1u));
                                sum += v[j];
                            }
                            dot += wv * v[j];
                        }
                    }
                    acc[w][r] += BITS == 16 ? dot : s * (dot - z * sum);
                }
            }
        }
    }
}

template <int BITS>
__device__ __forceinline__ long row_bytes(int cols) {
    return BITS == 16 ? (long)cols * 2 : (long)cols * BITS / 8;
}

template <int BITS, typename T>
__device__ void decode_gate_up(const uint16_t* __restrict__ x, const int* __restrict__ offsets, int hidden,
                               int inter, int group, DecodePtrs gu, float* __restrict__ h) {
    const int e = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int i = blockIdx.x * DEC_WARPS + warp;
    const int r0 = offsets[e], r1 = offsets[e + 1];
    if (i >= inter || r0 >= r1) return;  // warp-uniform: the shuffles below see whole warps
    const int groups = BITS == 16 ? 0 : hidden / group;
    const uint8_t* const q[2] = {gu.q[e] + i * row_bytes<BITS>(hidden), gu.q[e] + (inter + i) * row_bytes<BITS>(hidden)};
    const uint16_t* const s[2] = {gu.scale[e] + (long)i * groups, gu.scale[e] + (long)(inter + i) * groups};
    const uint16_t* const z[2] = {gu.zero[e] + (long)i * groups, gu.zero[e] + (long)(inter + i) * groups};
    for (int rb = r0; rb < r1; rb += DEC_ROWS) {
        const int nr = min(DEC_ROWS, r1 - rb);
        float acc[2][DEC_ROWS] = {};
        dot_rows<BITS, T, uint16_t, 2>(q, s, z, hidden, group, x + (long)rb * hidden, nr, lane, acc);
#pragma unroll
        for (int r = 0; r < DEC_ROWS; ++r) {
            if (r < nr) {
                const float g = warp_sum(acc[0][r]), u = warp_sum(acc[1][r]);
                if (lane == 0) h[(long)(rb + r) * inter + i] = silu(g) * u;
            }
        }
    }
}

template <int BITS, typename T>
__device__ void decode_down(const float* __restrict__ h, const int* __restrict__ offsets, int hidden, int inter,
                            int group, DecodePtrs d, const float* __restrict__ row_weight, float* __restrict__ y) {
    const int e = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int j = blockIdx.x * DEC_WARPS + warp;
    const int r0 = offsets[e], r1 = offsets[e + 1];
    if (j >= hidden || r0 >= r1) return;
    const int groups = BITS == 16 ? 0 : inter / group;
    const uint8_t* const q[1] = {d.q[e] + j * row_bytes<BITS>(inter)};
    const uint16_t* const s[1] = {d.scale[e] + (long)j * groups};
    const uint16_t* const z[1] = {d.zero[e] + (long)j * groups};
    for (int rb = r0; rb < r1; rb += DEC_ROWS) {
        const int nr = min(DEC_ROWS, r1 - rb);
        float acc[1][DEC_ROWS] = {};
        dot_rows<BITS, T, float, 1>(q, s, z, inter, group, h + (long)rb * inter, nr, lane, acc);
#pragma unroll
        for (int r = 0; r < DEC_ROWS; ++r) {
            if (r < nr) {
                const float v = warp_sum(acc[0][r]);
                if (lane == 0) y[(long)(rb + r) * hidden + j] = v * row_weight[rb + r];
            }
        }
    }
}

#define MOE_DECODE(BITS, NAME, T)                                                                          \
    extern "C" __global__ void decode_gate_up_##NAME(                                                      \
        const uint16_t* x, const int* offsets, int hidden, int inter, int group, const uint8_t* const* q,   \
        const uint16_t* const* scale, const uint16_t* const* zero, float* h) {                             \
        decode_gate_up<BITS, T>(x, offsets, hidden, inter, group, DecodePtrs{q, scale, zero}, h);          \
    }                                                                                                      \
    extern "C" __global__ void decode_down_##NAME(                                                         \
        const float* h, const int* offsets, int hidden, int inter, int group, const uint8_t* const* q,     \
        const uint16_t* const* scale, const uint16_t* const* zero, const float* row_weight, float* y) {    \
        decode_down<BITS, T>(h, offsets, hidden, inter, group, DecodePtrs{q, scale, zero}, row_weight, y); \
    }

MOE_DECODE(16, f16_f16, F16)
MOE_DECODE(16, bf16_bf16, BF16)
MOE_DECODE(8, int8_f16, F16)
MOE_DECODE(8, int8_bf16, BF16)
MOE_DECODE(4, int4_f16, F16)
MOE_DECODE(4, int4_bf16, BF16)
MOE_DECODE(2, int2_f16, F16)
MOE_DECODE(2, int2_bf16, BF16)
