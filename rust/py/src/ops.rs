//! Row-wise operations of a decode step on the CPU (`moeflow_core::ops`), by tensor address.

use moeflow_core::gemm::Output;
use moeflow_core::ops::{self, Values};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Norms of up to this many values keep the GIL (a few microseconds at most).
const DETACH_VALUES: usize = 1 << 16;

/// RMSNorm of x [rows, dim] (bfloat16 if `x_bf16` else float32) with weight [dim] (bfloat16 if
/// `w_bf16` else float32) into y [rows, dim] (bfloat16 when both are, else float32), all
/// C-contiguous, given by address: the bits of torch's `weight * F.rms_norm(x.float(), (dim,),
/// None, eps).to(x.dtype)` where torch sums floats in vectors of `lanes` (8 or 16).
///
/// The caller (moeflow/runtime/cpu_ops.py, which checks dtypes, shapes, contiguity and device
/// first) guarantees the addresses hold tensors of these shapes for the call.
#[pyfunction]
#[pyo3(signature = (x, rows, dim, w, y, eps, x_bf16, w_bf16, lanes = 8, threads = 1))]
#[allow(clippy::too_many_arguments)]
pub fn rms_norm(
    py: Python<'_>,
    x: usize,
    rows: usize,
    dim: usize,
    w: usize,
    y: usize,
    eps: f64,
    x_bf16: bool,
    w_bf16: bool,
    lanes: usize,
    threads: usize,
) -> PyResult<()> {
    if [x, w, y].contains(&0) {
        return Err(PyValueError::new_err("rms_norm: a null tensor address"));
    }
    let n = rows * dim;
    let work = move || {
        // SAFETY: the caller's contract above: each address holds a live, C-contiguous tensor
        // of the stated shape and dtype, y written by nobody else during the call.
        let (xs, ws, out) =
            unsafe { (values(x, n, x_bf16), values(w, dim, w_bf16), output(y, n, x_bf16 && w_bf16)) };
        ops::rms_norm(xs, rows, dim, ws, eps as f32, lanes, out, threads)
    };
    let done = if n > DETACH_VALUES { py.detach(work) } else { work() };
    done.map_err(|e| PyValueError::new_err(format!("rms_norm: {e}")))
}

/// Rotary embedding with half-split pairs of x [n / dim, dim] by tables cos and sin of the same
/// shape into y, all bfloat16 if `bf16` else float32, all C-contiguous, given by address: the
/// bits of torch's `x * cos + x.roll(dim // 2, -1) * sin`. The same caller contract as
/// `rms_norm`; always keeps the GIL (one decode step's heads: well under a microsecond).
#[pyfunction]
pub fn rope_half(x: usize, cos: usize, sin: usize, n: usize, dim: usize, y: usize, bf16: bool) -> PyResult<()> {
    if [x, cos, sin, y].contains(&0) {
        return Err(PyValueError::new_err("rope_half: a null tensor address"));
    }
    // SAFETY: the caller's contract above: each address holds a live, C-contiguous tensor of
    // n values of the stated dtype, y written by nobody else during the call.
    let done = unsafe {
        ops::rope_half(values(x, n, bf16), values(cos, n, bf16), values(sin, n, bf16), dim, output(y, n, bf16))
    };
    done.map_err(|e| PyValueError::new_err(format!("rope_half: {e}")))
}

/// The `n` values at address `at`: bfloat16 bits if `bf16`, else float32.
///
/// # Safety
/// `at` holds `n` live, aligned values of that type for the lifetime the caller gives them.
unsafe fn values<'a>(at: usize, n: usize, bf16: bool) -> Values<'a> {
    // SAFETY: the caller's contract above.
    unsafe {
        if bf16 {
            Values::Bf16(std::slice::from_raw_parts(at as *const u16, n))
        } else {
            Values::F32(std::slice::from_raw_parts(at as *const f32, n))
        }
    }
}

/// `values` for the output: `n` values at `at` that nothing else reads or writes meanwhile.
///
/// # Safety
/// As `values`, and the memory is written by nobody else for that lifetime.
unsafe fn output<'a>(at: usize, n: usize, bf16: bool) -> Output<'a> {
    // SAFETY: the caller's contract above.
    unsafe {
        if bf16 {
            Output::Bf16(std::slice::from_raw_parts_mut(at as *mut u16, n))
        } else {
            Output::F32(std::slice::from_raw_parts_mut(at as *mut f32, n))
        }
    }
}
