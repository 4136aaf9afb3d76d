//! `Completion` (what a transfer reports) and `CudaEvent` (the event of a device copy).

use std::sync::Arc;

use moeflow_core::{Completion, Event};
use pyo3::prelude::*;

use crate::errors::{to_pyerr, PyCoreResult};

/// What a finished (or cancelled) transfer reports.
#[pyclass(module = "moeflow._core", name = "Completion", frozen)]
#[derive(Debug)]
pub struct PyCompletion {
    pub(crate) inner: Completion,
}

#[pymethods]
impl PyCompletion {
    #[getter]
    fn id(&self) -> u64 {
        self.inner.id
    }

    /// 'issued' is posted for device copies when the copy is queued on the copy
    /// stream (event set), before 'done'.
    #[getter]
    fn status(&self) -> &'static str {
        self.inner.status.as_str()
    }

    #[getter]
    fn bytes(&self) -> u64 {
        self.inner.bytes
    }

    /// Nanoseconds from the first part starting to the last finishing (0 if never started).
    #[getter]
    fn nanos(&self) -> u64 {
        self.inner.nanos
    }

    /// Nanoseconds from submission to the first part starting.
    #[getter]
    fn queued_nanos(&self) -> u64 {
        self.inner.queued_nanos
    }

    /// Some part used O_DIRECT.
    #[getter]
    fn direct(&self) -> bool {
        self.inner.direct
    }

    /// The caller's tag given at submission.
    #[getter]
    fn tag(&self) -> i64 {
        self.inner.tag
    }

    #[getter]
    fn event(&self) -> Option<PyCudaEvent> {
        self.inner.event.clone().map(|inner| PyCudaEvent { inner })
    }

    /// The typed exception for a failed transfer (not raised).
    fn error(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.inner
            .error
            .as_ref()
            .map(|err| to_pyerr(py, err).into_value(py).into_any())
    }

    fn __repr__(&self) -> String {
        let c = &self.inner;
        format!(
            "Completion(id={}, status={:?}, bytes={}, nanos={}, direct={}, tag={})",
            c.id,
            c.status.as_str(),
            c.bytes,
            c.nanos,
            c.direct,
            c.tag
        )
    }
}

/// An event: after a device copy on the engine's copy stream, recorded on a caller's
/// stream, or of a simulated device (one class for both kinds).
#[pyclass(module = "moeflow._core", name = "CudaEvent", frozen)]
#[derive(Debug)]
pub struct PyCudaEvent {
    pub(crate) inner: Arc<Event>,
}

#[pymethods]
impl PyCudaEvent {
    fn query(&self) -> PyCoreResult<bool> {
        Ok(self.inner.query()?)
    }

    fn synchronize(&self, py: Python<'_>) -> PyCoreResult<()> {
        Ok(py.detach(|| self.inner.synchronize())?)
    }

    /// cuStreamWaitEvent(stream, event): make `stream` (a CUstream pointer, e.g.
    /// torch.cuda.current_stream().cuda_stream) wait for this event. A simulated
    /// event ignores `stream` and does `SimDevice.wait(event)`.
    fn wait_on(&self, py: Python<'_>, stream: usize) -> PyCoreResult<()> {
        Ok(py.detach(|| self.inner.wait_on(stream))?)
    }

    /// True for an event of a simulated device.
    #[getter]
    fn simulated(&self) -> bool {
        matches!(*self.inner, Event::Sim(_))
    }

    fn __repr__(&self) -> String {
        let kind = if self.simulated() {
            "simulated"
        } else {
            "cuda"
        };
        format!("CudaEvent({kind})")
    }
}
