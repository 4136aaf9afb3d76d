// Fused expert FFN for decode: out[t] += w[t] * down(silu(gate(x[t])) * up(x[t])) for a few tokens,
// with weights dequantized on the fly. One launch: each block owns a slice of the intermediate
// dimension, computes h = silu(gate) * up for that slice (one warp per row pair), then adds its
// partial down projection for every output row with atomics (split-K over the intermediate dim).
// `out` is fp32 and must be zeroed (or hold the residual sum) before the launch.
// Reference: moeflow/runtime/reference.py::quantized_expert_ffn / expert_ffn.

#define MAX_TOKENS 8
#define SLICE 64      // intermediate rows per block
#define WARPS 8

template <int BITS, typename T>
__device__ void expert_ffn_decode(const uint16_t* __restrict__ x, int n, int hidden, int inter, int group,
                                  const uint8_t* gu_q, const uint16_t* gu_s, const uint16_t* gu_z,
                                  const uint8_t* d_q, const uint16_t* d_s, const uint16_t* d_z,
                                  const float* __restrict__ token_weight, float* __restrict__ out) {
    __shared__ float h[MAX_TOKENS][SLICE];
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int i0 = blockIdx.x * SLICE;
    const int slice = min(SLICE, inter - i0);

    // Phase 1: h[t][i] = silu(gate_i . x_t) * (up_i . x_t) for the block's rows.
    for (int i = warp; i < slice; i += WARPS) {
        const WeightRow<BITS, T> g = weight_row<BITS, T>(gu_q, gu_s, gu_z, i0 + i, hidden, group);
        const WeightRow<BITS, T> u = weight_row<BITS, T>(gu_q, gu_s, gu_z, inter + i0 + i, hidden, group);
        for (int t = 0; t < n; ++t) {
            float sg = 0.f, su = 0.f;
            for (int c = lane; c < hidden; c += 32) {
                const float xv = to_float(x[(long)t * hidden + c], T());
                sg += g.at(c) * xv;
                su += u.at(c) * xv;
            }
            sg = warp_sum(sg);
            su = warp_sum(su);
            if (lane == 0) h[t][i] = silu(sg) * su;
        }
    }
    __syncthreads();

    // Phase 2: out[t][j] += w_t * sum_{i in slice} down[j][i0 + i] * h[t][i].
    for (int j = warp; j < hidden; j += WARPS) {
        const WeightRow<BITS, T> d = weight_row<BITS, T>(d_q, d_s, d_z, j, inter, group);
        for (int t = 0; t < n; ++t) {
            float s = 0.f;
            for (int i = lane; i < slice; i += 32) s += d.at(i0 + i) * h[t][i];
            s = warp_sum(s);
            if (lane == 0) atomicAdd(&out[(long)t * hidden + j], s * token_weight[t]);
        }
    }
}

#define EXPERT_FFN(BITS, NAME, T)                                                                          \
    extern "C" __global__ void expert_ffn_decode_##NAME(                                                   \
        const uint16_t* x, int n, int hidden, int inter, int group, const uint8_t* gu_q,                   \
        const uint16_t* gu_s, const uint16_t* gu_z, const uint8_t* d_q, const uint16_t* d_s,              \
        const uint16_t* d_z, const float* token_weight, float* out) {                                      \
        expert_ffn_decode<BITS, T>(x, n, hidden, inter, group, gu_q, gu_s, gu_z, d_q, d_s, d_z,           \
                                   token_weight, out);                                                     \
    }

EXPERT_FFN(16, f16_f16, F16)
EXPERT_FFN(16, bf16_bf16, BF16)
EXPERT_FFN(8, int8_f16, F16)
EXPERT_FFN(8, int8_bf16, BF16)
EXPERT_FFN(4, int4_f16, F16)
EXPERT_FFN(4, int4_bf16, BF16)
EXPERT_FFN(2, int2_f16, F16)
EXPERT_FFN(2, int2_bf16, BF16)
