//! State shared by an engine handle and its workers: lanes, completions, the
//! registry of transfers in flight, files and counters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::queue::{Doorbell, PriorityLanes};
use crate::sim::SimDevice;
use crate::transfer::completion::{Completion, CompletionQueue, Status};
use crate::transfer::device::DeviceQueue;
use crate::transfer::faults::FaultPlan;
use crate::transfer::files::FileTable;
use crate::transfer::task::Transfer;
use crate::transfer::worker::Job;
use crate::PRIORITY_LANES;

/// Running totals of an engine.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) submitted: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) direct_bytes: AtomicU64,
    pub(crate) busy_nanos: AtomicU64,
}

/// A snapshot of an engine's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineStats {
    pub submitted: u64,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub bytes: u64,
    pub direct_bytes: u64,
    /// Read workers' time on parts, plus the copy stream's busy time (device copies).
    pub busy_nanos: u64,
    /// Queue entries waiting per lane (demand, prefetch, background).
    pub queued: [u64; PRIORITY_LANES],
}

/// Transfers in flight by id; `closing` is flipped under the same lock so no
/// transfer can slip in after `close` swept the table.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    pub(crate) closing: bool,
    pub(crate) transfers: HashMap<u64, Arc<Transfer>>,
}

/// State shared by the engine handle and its workers.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) lanes: PriorityLanes<Job>,
    pub(crate) doorbell: Doorbell,
    pub(crate) completions: CompletionQueue,
    pub(crate) shutdown: AtomicBool,
    pub(crate) stats: Counters,
    pub(crate) registry: Mutex<Registry>,
    pub(crate) files: FileTable,
    /// Injected faults (tests only).
    pub(crate) faults: FaultPlan,
    pub(crate) pending: AtomicU64,
    pub(crate) next_id: AtomicU64,
    /// Workers running a speculative (prefetch or background) part, at most
    /// `speculative_limit` (one): the other workers stay free for demand parts, and a
    /// device that serves requests in order (a disk queue) has at most one speculative part
    /// ahead of a demand part.
    pub(crate) speculative_running: AtomicUsize,
    pub(crate) speculative_limit: usize,
    /// The most speculative parts ever running at once (for tests).
    pub(crate) speculative_high_water: AtomicUsize,
    /// The CUDA device this engine copies for, when fixed at creation.
    pub(crate) device: Option<i32>,
    /// The simulated device this engine copies for, when fixed at creation.
    pub(crate) sim: Option<Arc<SimDevice>>,
    /// Where device copies go; made with the engine's device or on first use.
    pub(crate) device_queue: Mutex<Option<Arc<DeviceQueue>>>,
}

impl Shared {
    pub(crate) fn registry(&self) -> MutexGuard<'_, Registry> {
        // Only map operations and a flag run under this lock: never torn.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn device_queue(&self) -> Option<Arc<DeviceQueue>> {
        self.device_queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Posts the final completion of `transfer` and forgets it.
    pub(crate) fn finish(&self, transfer: &Transfer, completion: Completion) {
        self.registry().transfers.remove(&transfer.id);
        let counter = match completion.status {
            Status::Done => &self.stats.completed,
            Status::Failed => &self.stats.failed,
            Status::Cancelled | Status::Issued => &self.stats.cancelled,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.pending.fetch_sub(1, Ordering::AcqRel);
        self.completions.post(completion);
    }
}
