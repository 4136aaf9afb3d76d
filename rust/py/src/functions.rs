//! Module-level functions: CUDA probing, events on a caller's stream and CRC-32.

use std::sync::Arc;

use moeflow_core::{cuda, event, gemm};
use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::prelude::*;

use crate::completion::PyCudaEvent;
use crate::errors::PyCoreResult;

/// True when libcuda loads, cuInit succeeds and at least one device exists.
#[pyfunction]
pub fn cuda_available(py: Python<'_>) -> bool {
    // The first call loads and initialises the driver, which can take a while.
    py.detach(cuda::available)
}

/// Number of CUDA devices (0 without CUDA).
#[pyfunction]
pub fn cuda_device_count(py: Python<'_>) -> usize {
    py.detach(cuda::device_count)
}

/// CRC-32 (IEEE) of `data`, continuing from `value`; releases the GIL.
#[pyfunction]
#[pyo3(signature = (data, value = 0))]
pub fn crc32(py: Python<'_>, data: &Bound<'_, PyAny>, value: u32) -> PyResult<u32> {
    let buffer = PyUntypedBuffer::get(data)?;
    if !buffer.is_c_contiguous() {
        return Err(PyBufferError::new_err("crc32 needs a C-contiguous buffer"));
    }
    let address = buffer.buf_ptr() as usize;
    let len = buffer.len_bytes();
    let crc = py.detach(move || {
        // SAFETY: `buffer` keeps the exporter's memory alive and unmoved until it is
        // dropped after this closure; the bytes are only read.
        let bytes = unsafe { std::slice::from_raw_parts(address as *const u8, len) };
        let mut hasher = crc32fast::Hasher::new_with_initial(value);
        hasher.update(bytes);
        hasher.finalize()
    });
    drop(buffer);
    Ok(crc)
}

/// Records an event on `stream` (a CUstream pointer, e.g. torch's current stream) in
/// the primary context of `device`; a copy given it as `after` waits for the work
/// queued on that stream before it.
#[pyfunction]
#[pyo3(signature = (stream, device = 0))]
pub fn record_cuda_event(py: Python<'_>, stream: usize, device: i32) -> PyCoreResult<PyCudaEvent> {
    let inner: Arc<_> = py.detach(|| event::record_cuda_event(stream, device))?;
    Ok(PyCudaEvent { inner })
}

/// y = x w^T (+ bias) for a CPU without bf16 instructions (`moeflow_core::gemm`): x [m, k]
/// bfloat16 (`x_bf16`) or float32, w [n, k] bfloat16, bias [n] float32 or 0, y [m, n]
/// bfloat16 (`y_bf16`) or float32, all C-contiguous, given by address. Releases the GIL for
/// products of more than `DETACH_MACS` multiply-adds (below that, releasing and taking it back
/// costs more than it lets others run).
///
/// The caller (moeflow/runtime/cpu_bf16.py, which checks dtypes, shapes, contiguity and
/// device first) guarantees the addresses hold tensors of these shapes for the call.
#[pyfunction]
#[pyo3(signature = (x, m, k, w, n, y, x_bf16, y_bf16, bias = 0, threads = 1))]
#[allow(clippy::too_many_arguments)]
pub fn bf16_linear(
    py: Python<'_>,
    x: usize,
    m: usize,
    k: usize,
    w: usize,
    n: usize,
    y: usize,
    x_bf16: bool,
    y_bf16: bool,
    bias: usize,
    threads: usize,
) -> PyResult<()> {
    let sides = Sides { x, m, k, n, y, x_bf16, y_bf16, bias, threads };
    let wn = length("bf16_linear", "w", &[n, k], 2)?;
    sides.run(py, "bf16_linear", w, move |xs, bs, out| {
        // SAFETY: the caller's contract: w holds n * k bf16 values.
        let ws = unsafe { std::slice::from_raw_parts(w as *const u16, wn) };
        gemm::linear(xs, m, k, ws, n, bs, out, threads)
    })
}

/// `bf16_linear` with MXFP4 weights by address: blocks [n, k/32, 16] and scales [n, k/32]
/// uint8 (store/mxfp4.py's layout), k a multiple of 32. The same caller contract.
#[pyfunction]
#[pyo3(signature = (x, m, k, blocks, scales, n, y, x_bf16, y_bf16, bias = 0, threads = 1))]
#[allow(clippy::too_many_arguments)]
pub fn mxfp4_linear(
    py: Python<'_>,
    x: usize,
    m: usize,
    k: usize,
    blocks: usize,
    scales: usize,
    n: usize,
    y: usize,
    x_bf16: bool,
    y_bf16: bool,
    bias: usize,
    threads: usize,
) -> PyResult<()> {
    if scales == 0 {
        return Err(PyValueError::new_err("mxfp4_linear: a null tensor address"));
    }
    let sides = Sides { x, m, k, n, y, x_bf16, y_bf16, bias, threads };
    let codes = length("mxfp4_linear", "blocks", &[n, k], 1)?;
    sides.run(py, "mxfp4_linear", blocks, move |xs, bs, out| {
        // SAFETY: the caller's contract: blocks and scales hold the [n, k] matrix's bytes.
        let (b, s) = unsafe {
            (
                std::slice::from_raw_parts(blocks as *const u8, codes / 2),
                std::slice::from_raw_parts(scales as *const u8, codes / gemm::MX_BLOCK),
            )
        };
        gemm::mxfp4_linear(xs, m, k, b, s, n, bs, out, threads)
    })
}

/// `bf16_linear` with group-wise min-max weights by address (store/quant.py's layout): codes
/// [n, k * bits / 8] uint8, scale and zero [n, k / group] float16; the weights rounded to bf16
/// first when `bf16_weights` (as `dequantize` to bfloat16 gives them). The same caller contract.
#[pyfunction]
#[pyo3(signature = (x, m, k, q, scale, zero, bits, group, bf16_weights, n, y, x_bf16, y_bf16, bias = 0, threads = 1))]
#[allow(clippy::too_many_arguments)]
pub fn minmax_linear(
    py: Python<'_>,
    x: usize,
    m: usize,
    k: usize,
    q: usize,
    scale: usize,
    zero: usize,
    bits: u32,
    group: usize,
    bf16_weights: bool,
    n: usize,
    y: usize,
    x_bf16: bool,
    y_bf16: bool,
    bias: usize,
    threads: usize,
) -> PyResult<()> {
    if scale == 0 || zero == 0 || group == 0 || !matches!(bits, 2 | 4 | 8) {
        return Err(PyValueError::new_err(format!(
            "minmax_linear: bits {bits} (2, 4 or 8), group {group} and non-null scale and zero are needed"
        )));
    }
    let sides = Sides { x, m, k, n, y, x_bf16, y_bf16, bias, threads };
    let codes = length("minmax_linear", "q", &[n, k, bits as usize], 1)? / 8;
    let weights = length("minmax_linear", "scale", &[n, k], 2)?;
    sides.run(py, "minmax_linear", q, move |xs, bs, out| {
        let groups = if k % group == 0 { weights / group } else { 0 };
        // SAFETY: the caller's contract: q, scale and zero hold the [n, k] matrix's codes and
        // groups (a k that groups do not divide is refused by the product before any read).
        let (qs, ss, zs) = unsafe {
            (
                std::slice::from_raw_parts(q as *const u8, codes),
                std::slice::from_raw_parts(scale as *const u16, groups),
                std::slice::from_raw_parts(zero as *const u16, groups),
            )
        };
        gemm::minmax_linear(xs, m, k, qs, ss, zs, bits, group, bf16_weights, n, bs, out, threads)
    })
}

/// The activations, bias and output of a product, by address.
struct Sides {
    x: usize,
    m: usize,
    k: usize,
    n: usize,
    y: usize,
    x_bf16: bool,
    y_bf16: bool,
    bias: usize,
    threads: usize,
}

impl Sides {
    /// Runs `product` on x (widened to f32 if bf16), the bias and y, without the GIL when large.
    fn run(
        self,
        py: Python<'_>,
        name: &str,
        weights: usize,
        product: impl FnOnce(&[f32], Option<&[f32]>, gemm::Output<'_>) -> Result<(), gemm::GemmError> + Send,
    ) -> PyResult<()> {
        let Sides { x, m, k, n, y, x_bf16, y_bf16, bias, threads } = self;
        if [x, weights, y].contains(&0) {
            return Err(PyValueError::new_err(format!("{name}: a null tensor address")));
        }
        let xn = length(name, "x", &[m, k], if x_bf16 { 2 } else { 4 })?;
        let yn = length(name, "y", &[m, n], if y_bf16 { 2 } else { 4 })?;
        let macs = length(name, "the product", &[m, n, k], 1)?;
        let work = move || {
            // SAFETY: the caller's contract above: each address holds a live, C-contiguous
            // tensor of the stated shape and dtype, not written by anyone else during the call.
            let bs = unsafe { (bias != 0).then(|| std::slice::from_raw_parts(bias as *const f32, n)) };
            let widened: Vec<f32>;
            let xs = if x_bf16 {
                // SAFETY: as above.
                let raw = unsafe { std::slice::from_raw_parts(x as *const u16, xn) };
                widened = raw.iter().map(|&b| gemm::bf16_to_f32(b)).collect();
                &widened[..]
            } else {
                // SAFETY: as above.
                unsafe { std::slice::from_raw_parts(x as *const f32, xn) }
            };
            let out = if y_bf16 {
                // SAFETY: as above; y is written only here.
                gemm::Output::Bf16(unsafe { std::slice::from_raw_parts_mut(y as *mut u16, yn) })
            } else {
                // SAFETY: as above.
                gemm::Output::F32(unsafe { std::slice::from_raw_parts_mut(y as *mut f32, yn) })
            };
            product(xs, bs, out)
        };
        // with more than one thread the work may queue on the shared pool behind another
        // caller's: never wait there holding the GIL
        let done = if macs > DETACH_MACS || threads > 1 { py.detach(work) } else { work() };
        done.map_err(|e| PyValueError::new_err(format!("{name}: {e}")))
    }
}

/// The element count of a shape (the product of `dims`), refused where it, or its size in bytes
/// at `elem` bytes each, exceeds what a slice may hold (isize::MAX bytes).
fn length(name: &str, what: &str, dims: &[usize], elem: usize) -> PyResult<usize> {
    let count = dims.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
    match count {
        Some(c) if c.checked_mul(elem).is_some_and(|bytes| bytes <= isize::MAX as usize) => Ok(c),
        _ => Err(PyValueError::new_err(format!("{name}: {what} of shape {dims:?} is too large"))),
    }
}

/// Products up to this many multiply-adds keep the GIL (tens of microseconds at most).
const DETACH_MACS: usize = 1 << 20;

/// Whether this CPU runs the products (x86-64 with AVX2, FMA and F16C).
#[pyfunction]
pub fn bf16_linear_available() -> bool {
    gemm::available()
}
