//! A simulated GPU for tests: device memory in host RAM, one copy-engine thread with
//! set bandwidth and latency standing in for one FIFO copy stream, CUDA-like events
//! and stream waits, and a hazard checker over the bytes of its arenas.
//!
//! Compute is torch on the CPU, so it is synchronous: its events complete at once and
//! it reports what it reads (`compute_read`) instead of the checker seeing kernels.
//! Edges from the copy stream to compute come from `wait`, an event's `synchronize`
//! or `query` returning true, or a popped 'done' completion; edges from compute to
//! the copy stream from a copy's `after` event (a stream wait) or `synchronize`.

mod engine;
mod hazard;

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{CoreError, CoreResult};
use hazard::{Checker, Clocks};

/// One copy part queued on the simulated copy stream.
#[derive(Debug, Clone, Copy)]
struct Part {
    seq: u64,
    dst: u64,
    src: u64,
    len: u64,
    enqueued: Instant,
}

#[derive(Debug)]
struct SimState {
    queue: VecDeque<Part>,
    /// Sequence number of the last copy part issued (parts count from 1).
    issued: u64,
    clocks: Clocks,
    /// The compute epoch reads happen in now.
    epoch: u64,
    /// When the copy engine finishes what it was given.
    free_at: Option<Instant>,
    checker: Checker,
    hazards: u64,
    last_hazard: Option<String>,
    bytes_copied: u64,
    busy: Duration,
    shutdown: bool,
}

/// State shared by a device, its copy-engine thread and its events.
#[derive(Debug)]
pub struct SimShared {
    bandwidth_gbps: f64,
    latency: Duration,
    check: bool,
    state: Mutex<SimState>,
    /// The copy engine waits here for parts.
    work: Condvar,
    /// Event waiters wait here for parts to land.
    landed: Condvar,
}

impl SimShared {
    fn lock(&self) -> MutexGuard<'_, SimState> {
        // Every critical section leaves the state consistent; a panic cannot tear it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Blocks until copy part `seq` landed.
    fn wait_landed(&self, seq: u64) -> MutexGuard<'_, SimState> {
        let mut state = self.lock();
        while state.clocks.landed < seq {
            state = self
                .landed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state
    }

    fn record_hazard(&self, state: &mut SimState, err: &CoreError) {
        state.hazards += 1;
        state.last_hazard = Some(err.to_string());
    }
}

/// The simulated GPU (see the module docs).
#[derive(Debug)]
pub struct SimDevice {
    shared: Arc<SimShared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl SimDevice {
    /// A device whose copy engine moves `bandwidth_gbps` GB/s (1e9 bytes) and pays
    /// `latency_us` per part; `check_hazards` turns the checker on.
    pub fn new(bandwidth_gbps: f64, latency_us: f64, check_hazards: bool) -> CoreResult<Self> {
        if !(bandwidth_gbps.is_finite() && bandwidth_gbps > 0.0) {
            return Err(CoreError::invalid(format!(
                "bandwidth_gbps must be a finite number > 0, got {bandwidth_gbps}"
            )));
        }
        if !(latency_us.is_finite() && latency_us >= 0.0) {
            return Err(CoreError::invalid(format!(
                "latency_us must be a finite number >= 0, got {latency_us}"
            )));
        }
        let shared = Arc::new(SimShared {
            bandwidth_gbps,
            latency: Duration::from_secs_f64(latency_us * 1e-6),
            check: check_hazards,
            state: Mutex::new(SimState {
                queue: VecDeque::new(),
                issued: 0,
                clocks: Clocks {
                    landed: 0,
                    known: 0,
                    fence: 0,
                    retired: 0,
                },
                epoch: 0,
                free_at: None,
                checker: Checker::default(),
                hazards: 0,
                last_hazard: None,
                bytes_copied: 0,
                busy: Duration::ZERO,
                shutdown: false,
            }),
            work: Condvar::new(),
            landed: Condvar::new(),
        });
        let engine_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("moeflow-sim-copy".into())
            .spawn(move || engine::run(&engine_shared))
            .map_err(|err| {
                CoreError::io(
                    "spawn",
                    None,
                    err.raw_os_error().unwrap_or(libc::EAGAIN),
                    None,
                    None,
                )
            })?;
        Ok(Self {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Copy bandwidth in GB/s.
    pub fn bandwidth_gbps(&self) -> f64 {
        self.shared.bandwidth_gbps
    }

    /// Latency of each copy part in microseconds.
    pub fn latency_us(&self) -> f64 {
        self.shared.latency.as_secs_f64() * 1e6
    }

    /// True when the hazard checker is on.
    pub fn check_hazards(&self) -> bool {
        self.shared.check
    }

    /// Hazards seen so far.
    pub fn hazards(&self) -> u64 {
        self.shared.lock().hazards
    }

    /// The message of the last hazard.
    pub fn last_hazard(&self) -> Option<String> {
        self.shared.lock().last_hazard.clone()
    }

    /// Bytes that landed.
    pub fn bytes_copied(&self) -> u64 {
        self.shared.lock().bytes_copied
    }

    /// Time the copy engine spent moving bytes (latency included).
    pub fn busy_seconds(&self) -> f64 {
        self.shared.lock().busy.as_secs_f64()
    }

    /// Compute is about to read the range: a HazardError unless every byte was
    /// written by a copy that landed and that compute is ordered after.
    pub fn compute_read(&self, address: u64, length: u64) -> CoreResult<()> {
        if !self.shared.check {
            return Ok(());
        }
        let mut state = self.shared.lock();
        let (epoch, clocks) = (state.epoch, state.clocks);
        let result = state.checker.read(address, length, epoch, clocks);
        if let Err(err @ CoreError::Hazard { .. }) = &result {
            self.shared.record_hazard(&mut state, err);
        }
        result
    }

    /// An event after all compute so far (complete at once: compute is synchronous);
    /// a copy waiting on it is ordered after every read reported before.
    pub fn record_compute(&self) -> SimEvent {
        let mut state = self.shared.lock();
        state.epoch += 1;
        SimEvent {
            shared: self.shared.clone(),
            mark: Mark::Compute(state.epoch),
        }
    }

    /// The compute stream waits on `event`: blocks until it completed, and orders
    /// the compute that follows after it.
    pub fn wait(&self, event: &SimEvent) -> CoreResult<()> {
        self.check_own(event)?;
        event.synchronize();
        Ok(())
    }

    /// The host synchronised the compute stream: every read so far is retired.
    pub fn synchronize(&self) {
        let mut state = self.shared.lock();
        state.epoch += 1;
        state.clocks.retired = state.epoch;
    }

    fn check_own(&self, event: &SimEvent) -> CoreResult<()> {
        if Arc::ptr_eq(&event.shared, &self.shared) {
            Ok(())
        } else {
            Err(CoreError::invalid(
                "the event belongs to another simulated device",
            ))
        }
    }

    /// True when `other` is this device.
    pub fn same(&self, other: &SimDevice) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    pub(crate) fn register_arena(&self, base: u64, size: u64) {
        self.shared.lock().checker.register(base, size);
    }

    pub(crate) fn unregister_arena(&self, base: u64) {
        self.shared.lock().checker.unregister(base);
    }

    /// A block of one of its arenas was freed: its bytes are poison again, for the
    /// checker and in memory (so a read of a reused block shows NaN even unchecked).
    pub(crate) fn poison(&self, address: u64, length: u64) {
        let mut state = self.shared.lock();
        if state.checker.covers(address, length) {
            state.checker.poison(address, length);
            // SAFETY: the range lies inside a registered arena, which stays mapped
            // until it unregisters; a freed block was unpinned, so no copy writes it.
            unsafe {
                std::ptr::write_bytes(
                    address as *mut u8,
                    crate::arena::SIM_POISON,
                    length as usize,
                )
            };
        }
    }

    /// The copy stream waits on `event` before any later part.
    pub(crate) fn stream_wait(&self, event: &SimEvent) -> CoreResult<()> {
        self.check_own(event)?;
        if let Mark::Compute(epoch) = event.mark {
            // Compute events complete at once; copy events of this one FIFO stream
            // are behind us already, so only the compute edge needs recording.
            let mut state = self.shared.lock();
            state.clocks.fence = state.clocks.fence.max(epoch);
        }
        Ok(())
    }

    /// Queues a copy part and returns the event recorded after it. Fails with a
    /// HazardError (nothing queued) when it would overwrite bytes compute may read.
    ///
    /// # Safety
    /// `src` and `dst` must be valid for `len` bytes until the event completes, and
    /// `dst` written by nothing else meanwhile.
    pub(crate) unsafe fn copy(&self, dst: u64, src: u64, len: u64) -> CoreResult<SimEvent> {
        let mut state = self.shared.lock();
        let seq = state.issued + 1;
        if self.shared.check && len > 0 && state.checker.covers(dst, len) {
            let clocks = state.clocks;
            if let Err(err) = state.checker.write(dst, len, seq, clocks) {
                self.shared.record_hazard(&mut state, &err);
                return Err(err);
            }
        }
        state.issued = seq;
        state.queue.push_back(Part {
            seq,
            dst,
            src,
            len,
            enqueued: Instant::now(),
        });
        self.shared.work.notify_one();
        Ok(SimEvent {
            shared: self.shared.clone(),
            mark: Mark::Copy(seq),
        })
    }
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.work.notify_all();
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            // The engine finishes the parts it holds, then exits.
            let _ = thread.join();
        }
    }
}

/// Where an event sits: after a copy part, or after a compute epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    Copy(u64),
    Compute(u64),
}

/// An event of the simulated device (behind the Python `CudaEvent` class).
#[derive(Debug)]
pub struct SimEvent {
    shared: Arc<SimShared>,
    mark: Mark,
}

impl SimEvent {
    /// True when the work before it completed; the caller then knows it (an edge).
    pub fn query(&self) -> bool {
        match self.mark {
            Mark::Compute(_) => true,
            Mark::Copy(seq) => {
                let mut state = self.shared.lock();
                let done = state.clocks.landed >= seq;
                if done {
                    state.clocks.known = state.clocks.known.max(seq);
                }
                done
            }
        }
    }

    /// Blocks until it completed; compute that follows is ordered after it.
    pub fn synchronize(&self) {
        if let Mark::Copy(seq) = self.mark {
            let mut state = self.shared.wait_landed(seq);
            state.clocks.known = state.clocks.known.max(seq);
        }
    }

    /// Blocks until it completed, establishing no edge (the engine's own waits).
    pub(crate) fn wait_quietly(&self) {
        if let Mark::Copy(seq) = self.mark {
            drop(self.shared.wait_landed(seq));
        }
    }

    /// True when the event belongs to `device`.
    pub fn belongs_to(&self, device: &SimDevice) -> bool {
        Arc::ptr_eq(&self.shared, &device.shared)
    }
}
