//! The `moeflow._core` extension module: registers the wrapped types, functions,
//! constants and exception classes of the memory core. Nothing else lives here.

mod arena;
mod completion;
mod errors;
mod functions;
mod ops;
mod sim;
mod slab;
mod transfer;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("PAGE_SIZE", moeflow_core::arena::page_size())?;
    m.add("DIRECT_IO_ALIGN", moeflow_core::DIRECT_IO_ALIGN)?;
    m.add("PRIORITY_DEMAND", moeflow_core::PRIORITY_DEMAND)?;
    m.add("PRIORITY_PREFETCH", moeflow_core::PRIORITY_PREFETCH)?;
    m.add("PRIORITY_BACKGROUND", moeflow_core::PRIORITY_BACKGROUND)?;
    m.add("SPECULATIVE_PART", moeflow_core::SPECULATIVE_PART_BYTES)?;
    m.add_function(wrap_pyfunction!(functions::cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(functions::cuda_device_count, m)?)?;
    m.add_function(wrap_pyfunction!(functions::crc32, m)?)?;
    m.add_function(wrap_pyfunction!(functions::record_cuda_event, m)?)?;
    m.add_function(wrap_pyfunction!(functions::bf16_linear, m)?)?;
    m.add_function(wrap_pyfunction!(functions::mxfp4_linear, m)?)?;
    m.add_function(wrap_pyfunction!(functions::minmax_linear, m)?)?;
    m.add_function(wrap_pyfunction!(functions::bf16_linear_available, m)?)?;
    m.add_function(wrap_pyfunction!(ops::rms_norm, m)?)?;
    m.add_function(wrap_pyfunction!(ops::rope_half, m)?)?;
    m.add_class::<arena::PyArenaBuffer>()?;
    m.add_class::<arena::PyHostArena>()?;
    m.add_class::<arena::PyDeviceArena>()?;
    m.add_class::<slab::PyBlockHandle>()?;
    m.add_class::<slab::PySlabAllocator>()?;
    m.add_class::<completion::PyCompletion>()?;
    m.add_class::<completion::PyCudaEvent>()?;
    m.add_class::<transfer::PyTransferEngine>()?;
    m.add_class::<sim::PySimDevice>()?;
    errors::register(m)?;
    // The stub (`_core.pyi`) is the contract and declares no `__all__`; users never
    // star-import this private module, so keep the one PyO3 adds out of it.
    if m.hasattr("__all__")? {
        m.delattr("__all__")?;
    }
    Ok(())
}
