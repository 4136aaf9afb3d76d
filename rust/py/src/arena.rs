//! `HostArena`, `DeviceArena` (real or simulated) and `ArenaBuffer`, the buffer-protocol
//! view of memory the CPU can read.

use std::ffi::{c_int, c_void};
use std::sync::Arc;

use moeflow_core::{Arena, DeviceArena, HostArena};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyMemoryView;
use pyo3::{ffi, PyErr};

use crate::errors::PyCoreResult;
use crate::sim::PySimDevice;

/// One page-aligned anonymous mapping; mlock attempted, CUDA page-locked when a GPU exists.
#[pyclass(module = "moeflow._core", name = "HostArena", frozen)]
#[derive(Debug)]
pub struct PyHostArena {
    pub(crate) inner: Arc<HostArena>,
}

#[pymethods]
impl PyHostArena {
    #[new]
    #[pyo3(signature = (size, *, lock = true, cuda_register = true))]
    fn new(py: Python<'_>, size: u64, lock: bool, cuda_register: bool) -> PyCoreResult<Self> {
        // mlock zero-fills every page: seconds for large arenas, so without the GIL.
        let arena = py.detach(|| HostArena::new(size, lock, cuda_register))?;
        Ok(Self {
            inner: Arc::new(arena),
        })
    }

    #[getter]
    fn size(&self) -> usize {
        self.inner.size()
    }

    #[getter]
    fn address(&self) -> u64 {
        self.inner.address()
    }

    /// mlock succeeded.
    #[getter]
    fn locked(&self) -> bool {
        self.inner.locked()
    }

    /// Why mlock failed (e.g. 'ENOMEM: RLIMIT_MEMLOCK'), or None.
    #[getter]
    fn lock_error(&self) -> Option<&str> {
        self.inner.lock_error()
    }

    /// Page-locked through cuMemHostRegister.
    #[getter]
    fn cuda_registered(&self) -> bool {
        self.inner.cuda_registered()
    }

    /// Writable buffer over [offset, offset+length). Raises ValueError out of range.
    fn view(&self, offset: u64, length: u64) -> PyResult<PyArenaBuffer> {
        PyArenaBuffer::new(Arena::Host(self.inner.clone()), offset, length)
    }

    fn __repr__(&self) -> String {
        format!(
            "HostArena(size={}, address={:#x}, locked={}, cuda_registered={})",
            self.inner.size(),
            self.inner.address(),
            self.inner.locked(),
            self.inner.cuda_registered()
        )
    }
}

/// One device allocation (cuMemAlloc) in the primary context of `device`, or with
/// `sim`, simulated device memory in host memory (filled with 0xFF poison).
#[pyclass(module = "moeflow._core", name = "DeviceArena", frozen)]
#[derive(Debug)]
pub struct PyDeviceArena {
    pub(crate) inner: Arc<DeviceArena>,
    sim: Option<Py<PySimDevice>>,
}

#[pymethods]
impl PyDeviceArena {
    #[new]
    #[pyo3(signature = (size, *, device = 0, sim = None))]
    fn new(
        py: Python<'_>,
        size: u64,
        device: i32,
        sim: Option<Py<PySimDevice>>,
    ) -> PyCoreResult<Self> {
        let arena = match &sim {
            Some(sim) => {
                let device_sim = sim.get().inner.clone();
                py.detach(|| DeviceArena::new_sim(size, device, device_sim))?
            }
            None => py.detach(|| DeviceArena::new(size, device))?,
        };
        Ok(Self {
            inner: Arc::new(arena),
            sim,
        })
    }

    /// The simulated device the arena belongs to, or None on a real one.
    #[getter]
    fn sim(&self, py: Python<'_>) -> Option<Py<PySimDevice>> {
        self.sim.as_ref().map(|sim| sim.clone_ref(py))
    }

    #[getter]
    fn size(&self) -> usize {
        self.inner.size()
    }

    /// Device pointer (CUdeviceptr) of the start.
    #[getter]
    fn address(&self) -> u64 {
        self.inner.address()
    }

    #[getter]
    fn device(&self) -> i32 {
        self.inner.device()
    }

    fn __repr__(&self) -> String {
        format!(
            "DeviceArena(size={}, address={:#x}, device={}, simulated={})",
            self.inner.size(),
            self.inner.address(),
            self.inner.device(),
            self.sim.is_some()
        )
    }
}

/// A buffer-protocol view of part of an arena in host memory (a host arena or a
/// simulated device's); keeps the arena alive.
#[pyclass(module = "moeflow._core", name = "ArenaBuffer", frozen)]
#[derive(Debug)]
pub struct PyArenaBuffer {
    /// Keeps the mapping `base` points into alive.
    _arena: Arena,
    base: HostPtr,
    offset: usize,
    len: usize,
}

/// The start of an arena's host memory.
#[derive(Debug, Clone, Copy)]
struct HostPtr(*mut u8);

// SAFETY: the pointer is only dereferenced in `__getbuffer__`, under the GIL, while
// `arena` (held beside it) keeps the mapping alive.
unsafe impl Send for HostPtr {}
// SAFETY: as above; the pointer itself is never changed.
unsafe impl Sync for HostPtr {}

impl PyArenaBuffer {
    /// A view of `[offset, offset+length)`; TypeError when the arena is real device memory.
    pub(crate) fn new(arena: Arena, offset: u64, length: u64) -> PyResult<Self> {
        let Some(base) = arena.host_ptr() else {
            return Err(PyTypeError::new_err("a device block has no host view"));
        };
        let size = arena.size() as u64;
        if offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(PyValueError::new_err(format!(
                "view of {length} bytes at offset {offset} exceeds the {size}-byte arena"
            )));
        }
        Ok(Self {
            _arena: arena,
            base: HostPtr(base),
            offset: offset as usize,
            len: length as usize,
        })
    }
}

#[pymethods]
impl PyArenaBuffer {
    #[getter]
    fn address(&self) -> u64 {
        self.base.0 as u64 + self.offset as u64
    }

    fn __len__(&self) -> usize {
        self.len
    }

    /// # Safety
    /// Called by CPython with a valid `Py_buffer` to fill.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let this = slf.get();
        // SAFETY: offset+len lies inside the arena (checked in `new`); the exporter
        // object stored in the view (`slf`, ref-counted by FillInfo) holds the Arc
        // that keeps the mapping alive until the buffer is released.
        let ptr = unsafe { this.base.0.add(this.offset) };
        // SAFETY: `view` is the caller's Py_buffer; FillInfo fills it, incref'ing `slf`.
        let status = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                ptr.cast::<c_void>(),
                this.len as ffi::Py_ssize_t,
                0,
                flags,
            )
        };
        if status == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    /// # Safety
    /// Called by CPython with the view filled by `__getbuffer__`.
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {
        // FillInfo allocated nothing; the exporter reference is dropped by CPython.
    }

    /// PEP 688 spelling of the buffer protocol (Python 3.12 adds it from the slot;
    /// this makes `__buffer__` exist on 3.11 too).
    #[pyo3(signature = (flags, /))]
    fn __buffer__<'py>(slf: &Bound<'py, Self>, flags: i32) -> PyResult<Bound<'py, PyMemoryView>> {
        let _ = flags;
        PyMemoryView::from(slf.as_any())
    }

    /// Releases a memoryview obtained from `__buffer__`.
    #[pyo3(signature = (buffer, /))]
    fn __release_buffer__(&self, buffer: &Bound<'_, PyAny>) -> PyResult<()> {
        buffer.call_method0("release").map(drop)
    }

    fn __repr__(&self) -> String {
        format!(
            "ArenaBuffer(address={:#x}, len={})",
            self.address(),
            self.len
        )
    }
}
