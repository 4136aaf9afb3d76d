//! `SimDevice`: the simulated GPU of the tests (copy engine, events, hazard checker).

use std::sync::Arc;

use moeflow_core::{Event, SimDevice};
use pyo3::prelude::*;

use crate::completion::PyCudaEvent;
use crate::errors::PyCoreResult;

/// A simulated GPU: device arenas in host memory, one copy engine with set bandwidth
/// and latency, CUDA-like events, and a hazard checker fed by `compute_read`.
#[pyclass(module = "moeflow._core", name = "SimDevice", frozen)]
#[derive(Debug)]
pub struct PySimDevice {
    pub(crate) inner: Arc<SimDevice>,
}

#[pymethods]
impl PySimDevice {
    #[new]
    #[pyo3(signature = (*, bandwidth_gbps = 25.0, latency_us = 10.0, check_hazards = true))]
    fn new(bandwidth_gbps: f64, latency_us: f64, check_hazards: bool) -> PyCoreResult<Self> {
        let inner = SimDevice::new(bandwidth_gbps, latency_us, check_hazards)?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    #[getter]
    fn bandwidth_gbps(&self) -> f64 {
        self.inner.bandwidth_gbps()
    }

    #[getter]
    fn latency_us(&self) -> f64 {
        self.inner.latency_us()
    }

    #[getter]
    fn check_hazards(&self) -> bool {
        self.inner.check_hazards()
    }

    /// Hazards seen so far.
    #[getter]
    fn hazards(&self) -> u64 {
        self.inner.hazards()
    }

    #[getter]
    fn last_hazard(&self) -> Option<String> {
        self.inner.last_hazard()
    }

    /// Bytes that landed in (or left) simulated device memory.
    #[getter]
    fn bytes_copied(&self) -> u64 {
        self.inner.bytes_copied()
    }

    /// Time the copy engine was busy (latency included).
    #[getter]
    fn busy_seconds(&self) -> f64 {
        self.inner.busy_seconds()
    }

    /// Compute is about to read the range: HazardError when a byte is poison, its copy
    /// has not landed, or nothing orders compute after that copy.
    fn compute_read(&self, address: u64, length: u64) -> PyCoreResult<()> {
        Ok(self.inner.compute_read(address, length)?)
    }

    /// An event after all compute so far; pass it as a copy's `after`.
    fn record_compute(&self) -> PyCudaEvent {
        PyCudaEvent {
            inner: Arc::new(Event::Sim(self.inner.record_compute())),
        }
    }

    /// The compute stream waits on `event`: blocks until it completed (GIL released).
    fn wait(&self, py: Python<'_>, event: &PyCudaEvent) -> PyCoreResult<()> {
        let sim_event = event.inner.as_sim_of(&self.inner)?;
        py.detach(|| self.inner.wait(sim_event))?;
        Ok(())
    }

    /// The host synchronised the compute stream: every read so far is retired.
    fn synchronize(&self) {
        self.inner.synchronize();
    }

    fn __repr__(&self) -> String {
        format!(
            "SimDevice(bandwidth_gbps={}, latency_us={}, hazards={}, bytes_copied={})",
            self.inner.bandwidth_gbps(),
            self.inner.latency_us(),
            self.inner.hazards(),
            self.inner.bytes_copied()
        )
    }
}
