// MXFP4 experts (GPT-OSS's native format): dequantization and the decode expert FFN.
// Reference: moeflow/runtime/reference.py::mxfp4_expert_ffn and moeflow/store/mxfp4.py::dequantize.
//
// A matrix [rows, cols] is blocks [rows, cols/32, 16] uint8 (two e2m1 codes per byte, the even
// column in the low nibble) and scales [rows, cols/32] uint8 (e8m0: 2^(s - 127)).
// w[r][c] = e2m1(code) * 2^(scale - 127), computed exactly in fp32.

#define MX_WARPS 8
#define MX_MAX_TOKENS 8

// e2m1: bit 3 sign, bits 2-1 exponent (bias 1), bit 0 mantissa; exponent 0 is the subnormal 0 / 0.5.
__device__ __forceinline__ float e2m1(uint32_t code) {
    const uint32_t e = (code >> 1) & 3u, m = code & 1u;
    const float v = e ? __uint_as_float(((e + 126u) << 23) | (m << 22)) : 0.5f * (float)m;
    return (code & 8u) ? -v : v;
}

// 2^(s - 127) from the float32 bits: s = 0 is the subnormal 2^-127; 255 gives inf, as
// transformers' ldexp(x, 128) does in float32.
__device__ __forceinline__ float e8m0(uint32_t s) {
    return __uint_as_float(s == 0 ? 0x00400000u : (s << 23));
}

// One thread per packed byte: out[r][2b], out[r][2b + 1].
template <typename T>
__device__ void mxfp4_dequant(const uint8_t* __restrict__ blocks, const uint8_t* __restrict__ scales,
                              uint16_t* __restrict__ out, int rows, int cols) {
    const long bytes_per_row = cols / 2;
    const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)rows * bytes_per_row) return;
    const long r = idx / bytes_per_row;
    const long b = idx % bytes_per_row;
    const uint32_t packed = blocks[idx];
    const float s = e8m0(scales[r * (cols / 32) + b / 16]);
    out[r * cols + 2 * b] = from_float(e2m1(packed & 15u) * s, T());
    out[r * cols + 2 * b + 1] = from_float(e2m1(packed >> 4) * s, T());
}

extern "C" __global__ void mxfp4_dequant_f16(const uint8_t* blocks, const uint8_t* scales, uint16_t* out, int rows,
                                             int cols) {
    mxfp4_dequant<F16>(blocks, scales, out, rows, cols);
}
extern "C" __global__ void mxfp4_dequant_bf16(const uint8_t* blocks, const uint8_t* scales, uint16_t* out, int rows,
                                              int cols) {
    mxfp4_dequant<BF16>(blocks, scales, out, rows, cols);
}

// acc[t] += sum_c w[row][c] * x[t][c] over this lane's columns (x fp32 rows of `cols`, n tokens).
__device__ __forceinline__ void mx_row_dot(const uint8_t* __restrict__ blocks, const uint8_t* __restrict__ scales,
                                           long row, int cols, const float* __restrict__ x, int n, int lane,
                                           float* acc) {
    const uint8_t* rb = blocks + row * (cols / 2);
    const uint8_t* rs = scales + row * (cols / 32);
    for (int b = lane; b < cols / 2; b += 32) {
        const uint32_t packed = rb[b];
        const float s = e8m0(rs[b / 16]);
        const float w0 = e2m1(packed & 15u) * s, w1 = e2m1(packed >> 4) * s;
        for (int t = 0; t < n; ++t) acc[t] += w0 * x[(long)t * cols + 2 * b] + w1 * x[(long)t * cols + 2 * b + 1];
    }
}

// Phase 1: one warp per intermediate index i: gate row i and up row inter + i (gate rows above up
// rows), their biases, then GPT-OSS's clamped SwiGLU (swiglu != 0) or SiLU(gate) * up.
// x [n, hidden] fp32 (the launcher converts the activations), h [n, inter] fp32.
extern "C" __global__ void mxfp4_gate_up(const float* __restrict__ x, int n, int hidden, int inter,
                                         const uint8_t* gu_blocks, const uint8_t* gu_scales, const float* gu_bias,
                                         int swiglu, float alpha, float limit, float* __restrict__ h) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int i = blockIdx.x * MX_WARPS + warp;
    if (i >= inter) return;
    float g[MX_MAX_TOKENS], u[MX_MAX_TOKENS];
    for (int t = 0; t < MX_MAX_TOKENS; ++t) g[t] = u[t] = 0.f;
    mx_row_dot(gu_blocks, gu_scales, i, hidden, x, n, lane, g);
    mx_row_dot(gu_blocks, gu_scales, (long)inter + i, hidden, x, n, lane, u);
    for (int t = 0; t < n; ++t) {
        float gt = warp_sum(g[t]), ut = warp_sum(u[t]);
        if (lane != 0) continue;
        if (gu_bias != nullptr) {
            gt += gu_bias[i];
            ut += gu_bias[inter + i];
        }
        float out;
        if (swiglu) {
            gt = fminf(gt, limit);
            ut = fminf(fmaxf(ut, -limit), limit);
            out = (ut + 1.0f) * (gt / (1.0f + expf(-gt * alpha)));
        } else {
            out = silu(gt) * ut;
        }
        h[(long)t * inter + i] = out;
    }
}

// Phase 2: one warp per output row j: out[t][j] = down[j] . h[t] + bias[j] (fp32 out [n, hidden]).
extern "C" __global__ void mxfp4_down(const float* __restrict__ h, int n, int hidden, int inter,
                                      const uint8_t* d_blocks, const uint8_t* d_scales, const float* d_bias,
                                      float* __restrict__ out) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int j = blockIdx.x * MX_WARPS + warp;
    if (j >= hidden) return;
    float acc[MX_MAX_TOKENS];
    for (int t = 0; t < MX_MAX_TOKENS; ++t) acc[t] = 0.f;
    mx_row_dot(d_blocks, d_scales, j, inter, h, n, lane, acc);
    for (int t = 0; t < n; ++t) {
        const float s = warp_sum(acc[t]);
        if (lane == 0) out[(long)t * hidden + j] = s + (d_bias != nullptr ? d_bias[j] : 0.f);
    }
}
