//! `TransferEngine`: submissions, cancellation and completions of the transfer engine.

use std::time::Duration;

use moeflow_core::{
    CopyRequest, CoreError, DirectMode, FaultKind, FaultOp, FaultRule, ReadRequest, TransferEngine,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::completion::{PyCompletion, PyCudaEvent};
use crate::errors::PyCoreResult;
use crate::sim::PySimDevice;
use crate::slab::{PyBlockHandle, PySlabAllocator};

/// Worker threads fed by lock-free priority lanes; completions on a lock-free
/// queue, signalled on `eventfd`.
#[pyclass(module = "moeflow._core", name = "TransferEngine", frozen)]
#[derive(Debug)]
pub struct PyTransferEngine {
    inner: TransferEngine,
}

/// Lane numbers arrive as Python ints; anything outside 0..=2 is a ValueError.
fn lane(priority: i64) -> PyCoreResult<u8> {
    u8::try_from(priority).map_err(|_| {
        CoreError::invalid(format!(
            "priority must be 0 (demand), 1 (prefetch) or 2 (background), got {priority}"
        ))
        .into()
    })
}

#[pymethods]
impl PyTransferEngine {
    #[new]
    #[pyo3(signature = (*, workers = 4, chunk_size = 8 << 20, device = None, sim = None))]
    fn new(
        py: Python<'_>,
        workers: usize,
        chunk_size: u64,
        device: Option<i32>,
        sim: Option<&PySimDevice>,
    ) -> PyCoreResult<Self> {
        let sim = sim.map(|sim| sim.inner.clone());
        let inner = py.detach(|| TransferEngine::with_sim(workers, chunk_size, device, sim))?;
        Ok(Self { inner })
    }

    /// Readable when completions are waiting (an eventfd; read 8 bytes to reset).
    #[getter]
    fn eventfd(&self) -> i32 {
        self.inner.eventfd()
    }

    #[getter]
    fn workers(&self) -> usize {
        self.inner.workers()
    }

    #[getter]
    fn chunk_size(&self) -> u64 {
        self.inner.chunk_size()
    }

    /// Open `path` (buffered and, where the filesystem allows, O_DIRECT); returns a file id.
    fn register_file(&self, py: Python<'_>, path: &str) -> PyCoreResult<u64> {
        Ok(py.detach(|| self.inner.register_file(path))?)
    }

    fn unregister_file(&self, file_id: u64) -> PyCoreResult<()> {
        Ok(self.inner.unregister_file(file_id)?)
    }

    fn file_size(&self, file_id: u64) -> PyCoreResult<u64> {
        Ok(self.inner.file_size(file_id)?)
    }

    /// file -> host block; returns the transfer id.
    #[pyo3(signature = (
        file_id, file_offset, length, dst, dst_handle, *,
        dst_offset = 0, priority = 1, direct = "auto", expect_crc32 = None, owned = true, tag = 0
    ))]
    #[allow(clippy::too_many_arguments)]
    fn submit_read(
        &self,
        file_id: u64,
        file_offset: u64,
        length: u64,
        dst: &PySlabAllocator,
        dst_handle: &PyBlockHandle,
        dst_offset: u64,
        priority: i64,
        direct: &str,
        expect_crc32: Option<u32>,
        owned: bool,
        tag: i64,
    ) -> PyCoreResult<u64> {
        Ok(self.inner.submit_read(ReadRequest {
            file_id,
            file_offset,
            length,
            dst: dst.inner.clone(),
            dst_handle: dst_handle.inner,
            dst_offset,
            priority: lane(priority)?,
            direct: DirectMode::parse(direct)?,
            expect_crc32,
            owned,
            tag,
        })?)
    }

    /// host->host, host->device (copy stream + event), device->host, device->device;
    /// the copy waits for `after` first. Returns the id.
    #[pyo3(signature = (
        src, src_handle, dst, dst_handle, length, *,
        src_offset = 0, dst_offset = 0, priority = 1, owned = true, tag = 0, after = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn submit_copy(
        &self,
        src: &PySlabAllocator,
        src_handle: &PyBlockHandle,
        dst: &PySlabAllocator,
        dst_handle: &PyBlockHandle,
        length: u64,
        src_offset: u64,
        dst_offset: u64,
        priority: i64,
        owned: bool,
        tag: i64,
        after: Option<&PyCudaEvent>,
    ) -> PyCoreResult<u64> {
        Ok(self.inner.submit_copy(CopyRequest {
            src: src.inner.clone(),
            src_handle: src_handle.inner,
            dst: dst.inner.clone(),
            dst_handle: dst_handle.inner,
            length,
            src_offset,
            dst_offset,
            priority: lane(priority)?,
            owned,
            tag,
            after: after.map(|event| event.inner.clone()),
        })?)
    }

    /// True when no part had started (device copies: some part was not issued): see
    /// `TransferEngine::cancel`.
    fn cancel(&self, transfer_id: u64) -> bool {
        self.inner.cancel(transfer_id)
    }

    /// Move a queued transfer's unstarted parts to a more urgent lane.
    fn promote(&self, transfer_id: u64, priority: i64) -> PyCoreResult<bool> {
        Ok(self.inner.promote(transfer_id, lane(priority)?)?)
    }

    fn try_pop(&self) -> Option<PyCompletion> {
        self.inner.try_pop().map(|inner| PyCompletion { inner })
    }

    /// All completions waiting now, and reset the eventfd.
    fn drain(&self) -> Vec<PyCompletion> {
        self.inner
            .drain()
            .into_iter()
            .map(|inner| PyCompletion { inner })
            .collect()
    }

    /// Blocking pop (GIL released) for scripts and tests; asyncio code uses eventfd.
    #[pyo3(signature = (timeout = None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<PyCompletion>> {
        let timeout = match timeout {
            Some(t) if !(t >= 0.0 && t.is_finite()) => {
                return Err(PyValueError::new_err(format!(
                    "timeout must be a finite number >= 0, got {t}"
                )))
            }
            Some(t) => Some(Duration::from_secs_f64(t)),
            None => None,
        };
        Ok(py
            .detach(|| self.inner.wait(timeout))
            .map(|inner| PyCompletion { inner }))
    }

    /// Testing only: the next `count` reads (parts) of `file_id` fail with `errno`.
    #[pyo3(signature = (file_id, errno, count = 1))]
    fn inject_fault(&self, file_id: u64, errno: i32, count: u32) -> PyCoreResult<()> {
        Ok(self.inner.inject_fault(file_id, errno, count)?)
    }

    /// Testing only: arm a fault rule (see `moeflow_core::FaultRule`). After `skip`
    /// matching parts, the next `count` (0: all, until cleared) get the fault `kind`.
    #[pyo3(signature = (
        kind, *, op = "read", file_id = None, offset = None, skip = 0, count = 1,
        errno = 5, delay = 0.0
    ))]
    #[allow(clippy::too_many_arguments)]
    fn add_test_fault(
        &self,
        kind: &str,
        op: &str,
        file_id: Option<u64>,
        offset: Option<u64>,
        skip: u32,
        count: u32,
        errno: i32,
        delay: f64,
    ) -> PyCoreResult<()> {
        Ok(self.inner.add_fault(FaultRule {
            kind: FaultKind::from_name(kind, errno, delay)?,
            op: FaultOp::parse(op)?,
            file_id,
            offset,
            skip,
            count,
        })?)
    }

    /// Testing only: remove every fault rule.
    fn clear_test_faults(&self) {
        self.inner.clear_faults();
    }

    /// Testing only: parts an injected fault has hit since the engine started.
    fn test_fault_hits(&self) -> u64 {
        self.inner.fault_hits()
    }

    /// Transfers submitted and not yet completed.
    fn pending(&self) -> u64 {
        self.inner.pending()
    }

    /// submitted, completed, failed, cancelled, bytes, direct_bytes, busy_nanos,
    /// queued_demand, queued_prefetch, queued_background.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let out = PyDict::new(py);
        out.set_item("submitted", s.submitted)?;
        out.set_item("completed", s.completed)?;
        out.set_item("failed", s.failed)?;
        out.set_item("cancelled", s.cancelled)?;
        out.set_item("bytes", s.bytes)?;
        out.set_item("direct_bytes", s.direct_bytes)?;
        out.set_item("busy_nanos", s.busy_nanos)?;
        out.set_item("queued_demand", s.queued[0])?;
        out.set_item("queued_prefetch", s.queued[1])?;
        out.set_item("queued_background", s.queued[2])?;
        Ok(out)
    }

    /// Cancel what is queued, wait for running parts, stop the workers. Idempotent.
    fn close(&self, py: Python<'_>) {
        py.detach(|| self.inner.close());
    }

    fn __repr__(&self) -> String {
        format!(
            "TransferEngine(workers={}, chunk_size={}, pending={}, closed={})",
            self.inner.workers(),
            self.inner.chunk_size(),
            self.inner.pending(),
            self.inner.is_closed()
        )
    }
}
