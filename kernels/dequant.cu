// Dequantization: packed BITS-bit codes with per-group fp16 scale/zero -> fp16 or bf16 matrix.
// Reference: moeflow/runtime/reference.py::dequantize. One thread per packed byte.

template <int BITS, typename T>
__device__ void dequant(const uint8_t* __restrict__ q, const uint16_t* __restrict__ scale,
                        const uint16_t* __restrict__ zero, uint16_t* __restrict__ out,
                        int rows, int cols, int group) {
    const int per = 8 / BITS;
    const int bytes_per_row = cols / per;
    const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)rows * bytes_per_row) return;
    const int r = (int)(idx / bytes_per_row);
    const int b = (int)(idx % bytes_per_row);
    const uint32_t packed = q[idx];
    const int groups = cols / group;
#pragma unroll
    for (int i = 0; i < per; ++i) {
        const int c = b * per + i;
        const int g = r * groups + c / group;
        const uint32_t code = (packed >> (i * BITS)) & ((1u << BITS) - 1u);
        const float w = ((float)code - half_to_float(zero[g])) * half_to_float(scale[g]);
        out[(long)r * cols + c] = from_float(w, T());
    }
}

#define DEQUANT(BITS, NAME, T)                                                                          \
    extern "C" __global__ void dequant_int##BITS##_##NAME(const uint8_t* q, const uint16_t* scale,      \
                                                         const uint16_t* zero, uint16_t* out, int rows,  \
                                                         int cols, int group) {                          \
        dequant<BITS, T>(q, scale, zero, out, rows, cols, group);                                        \
    }

DEQUANT(8, f16, F16)
DEQUANT(8, bf16, BF16)
DEQUANT(4, f16, F16)
DEQUANT(4, bf16, BF16)
DEQUANT(2, f16, F16)
DEQUANT(2, bf16, BF16)
