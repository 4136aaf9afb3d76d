//! Module-level functions: CUDA probing, events on a caller's stream and CRC-32.

use std::sync::Arc;

use moeflow_core::{cuda, event};
use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::PyBufferError;
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
