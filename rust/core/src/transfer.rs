//! The transfer engine: worker threads fed by lock-free priority lanes, moving bytes
//! file -> host, host -> host and between host and device, and reporting through a
//! lock-free completion queue signalled on an eventfd.
//!
//! A transfer larger than `chunk_size` is split into parts that any worker may take,
//! which keeps several reads in flight on one file (queue depth for the disk) and
//! spreads a big memcpy over cores. Blocks involved are pinned from submission to
//! the end; an owned destination is freed when its transfer fails or is cancelled.
//! Calls never block on I/O; only [`TransferEngine::wait`] and `close` wait.

mod backend;
mod completion;
mod device;
mod faults;
mod files;
mod request;
mod shared;
mod task;
mod worker;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

pub use completion::{Completion, Status};
pub use device::SPECULATIVE_PART as SPECULATIVE_PART_BYTES;
pub use faults::{FaultKind, FaultOp, FaultRule};
pub use request::{CopyRequest, DirectMode, ReadRequest};
pub use shared::EngineStats;

use crate::cuda::{CopyStream, PrimaryContext};
use crate::error::{CoreError, CoreResult};
use crate::notify::EventFd;
use crate::queue::{Doorbell, PriorityLanes};
use crate::sim::SimDevice;
use crate::DIRECT_IO_ALIGN;
use completion::CompletionQueue;
use device::{Backend, DeviceQueue, DeviceSide};
use faults::FaultPlan;
use files::FileTable;
pub(crate) use shared::Shared;
use shared::{Counters, Registry};
use task::{Op, Transfer};
use worker::Job;

/// The transfer engine (see the module docs).
#[derive(Debug)]
pub struct TransferEngine {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    workers: usize,
    chunk_size: u64,
}

impl TransferEngine {
    /// Starts `workers` threads. `chunk_size` (a multiple of 4096) is the largest
    /// part; `device` creates the CUDA copy stream now (else on first device copy).
    pub fn new(workers: usize, chunk_size: u64, device: Option<i32>) -> CoreResult<Self> {
        Self::with_sim(workers, chunk_size, device, None)
    }

    /// As [`TransferEngine::new`]; with `sim`, device copies go to that simulated
    /// device's copy engine (its arenas only), and `device` must be None.
    pub fn with_sim(
        workers: usize,
        chunk_size: u64,
        device: Option<i32>,
        sim: Option<Arc<SimDevice>>,
    ) -> CoreResult<Self> {
        if device.is_some() && sim.is_some() {
            return Err(CoreError::invalid(
                "device and sim are exclusive: an engine copies for one device",
            ));
        }
        if !(1..=256).contains(&workers) {
            return Err(CoreError::invalid(format!(
                "workers must be in 1..=256, got {workers}"
            )));
        }
        if chunk_size == 0 || chunk_size % DIRECT_IO_ALIGN != 0 {
            return Err(CoreError::invalid(format!(
                "chunk_size must be a positive multiple of {DIRECT_IO_ALIGN}, got {chunk_size}"
            )));
        }
        let backend = match (device, &sim) {
            (Some(ordinal), _) => Some(Backend::Cuda(Arc::new(CopyStream::new(
                PrimaryContext::retain(ordinal)?,
            )?))),
            (None, Some(sim)) => Some(Backend::Sim(sim.clone())),
            (None, None) => None,
        };
        let eventfd = EventFd::new().map_err(|e| {
            CoreError::io(
                "eventfd",
                None,
                e.raw_os_error().unwrap_or(libc::EIO),
                None,
                None,
            )
        })?;
        let (doorbell, parkers) = Doorbell::new(workers);
        let shared = Arc::new(Shared {
            lanes: PriorityLanes::new(),
            doorbell,
            completions: CompletionQueue::new(eventfd),
            shutdown: AtomicBool::new(false),
            stats: Counters::default(),
            registry: Mutex::new(Registry::default()),
            files: FileTable::default(),
            faults: FaultPlan::default(),
            pending: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            speculative_running: AtomicUsize::new(0),
            // One speculative part at a time: a disk serves reads about in order (measured on
            // this project's machines: four reads at once take four times as long each), so
            // each speculative read running is one a demand read may wait behind.
            speculative_limit: 1,
            speculative_high_water: AtomicUsize::new(0),
            device,
            sim,
            device_queue: Mutex::new(None),
        });
        if let Some(backend) = backend {
            let queue = DeviceQueue::start(backend, chunk_size, &shared)?;
            *shared
                .device_queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(queue);
        }
        let mut threads = Vec::with_capacity(workers);
        for (index, parker) in parkers.into_iter().enumerate() {
            let worker_shared = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("moeflow-io-{index}"))
                .spawn(move || worker::run(worker_shared, index, parker));
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(err) => {
                    let engine = Self {
                        shared,
                        threads: Mutex::new(threads),
                        workers,
                        chunk_size,
                    };
                    engine.close();
                    return Err(CoreError::io(
                        "spawn",
                        None,
                        err.raw_os_error().unwrap_or(libc::EAGAIN),
                        None,
                        None,
                    ));
                }
            }
        }
        Ok(Self {
            shared,
            threads: Mutex::new(threads),
            workers,
            chunk_size,
        })
    }

    /// Readable when completions are waiting.
    pub fn eventfd(&self) -> RawFd {
        self.shared.completions.eventfd().as_raw_fd()
    }

    /// Number of worker threads.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Largest part of a transfer, in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Opens `path` (buffered, and O_DIRECT where the filesystem allows).
    pub fn register_file(&self, path: &str) -> CoreResult<u64> {
        self.shared.files.register(path)
    }

    /// Forgets a file; transfers already submitted keep reading it.
    pub fn unregister_file(&self, file_id: u64) -> CoreResult<()> {
        self.shared.files.unregister(file_id)
    }

    /// Current size of a registered file.
    pub fn file_size(&self, file_id: u64) -> CoreResult<u64> {
        self.shared.files.get(file_id)?.size()
    }

    /// True when the registered file can be read with O_DIRECT.
    pub fn file_supports_direct(&self, file_id: u64) -> CoreResult<bool> {
        Ok(self.shared.files.get(file_id)?.supports_direct())
    }

    /// Submits a file -> host read; returns its id.
    pub fn submit_read(&self, request: ReadRequest) -> CoreResult<u64> {
        let file = self.shared.files.get(request.file_id)?;
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let transfer = request.prepare(id, file, self.chunk_size)?;
        self.enqueue(transfer)
    }

    /// Submits a copy between blocks (host/device in any direction); returns its id.
    pub fn submit_copy(&self, request: CopyRequest) -> CoreResult<u64> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (transfer, queue) =
            request.prepare(id, self.chunk_size, |side| self.device_queue_for(side))?;
        match queue {
            Some(queue) => self.register(transfer).map(|transfer| {
                queue.submit(transfer.clone());
                transfer.id
            }),
            None => self.enqueue(transfer),
        }
    }

    /// The device queue for copies touching `side`, made on first use.
    fn device_queue_for(&self, side: DeviceSide) -> CoreResult<Arc<DeviceQueue>> {
        let fixed = match (self.shared.device, &self.shared.sim) {
            (Some(ordinal), _) => Some(DeviceSide::Cuda(ordinal)),
            (None, Some(sim)) => Some(DeviceSide::Sim(sim.clone())),
            (None, None) => None,
        };
        let mismatch = |engine: &DeviceSide| {
            CoreError::invalid(format!(
                "the engine copies for {}, the block is on {}",
                engine.describe(),
                side.describe()
            ))
        };
        if let Some(engine) = fixed.filter(|engine| !engine.same(&side)) {
            return Err(mismatch(&engine));
        }
        let mut slot = self
            .shared
            .device_queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(queue) = slot.as_ref() {
            let engine = queue.backend.side();
            return if engine.same(&side) {
                Ok(queue.clone())
            } else {
                Err(mismatch(&engine))
            };
        }
        if self.shared.registry().closing {
            // A queue started now would never be stopped.
            return Err(CoreError::EngineClosed);
        }
        let backend = match &side {
            DeviceSide::Cuda(ordinal) => Backend::Cuda(Arc::new(CopyStream::new(
                PrimaryContext::retain(*ordinal)?,
            )?)),
            DeviceSide::Sim(sim) => Backend::Sim(sim.clone()),
        };
        let queue = DeviceQueue::start(backend, self.chunk_size, &self.shared)?;
        *slot = Some(queue.clone());
        Ok(queue)
    }

    /// Registers a pinned transfer as in flight; undoes the pins if closed.
    fn register(&self, transfer: Transfer) -> CoreResult<Arc<Transfer>> {
        let transfer = Arc::new(transfer);
        {
            let mut registry = self.shared.registry();
            if registry.closing {
                drop(registry);
                transfer.abandon();
                return Err(CoreError::EngineClosed);
            }
            registry.transfers.insert(transfer.id, transfer.clone());
        }
        self.shared.stats.submitted.fetch_add(1, Ordering::Relaxed);
        self.shared.pending.fetch_add(1, Ordering::AcqRel);
        Ok(transfer)
    }

    /// Registers a pinned transfer and queues its parts on the worker lanes.
    fn enqueue(&self, transfer: Transfer) -> CoreResult<u64> {
        let transfer = self.register(transfer)?;
        let priority = transfer.priority.load(Ordering::Relaxed);
        let parts = transfer.part_count();
        for part in 0..parts {
            self.shared.lanes.push(
                priority,
                Job {
                    transfer: transfer.clone(),
                    part,
                },
            );
        }
        self.shared.doorbell.wake(parts as usize);
        Ok(transfer.id)
    }

    fn lookup(&self, id: u64) -> Option<Arc<Transfer>> {
        self.shared.registry().transfers.get(&id).cloned()
    }

    /// Cancels a transfer none of whose parts started: its pins are released now (its
    /// block freed if owned) and a 'cancelled' completion is posted. False otherwise.
    /// A device copy is cancellable while some part is not issued: those parts are
    /// dropped and it ends 'cancelled' once the issued ones landed (`bytes` says how
    /// many), freeing an owned destination then.
    pub fn cancel(&self, id: u64) -> bool {
        let Some(transfer) = self.lookup(id) else {
            return false;
        };
        if matches!(transfer.op, Op::Device { .. }) {
            return self
                .shared
                .device_queue()
                .is_some_and(|queue| queue.cancel(&self.shared, id));
        }
        if !transfer.try_cancel() {
            return false;
        }
        // The queue entries stay behind and are skipped when popped.
        self.shared.finish(&transfer, transfer.finalize_cancelled());
        true
    }

    /// Moves the unstarted parts of a queued transfer to a more urgent lane; the
    /// entries left in the old lane are skipped when popped. True when moved.
    pub fn promote(&self, id: u64, priority: u8) -> CoreResult<bool> {
        request::check_priority(priority)?;
        let Some(transfer) = self.lookup(id) else {
            return Ok(false);
        };
        let old = transfer.priority.fetch_min(priority, Ordering::AcqRel);
        if priority >= old {
            return Ok(false);
        }
        if matches!(transfer.op, Op::Device { .. }) {
            return Ok(self
                .shared
                .device_queue()
                .is_some_and(|queue| queue.promote(id, priority)));
        }
        let mut moved = 0;
        for part in transfer.unclaimed_parts() {
            self.shared.lanes.push(
                priority,
                Job {
                    transfer: transfer.clone(),
                    part,
                },
            );
            moved += 1;
        }
        self.shared.doorbell.wake(moved);
        Ok(moved > 0)
    }

    /// A waiting completion, if any (never blocks).
    pub fn try_pop(&self) -> Option<Completion> {
        self.shared.completions.try_pop().map(Completion::observed)
    }

    /// Every waiting completion; resets the eventfd first.
    pub fn drain(&self) -> Vec<Completion> {
        let mut completions = self.shared.completions.drain();
        completions.iter_mut().for_each(|c| c.observe());
        completions
    }

    /// Blocks until a completion arrives or `timeout` passes.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<Completion> {
        self.shared
            .completions
            .wait(timeout)
            .map(Completion::observed)
    }

    /// The most speculative (prefetch or background) parts that ever ran at once: at most
    /// one, so a demand part waits behind at most one speculative part.
    pub fn speculative_high_water(&self) -> usize {
        self.shared.speculative_high_water.load(Ordering::Relaxed)
    }

    /// Transfers submitted and not yet finished.
    pub fn pending(&self) -> u64 {
        self.shared.pending.load(Ordering::Acquire)
    }

    /// Completions waiting to be popped.
    pub fn completions_waiting(&self) -> usize {
        self.shared.completions.len()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> EngineStats {
        let s = &self.shared.stats;
        EngineStats {
            submitted: s.submitted.load(Ordering::Relaxed),
            completed: s.completed.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            cancelled: s.cancelled.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            direct_bytes: s.direct_bytes.load(Ordering::Relaxed),
            busy_nanos: s.busy_nanos.load(Ordering::Relaxed),
            queued: {
                let device = self.shared.device_queue().map(|queue| queue.queued());
                std::array::from_fn(|lane| {
                    let on_device = device.map_or(0, |queued| queued[lane]);
                    (self.shared.lanes.len(lane as u8) + on_device) as u64
                })
            },
        }
    }

    /// True once `close` has begun.
    pub fn is_closed(&self) -> bool {
        self.shared.registry().closing
    }

    /// Cancels what is queued, lets running transfers finish, stops the workers.
    /// Idempotent; completions stay available to pop afterwards.
    pub fn close(&self) {
        let unstarted: Vec<u64> = {
            let mut registry = self.shared.registry();
            registry.closing = true;
            registry.transfers.keys().copied().collect()
        };
        for id in unstarted {
            self.cancel(id);
        }
        self.shared.shutdown.store(true, Ordering::Release);
        self.shared.doorbell.wake_all();
        let threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for handle in threads {
            // A worker that panicked outside a part (a bug) has nothing left to clean.
            let _ = handle.join();
        }
        if let Some(queue) = self.shared.device_queue() {
            // Its unissued parts were cancelled above; the issued ones land first.
            queue.stop();
        }
    }
}

impl Drop for TransferEngine {
    fn drop(&mut self) {
        self.close();
    }
}
