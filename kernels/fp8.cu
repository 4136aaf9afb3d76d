// FP8 block-quantized experts as DeepSeek-V3 / Qwen3-FP8 publish them: float8_e4m3fn codes (one
// byte each) with one float32 scale per 128x128 block, w[r][c] = e4m3(q[r][c]) * scale[r/128][c/128];
// the scale grid is [ceil(rows/128), ceil(cols/128)] (partial edge blocks use their own scale).
// An expert blob (store/fp8.py Fp8Codec) holds gate_up codes [2I, H], separate gate and up scale
// grids [ceil(I/128), ceil(H/128)], down codes [H, I] and down scales [ceil(H/128), ceil(I/128)].
// References: moeflow/runtime/reference.py::fp8_dequantize / fp8_expert_ffn.

#define FP8_BLOCK 128
#define FP8_MAX_TOKENS 8
#define FP8_SLICE 64  // intermediate rows per block of the decode FFN
#define FP8_WARPS 8

// e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities, S.1111.111 is NaN;
// exponent 0 is subnormal (mantissa / 8 * 2^-6). Exact in float32.
__device__ __forceinline__ float e4m3_to_float(uint8_t v) {
    const uint32_t exp = (v >> 3) & 0xFu;
    const uint32_t man = v & 0x7u;
    float f;
    if (exp == 0) {
        f = (float)man * 0.001953125f;  // 2^-9
    } else if (exp == 15 && man == 7) {
        f = __uint_as_float(0x7fc00000u);
    } else {
        f = __uint_as_float(((exp + 120u) << 23) | (man << 20));
    }
    return (v & 0x80u) ? -f : f;
}

// Element c of row r of an FP8 matrix with `cols` columns.
__device__ __forceinline__ float fp8_at(const uint8_t* q, const float* scale, int r, int c, int cols) {
    const int scale_cols = (cols + FP8_BLOCK - 1) / FP8_BLOCK;
    return e4m3_to_float(q[(long)r * cols + c]) * scale[(r / FP8_BLOCK) * scale_cols + c / FP8_BLOCK];
}

// ---- dequantization: one thread per element ---------------------------------------------------

extern "C" __global__ void fp8_dequant_f32(const uint8_t* q, const float* scale, float* out, int rows, int cols) {
    const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)rows * cols) return;
    out[idx] = fp8_at(q, scale, (int)(idx / cols), (int)(idx % cols), cols);
}

extern "C" __global__ void fp8_dequant_f16(const uint8_t* q, const float* scale, uint16_t* out, int rows, int cols) {
    const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)rows * cols) return;
    out[idx] = from_float(fp8_at(q, scale, (int)(idx / cols), (int)(idx % cols), cols), F16());
}

extern "C" __global__ void fp8_dequant_bf16(const uint8_t* q, const float* scale, uint16_t* out, int rows, int cols) {
    const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)rows * cols) return;
    out[idx] = from_float(fp8_at(q, scale, (int)(idx / cols), (int)(idx % cols), cols), BF16());
}

// ---- decode FFN: out[t] += w[t] * down(silu(gate(x[t])) * up(x[t])) --------------------------
// As kernels/expert_ffn.cu: each block owns FP8_SLICE intermediate rows, one warp per row computes
// h = silu(gate . x) * (up . x) for them, then adds its partial down projection with atomics.
// `out` is fp32 and must be zeroed (or hold the running sum) before the launch.

template <typename T>
__device__ void fp8_ffn_decode(const uint16_t* __restrict__ x, int n, int hidden, int inter,
                               const uint8_t* __restrict__ gu_q, const float* __restrict__ g_s,
                               const float* __restrict__ u_s, const uint8_t* __restrict__ d_q,
                               const float* __restrict__ d_s, const float* __restrict__ token_weight,
                               float* __restrict__ out) {
    __shared__ float h[FP8_MAX_TOKENS][FP8_SLICE];
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int i0 = blockIdx.x * FP8_SLICE;
    const int slice = min(FP8_SLICE, inter - i0);
    const uint8_t* up_q = gu_q + (long)inter * hidden;  // up's rows follow gate's

    for (int i = warp; i < slice; i += FP8_WARPS) {
        for (int t = 0; t < n; ++t) {
            float sg = 0.f, su = 0.f;
            for (int c = lane; c < hidden; c += 32) {
                const float xv = to_float(x[(long)t * hidden + c], T());
                sg += fp8_at(gu_q, g_s, i0 + i, c, hidden) * xv;
                su += fp8_at(up_q, u_s, i0 + i, c, hidden) * xv;
            }
            sg = warp_sum(sg);
            su = warp_sum(su);
            if (lane == 0) h[t][i] = silu(sg) * su;
        }
    }
    __syncthreads();

    for (int j = warp; j < hidden; j += FP8_WARPS) {
        for (int t = 0; t < n; ++t) {
            float s = 0.f;
            for (int i = lane; i < slice; i += 32) s += fp8_at(d_q, d_s, j, i0 + i, inter) * h[t][i];
            s = warp_sum(s);
            if (lane == 0) atomicAdd(&out[(long)t * hidden + j], s * token_weight[t]);
        }
    }
}

extern "C" __global__ void fp8_ffn_decode_f16(const uint16_t* x, int n, int hidden, int inter, const uint8_t* gu_q,
                                              const float* g_s, const float* u_s, const uint8_t* d_q,
                                              const float* d_s, const float* token_weight, float* out) {
    fp8_ffn_decode<F16>(x, n, hidden, inter, gu_q, g_s, u_s, d_q, d_s, token_weight, out);
}

extern "C" __global__ void fp8_ffn_decode_bf16(const uint16_t* x, int n, int hidden, int inter, const uint8_t* gu_q,
                                               const float* g_s, const float* u_s, const uint8_t* d_q,
                                               const float* d_s, const float* token_weight, float* out) {
    fp8_ffn_decode<BF16>(x, n, hidden, inter, gu_q, g_s, u_s, d_q, d_s, token_weight, out);
}
