//! The completer thread of the device queue: follows the issued parts' events in
//! stream order, frees the speculative slot, and ends the transfers that landed.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Instant;

use super::{DeviceQueue, End, Progress, QueueState};
use crate::error::CoreError;
use crate::event::Event;
use crate::transfer::completion::Status;
use crate::transfer::Shared;

impl DeviceQueue {
    pub(super) fn complete_loop(&self, shared: &Shared) {
        // The copy stream runs parts in order: one is busy from when it was issued, or the one
        // before landed if later, until it lands (the stream's wait on a reuse fence counts).
        let mut last_landed: Option<Instant> = None;
        loop {
            let marker = {
                let mut state = self.lock();
                loop {
                    if let Some(marker) = state.markers.pop_front() {
                        break marker;
                    }
                    if state.shutdown && state.transfers.is_empty() {
                        return;
                    }
                    state = self
                        .complete
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            };
            let landed = marker.event.get().wait_quietly();
            let now = Instant::now();
            let began = last_landed.map_or(marker.issued, |t| t.max(marker.issued));
            shared.stats.busy_nanos.fetch_add(
                now.saturating_duration_since(began).as_nanos() as u64,
                Ordering::Relaxed,
            );
            last_landed = Some(now);
            if landed.is_ok() {
                shared.stats.bytes.fetch_add(marker.len, Ordering::Relaxed);
            }
            let finished = {
                let mut state = self.lock();
                if marker.speculative {
                    state.speculative_in_flight = false;
                    self.issue.notify_one();
                }
                if let Some(progress) = state.transfers.get_mut(&marker.id) {
                    progress.in_flight -= 1;
                    if landed.is_ok() {
                        progress.landed += marker.len;
                    }
                }
                if let Err(err) = landed {
                    state.fail(marker.id, Some(err));
                }
                state.take_finished(marker.id)
            };
            if let Some(progress) = finished {
                finish(shared, progress);
            }
        }
    }
}

/// The event a part's landing is followed by: its own, or the transfer's (last part).
#[derive(Debug)]
pub(super) enum Landing {
    Own(Event),
    Shared(Arc<Event>),
}

impl Landing {
    fn get(&self) -> &Event {
        match self {
            Self::Own(event) => event,
            Self::Shared(event) => event,
        }
    }
}

impl QueueState {
    /// A part failed to issue or to land: the unissued parts are dropped.
    pub(super) fn fail(&mut self, id: u64, err: Option<CoreError>) {
        let Some(progress) = self.transfers.get_mut(&id) else {
            return;
        };
        if let Some(err) = err {
            if !matches!(progress.end, Some(End::Failed(_))) {
                progress.end = Some(End::Failed(err));
            }
        }
        let lane = progress.lane;
        self.unqueue(id, lane);
    }
}

/// Posts the final completion of a transfer nothing is left in flight for.
pub(super) fn finish(shared: &Shared, progress: Progress) {
    let (status, error) = match progress.end {
        None => (Status::Done, None),
        Some(End::Cancelled) => (Status::Cancelled, None),
        Some(End::Failed(err)) => (Status::Failed, Some(err)),
    };
    let transfer = &progress.transfer;
    shared.finish(
        transfer,
        transfer.finish_device(status, progress.landed, error),
    );
}
