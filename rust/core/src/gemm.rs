//! Matrix products with bf16 or MXFP4 weights on the CPU (AVX2 + FMA):
//! y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), x and the accumulation in f32, y in f32 or bf16.
//!
//! Why moeflow has its own: on such CPUs torch's bf16 product converts the weights again for
//! every row, so 64 rows cost ~64x one row, and a batched decode step or a prefill chunk saves
//! nothing on its experts. Here each weight is converted once per call, in registers, and serves
//! every row of the step. MXFP4 weights (GPT-OSS's experts: e2m1 codes with a power-of-two
//! scale per 32 inputs) are decoded the same way, in registers, so the CPU never writes a
//! dequantized copy; each weight's value is exactly the one store/mxfp4.py's `dequantize` gives,
//! so the product is bit for bit `linear` over the dequantized bf16 matrix.
//!
//! The arithmetic of one output never depends on the number of rows, their position in the call,
//! the tile or the thread that computes it (batch invariance: a request's tokens do not depend
//! on what it is batched with). Every output is computed as:
//! - eight lanes, lane l summing x[k] * w[k] over k = 8i + l for i = 0, 1, ... in order, one
//!   fused multiply-add per term;
//! - the lanes added as ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7));
//! - the last k % 8 terms fused into that sum in order of k;
//! - the bias added, then one rounding to the output type (bf16: nearest, ties to even).

use rayon::prelude::*;

/// The f32 value of a bf16 bit pattern (exact).
#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// The bf16 nearest to `value` (ties to even), NaN kept a quiet NaN.
#[inline]
pub fn f32_to_bf16(value: f32) -> u16 {
    let bits = value.to_bits();
    if value.is_nan() {
        return ((bits >> 16) as u16) | 0x40;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// Whether this CPU runs the kernel (x86-64 with AVX2 and FMA).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Where the product goes: [m, n] row-major.
#[derive(Debug)]
pub enum Output<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [u16]),
}

/// Why a product was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GemmError {
    #[error("this CPU lacks AVX2 and FMA, which the bf16 product needs")]
    Unsupported,
    #[error("{what} holds {got} values, the shape needs {need}")]
    Size { what: &'static str, got: usize, need: usize },
    #[error("MXFP4 weights take inputs in blocks of 32; k = {k} is not a multiple of 32")]
    Block { k: usize },
}

/// Columns (weight rows) per panel: about 128 KiB of bf16 weights, kept in L2 while every row
/// block of x passes over them.
fn panel_columns(k: usize) -> usize {
    (128 * 1024 / 2 / k.max(1)).max(NR_WIDE).next_multiple_of(NR_WIDE)
}

const MR: usize = 4; // rows of x per tile
const NR: usize = 3; // weight rows per tile with MR rows
const NR_WIDE: usize = 12; // weight rows per tile with one row: 12 chains in flight, and a multiple of NR

/// y = x w^T (+ bias) with x [m, k] f32, w [n, k] bf16 bits, bias [n] f32, on up to `threads`
/// threads of rayon's pool. See the module doc for the arithmetic of each output.
#[allow(clippy::too_many_arguments)]
pub fn linear(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u16],
    n: usize,
    bias: Option<&[f32]>,
    out: Output<'_>,
    threads: usize,
) -> Result<(), GemmError> {
    check("w", w.len(), n * k)?;
    run(x, m, k, Bf16Rows { w: w.as_ptr() as usize, k }, n, bias, out, threads)
}

/// `linear` with MXFP4 weights: blocks [n, k/32, 16] (two e2m1 codes a byte, the even input in
/// the low nibble) and scales [n, k/32] (e8m0: 2^(s - 127)); k a multiple of 32.
#[allow(clippy::too_many_arguments)]
pub fn mxfp4_linear(
    x: &[f32],
    m: usize,
    k: usize,
    blocks: &[u8],
    scales: &[u8],
    n: usize,
    bias: Option<&[f32]>,
    out: Output<'_>,
    threads: usize,
) -> Result<(), GemmError> {
    if k % MX_BLOCK != 0 {
        return Err(GemmError::Block { k });
    }
    check("blocks", blocks.len(), n * k / 2)?;
    check("scales", scales.len(), n * k / MX_BLOCK)?;
    let rows = Mxfp4Rows { blocks: blocks.as_ptr() as usize, scales: scales.as_ptr() as usize, k };
    run(x, m, k, rows, n, bias, out, threads)
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

#[allow(clippy::too_many_arguments)]
fn run<W: Rows>(
    x: &[f32],
    m: usize,
    k: usize,
    rows: W,
    n: usize,
    bias: Option<&[f32]>,
    out: Output<'_>,
    threads: usize,
) -> Result<(), GemmError> {
    if !available() {
        return Err(GemmError::Unsupported);
    }
    check("x", x.len(), m * k)?;
    if let Some(b) = bias {
        check("bias", b.len(), n)?;
    }
    match &out {
        Output::F32(y) => check("y", y.len(), m * n)?,
        Output::Bf16(y) => check("y", y.len(), m * n)?,
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let dest = match out {
        Output::F32(y) => Dest::F32(y.as_mut_ptr() as usize),
        Output::Bf16(y) => Dest::Bf16(y.as_mut_ptr() as usize),
    };
    let panel = panel_columns(k);
    let panels = n.div_ceil(panel);
    let threads = threads.clamp(1, panels);
    let per = panels.div_ceil(threads);
    let job = Job { x: x.as_ptr() as usize, m, k, rows, n, bias: bias.map(|b| b.as_ptr() as usize), dest };
    let run = |group: usize| {
        let first = group * per * panel;
        let last = ((group + 1) * per * panel).min(n);
        let mut start = first;
        while start < last {
            let end = (start + panel).min(last);
            // SAFETY: `available()` checked AVX2 and FMA; `job`'s pointers come from slices
            // whose lengths were checked, and groups write disjoint columns of y.
            unsafe { job.columns(start, end) };
            start = end;
        }
    };
    if threads == 1 {
        run(0);
    } else {
        (0..threads).into_par_iter().for_each(run);
    }
    Ok(())
}

fn check(what: &'static str, got: usize, need: usize) -> Result<(), GemmError> {
    if got == need {
        Ok(())
    } else {
        Err(GemmError::Size { what, got, need })
    }
}

#[derive(Clone, Copy)]
enum Dest {
    F32(usize),
    Bf16(usize),
}

/// The product's raw parts, shared by the threads (addresses: each writes its own columns).
#[derive(Clone, Copy)]
struct Job<W> {
    x: usize,
    m: usize,
    k: usize,
    rows: W,
    n: usize,
    bias: Option<usize>,
    dest: Dest,
}

impl<W: Rows> Job<W> {
    /// Columns start..end of y for every row.
    ///
    /// # Safety
    /// AVX2 and FMA present; the pointers valid for the shapes; no other thread writes these columns.
    unsafe fn columns(&self, start: usize, end: usize) {
        let mut row = 0;
        while row + MR <= self.m {
            let mut col = start;
            while col + NR <= end {
                // SAFETY: the caller's contract; the tile lies inside x, w and y.
                unsafe { self.tile::<MR, NR>(row, col) };
                col += NR;
            }
            while col < end {
                // SAFETY: as above.
                unsafe { self.tile::<MR, 1>(row, col) };
                col += 1;
            }
            row += MR;
        }
        while row < self.m {
            let mut col = start;
            while col + NR_WIDE <= end {
                // SAFETY: as above.
                unsafe { self.tile::<1, NR_WIDE>(row, col) };
                col += NR_WIDE;
            }
            while col < end {
                // SAFETY: as above.
                unsafe { self.tile::<1, 1>(row, col) };
                col += 1;
            }
            row += 1;
        }
    }

    /// Outputs rows row..row+R, columns col..col+C.
    ///
    /// # Safety
    /// As `columns`.
    #[inline(always)]
    unsafe fn tile<const R: usize, const C: usize>(&self, row: usize, col: usize) {
        let mut sums = [[0f32; C]; R];
        let x = self.x as *const f32;
        // SAFETY: the caller's contract.
        unsafe { dots::<R, C, W>(x.add(row * self.k), &self.rows, col, self.k, &mut sums) };
        for (r, line) in sums.iter().enumerate() {
            for (c, &sum) in line.iter().enumerate() {
                let j = col + c;
                let value = match self.bias {
                    // SAFETY: j < n, the bias length.
                    Some(b) => sum + unsafe { *(b as *const f32).add(j) },
                    None => sum,
                };
                let at = (row + r) * self.n + j;
                // SAFETY: at < m * n, the output length; this thread owns column j.
                unsafe {
                    match self.dest {
                        Dest::F32(y) => *(y as *mut f32).add(at) = value,
                        Dest::Bf16(y) => *(y as *mut u16).add(at) = f32_to_bf16(value),
                    }
                }
            }
        }
    }
}

/// Weight rows the tiles read: eight consecutive weights of a row as f32, or one.
trait Rows: Copy + Send + Sync {
    /// Weights i..i+8 of row `row`.
    ///
    /// # Safety
    /// AVX2 present; row < n and i + 8 <= k.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(&self, row: usize, i: usize) -> std::arch::x86_64::__m256;

    /// Weight j of row `row`.
    ///
    /// # Safety
    /// row < n and j < k.
    unsafe fn one(&self, row: usize, j: usize) -> f32;
}

/// bf16 weights [n, k].
#[derive(Clone, Copy)]
struct Bf16Rows {
    w: usize,
    k: usize,
}

impl Rows for Bf16Rows {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(&self, row: usize, i: usize) -> std::arch::x86_64::__m256 {
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

/// MXFP4 weights: blocks [n, k/2] bytes, scales [n, k/32].
#[derive(Clone, Copy)]
struct Mxfp4Rows {
    blocks: usize,
    scales: usize,
    k: usize,
}

impl Rows for Mxfp4Rows {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(&self, row: usize, i: usize) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract: i is a multiple of 8, so the 4 bytes of codes i..i+8
        // and their one scale (i / 32) lie inside row `row`.
        unsafe {
            let at = (self.blocks as *const u8).add((row * self.k + i) / 2);
            let raw = _mm_cvtsi32_si128(std::ptr::read_unaligned(at as *const i32));
            // byte b to lanes 2b and 2b+1, then the low nibble to the even lane, the high to the odd
            let pairs = _mm_shuffle_epi8(raw, _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1, -1, -1, -1, -1, -1));
            let codes = _mm256_and_si256(
                _mm256_srlv_epi32(_mm256_cvtepu8_epi32(pairs), _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4)),
                _mm256_set1_epi32(0xf),
            );
            let table = _mm256_loadu_ps(E2M1.as_ptr());
            let magnitude = _mm256_permutevar8x32_ps(table, codes); // uses the low 3 bits
            let sign = _mm256_slli_epi32::<28>(_mm256_and_si256(codes, _mm256_set1_epi32(8)));
            let value = _mm256_or_ps(magnitude, _mm256_castsi256_ps(sign));
            let scale = *(self.scales as *const u8).add((row * self.k + i) / MX_BLOCK);
            _mm256_mul_ps(value, _mm256_set1_ps(e8m0(scale)))
        }
    }

    #[inline(always)]
    unsafe fn one(&self, _row: usize, _j: usize) -> f32 {
        unreachable!("MXFP4 rows are whole blocks of 32: no k % 8 tail")
    }
}

/// sums[r][c] = the module doc's sum of x row r (stride k) times weight row col + c.
///
/// # Safety
/// AVX2 and FMA present; x valid for R rows of k values, rows col..col+C inside the weights.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots<const R: usize, const C: usize, W: Rows>(
    x: *const f32,
    weights: &W,
    col: usize,
    k: usize,
    sums: &mut [[f32; C]; R],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let body = k - k % 8;
    let mut i = 0;
    while i < body {
        // Whichever operand is fewer stays in registers while the other streams past it: the
        // accumulators plus one of them fit the 16 vector registers (4x3, 1x12).
        if R >= C {
            let mut wv = [_mm256_setzero_ps(); C];
            for (c, v) in wv.iter_mut().enumerate() {
                // SAFETY: i + 8 <= k within weight row col + c.
                *v = unsafe { weights.load8(col + c, i) };
            }
            for (r, lanes) in acc.iter_mut().enumerate() {
                // SAFETY: i + 8 <= k within x row r.
                let xv = unsafe { _mm256_loadu_ps(x.add(r * k + i)) };
                for (c, a) in lanes.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(xv, wv[c], *a);
                }
            }
        } else {
            let mut xv = [_mm256_setzero_ps(); R];
            for (r, v) in xv.iter_mut().enumerate() {
                // SAFETY: i + 8 <= k within x row r.
                *v = unsafe { _mm256_loadu_ps(x.add(r * k + i)) };
            }
            for c in 0..C {
                // SAFETY: i + 8 <= k within weight row col + c.
                let wv = unsafe { weights.load8(col + c, i) };
                for (r, lanes) in acc.iter_mut().enumerate() {
                    lanes[c] = _mm256_fmadd_ps(xv[r], wv, lanes[c]);
                }
            }
        }
        i += 8;
    }
    for (r, lanes) in acc.iter().enumerate() {
        for (c, a) in lanes.iter().enumerate() {
            let mut l = [0f32; 8];
            // SAFETY: l holds 8 floats.
            unsafe { _mm256_storeu_ps(l.as_mut_ptr(), *a) };
            let mut s = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
            for j in body..k {
                // SAFETY: j < k.
                let (xv, wv) = unsafe { (*x.add(r * k + j), weights.one(col + c, j)) };
                s = xv.mul_add(wv, s);
            }
            sums[r][c] = s;
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dots<const R: usize, const C: usize, W: Rows>(_: *const f32, _: &W, _: usize, _: usize, _: &mut [[f32; C]; R]) {
    unreachable!("the products refuse CPUs without AVX2 and FMA")
}

/// The module doc's arithmetic written plainly, one output at a time, over weights given as a
/// function (row, col) -> f32: the reference the tests hold the kernels to, bit for bit.
pub fn reference(
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    bias: Option<&[f32]>,
    weight: impl Fn(usize, usize) -> f32,
) -> Vec<f32> {
    let body = k - k % 8;
    let mut y = vec![0f32; m * n];
    for r in 0..m {
        for c in 0..n {
            let mut l = [0f32; 8];
            for i in (0..body).step_by(8) {
                for (lane, v) in l.iter_mut().enumerate() {
                    *v = x[r * k + i + lane].mul_add(weight(c, i + lane), *v);
                }
            }
            let mut s = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
            for j in body..k {
                s = x[r * k + j].mul_add(weight(c, j), s);
            }
            y[r * n + c] = s + bias.map_or(0.0, |b| b[c]);
        }
    }
    y
}
