// Grouped expert FFN for prefill: many tokens routed to several experts, one launch per phase.
// Tokens are sorted by expert; rows offsets[e]..offsets[e+1] of x go through expert e, whose
// matrices are found through per-expert pointer tables. Tiled matmul with on-the-fly
// dequantization, fp32 accumulation.
//   phase 1 grouped_gate_up_*: h[r][i] = silu(gate_i . x_r) * (up_i . x_r)      (h: fp32 [rows, inter])
//   phase 2 grouped_down_*:    out[r][j] = w_r * (down_j . h_r)                   (out: fp32 [rows, hidden])
// Grid: x = tiles over outputs, y = tiles over token rows (of the largest expert), z = expert.
// Reference: moeflow/runtime/reference.py::grouped_expert_ffn.

#define TILE 32

struct ExpertPtrs {
    const uint8_t* const* q;
    const uint16_t* const* scale;
    const uint16_t* const* zero;
};

template <int BITS, typename T>
__device__ void grouped_gate_up(const uint16_t* __restrict__ x, const int* __restrict__ offsets, int hidden,
                                int inter, int group, ExpertPtrs gu, float* __restrict__ h) {
    __shared__ float xs[TILE][TILE + 1];
    __shared__ float gs[TILE][TILE + 1];
    __shared__ float us[TILE][TILE + 1];
    const int e = blockIdx.z;
    const int row0 = offsets[e] + blockIdx.y * TILE;
    const int row_end = offsets[e + 1];
    if (row0 >= row_end) return;
    const int col0 = blockIdx.x * TILE;  // intermediate index
    const int tx = threadIdx.x, ty = threadIdx.y;
    float acc_g = 0.f, acc_u = 0.f;
    for (int k0 = 0; k0 < hidden; k0 += TILE) {
        const int r = row0 + ty, k = k0 + tx;
        xs[ty][tx] = (r < row_end && k < hidden) ? to_float(x[(long)r * hidden + k], T()) : 0.f;
        const int i = col0 + ty;
        if (i < inter && k < hidden) {
            gs[ty][tx] = weight_row<BITS, T>(gu.q[e], gu.scale[e], gu.zero[e], i, hidden, group).at(k);
            us[ty][tx] = weight_row<BITS, T>(gu.q[e], gu.scale[e], gu.zero[e], inter + i, hidden, group).at(k);
        } else {
            gs[ty][tx] = 0.f;
            us[ty][tx] = 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TILE; ++kk) {
            acc_g += xs[ty][kk] * gs[tx][kk];
            acc_u += xs[ty][kk] * us[tx][kk];
        }
        __syncthreads();
    }
    const int r = row0 + ty, i = col0 + tx;
    if (r < row_end && i < inter) h[(long)r * inter + i] = silu(acc_g) * acc_u;
}

template <int BITS, typename T>
__device__ void grouped_down(const float* __restrict__ h, const int* __restrict__ offsets, int hidden, int inter,
                             int group, ExpertPtrs d, const float* __restrict__ row_weight, float* __restrict__ out) {
    __shared__ float hs[TILE][TILE + 1];
    __shared__ float ds[TILE][TILE + 1];
    const int e = blockIdx.z;
    const int row0 = offsets[e] + blockIdx.y * TILE;
    const int row_end = offsets[e + 1];
    if (row0 >= row_end) return;
    const int col0 = blockIdx.x * TILE;  // hidden index
    const int tx = threadIdx.x, ty = threadIdx.y;
    float acc = 0.f;
    for (int k0 = 0; k0 < inter; k0 += TILE) {
        const int r = row0 + ty, k = k0 + tx;
        hs[ty][tx] = (r < row_end && k < inter) ? h[(long)r * inter + k] : 0.f;
        const int j = col0 + ty;
        ds[ty][tx] = (j < hidden && k < inter)
                         ? weight_row<BITS, T>(d.q[e], d.scale[e], d.zero[e], j, inter, group).at(k)
                         : 0.f;
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TILE; ++kk) acc += hs[ty][kk] * ds[tx][kk];
        __syncthreads();
    }
    const int r = row0 + ty, j = col0 + tx;
    if (r < row_end && j < hidden) out[(long)r * hidden + j] = acc * row_weight[r];
}

#define GROUPED(BITS, NAME, T)                                                                               \
    extern "C" __global__ void grouped_gate_up_##NAME(                                                       \
        const uint16_t* x, const int* offsets, int hidden, int inter, int group, const uint8_t* const* q,    \
        const uint16_t* const* scale, const uint16_t* const* zero, float* h) {                               \
        ExpertPtrs p = {q, scale, zero};                                                                     \
        grouped_gate_up<BITS, T>(x, offsets, hidden, inter, group, p, h);                                    \
    }                                                                                                        \
    extern "C" __global__ void grouped_down_##NAME(                                                          \
        const float* h, const int* offsets, int hidden, int inter, int group, const uint8_t* const* q,       \
        const uint16_t* const* scale, const uint16_t* const* zero, const float* row_weight, float* out) {     \
        ExpertPtrs p = {q, scale, zero};                                                                     \
        grouped_down<BITS, T>(h, offsets, hidden, inter, group, p, row_weight, out);                         \
    }

GROUPED(16, f16_f16, F16)
GROUPED(16, bf16_bf16, BF16)
GROUPED(8, int8_f16, F16)
GROUPED(8, int8_bf16, BF16)
GROUPED(4, int4_f16, F16)
GROUPED(4, int4_bf16, BF16)
GROUPED(2, int2_f16, F16)
GROUPED(2, int2_bf16, BF16)
