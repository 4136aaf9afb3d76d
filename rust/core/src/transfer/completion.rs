//! What a transfer reports when it ends, and the lock-free queue that carries it to
//! the consumer, signalled through an eventfd.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_queue::SegQueue;

use crate::error::CoreError;
use crate::event::Event;
use crate::notify::EventFd;

/// How a transfer ended (or, for device copies, that it was issued).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Every byte arrived.
    Done,
    /// A part failed; `error` says why.
    Failed,
    /// Cancelled: no part started (device copies: the issued parts landed, `bytes`).
    Cancelled,
    /// A device copy was queued on the copy stream (its event is set); 'done' follows.
    Issued,
}

impl Status {
    /// The name Python sees.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Issued => "issued",
        }
    }
}

/// The report of one transfer.
#[derive(Debug, Clone)]
pub struct Completion {
    pub id: u64,
    pub status: Status,
    /// Bytes moved by the parts that succeeded.
    pub bytes: u64,
    /// From the first part starting to the last finishing (0 if never started).
    pub nanos: u64,
    /// From submission to the first part starting.
    pub queued_nanos: u64,
    /// Some part used O_DIRECT.
    pub direct: bool,
    pub tag: i64,
    /// The event after the copy's last part (device copies).
    pub event: Option<Arc<Event>>,
    pub error: Option<CoreError>,
}

impl Completion {
    /// A transfer reports exactly one final completion ('issued' is not final).
    pub fn is_final(&self) -> bool {
        self.status != Status::Issued
    }

    /// The consumer received it: a 'done' device copy's completion tells the host the
    /// bytes landed (an edge the simulated device's hazard checker records).
    pub(crate) fn observe(&self) {
        if self.status == Status::Done {
            if let Some(event) = &self.event {
                event.observed();
            }
        }
    }

    pub(crate) fn observed(self) -> Self {
        self.observe();
        self
    }
}

/// Completions waiting for the consumer.
#[derive(Debug)]
pub(crate) struct CompletionQueue {
    queue: SegQueue<Completion>,
    eventfd: EventFd,
}

impl CompletionQueue {
    pub(crate) fn new(eventfd: EventFd) -> Self {
        Self {
            queue: SegQueue::new(),
            eventfd,
        }
    }

    pub(crate) fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }

    /// Pushes, then signals: a consumer that resets the eventfd before draining
    /// therefore never misses a completion.
    pub(crate) fn post(&self, completion: Completion) {
        self.queue.push(completion);
        self.eventfd.signal();
    }

    pub(crate) fn try_pop(&self) -> Option<Completion> {
        self.queue.pop()
    }

    /// Resets the eventfd, then takes everything waiting.
    pub(crate) fn drain(&self) -> Vec<Completion> {
        self.eventfd.reset();
        std::iter::from_fn(|| self.queue.pop()).collect()
    }

    /// Blocking pop; None when `timeout` passes first.
    pub(crate) fn wait(&self, timeout: Option<Duration>) -> Option<Completion> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(done) = self.queue.pop() {
                return Some(done);
            }
            // Reset before the re-check: whatever is pushed after it signals again.
            self.eventfd.reset();
            if let Some(done) = self.queue.pop() {
                if !self.queue.is_empty() {
                    // The reset may have eaten the signal of what is still queued;
                    // keep the fd readable for an event loop watching it.
                    self.eventfd.signal();
                }
                return Some(done);
            }
            let left = match deadline {
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return None;
                    }
                    Some(deadline - now)
                }
                None => None,
            };
            self.eventfd.wait(left);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }
}
