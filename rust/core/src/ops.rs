//! Row-wise operations of a decode step on the CPU, where torch's cost is its dispatch rather
//! than its arithmetic: `F.rms_norm` is a composite of six aten ops (pow, mean, add, rsqrt, two
//! multiplies), ~14-25 us for one row of 64 values, of which the arithmetic is well under 1 us.
//!
//! `rms_norm` computes the bits torch computes, not merely close values, so the engine's logits
//! do not move and its RMSNorm stays bit-identical to transformers': every row is
//! `(x * rsqrt(sum(x * x) / d + eps)) * w` with torch's own order of the sum. That order is
//! aten's cascade sum over a contiguous row (ATen/native/cpu/SumKernel.cpp, `row_sum` and
//! `multi_row_sum`) on vectors of `lanes` floats (torch's `Vectorized<float>`: 8 with AVX2 or
//! the default build, 16 with AVX512), and on single floats for a row shorter than a vector.
//! The Python side (moeflow/runtime/cpu_ops.py) checks the bits against `F.rms_norm` once at
//! import and falls back to torch where they differ.
//!
//! Each row's arithmetic depends on that row alone, never on the number of rows or the thread
//! that computes it (batch invariance).

use rayon::prelude::*;

use crate::gemm::{bf16_to_f32, f32_to_bf16, Output};

/// Values of a row-major tensor: f32, or bf16 bit patterns.
#[derive(Debug, Clone, Copy)]
pub enum Values<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl Values<'_> {
    fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::Bf16(v) => v.len(),
        }
    }

    fn is_bf16(&self) -> bool {
        matches!(self, Values::Bf16(_))
    }

    /// Values [start, start + out.len()) widened to f32 (exact).
    fn widen(&self, start: usize, out: &mut [f32]) {
        match self {
            Values::F32(v) => out.copy_from_slice(&v[start..start + out.len()]),
            Values::Bf16(v) => {
                let end = start + out.len();
                for (o, &b) in out.iter_mut().zip(&v[start..end]) {
                    *o = bf16_to_f32(b);
                }
            }
        }
    }
}

/// Why an operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpsError {
    #[error("{what} holds {got} values, the shape needs {need}")]
    Size { what: &'static str, got: usize, need: usize },
    #[error("rows of 0 values cannot be normalized")]
    Empty,
    #[error("lanes = {0}: torch sums floats in vectors of 8 or 16 lanes")]
    Lanes(usize),
    #[error("rope rows of {0} values: the pairs need an even number")]
    OddDim(usize),
    #[error("rope takes x, cos, sin and y all f32 or all bf16")]
    MixedTypes,
    #[error("the output is {got}, but {x} rows with a {w} weight give {need}")]
    OutputType { got: &'static str, need: &'static str, x: &'static str, w: &'static str },
}

fn check(what: &'static str, got: usize, need: usize) -> Result<(), OpsError> {
    if got == need {
        Ok(())
    } else {
        Err(OpsError::Size { what, got, need })
    }
}

fn type_name(bf16: bool) -> &'static str {
    if bf16 {
        "bf16"
    } else {
        "f32"
    }
}

/// Rows of this many values or more split over the threads (below it, waking them costs more).
const PARALLEL_VALUES: usize = 1 << 16;

/// RMSNorm of `rows` rows of `dim` values: y = (x * rsqrt(mean(x * x) + eps)) * w, as torch's
/// `weight * F.rms_norm(x.float(), (dim,), None, eps).to(x.dtype)` computes it: the normalized
/// row rounded to bf16 first when x is bf16, the product with w in f32, rounded to bf16 when x
/// and w both are (y must then be bf16, else f32). `eps` is used as f32, as F.rms_norm does;
/// `lanes` is torch's float vector width (8 or 16), which fixes the order of the sum.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm(
    x: Values<'_>,
    rows: usize,
    dim: usize,
    w: Values<'_>,
    eps: f32,
    lanes: usize,
    out: Output<'_>,
    threads: usize,
) -> Result<(), OpsError> {
    if dim == 0 {
        return Err(OpsError::Empty);
    }
    if lanes != 8 && lanes != 16 {
        return Err(OpsError::Lanes(lanes));
    }
    check("x", x.len(), rows * dim)?;
    check("weight", w.len(), dim)?;
    let y_bf16 = x.is_bf16() && w.is_bf16();
    let (got, out_len) = match &out {
        Output::F32(y) => (false, y.len()),
        Output::Bf16(y) => (true, y.len()),
    };
    if got != y_bf16 {
        return Err(OpsError::OutputType {
            got: type_name(got),
            need: type_name(y_bf16),
            x: type_name(x.is_bf16()),
            w: type_name(w.is_bf16()),
        });
    }
    check("y", out_len, rows * dim)?;
    let mut weight = vec![0f32; dim];
    w.widen(0, &mut weight);
    let norm = Norm { x, dim, weight: &weight, eps, lanes, round_normalized: x.is_bf16() };
    let threads = if rows * dim >= PARALLEL_VALUES { threads.clamp(1, rows.max(1)) } else { 1 };
    let per = rows.div_ceil(threads).max(1);
    match out {
        Output::F32(y) => {
            if threads == 1 {
                norm.rows(0, y, |v| v);
            } else {
                // gemm's per-process pool (rayon's global one hangs in a forked child), with the caller's modes
                let caller = crate::gemm::modes();
                crate::gemm::pool().install(|| {
                    y.par_chunks_mut(per * dim).enumerate().for_each(|(i, part)| {
                        crate::gemm::with_modes(caller, || norm.rows(i * per, part, |v| v))
                    })
                });
            }
        }
        Output::Bf16(y) => {
            if threads == 1 {
                norm.rows(0, y, f32_to_bf16);
            } else {
                let caller = crate::gemm::modes();
                crate::gemm::pool().install(|| {
                    y.par_chunks_mut(per * dim).enumerate().for_each(|(i, part)| {
                        crate::gemm::with_modes(caller, || norm.rows(i * per, part, f32_to_bf16))
                    })
                });
            }
        }
    }
    Ok(())
}

/// One call's parameters, shared by the threads (each writes its own rows).
struct Norm<'a> {
    x: Values<'a>,
    dim: usize,
    weight: &'a [f32],
    eps: f32,
    lanes: usize,
    round_normalized: bool,
}

impl Norm<'_> {
    /// Rows first.. into `y` (whole rows), each value stored through `store`.
    fn rows<T>(&self, first: usize, y: &mut [T], store: impl Fn(f32) -> T) {
        let dim = self.dim;
        let mut row = vec![0f32; dim];
        for (i, out) in y.chunks_exact_mut(dim).enumerate() {
            self.x.widen((first + i) * dim, &mut row);
            let sum = match (self.lanes, dim >= self.lanes) {
                (16, true) => torch_sum_squares::<16>(&row),
                (_, true) => torch_sum_squares::<8>(&row),
                _ => torch_sum_squares::<1>(&row),
            };
            let r = 1.0 / (sum / dim as f32 + self.eps).sqrt();
            for ((o, &v), &w) in out.iter_mut().zip(&row).zip(self.weight) {
                let mut n = v * r;
                if self.round_normalized {
                    n = bf16_to_f32(f32_to_bf16(n));
                }
                *o = store(n * w);
            }
        }
    }
}

/// Rotary embedding of rows of `dim` values with half-split pairs, as torch computes
/// `x * cos + x.roll(dim / 2, -1) * sin` over tensors of one shape: y[i] = x[i] * cos[i] +
/// x[(i + dim/2) % dim] * sin[i], each product and the sum rounded on its own (no fused
/// multiply-add, as three separate torch ops round them; bf16 rounds each to bf16), so the bits
/// are torch's. x, cos, sin and y are all f32 or all bf16; `dim` is even.
pub fn rope_half(x: Values<'_>, cos: Values<'_>, sin: Values<'_>, dim: usize, out: Output<'_>) -> Result<(), OpsError> {
    if dim == 0 || dim % 2 != 0 {
        return Err(OpsError::OddDim(dim));
    }
    let n = x.len();
    if n % dim != 0 {
        return Err(OpsError::Size { what: "x", got: n, need: n.next_multiple_of(dim) });
    }
    check("cos", cos.len(), n)?;
    check("sin", sin.len(), n)?;
    let half = dim / 2;
    match (x, cos, sin, out) {
        (Values::F32(x), Values::F32(c), Values::F32(s), Output::F32(y)) => {
            check("y", y.len(), n)?;
            for (r, yr) in y.chunks_exact_mut(dim).enumerate() {
                let (xr, cr, sr) = (&x[r * dim..][..dim], &c[r * dim..][..dim], &s[r * dim..][..dim]);
                for i in 0..dim {
                    let swapped = xr[if i < half { i + half } else { i - half }];
                    yr[i] = xr[i] * cr[i] + swapped * sr[i];
                }
            }
        }
        (Values::Bf16(x), Values::Bf16(c), Values::Bf16(s), Output::Bf16(y)) => {
            check("y", y.len(), n)?;
            let round = |v: f32| bf16_to_f32(f32_to_bf16(v));
            for (r, yr) in y.chunks_exact_mut(dim).enumerate() {
                let (xr, cr, sr) = (&x[r * dim..][..dim], &c[r * dim..][..dim], &s[r * dim..][..dim]);
                for i in 0..dim {
                    let swapped = bf16_to_f32(xr[if i < half { i + half } else { i - half }]);
                    let a = round(bf16_to_f32(xr[i]) * bf16_to_f32(cr[i]));
                    let b = round(swapped * bf16_to_f32(sr[i]));
                    yr[i] = f32_to_bf16(a + b);
                }
            }
        }
        _ => return Err(OpsError::MixedTypes),
    }
    Ok(())
}

/// Levels of partial sums of aten's cascade sum.
const LEVELS: usize = 4;
/// Independent chains of aten's `row_sum` (its `ilp_factor`).
const ILP: usize = 4;

/// sum(x * x) over `row` in aten's order with vectors of W lanes (W = 1: its scalar path, taken
/// for a row shorter than a vector). Each square is rounded before it is added (torch squares
/// the tensor first), and no sum is fused.
fn torch_sum_squares<const W: usize>(row: &[f32]) -> f32 {
    let vectors = row.len() / W;
    let square = |v: usize| -> [f32; W] {
        let mut s = [0f32; W];
        for (l, out) in s.iter_mut().enumerate() {
            let x = row[v * W + l];
            *out = x * x;
        }
        s
    };
    let add = |acc: &mut [f32; W], v: &[f32; W]| {
        for (a, b) in acc.iter_mut().zip(v) {
            *a += *b;
        }
    };
    // multi_row_sum over `chains` groups of ILP vectors, partial sums cascaded in LEVELS levels
    let chains = vectors / ILP;
    let level_power = 4usize.max(ceil_log2(chains) / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0f32; W]; ILP]; LEVELS];
    let mut i = 0;
    while i + level_step <= chains {
        for _ in 0..level_step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                add(a, &square(i * ILP + k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            for (up, low) in upper[0].iter_mut().zip(lower[j - 1].iter_mut()) {
                add(up, low);
                *low = [0f32; W];
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < chains {
        for (k, a) in acc[0].iter_mut().enumerate() {
            add(a, &square(i * ILP + k));
        }
        i += 1;
    }
    let (first, upper) = acc.split_at_mut(1);
    for level in upper.iter() {
        for (a, u) in first[0].iter_mut().zip(level) {
            add(a, u);
        }
    }
    // row_sum: the vectors past the last whole chain go to the first, then the chains are added
    let mut partial = acc[0];
    for v in chains * ILP..vectors {
        add(&mut partial[0], &square(v));
    }
    for k in 1..ILP {
        let p = partial[k];
        add(&mut partial[0], &p);
    }
    // vectorized_inner_sum: the floats past the last vector, then the lanes in order
    let mut total = 0f32;
    for &x in &row[vectors * W..] {
        total += x * x;
    }
    for lane in partial[0] {
        total += lane;
    }
    total
}

/// aten's utils::CeilLog2: 1 up to 2, else the bits of x - 1.
fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
        let ss: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let r = 1.0 / (ss / x.len() as f64 + f64::from(eps)).sqrt();
        x.iter().zip(w).map(|(&v, &w)| (f64::from(v) * r * f64::from(w)) as f32).collect()
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32 - 0.5) * 6.0
            })
            .collect()
    }

    #[test]
    fn close_to_a_wide_reference_across_widths_and_tails() {
        for dim in [1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 513, 4096, 5000] {
            let x = values(3 * dim, dim as u32);
            let w = values(dim, 7);
            for lanes in [8, 16] {
                let mut y = vec![0f32; 3 * dim];
                rms_norm(Values::F32(&x), 3, dim, Values::F32(&w), 1e-6, lanes, Output::F32(&mut y), 1).unwrap();
                for r in 0..3 {
                    let want = reference(&x[r * dim..(r + 1) * dim], &w, 1e-6);
                    for (a, b) in y[r * dim..(r + 1) * dim].iter().zip(&want) {
                        assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "dim {dim} lanes {lanes}: {a} vs {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_is_the_same_whatever_the_rows_and_threads() {
        let dim = 1000;
        let x = values(130 * dim, 3);
        let w = values(dim, 4);
        let mut alone = vec![0f32; dim];
        rms_norm(Values::F32(&x[..dim]), 1, dim, Values::F32(&w), 1e-5, 8, Output::F32(&mut alone), 1).unwrap();
        for threads in [1, 4] {
            let mut all = vec![0f32; 130 * dim];
            rms_norm(Values::F32(&x), 130, dim, Values::F32(&w), 1e-5, 8, Output::F32(&mut all), threads).unwrap();
            assert_eq!(alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                       all[..dim].iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        }
    }

    #[test]
    fn bf16_rounds_the_normalized_row_then_the_product() {
        let dim = 24;
        let xf = values(dim, 9);
        let x: Vec<u16> = xf.iter().map(|&v| f32_to_bf16(v)).collect();
        let w: Vec<u16> = values(dim, 10).iter().map(|&v| f32_to_bf16(v)).collect();
        let mut y = vec![0u16; dim];
        rms_norm(Values::Bf16(&x), 1, dim, Values::Bf16(&w), 1e-6, 8, Output::Bf16(&mut y), 1).unwrap();
        let wide: Vec<f32> = x.iter().map(|&b| bf16_to_f32(b)).collect();
        let mut n = vec![0f32; dim];
        rms_norm(Values::F32(&wide), 1, dim, Values::F32(&vec![1.0; dim]), 1e-6, 8, Output::F32(&mut n), 1).unwrap();
        for i in 0..dim {
            let want = f32_to_bf16(bf16_to_f32(f32_to_bf16(n[i])) * bf16_to_f32(w[i]));
            assert_eq!(y[i], want);
        }
    }

    #[test]
    fn rope_rounds_each_product_and_the_sum() {
        let dim = 10;
        let (x, c, s) = (values(3 * dim, 1), values(3 * dim, 2), values(3 * dim, 3));
        let mut y = vec![0f32; 3 * dim];
        rope_half(Values::F32(&x), Values::F32(&c), Values::F32(&s), dim, Output::F32(&mut y)).unwrap();
        for r in 0..3 {
            for i in 0..dim {
                let swapped = x[r * dim + (i + dim / 2) % dim];
                let (a, b) = (x[r * dim + i] * c[r * dim + i], swapped * s[r * dim + i]);
                assert_eq!(y[r * dim + i].to_bits(), (a + b).to_bits());
            }
        }
        let bf = |v: &[f32]| v.iter().map(|&f| f32_to_bf16(f)).collect::<Vec<u16>>();
        let (xb, cb, sb) = (bf(&x), bf(&c), bf(&s));
        let mut yb = vec![0u16; 3 * dim];
        rope_half(Values::Bf16(&xb), Values::Bf16(&cb), Values::Bf16(&sb), dim, Output::Bf16(&mut yb)).unwrap();
        let w = |b: u16| bf16_to_f32(b);
        let round = |v: f32| w(f32_to_bf16(v));
        for i in 0..3 * dim {
            let j = i - i % dim + (i % dim + dim / 2) % dim;
            let want = f32_to_bf16(round(w(xb[i]) * w(cb[i])) + round(w(xb[j]) * w(sb[i])));
            assert_eq!(yb[i], want);
        }
        let err = rope_half(Values::F32(&x[..9]), Values::F32(&c[..9]), Values::F32(&s[..9]), 9, Output::F32(&mut y[..9]));
        assert_eq!(err.unwrap_err(), OpsError::OddDim(9));
        let err = rope_half(Values::F32(&x), Values::Bf16(&cb), Values::F32(&s), dim, Output::F32(&mut y));
        assert_eq!(err.unwrap_err(), OpsError::MixedTypes);
        let err = rope_half(Values::F32(&x), Values::F32(&c[..dim]), Values::F32(&s), dim, Output::F32(&mut y));
        assert_eq!(err.unwrap_err(), OpsError::Size { what: "cos", got: dim, need: 3 * dim });
    }

    #[test]
    fn refuses_bad_shapes_and_types() {
        let x = [1f32; 8];
        let mut y = [0f32; 8];
        let mut yb = [0u16; 8];
        let err = rms_norm(Values::F32(&x), 2, 8, Values::F32(&x), 1e-6, 8, Output::F32(&mut y), 1).unwrap_err();
        assert_eq!(err, OpsError::Size { what: "x", got: 8, need: 16 });
        let err = rms_norm(Values::F32(&x), 1, 8, Values::F32(&x[..4]), 1e-6, 8, Output::F32(&mut y), 1).unwrap_err();
        assert_eq!(err, OpsError::Size { what: "weight", got: 4, need: 8 });
        let err = rms_norm(Values::F32(&x), 1, 8, Values::F32(&x), 1e-6, 4, Output::F32(&mut y), 1).unwrap_err();
        assert_eq!(err, OpsError::Lanes(4));
        let err = rms_norm(Values::F32(&x), 1, 8, Values::F32(&x), 1e-6, 8, Output::Bf16(&mut yb), 1).unwrap_err();
        assert!(matches!(err, OpsError::OutputType { .. }));
        let err = rms_norm(Values::F32(&[]), 1, 0, Values::F32(&[]), 1e-6, 8, Output::F32(&mut []), 1).unwrap_err();
        assert_eq!(err, OpsError::Empty);
    }
}
