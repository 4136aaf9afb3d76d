//! The copy stream a device copy goes to: a CUDA stream or a simulated device's copy
//! engine, behind one interface (stream waits on events, a copy part with an event).

use std::sync::Arc;

use crate::cuda::{CopyStream, DeviceCopy};
use crate::error::{CoreError, CoreResult};
use crate::event::Event;
use crate::sim::SimDevice;

/// The copy stream device copies go to.
#[derive(Debug, Clone)]
pub(crate) enum Backend {
    Cuda(Arc<CopyStream>),
    Sim(Arc<SimDevice>),
}

/// Which device a block lives on.
#[derive(Debug, Clone)]
pub(crate) enum DeviceSide {
    Cuda(i32),
    Sim(Arc<SimDevice>),
}

impl DeviceSide {
    pub(crate) fn same(&self, other: &DeviceSide) -> bool {
        match (self, other) {
            (Self::Cuda(a), Self::Cuda(b)) => a == b,
            (Self::Sim(a), Self::Sim(b)) => a.same(b),
            _ => false,
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Cuda(ordinal) => format!("CUDA device {ordinal}"),
            Self::Sim(_) => "a simulated device".to_owned(),
        }
    }
}

impl Backend {
    pub(crate) fn side(&self) -> DeviceSide {
        match self {
            Self::Cuda(stream) => DeviceSide::Cuda(stream.context().ordinal()),
            Self::Sim(sim) => DeviceSide::Sim(sim.clone()),
        }
    }

    /// A typed error unless `after` can order this stream.
    pub(crate) fn check_after(&self, after: &Event) -> CoreResult<()> {
        match (self, after) {
            (Self::Cuda(_), Event::Cuda(_)) => Ok(()),
            (Self::Sim(sim), event) => event.as_sim_of(sim).map(drop),
            (Self::Cuda(_), Event::Sim(_)) => Err(CoreError::WrongKind(
                "a simulated device's event cannot order a CUDA copy".into(),
            )),
        }
    }

    pub(super) fn wait(&self, after: &Event) -> CoreResult<()> {
        match (self, after) {
            (Self::Cuda(stream), Event::Cuda(event)) => stream.wait_event(event),
            (Self::Sim(sim), event) => sim.stream_wait(event.as_sim_of(sim)?),
            (Self::Cuda(_), Event::Sim(_)) => self.check_after(after),
        }
    }

    /// # Safety
    /// Both ranges valid for `len` bytes in the spaces `kind` names until the event
    /// returned completes.
    pub(super) unsafe fn copy(
        &self,
        kind: DeviceCopy,
        dst: u64,
        src: u64,
        len: u64,
    ) -> CoreResult<Event> {
        match self {
            Self::Cuda(stream) => {
                // SAFETY: forwarded from the caller.
                unsafe { stream.copy_async(kind, dst, src, len as usize) }.map(Event::Cuda)
            }
            // SAFETY: forwarded from the caller; simulated device memory is host memory.
            Self::Sim(sim) => unsafe { sim.copy(dst, src, len) }.map(Event::Sim),
        }
    }
}
