//! The event of a device copy: a CUDA event, or an event of the simulated device;
//! Python sees both as one `CudaEvent` class.

use std::sync::Arc;

use crate::cuda::{CudaEvent, PrimaryContext};
use crate::error::{CoreError, CoreResult};
use crate::sim::{SimDevice, SimEvent};

/// A CUDA event or a simulated one.
#[derive(Debug)]
pub enum Event {
    Cuda(CudaEvent),
    Sim(SimEvent),
}

impl Event {
    /// True when the work before the event has finished.
    pub fn query(&self) -> CoreResult<bool> {
        match self {
            Self::Cuda(event) => event.query(),
            Self::Sim(event) => Ok(event.query()),
        }
    }

    /// Blocks until the event has completed.
    pub fn synchronize(&self) -> CoreResult<()> {
        match self {
            Self::Cuda(event) => event.synchronize(),
            Self::Sim(event) => {
                event.synchronize();
                Ok(())
            }
        }
    }

    /// Makes `stream` wait for the event. A simulated event has one compute stream,
    /// so `stream` is ignored and this is `SimDevice::wait`.
    pub fn wait_on(&self, stream: usize) -> CoreResult<()> {
        match self {
            Self::Cuda(event) => event.wait_on(stream),
            Self::Sim(event) => {
                event.synchronize();
                Ok(())
            }
        }
    }

    /// Blocks until complete without telling the simulated compute stream (the
    /// transfer engine's own waits are not compute's).
    pub(crate) fn wait_quietly(&self) -> CoreResult<()> {
        match self {
            Self::Cuda(event) => event.synchronize(),
            Self::Sim(event) => {
                event.wait_quietly();
                Ok(())
            }
        }
    }

    /// The host learned that the event completed (a popped 'done' completion).
    pub(crate) fn observed(&self) {
        if let Self::Sim(event) = self {
            // Complete already: this only records the edge.
            event.synchronize();
        }
    }

    /// The simulated event, if it belongs to `device`; a typed error otherwise.
    pub fn as_sim_of(&self, device: &SimDevice) -> CoreResult<&SimEvent> {
        match self {
            Self::Sim(event) if event.belongs_to(device) => Ok(event),
            Self::Sim(_) => Err(CoreError::invalid(
                "the event belongs to another simulated device",
            )),
            Self::Cuda(_) => Err(CoreError::WrongKind(
                "a CUDA event cannot order work of a simulated device".into(),
            )),
        }
    }
}

/// Records an event on a caller's CUDA stream (e.g. torch's current stream) in the
/// primary context of device `ordinal`.
pub fn record_cuda_event(stream: usize, ordinal: i32) -> CoreResult<Arc<Event>> {
    let ctx = PrimaryContext::retain(ordinal)?;
    Ok(Arc::new(Event::Cuda(CudaEvent::record(ctx, stream)?)))
}
