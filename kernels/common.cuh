// Shared helpers for moeflow's kernels. Header-free on purpose: NVRTC compiles these sources
// without any CUDA include path (the loader prepends this file to each kernel source). The tests
// also run them on the CPU (tests/emu/cuda_cpu.h defines MOEFLOW_EMU): the only inline PTX, the
// fp16 conversions, has a CPU twin below.
//
// Storage types: activations and weights are 16-bit floats held as uint16_t (fp16 or bf16,
// chosen per kernel instance); scales and zeros of quantized weights are fp16; accumulation is fp32.

typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;

struct F16 {};
struct BF16 {};

__device__ __forceinline__ float to_float(uint16_t v, F16) {
#ifdef MOEFLOW_EMU  // tests/emu/cuda_cpu.h: the CPU's own IEEE half conversion
    _Float16 h;
    __builtin_memcpy(&h, &v, 2);
    return (float)h;
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
#endif
}
__device__ __forceinline__ float to_float(uint16_t v, BF16) {
    return __uint_as_float(((uint32_t)v) << 16);
}
__device__ __forceinline__ uint16_t from_float(float f, F16) {
    uint16_t h;
#ifdef MOEFLOW_EMU
    const _Float16 v = (_Float16)f;  // round to nearest even, as cvt.rn
    __builtin_memcpy(&h, &v, 2);
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
    return h;
}
__device__ __forceinline__ uint16_t from_float(float f, BF16) {
    uint32_t bits = __float_as_uint(f);
    if ((bits & 0x7f800000u) == 0x7f800000u) return (uint16_t)((bits >> 16) | ((bits & 0xffff) ? 0x40 : 0));  // inf / nan
    bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
    return (uint16_t)(bits >> 16);
}
__device__ __forceinline__ float half_to_float(uint16_t v) { return to_float(v, F16()); }

// Weight element c of row r of a matrix stored either as 16-bit floats (BITS == 16) or as
// packed BITS-bit codes with per-group fp16 scale and zero: w = (q - zero) * scale.
template <int BITS, typename T>
struct WeightRow {
    const uint8_t* q;        // row start: packed codes, or 16-bit floats reinterpreted
    const uint16_t* scale;   // row start of [cols / group] scales (unused for BITS == 16)
    const uint16_t* zero;
    int group;

    __device__ __forceinline__ float at(int c) const {
        if constexpr (BITS == 16) {
            return to_float(reinterpret_cast<const uint16_t*>(q)[c], T());
        } else {
            const int per = 8 / BITS;
            const uint32_t code = (q[c / per] >> ((c % per) * BITS)) & ((1u << BITS) - 1u);
            const int g = c / group;
            return ((float)code - half_to_float(zero[g])) * half_to_float(scale[g]);
        }
    }
};

template <int BITS, typename T>
__device__ __forceinline__ WeightRow<BITS, T> weight_row(const uint8_t* q, const uint16_t* scale, const uint16_t* zero,
                                                         int row, int cols, int group) {
    WeightRow<BITS, T> w;
    const long row_bytes = BITS == 16 ? (long)cols * 2 : (long)cols * BITS / 8;
    w.q = q + row * row_bytes;
    const int groups = BITS == 16 ? 0 : cols / group;
    w.scale = scale + (long)row * groups;
    w.zero = zero + (long)row * groups;
    w.group = group;
    return w;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float silu(float v) { return v / (1.0f + __expf(-v)); }
