//! Device copies: one issuer thread feeding the one FIFO copy stream (CUDA or
//! simulated) part by part, and one completer thread following the events.
//!
//! Parts are cut as they are issued: demand (lane 0) parts of at most `chunk` bytes
//! are issued at once; speculative (prefetch, background) parts of at most
//! min(chunk, 8 MiB), one at a time, and only while no demand part waits. A demand
//! copy therefore waits behind at most one bounded speculative part on the stream.
//! The transfer's event is the one recorded after its last part; 'issued' is posted
//! then, 'done' once that event completed. Cancel and promote act on unissued parts.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

mod complete;

use crate::error::{CoreError, CoreResult};
use crate::event::Event;
pub(crate) use crate::transfer::backend::{Backend, DeviceSide};
use crate::transfer::completion::{Completion, Status};
use crate::transfer::faults::{panic_error, FaultKind, PartSite, INJECTED_PANIC};
use crate::transfer::task::{Op, Transfer};
use crate::transfer::Shared;
use crate::{PRIORITY_DEMAND, PRIORITY_LANES};
use complete::{finish, Landing};

/// Largest speculative part: what a demand copy may find ahead of it on the stream.
pub const SPECULATIVE_PART: u64 = 8 << 20;

/// Why a transfer stops before all its parts ran.
#[derive(Debug)]
enum End {
    Cancelled,
    Failed(CoreError),
}

/// How far one transfer got.
#[derive(Debug)]
struct Progress {
    transfer: Arc<Transfer>,
    lane: usize,
    /// Bytes issued so far (the next part starts here).
    next: u64,
    in_flight: u32,
    landed: u64,
    end: Option<End>,
}

/// One issued part, in stream order.
#[derive(Debug)]
struct Marker {
    id: u64,
    len: u64,
    event: Landing,
    speculative: bool,
    issued: Instant, // when it was queued on the stream (its copy starts then or after the one before)
}

#[derive(Debug, Default)]
struct QueueState {
    lanes: [VecDeque<u64>; PRIORITY_LANES],
    transfers: HashMap<u64, Progress>,
    speculative_in_flight: bool,
    markers: VecDeque<Marker>,
    shutdown: bool,
}

impl QueueState {
    fn unqueue(&mut self, id: u64, lane: usize) {
        self.lanes[lane].retain(|&queued| queued != id);
    }

    /// Removes a transfer with nothing left in flight that cannot go on.
    fn take_finished(&mut self, id: u64) -> Option<Progress> {
        let progress = self.transfers.get(&id)?;
        let all_issued = progress.next == progress.transfer.length;
        if progress.in_flight > 0 || (progress.end.is_none() && !all_issued) {
            return None;
        }
        self.transfers.remove(&id)
    }
}

/// The device-copy queue of one engine (see the module docs).
#[derive(Debug)]
pub(crate) struct DeviceQueue {
    pub(crate) backend: Backend,
    chunk: u64,
    state: Mutex<QueueState>,
    issue: Condvar,
    complete: Condvar,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl DeviceQueue {
    pub(crate) fn start(
        backend: Backend,
        chunk: u64,
        shared: &Arc<Shared>,
    ) -> CoreResult<Arc<Self>> {
        let queue = Arc::new(Self {
            backend,
            chunk,
            state: Mutex::new(QueueState::default()),
            issue: Condvar::new(),
            complete: Condvar::new(),
            threads: Mutex::new(Vec::new()),
        });
        type Body = fn(&DeviceQueue, &Shared);
        let loops: [(&str, Body); 2] = [
            ("moeflow-copy-issue", Self::issue_loop),
            ("moeflow-copy-done", Self::complete_loop),
        ];
        for (name, body) in loops {
            let (queue_ref, shared) = (queue.clone(), shared.clone());
            let spawned = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || body(&queue_ref, &shared));
            match spawned {
                Ok(handle) => queue.threads().push(handle),
                Err(err) => {
                    queue.stop();
                    let errno = err.raw_os_error().unwrap_or(libc::EAGAIN);
                    return Err(CoreError::io("spawn", None, errno, None, None));
                }
            }
        }
        Ok(queue)
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Every critical section leaves the state consistent; a panic cannot tear it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn threads(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn submit(&self, transfer: Arc<Transfer>) {
        let lane = usize::from(transfer.priority.load(Ordering::Relaxed)).min(PRIORITY_LANES - 1);
        let id = transfer.id;
        let mut state = self.lock();
        state.transfers.insert(
            id,
            Progress {
                transfer,
                lane,
                next: 0,
                in_flight: 0,
                landed: 0,
                end: None,
            },
        );
        state.lanes[lane].push_back(id);
        self.issue.notify_one();
    }

    /// Drops the unissued parts; the transfer ends 'cancelled' once the issued ones
    /// landed (now, when none is in flight). False when every part was issued.
    pub(crate) fn cancel(&self, shared: &Shared, id: u64) -> bool {
        let finished = {
            let mut state = self.lock();
            let Some(progress) = state.transfers.get_mut(&id) else {
                return false;
            };
            if progress.end.is_some() || progress.next == progress.transfer.length {
                return false;
            }
            progress.end = Some(End::Cancelled);
            let lane = progress.lane;
            state.unqueue(id, lane);
            state.take_finished(id)
        };
        if let Some(progress) = finished {
            finish(shared, progress);
        }
        true
    }

    /// Moves the unissued parts to a more urgent lane; true when moved.
    pub(crate) fn promote(&self, id: u64, priority: u8) -> bool {
        let lane = usize::from(priority);
        let mut state = self.lock();
        let Some(progress) = state.transfers.get_mut(&id) else {
            return false;
        };
        let old = progress.lane;
        if progress.end.is_some() || progress.next == progress.transfer.length || lane >= old {
            return false;
        }
        progress.lane = lane;
        state.unqueue(id, old);
        state.lanes[lane].push_back(id);
        self.issue.notify_one();
        true
    }

    /// Queue entries waiting per lane (transfers with unissued parts).
    pub(crate) fn queued(&self) -> [usize; PRIORITY_LANES] {
        let state = self.lock();
        std::array::from_fn(|lane| state.lanes[lane].len())
    }

    /// Stops both threads once the lanes are empty and every issued part landed.
    pub(crate) fn stop(&self) {
        self.lock().shutdown = true;
        self.issue.notify_all();
        self.complete.notify_all();
        let threads = std::mem::take(&mut *self.threads());
        for handle in threads {
            let _ = handle.join();
        }
    }

    /// Picks the next part: demand first; a speculative part only when none is in
    /// flight. None at shutdown.
    fn next_part(&self) -> Option<Part> {
        let mut state = self.lock();
        loop {
            let demand = usize::from(PRIORITY_DEMAND);
            let picked = state.lanes[demand]
                .front()
                .map(|&id| (id, demand))
                .or_else(|| {
                    if state.speculative_in_flight {
                        return None;
                    }
                    (demand + 1..PRIORITY_LANES)
                        .find_map(|lane| state.lanes[lane].front().map(|&id| (id, lane)))
                });
            let Some((id, lane)) = picked else {
                if state.shutdown && state.lanes.iter().all(VecDeque::is_empty) {
                    return None;
                }
                state = self
                    .issue
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            };
            let speculative = lane != demand;
            let cap = if speculative {
                self.chunk.min(SPECULATIVE_PART)
            } else {
                self.chunk
            };
            let Some(progress) = state.transfers.get_mut(&id) else {
                // Unreachable (a transfer leaves its lane before the map); never spin on it.
                state.lanes[lane].pop_front();
                continue;
            };
            let offset = progress.next;
            // A zero-length copy is one empty part, so it still gets an event.
            let len = cap.min(progress.transfer.length - offset);
            progress.next += len;
            progress.in_flight += 1;
            let last = progress.next == progress.transfer.length;
            let transfer = progress.transfer.clone();
            if last {
                state.lanes[lane].pop_front();
            }
            state.speculative_in_flight |= speculative;
            return Some(Part {
                transfer,
                offset,
                len,
                speculative,
                last,
            });
        }
    }

    fn issue_loop(&self, shared: &Shared) {
        while let Some(part) = self.next_part() {
            let transfer = &part.transfer;
            transfer.mark_started();
            let outcome = self.issue_guarded(shared, &part);
            let issued = Instant::now();
            let mut state = self.lock();
            let finished = match outcome {
                Ok(event) => {
                    if part.last {
                        // Posted before the completer can see the part, so 'issued'
                        // always precedes 'done'.
                        let shared_event = Arc::new(event);
                        let _ = transfer.event.set(shared_event.clone());
                        shared.completions.post(Completion {
                            id: transfer.id,
                            status: Status::Issued,
                            bytes: 0,
                            nanos: 0,
                            queued_nanos: 0,
                            direct: false,
                            tag: transfer.tag,
                            event: Some(shared_event.clone()),
                            error: None,
                        });
                        state.markers.push_back(Marker {
                            id: transfer.id,
                            len: part.len,
                            event: Landing::Shared(shared_event),
                            speculative: part.speculative,
                            issued,
                        });
                    } else {
                        state.markers.push_back(Marker {
                            id: transfer.id,
                            len: part.len,
                            event: Landing::Own(event),
                            speculative: part.speculative,
                            issued,
                        });
                    }
                    self.complete.notify_one();
                    None
                }
                Err(err) => {
                    if part.speculative {
                        state.speculative_in_flight = false;
                    }
                    if let Some(progress) = state.transfers.get_mut(&transfer.id) {
                        progress.in_flight -= 1;
                    }
                    state.fail(transfer.id, Some(err));
                    state.take_finished(transfer.id)
                }
            };
            drop(state);
            if let Some(progress) = finished {
                finish(shared, progress);
            }
        }
    }

    /// Issues a part, meeting an injected fault first (tests); a panic fails the transfer
    /// instead of ending the issuer thread (which would leave every device copy waiting).
    fn issue_guarded(&self, shared: &Shared, part: &Part) -> CoreResult<Event> {
        let fault = shared.faults.take(&PartSite {
            file_id: None,
            file_range: None,
        });
        if let Some(FaultKind::Delay(pause)) = fault.map(|hit| hit.kind) {
            std::thread::sleep(pause);
        }
        catch_unwind(AssertUnwindSafe(|| {
            if let Some(FaultKind::Panic) = fault.map(|hit| hit.kind) {
                resume_unwind(Box::new(INJECTED_PANIC));
            }
            self.issue_part(part)
        }))
        .unwrap_or_else(|payload| Err(panic_error("copy", None, None, part.len, payload.as_ref())))
    }

    fn issue_part(&self, part: &Part) -> CoreResult<Event> {
        let transfer = &part.transfer;
        let Op::Device { kind, src, after } = &transfer.op else {
            return Err(CoreError::invalid(
                "internal error: a host transfer reached the copy stream",
            ));
        };
        if part.offset == 0 {
            if let Some(after) = after {
                self.backend.wait(after)?;
            }
        }
        // SAFETY: both blocks are pinned until the transfer finalizes, which happens
        // only after the completer saw this part's event complete.
        unsafe {
            self.backend.copy(
                *kind,
                transfer.dst + part.offset,
                src + part.offset,
                part.len,
            )
        }
    }
}

/// One part picked for issue.
#[derive(Debug)]
struct Part {
    transfer: Arc<Transfer>,
    offset: u64,
    len: u64,
    speculative: bool,
    last: bool,
}
