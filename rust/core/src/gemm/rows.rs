//! How the products read their weights: bf16 rows, float32 rows (quantized rows decoded once),
//! MXFP4 rows and min-max rows, each eight consecutive weights at a time as f32 in registers, and
//! the exact value of any one weight (the tests' reference).

use super::{bf16_to_f32, f32_to_bf16};

/// The f32 value of IEEE half-precision bits (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // subnormal: man * 2^-24, exact in f32
            let v = man as f32 * f32::from_bits(0x3380_0000); // 2^-24
            return if sign != 0 { -v } else { v };
        }
        (0x1f, 0) => sign | 0x7f80_0000,
        (0x1f, _) => sign | 0x7fc0_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// The value of min-max weight (row, col) of a [.., k] matrix, as `minmax_linear` reads it.
#[allow(clippy::too_many_arguments)]
pub fn minmax_value(
    q: &[u8],
    scale: &[u16],
    zero: &[u16],
    k: usize,
    bits: u32,
    group: usize,
    bf16_weights: bool,
    row: usize,
    col: usize,
) -> f32 {
    let per = 8 / bits as usize;
    let byte = q[(row * k + col) / per];
    let code = (byte >> ((col % per) as u32 * bits)) & ((1u16 << bits) - 1) as u8;
    let at = row * k / group + col / group;
    let w = (f32::from(code) - f16_to_f32(zero[at])) * f16_to_f32(scale[at]);
    if bf16_weights {
        bf16_to_f32(f32_to_bf16(w))
    } else {
        w
    }
}

/// Inputs per MXFP4 scale.
pub const MX_BLOCK: usize = 32;

/// The e2m1 magnitudes of codes 0-7 (bit 3 is the sign).
const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// 2^(s - 127) for an e8m0 byte, exactly (s = 0 is the subnormal 2^-127, s = 255 infinity, so a
/// zero code times it is NaN, as torch.ldexp gives).
pub fn e8m0(s: u8) -> f32 {
    match s {
        0 => f32::from_bits(0x0040_0000),
        s => f32::from_bits(u32::from(s) << 23),
    }
}

/// The value of MXFP4 weight (row, col) of a [.., k] matrix: e2m1 code times its block's scale.
pub fn mxfp4_value(blocks: &[u8], scales: &[u8], k: usize, row: usize, col: usize) -> f32 {
    let byte = blocks[row * k / 2 + col / 2];
    let code = if col % 2 == 0 { byte & 0xf } else { byte >> 4 };
    let magnitude = E2M1[usize::from(code & 7)];
    let value = if code & 8 != 0 { -magnitude } else { magnitude };
    value * e8m0(scales[row * k / MX_BLOCK + col / MX_BLOCK])
}

/// Weight rows the tiles read: eight consecutive weights of a row as f32, or one. Quantized
/// rows share per-group constants (scale, zero) over `span()` consecutive weights; a tile reads
/// them once per group, not once per eight weights.
pub(super) trait Rows: Copy + Send + Sync {
    /// Whether reading a weight costs more than a load and a conversion (so that, for several
    /// row blocks, decoding each weight once and keeping it in f32 pays).
    const DECODES: bool;
    /// What a row's group holds for its weights (scale, zero), decoded once.
    type Group: Copy;

    /// Weights per group: a multiple of 8 (k for ungrouped rows).
    fn span(&self) -> usize;

    /// The group of weight i of row `row` (i a multiple of span()).
    ///
    /// # Safety
    /// AVX2 and F16C present; row < n and i < k.
    unsafe fn group(&self, row: usize, i: usize) -> Self::Group;

    /// Weights i..i+8 of row `row`, whose group is g.
    ///
    /// # Safety
    /// AVX2 present; row < n, i + 8 <= k, i in g's group.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(&self, row: usize, i: usize, g: Self::Group) -> std::arch::x86_64::__m256;

    /// Weight j of row `row` (the k % 8 tail; only ungrouped rows have one).
    ///
    /// # Safety
    /// row < n and j < k.
    unsafe fn one(&self, row: usize, j: usize) -> f32;
}

/// bf16 weights [n, k].
#[derive(Clone, Copy)]
pub(super) struct Bf16Rows {
    pub(super) w: usize,
    pub(super) k: usize,
}

impl Rows for Bf16Rows {
    const DECODES: bool = false;
    type Group = ();

    fn span(&self) -> usize {
        self.k.max(8)
    }

    unsafe fn group(&self, _row: usize, _i: usize) {}

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(&self, row: usize, i: usize, _g: ()) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract: eight values inside row `row`.
        unsafe {
            let raw = _mm_loadu_si128((self.w as *const u16).add(row * self.k + i) as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)))
        }
    }

    #[inline(always)]
    unsafe fn one(&self, row: usize, j: usize) -> f32 {
        // SAFETY: the caller's contract.
        bf16_to_f32(unsafe { *(self.w as *const u16).add(row * self.k + j) })
    }
}

/// f32 weights [n, k]: quantized rows decoded once (see `Job::columns`).
#[derive(Clone, Copy)]
pub(super) struct F32Rows {
    pub(super) w: usize,
    pub(super) k: usize,
}

impl Rows for F32Rows {
    const DECODES: bool = false;
    type Group = ();

    fn span(&self) -> usize {
        self.k.max(8)
    }

    unsafe fn group(&self, _row: usize, _i: usize) {}

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(&self, row: usize, i: usize, _g: ()) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's contract: eight values inside row `row`.
        unsafe { std::arch::x86_64::_mm256_loadu_ps((self.w as *const f32).add(row * self.k + i)) }
    }

    #[inline(always)]
    unsafe fn one(&self, row: usize, j: usize) -> f32 {
        // SAFETY: the caller's contract.
        unsafe { *(self.w as *const f32).add(row * self.k + j) }
    }
}

/// MXFP4 weights: blocks [n, k/2] bytes, scales [n, k/32].
#[derive(Clone, Copy)]
pub(super) struct Mxfp4Rows {
    pub(super) blocks: usize,
    pub(super) scales: usize,
    pub(super) k: usize,
}

impl Rows for Mxfp4Rows {
    const DECODES: bool = true;
    #[cfg(target_arch = "x86_64")]
    type Group = std::arch::x86_64::__m256;
    #[cfg(not(target_arch = "x86_64"))]
    type Group = f32;

    fn span(&self) -> usize {
        MX_BLOCK
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn group(&self, row: usize, i: usize) -> Self::Group {
        // SAFETY: the caller's contract: the block's scale lies inside row `row`.
        let scale = unsafe { *(self.scales as *const u8).add((row * self.k + i) / MX_BLOCK) };
        // SAFETY: AVX is part of the caller's contract.
        unsafe { std::arch::x86_64::_mm256_set1_ps(e8m0(scale)) }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn group(&self, _row: usize, _i: usize) -> f32 {
        unreachable!("the products refuse CPUs without AVX2 and FMA")
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(&self, row: usize, i: usize, scale: Self::Group) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract: i is a multiple of 8, so the 4 bytes of codes i..i+8
        // lie inside row `row`.
        unsafe {
            let at = (self.blocks as *const u8).add((row * self.k + i) / 2);
            // code j (even inputs in the low nibble) is (little-endian word >> 4 * j) & 0xf
            let codes = _mm256_and_si256(
                _mm256_srlv_epi32(
                    _mm256_set1_epi32(std::ptr::read_unaligned(at as *const i32)),
                    _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28),
                ),
                _mm256_set1_epi32(0xf),
            );
            let table = _mm256_loadu_ps(E2M1.as_ptr());
            let magnitude = _mm256_permutevar8x32_ps(table, codes); // uses the low 3 bits
            let sign = _mm256_slli_epi32::<28>(_mm256_and_si256(codes, _mm256_set1_epi32(8)));
            let value = _mm256_or_ps(magnitude, _mm256_castsi256_ps(sign));
            _mm256_mul_ps(value, scale)
        }
    }

    #[inline(always)]
    unsafe fn one(&self, _row: usize, _j: usize) -> f32 {
        unreachable!("MXFP4 rows are whole blocks of 32: no k % 8 tail")
    }
}

/// Min-max weights: codes [n, k * BITS / 8], scale and zero [n, k / group] float16 bits.
#[derive(Clone, Copy)]
pub(super) struct MinMaxRows<const BITS: u32, const BF16: bool> {
    pub(super) q: usize,
    pub(super) scale: usize,
    pub(super) zero: usize,
    pub(super) k: usize,
    pub(super) group: usize,
}

impl<const BITS: u32, const BF16: bool> Rows for MinMaxRows<BITS, BF16> {
    const DECODES: bool = true;
    /// int8: (scale, zero) broadcast; int4 and int2: the group's weight for every code, as a
    /// table (codes 0-7, codes 8-15), computed once per group with the same arithmetic.
    #[cfg(target_arch = "x86_64")]
    type Group = (std::arch::x86_64::__m256, std::arch::x86_64::__m256);
    #[cfg(not(target_arch = "x86_64"))]
    type Group = (f32, f32);

    fn span(&self) -> usize {
        self.group
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn group(&self, row: usize, i: usize) -> Self::Group {
        use std::arch::x86_64::*;
        let g = (row * self.k + i) / self.group;
        // SAFETY: the caller's contract: the group's scale and zero lie inside row `row`; F16C
        // and AVX are part of it.
        unsafe {
            let halves = _mm_setr_epi16(
                *(self.scale as *const u16).add(g) as i16,
                *(self.zero as *const u16).add(g) as i16,
                0,
                0,
                0,
                0,
                0,
                0,
            );
            let sz = _mm_cvtph_ps(halves);
            let (scale, zero) = (_mm256_broadcastss_ps(sz), _mm256_broadcastss_ps(_mm_shuffle_ps::<0b01>(sz, sz)));
            if BITS == 8 {
                return (scale, zero);
            }
            let low = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let high = _mm256_add_epi32(low, _mm256_set1_epi32(8));
            (weights::<BF16>(low, scale, zero), weights::<BF16>(high, scale, zero))
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn group(&self, _row: usize, _i: usize) -> (f32, f32) {
        unreachable!("the products refuse CPUs without AVX2 and FMA")
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(&self, row: usize, i: usize, (a, b): Self::Group) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract: i is a multiple of 8, so codes i..i+8 (BITS bytes)
        // lie inside row `row`.
        unsafe {
            let at = (self.q as *const u8).add((row * self.k + i) * BITS as usize / 8);
            match BITS {
                8 => weights::<BF16>(_mm256_cvtepu8_epi32(_mm_loadl_epi64(at as *const __m128i)), a, b),
                // codes lowest bits first: code j of the little-endian word is (word >> BITS * j)
                4 => {
                    let codes = _mm256_and_si256(
                        _mm256_srlv_epi32(
                            _mm256_set1_epi32(std::ptr::read_unaligned(at as *const i32)),
                            _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28),
                        ),
                        _mm256_set1_epi32(0xf),
                    );
                    // the permutes read the low 3 bits; bit 3 picks the table's half
                    let pick = _mm256_castsi256_ps(_mm256_slli_epi32::<28>(codes));
                    _mm256_blendv_ps(_mm256_permutevar8x32_ps(a, codes), _mm256_permutevar8x32_ps(b, codes), pick)
                }
                _ => {
                    let codes = _mm256_srlv_epi32(
                        _mm256_set1_epi32(i32::from(std::ptr::read_unaligned(at as *const u16))),
                        _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14),
                    );
                    // codes 0-3: the table's low half, indexed by the low 3 bits (bit 2 cleared)
                    _mm256_permutevar8x32_ps(a, _mm256_and_si256(codes, _mm256_set1_epi32(3)))
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn one(&self, _row: usize, _j: usize) -> f32 {
        unreachable!("min-max rows are whole groups of a multiple of 8: no k % 8 tail")
    }
}

/// (codes - zero) * scale in f32 (two roundings, as store/quant.py's dequantize: no fused
/// multiply-add), rounded to the nearest bf16 (ties to even) when BF16.
///
/// # Safety
/// AVX2 present.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn weights<const BF16: bool>(
    codes: std::arch::x86_64::__m256i,
    scale: std::arch::x86_64::__m256,
    zero: std::arch::x86_64::__m256,
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: AVX2 is the caller's contract.
    unsafe {
        let w = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(codes), zero), scale);
        if !BF16 {
            return w;
        }
        // add half an ulp of bf16 (less one, plus the kept bit for ties) and cut; a NaN (a corrupt
        // scale or zero) would carry into its sign that way, so it is kept a quiet NaN instead
        let b = _mm256_castps_si256(w);
        let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
        let rounded = _mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb);
        let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
        let quiet = _mm256_and_si256(_mm256_or_si256(b, _mm256_set1_epi32(0x0040_0000)), high);
        let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(w, w);
        _mm256_blendv_ps(_mm256_castsi256_ps(_mm256_and_si256(rounded, high)), _mm256_castsi256_ps(quiet), nan)
    }
}
