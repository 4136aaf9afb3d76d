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

mod rows;

use rows::{Bf16Rows, F32Rows, MinMaxRows, Mxfp4Rows, Rows};
pub use rows::{e8m0, f16_to_f32, minmax_value, mxfp4_value, MX_BLOCK};

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

/// Whether this CPU runs the kernels (x86-64 with AVX2, FMA and F16C).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
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
    #[error("this CPU lacks AVX2, FMA or F16C, which the products need")]
    Unsupported,
    #[error("{what} holds {got} values, the shape needs {need}")]
    Size { what: &'static str, got: usize, need: usize },
    #[error("the size of {what} overflows")]
    Overflow { what: &'static str },
    #[error("MXFP4 weights take inputs in blocks of 32; k = {k} is not a multiple of 32")]
    Block { k: usize },
    #[error("min-max codes of {bits} bits in groups of {group} over k = {k}: bits must be 2, 4 or 8, the group a multiple of 8 dividing k")]
    MinMax { bits: u32, group: usize, k: usize },
}

/// Columns (weight rows) per panel, the unit the threads share out: about 128 KiB of bf16
/// weights, so a thread's share is never smaller. A thread walks its panels as one range.
fn panel_columns(k: usize) -> usize {
    (128 * 1024 / 2 / k.max(1)).max(NR_WIDE).next_multiple_of(NR_WIDE)
}

const MR: usize = 4; // rows of x per tile
const NR: usize = 3; // weight rows per tile with MR rows
const NR_WIDE: usize = 12; // weight rows per tile with one row: 12 chains in flight, and a multiple of NR
const NR_DECODE: usize = 4; // weight rows per one-row tile of decoding (quantized) rows; divides NR_WIDE

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
    check("w", w.len(), size("w", &[n, k])?)?;
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
    check("blocks", blocks.len(), size("blocks", &[n, k])? / 2)?;
    check("scales", scales.len(), size("scales", &[n, k])? / MX_BLOCK)?;
    let rows = Mxfp4Rows { blocks: blocks.as_ptr() as usize, scales: scales.as_ptr() as usize, k };
    run(x, m, k, rows, n, bias, out, threads)
}

/// `linear` with group-wise min-max weights (store/quant.py): codes of `bits` (2, 4, 8) packed
/// lowest bits first along k, [n, k * bits / 8]; scale and zero [n, k / group] float16 bits;
/// w = (q - zero) * scale in f32, rounded to bf16 when `bf16_weights` (the values store/quant.py's
/// `dequantize` gives in that dtype, so the product is bit for bit `linear` over them).
#[allow(clippy::too_many_arguments)]
pub fn minmax_linear(
    x: &[f32],
    m: usize,
    k: usize,
    q: &[u8],
    scale: &[u16],
    zero: &[u16],
    bits: u32,
    group: usize,
    bf16_weights: bool,
    n: usize,
    bias: Option<&[f32]>,
    out: Output<'_>,
    threads: usize,
) -> Result<(), GemmError> {
    if !matches!(bits, 2 | 4 | 8) || group == 0 || group % 8 != 0 || k % group != 0 {
        return Err(GemmError::MinMax { bits, group, k });
    }
    check("q", q.len(), size("q", &[n, k, bits as usize])? / 8)?;
    check("scale", scale.len(), size("scale", &[n, k])? / group)?;
    check("zero", zero.len(), size("zero", &[n, k])? / group)?;
    let (q, scale, zero) = (q.as_ptr() as usize, scale.as_ptr() as usize, zero.as_ptr() as usize);
    macro_rules! go {
        ($bits:literal, $bf16:literal) => {
            run(x, m, k, MinMaxRows::<$bits, $bf16> { q, scale, zero, k, group }, n, bias, out, threads)
        };
    }
    match (bits, bf16_weights) {
        (8, false) => go!(8, false),
        (8, true) => go!(8, true),
        (4, false) => go!(4, false),
        (4, true) => go!(4, true),
        (2, false) => go!(2, false),
        _ => go!(2, true),
    }
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
    check("x", x.len(), size("x", &[m, k])?)?;
    if let Some(b) = bias {
        check("bias", b.len(), n)?;
    }
    match &out {
        Output::F32(y) => check("y", y.len(), size("y", &[m, n])?)?,
        Output::Bf16(y) => check("y", y.len(), size("y", &[m, n])?)?,
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
        if first < last {
            // SAFETY: `available()` checked AVX2, FMA and F16C; `job`'s pointers come from slices
            // whose lengths were checked, and groups write disjoint columns of y.
            unsafe { job.columns(first, last) };
        }
    };
    if threads == 1 {
        run(0);
    } else {
        // rayon's threads compute with the caller's floating-point modes (torch.set_flush_denormal
        // sets the caller's MXCSR only), so the bits do not depend on the thread count
        let caller = modes();
        pool().install(|| (0..threads).into_par_iter().for_each(|group| with_modes(caller, || run(group))));
    }
    Ok(())
}

/// This process's thread pool for the products. rayon's global pool would do, but a forked child
/// (multiprocessing, a server's workers) inherits it without its threads, and its first parallel
/// product would wait forever: a child gets its own pool, made on its first use.
pub(crate) fn pool() -> std::sync::Arc<rayon::ThreadPool> {
    static POOL: std::sync::Mutex<Option<(u32, std::sync::Arc<rayon::ThreadPool>)>> = std::sync::Mutex::new(None);
    let pid = std::process::id();
    let mut held = POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    match held.as_ref() {
        Some((owner, pool)) if *owner == pid => pool.clone(),
        _ => {
            // sized and placed by the main thread's CPUs, whichever thread asks first (a pinned
            // worker's own affinity would otherwise shrink the pool to its CPUs for good)
            let cpus = main_thread_cpus();
            let threads = cpus.as_ref().map_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()), |c| c.len());
            let pool = std::sync::Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("moeflow-gemm-{i}"))
                    .start_handler(move |_| {
                        if let Some(set) = &cpus {
                            pin_to(set);
                        }
                    })
                    .build()
                    .expect("a thread pool for the CPU products"),
            );
            // the parent's pool has no threads here: forget it rather than run its drop
            if let Some(inherited) = held.replace((pid, pool.clone())) {
                std::mem::forget(inherited);
            }
            pool
        }
    }
}

/// The CPUs the process's main thread may run on (its affinity mask), None where unknown.
#[cfg(target_os = "linux")]
fn main_thread_cpus() -> Option<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity writes at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let pid = std::process::id() as libc::pid_t; // the main thread's id is the process's
    // SAFETY: set is a valid cpu_set_t of the size passed.
    if unsafe { libc::sched_getaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return None;
    }
    // SAFETY: CPU_ISSET reads the set for indices below CPU_SETSIZE.
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect();
    (!cpus.is_empty()).then_some(cpus)
}

#[cfg(not(target_os = "linux"))]
fn main_thread_cpus() -> Option<Vec<usize>> {
    None
}

/// Pins the calling thread to `cpus` (best effort: a refusal leaves it as it was).
#[cfg(target_os = "linux")]
fn pin_to(cpus: &[usize]) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes indices below CPU_SETSIZE.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: c came from CPU_ISSET over indices below CPU_SETSIZE.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: set is a valid cpu_set_t of the size passed; 0 is the calling thread.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
}

#[cfg(not(target_os = "linux"))]
fn pin_to(_: &[usize]) {}

/// The caller's floating-point modes (MXCSR), to run pool tasks with (`with_modes`).
pub(crate) fn modes() -> u32 {
    mxcsr::get()
}

/// f run with the floating-point modes `modes`, the thread's own restored after: a pool task
/// computes as the thread that asked for the work would have.
pub(crate) fn with_modes<R>(modes: u32, f: impl FnOnce() -> R) -> R {
    let saved = mxcsr::get();
    mxcsr::set(modes);
    let out = f();
    mxcsr::set(saved);
    out
}

/// The product of a shape's sizes, refused where it overflows.
fn size(what: &'static str, dims: &[usize]) -> Result<usize, GemmError> {
    dims.iter().try_fold(1usize, |a, &b| a.checked_mul(b)).ok_or(GemmError::Overflow { what })
}

/// The SSE control and status register: rounding, flush-to-zero and denormals-are-zero modes.
mod mxcsr {
    #[cfg(target_arch = "x86_64")]
    pub(super) fn get() -> u32 {
        let mut value = 0u32;
        // SAFETY: stmxcsr stores the 32-bit register to the given address, a local.
        unsafe { std::arch::asm!("stmxcsr [{}]", in(reg) &mut value, options(nostack, preserves_flags)) };
        value
    }

    #[cfg(target_arch = "x86_64")]
    pub(super) fn set(value: u32) {
        // SAFETY: ldmxcsr loads a value read by `get` on an x86-64 CPU: valid modes, no reserved bits.
        unsafe { std::arch::asm!("ldmxcsr [{}]", in(reg) &value, options(nostack, preserves_flags)) };
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub(super) fn get() -> u32 {
        0
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub(super) fn set(_: u32) {}
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
    /// AVX2, FMA and F16C present; the pointers valid for the shapes; no other thread writes
    /// these columns.
    unsafe fn columns(&self, start: usize, end: usize) {
        if W::DECODES && self.m > MR {
            // Several row blocks: decode each weight once into f32, then every block reads that.
            // The values and each output's order are the same, so the bits are too.
            let mut buf = vec![0f32; NR * self.k];
            let mut col = start;
            while col < end {
                let c = NR.min(end - col);
                for j in 0..c {
                    // SAFETY: the caller's contract; buf holds NR rows of k.
                    unsafe { decode_row(&self.rows, col + j, self.k, buf.as_mut_ptr().add(j * self.k)) };
                }
                let f32_rows = F32Rows { w: buf.as_ptr() as usize, k: self.k };
                // SAFETY: as above, the decoded rows standing for weight rows col..col+c.
                unsafe { self.block(&f32_rows, 0, col, c) };
                col += c;
            }
            return;
        }
        let mut col = start;
        while col < end {
            let c = NR_WIDE.min(end - col);
            // SAFETY: the caller's contract.
            unsafe { self.block(&self.rows, col, col, c) };
            col += c;
        }
    }

    /// Every row against weight rows wrow..wrow+c of `weights`, written to columns col..col+c.
    ///
    /// # Safety
    /// As `columns`; c <= NR_WIDE, and c <= NR when m > MR.
    unsafe fn block<V: Rows>(&self, weights: &V, wrow: usize, col: usize, c: usize) {
        let mut row = 0;
        while row + MR <= self.m {
            let mut j = 0;
            while j + NR <= c {
                // SAFETY: the caller's contract; the tile lies inside x, the weights and y.
                unsafe { self.tile::<MR, NR, V>(weights, row, wrow + j, col + j) };
                j += NR;
            }
            while j < c {
                // SAFETY: as above.
                unsafe { self.tile::<MR, 1, V>(weights, row, wrow + j, col + j) };
                j += 1;
            }
            row += MR;
        }
        while row < self.m {
            let mut j = 0;
            if V::DECODES {
                // decoding a weight takes more registers than loading one: 4 rows a tile keep
                // the accumulators, the rows' group constants and the decode's temporaries in
                // the 16 vector registers
                while j + NR_DECODE <= c {
                    // SAFETY: as above.
                    unsafe { self.tile::<1, NR_DECODE, V>(weights, row, wrow + j, col + j) };
                    j += NR_DECODE;
                }
            } else if c == NR_WIDE {
                // SAFETY: as above.
                unsafe { self.tile::<1, NR_WIDE, V>(weights, row, wrow, col) };
                j = c;
            }
            while j < c {
                // SAFETY: as above.
                unsafe { self.tile::<1, 1, V>(weights, row, wrow + j, col + j) };
                j += 1;
            }
            row += 1;
        }
    }

    /// Outputs rows row..row+R, columns col..col+C, from weight rows wrow..wrow+C.
    ///
    /// # Safety
    /// As `columns`.
    #[inline(always)]
    unsafe fn tile<const R: usize, const C: usize, V: Rows>(&self, weights: &V, row: usize, wrow: usize, col: usize) {
        let mut sums = [[0f32; C]; R];
        let x = self.x as *const f32;
        // SAFETY: the caller's contract.
        unsafe { dots::<R, C, V>(x.add(row * self.k), weights, wrow, self.k, &mut sums) };
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

/// Weight row `row` (k values, k a multiple of 8 for decoding rows) as f32 into out.
///
/// # Safety
/// AVX2, FMA and F16C present; row inside the weights; out valid for k floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_row<W: Rows>(weights: &W, row: usize, k: usize, out: *mut f32) {
    use std::arch::x86_64::*;
    let mut i = 0;
    while i < k {
        // SAFETY: the caller's contract.
        let g = unsafe { weights.group(row, i) };
        let end = (i + weights.span()).min(k);
        while i < end {
            // SAFETY: i + 8 <= k: decoding rows hold whole groups of a multiple of 8.
            unsafe { _mm256_storeu_ps(out.add(i), weights.load8(row, i, g)) };
            i += 8;
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn decode_row<W: Rows>(_: &W, _: usize, _: usize, _: *mut f32) {
    unreachable!("the products refuse CPUs without AVX2, FMA and F16C")
}

/// sums[r][c] = the module doc's sum of x row r (stride k) times weight row col + c.
///
/// # Safety
/// AVX2, FMA and F16C present; x valid for R rows of k values, rows col..col+C inside the weights.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
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
        let mut groups = [None; C];
        for (c, g) in groups.iter_mut().enumerate() {
            // SAFETY: i < k inside weight row col + c.
            *g = Some(unsafe { weights.group(col + c, i) });
        }
        let end = (i + weights.span()).min(body);
        while i < end {
            // Whichever operand is fewer stays in registers while the other streams past it: the
            // accumulators plus one of them fit the 16 vector registers (4x3, 1x12).
            if R >= C {
                let mut wv = [_mm256_setzero_ps(); C];
                for (c, v) in wv.iter_mut().enumerate() {
                    // SAFETY: i + 8 <= k within weight row col + c, in its group.
                    *v = unsafe { weights.load8(col + c, i, groups[c].unwrap_unchecked()) };
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
                    // SAFETY: i + 8 <= k within weight row col + c, in its group.
                    let wv = unsafe { weights.load8(col + c, i, groups[c].unwrap_unchecked()) };
                    for (r, lanes) in acc.iter_mut().enumerate() {
                        lanes[c] = _mm256_fmadd_ps(xv[r], wv, lanes[c]);
                    }
                }
            }
            i += 8;
        }
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
    unreachable!("the products refuse CPUs without AVX2, FMA and F16C")
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
            y[r * n + c] = bias.map_or(s, |b| s + b[c]); // no bias: s itself (a -0.0 stays -0.0)
        }
    }
    y
}
