// Grouped expert FFN for prefill on tensor cores: rows sorted by expert, rows offsets[e]..offsets[e+1]
// of x through expert e (pointer tables as grouped_ffn.cu), weights dequantized into shared memory
// tile by tile, products by mma.sync.m16n8k16 (fp16/bf16 in, fp32 accumulate).
//   phase 1 mma_gate_up_*: h[r][i] = silu(gate_i . x_r) * (up_i . x_r)    (h: 16-bit [rows, inter])
//   phase 2 mma_down_*:    y[r][j] = w_r * (down_j . h_r)                 (y: fp32 [rows, hidden])
// h is rounded to the activations' 16-bit type between the phases, as torch's 16-bit F.linear does.
// A block computes a BM x BN tile of one expert's output: 4 warps, each 32 rows x 32 columns (two
// m16 by four n8 tiles); 64 rows per block, so an expert's weights are read once per 64 of its rows. Per BK step the block stages BM x BK activations and BN x BK weights (two weight tiles,
// gate and up, in phase 1), each weight segment of 8 values dequantized once with its group's
// scale and zero. Rows of shared tiles are padded by 8 values so fragment reads hit distinct banks.
// Deterministic: each output is one thread's fixed-order sum. Requirements (runtime/gpu_mma.py):
// K of both phases (hidden, inter) a multiple of BK, the group size a multiple of 8, 16-byte
// aligned activations.
// Reference: moeflow/runtime/reference.py::grouped_expert_ffn.

#define BM 64
#define BN 64
#define BK 64
#define PAD 8
#define MMA_THREADS 128

template <typename T> struct IsBF16 { static constexpr bool value = false; };
template <> struct IsBF16<BF16> { static constexpr bool value = true; };

struct MmaPtrs {
    const uint8_t* const* q;
    const uint16_t* const* scale;
    const uint16_t* const* zero;
};

// d = a (16x16, row-major) * b (16x8, col-major) + c for the warp, in PTX's m16n8k16 fragments:
// lane = 4 * g + t holds a = {A[g][2t..], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..]},
// b = {B[2t..][g], B[2t+8..][g]}, c/d = {C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]}.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef MOEFLOW_EMU
    moeflow_mma_16816(d, a, b, IsBF16<T>::value);
#else
    if constexpr (IsBF16<T>::value) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
#endif
}

// 8 consecutive weights of one row, starting at column k (a multiple of 8), as 16-bit values of T.
template <int BITS, typename T>
__device__ __forceinline__ uint4 weight_segment(const uint8_t* q_row, const uint16_t* s_row, const uint16_t* z_row,
                                                int k, int group) {
    if constexpr (BITS == 16) {
        return *reinterpret_cast<const uint4*>(q_row + (long)k * 2);
    } else {
        uint32_t codes;  // 8 codes, lowest bits first
        if constexpr (BITS == 8) {
            const uint2 v = *reinterpret_cast<const uint2*>(q_row + k);
            const float s = half_to_float(s_row[k / group]), z = half_to_float(z_row[k / group]);
            uint32_t out[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const uint32_t word = i < 2 ? v.x : v.y;
                const int sh = (i % 2) * 16;
                const float w0 = ((float)((word >> sh) & 0xffu) - z) * s;
                const float w1 = ((float)((word >> (sh + 8)) & 0xffu) - z) * s;
                out[i] = (uint32_t)from_float(w0, T()) | ((uint32_t)from_float(w1, T()) << 16);
            }
            return uint4{out[0], out[1], out[2], out[3]};
        } else {
            if constexpr (BITS == 4) {
                codes = *reinterpret_cast<const uint32_t*>(q_row + k / 2);
            } else {
                codes = *reinterpret_cast<const uint16_t*>(q_row + k / 4);
            }
            const float s = half_to_float(s_row[k / group]), z = half_to_float(z_row[k / group]);
            constexpr uint32_t MASK = (1u << BITS) - 1u;
            uint32_t out[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float w0 = ((float)((codes >> (2 * i * BITS)) & MASK) - z) * s;
                const float w1 = ((float)((codes >> ((2 * i + 1) * BITS)) & MASK) - z) * s;
                out[i] = (uint32_t)from_float(w0, T()) | ((uint32_t)from_float(w1, T()) << 16);
            }
            return uint4{out[0], out[1], out[2], out[3]};
        }
    }
}

template <int BITS>
__device__ __forceinline__ long mma_row_bytes(int cols) {
    return BITS == 16 ? (long)cols * 2 : (long)cols * BITS / 8;
}

// Stage BN rows x BK columns of weight rows n0.. (of a matrix with `cols` columns, `rows` rows,
// starting at row `first`) into tile, dequantized. 8 segments per row, 512 per tile.
template <int BITS, typename T>
__device__ __forceinline__ void stage_weights(uint16_t (*tile)[BK + PAD], const uint8_t* q, const uint16_t* s,
                                              const uint16_t* z, long first, int n0, int rows, int cols, int k0,
                                              int group) {
    const int groups = BITS == 16 ? 0 : cols / group;
    for (int seg = threadIdx.x; seg < BN * (BK / 8); seg += MMA_THREADS) {
        const int r = seg / (BK / 8), c = (seg % (BK / 8)) * 8;
        uint4 v = uint4{0u, 0u, 0u, 0u};
        if (n0 + r < rows) {
            const long row = first + n0 + r;
            v = weight_segment<BITS, T>(q + row * mma_row_bytes<BITS>(cols), s + row * groups, z + row * groups,
                                        k0 + c, group);
        }
        *reinterpret_cast<uint4*>(&tile[r][c]) = v;
    }
}

// Stage BM rows x BK columns of 16-bit activations (rows r0.. up to row_end) into tile.
__device__ __forceinline__ void stage_rows(uint16_t (*tile)[BK + PAD], const uint16_t* act, int cols, int r0,
                                           int row_end, int k0) {
    for (int seg = threadIdx.x; seg < BM * (BK / 8); seg += MMA_THREADS) {
        const int r = seg / (BK / 8), c = (seg % (BK / 8)) * 8;
        uint4 v = uint4{0u, 0u, 0u, 0u};
        if (r0 + r < row_end) v = *reinterpret_cast<const uint4*>(act + (long)(r0 + r) * cols + k0 + c);
        *reinterpret_cast<uint4*>(&tile[r][c]) = v;
    }
}

__device__ __forceinline__ uint32_t pair(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// acc[mt][nt] += A-tile rows (warp's 32: two m16 tiles) x B-tile rows (warp's 32 columns, four n8
// tiles) over BK.
template <typename T>
__device__ __forceinline__ void tile_products(uint16_t (*a_tile)[BK + PAD], uint16_t (*b_tile)[BK + PAD], int wm,
                                              int wn, float (&acc)[2][4][4]) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
        uint32_t a[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
            const int m = wm + mt * 16 + g;
            a[mt][0] = pair(&a_tile[m][kk + 2 * t]);
            a[mt][1] = pair(&a_tile[m + 8][kk + 2 * t]);
            a[mt][2] = pair(&a_tile[m][kk + 2 * t + 8]);
            a[mt][3] = pair(&a_tile[m + 8][kk + 2 * t + 8]);
        }
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            const int n = wn + nt * 8 + g;
            const uint32_t b[2] = {pair(&b_tile[n][kk + 2 * t]), pair(&b_tile[n][kk + 2 * t + 8])};
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) mma_16816<T>(acc[mt][nt], a[mt], b);
        }
    }
}

// f(r, col, mt, nt, c) for each of the warp's accumulators inside the tile's rows and columns: the
// m16n8 fragments' layout, c = {D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1]} per n8 tile.
template <typename F>
__device__ __forceinline__ void each_output(const float (&acc)[2][4][4], int r0, int wm, int n0, int wn,
                                            int row_end, int cols, F f) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int r = r0 + wm + mt * 16 + g + 8 * (c / 2), col = n0 + wn + nt * 8 + 2 * t + c % 2;
                if (r < row_end && col < cols) f(r, col, mt, nt, c);
            }
        }
    }
}

template <int BITS, typename T>
__device__ void mma_gate_up(const uint16_t* __restrict__ x, const int* __restrict__ offsets, int hidden, int inter,
                            int group, MmaPtrs gu, uint16_t* __restrict__ h) {
    __shared__ __align__(16) uint16_t xs[BM][BK + PAD];
    __shared__ __align__(16) uint16_t gs[BN][BK + PAD];
    __shared__ __align__(16) uint16_t us[BN][BK + PAD];
    const int e = blockIdx.z;
    const int r0 = offsets[e] + blockIdx.y * BM, row_end = offsets[e + 1];
    if (r0 >= row_end) return;  // block-uniform
    const int n0 = blockIdx.x * BN;
    const int warp = threadIdx.x / 32, wm = (warp / 2) * 32, wn = (warp % 2) * 32;
    float acc_g[2][4][4] = {}, acc_u[2][4][4] = {};
    for (int k0 = 0; k0 < hidden; k0 += BK) {
        stage_rows(xs, x, hidden, r0, row_end, k0);
        stage_weights<BITS, T>(gs, gu.q[e], gu.scale[e], gu.zero[e], 0, n0, inter, hidden, k0, group);
        stage_weights<BITS, T>(us, gu.q[e], gu.scale[e], gu.zero[e], inter, n0, inter, hidden, k0, group);
        __syncthreads();
        tile_products<T>(xs, gs, wm, wn, acc_g);
        tile_products<T>(xs, us, wm, wn, acc_u);
        __syncthreads();
    }
    each_output(acc_g, r0, wm, n0, wn, row_end, inter, [&](int r, int i, int mt, int nt, int c) {
        h[(long)r * inter + i] = from_float(silu(acc_g[mt][nt][c]) * acc_u[mt][nt][c], T());
    });
}

template <int BITS, typename T>
__device__ void mma_down(const uint16_t* __restrict__ h, const int* __restrict__ offsets, int hidden, int inter,
                         int group, MmaPtrs d, const float* __restrict__ row_weight, float* __restrict__ y) {
    __shared__ __align__(16) uint16_t hs[BM][BK + PAD];
    __shared__ __align__(16) uint16_t ds[BN][BK + PAD];
    const int e = blockIdx.z;
    const int r0 = offsets[e] + blockIdx.y * BM, row_end = offsets[e + 1];
    if (r0 >= row_end) return;
    const int n0 = blockIdx.x * BN;
    const int warp = threadIdx.x / 32, wm = (warp / 2) * 32, wn = (warp % 2) * 32;
    float acc[2][4][4] = {};
    for (int k0 = 0; k0 < inter; k0 += BK) {
        stage_rows(hs, h, inter, r0, row_end, k0);
        stage_weights<BITS, T>(ds, d.q[e], d.scale[e], d.zero[e], 0, n0, hidden, inter, k0, group);
        __syncthreads();
        tile_products<T>(hs, ds, wm, wn, acc);
        __syncthreads();
    }
    each_output(acc, r0, wm, n0, wn, row_end, hidden, [&](int r, int j, int mt, int nt, int c) {
        y[(long)r * hidden + j] = acc[mt][nt][c] * row_weight[r];
    });
}

#define GROUPED_MMA(BITS, NAME, T)                                                                        \
    extern "C" __global__ void mma_gate_up_##NAME(                                                        \
        const uint16_t* x, const int* offsets, int hidden, int inter, int group, const uint8_t* const* q,  \
        const uint16_t* const* scale, const uint16_t* const* zero, uint16_t* h) {                         \
        mma_gate_up<BITS, T>(x, offsets, hidden, inter, group, MmaPtrs{q, scale, zero}, h);               \
    }                                                                                                     \
    extern "C" __global__ void mma_down_##NAME(                                                           \
        const uint16_t* h, const int* offsets, int hidden, int inter, int group, const uint8_t* const* q,  \
        const uint16_t* const* scale, const uint16_t* const* zero, const float* row_weight, float* y) {   \
        mma_down<BITS, T>(h, offsets, hidden, inter, group, MmaPtrs{q, scale, zero}, row_weight, y);      \
    }

GROUPED_MMA(16, f16_f16, F16)
GROUPED_MMA(16, bf16_bf16, BF16)
GROUPED_MMA(8, int8_f16, F16)
GROUPED_MMA(8, int8_bf16, BF16)
GROUPED_MMA(4, int4_f16, F16)
GROUPED_MMA(4, int4_bf16, BF16)
GROUPED_MMA(2, int2_f16, F16)
GROUPED_MMA(2, int2_bf16, BF16)
