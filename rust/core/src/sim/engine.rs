//! The copy-engine thread of the simulated device: one FIFO copy stream. Each part
//! takes latency + len / bandwidth of wall time from when the engine is free for it;
//! its bytes land (memcpy) only when that time is up, then its event completes.

use std::sync::PoisonError;
use std::time::{Duration, Instant};

use super::SimShared;

pub(super) fn run(shared: &SimShared) {
    let bytes_per_second = shared.bandwidth_gbps * 1e9;
    let mut state = shared.lock();
    loop {
        let Some(part) = state.queue.front().copied() else {
            if state.shutdown {
                return;
            }
            state = shared
                .work
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            continue;
        };
        let start = state
            .free_at
            .map_or(part.enqueued, |free| free.max(part.enqueued));
        let cost = shared.latency + Duration::from_secs_f64(part.len as f64 / bytes_per_second);
        let due = start + cost;
        state.free_at = Some(due);
        drop(state);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        // SAFETY: the issuer keeps both ranges valid until this part's event
        // completes (set below), and nothing else writes the destination meanwhile.
        unsafe {
            std::ptr::copy(
                part.src as *const u8,
                part.dst as *mut u8,
                part.len as usize,
            );
        }
        state = shared.lock();
        state.queue.pop_front();
        state.clocks.landed = part.seq;
        state.bytes_copied += part.len;
        state.busy += cost;
        shared.landed.notify_all();
    }
}
