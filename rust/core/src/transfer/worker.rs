//! The worker threads: take parts from the lanes, move their bytes (or meet an injected
//! fault, in tests), finish transfers; a panic fails its transfer, never the worker.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_utils::sync::Parker;

use crate::error::CoreError;
use crate::transfer::faults::{aim, panic_error, FaultKind, Hit, PartSite, INJECTED_PANIC};
use crate::transfer::files::ReadFault;
use crate::transfer::task::{Op, PartDone, Transfer};
use crate::transfer::Shared;
use crate::PRIORITY_DEMAND;

/// One queued part of a transfer.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) transfer: Arc<Transfer>,
    pub(crate) part: u32,
}

/// Main loop of worker `index`: runs parts until shutdown and empty lanes.
///
/// Demand parts first; a speculative part only while fewer than `speculative_limit` (one)
/// workers run one, so with several workers one is always free when a demand read
/// arrives (it never waits behind a prefetch read for a worker), and at the disk it waits
/// behind at most one speculative part.
pub(crate) fn run(shared: Arc<Shared>, index: usize, parker: Parker) {
    loop {
        if let Some(job) = shared.lanes.pop_lane(PRIORITY_DEMAND) {
            execute(&shared, job);
            continue;
        }
        if reserve_speculative(&shared) {
            let job = shared.lanes.pop_from(PRIORITY_DEMAND + 1);
            if let Some((_, job)) = job {
                execute(&shared, job);
            }
            shared.speculative_running.fetch_sub(1, Ordering::AcqRel);
            if speculative_queued(&shared) {
                // A worker parked at the limit may take the next speculative part.
                shared.doorbell.wake(1);
                continue;
            }
        }
        // Parts of transfers that already started are still run after shutdown
        // (close cancels only unstarted transfers), so exit only on empty lanes.
        if shared.shutdown.load(Ordering::Acquire) && shared.lanes.is_empty() {
            shared.doorbell.wake_all(); // a worker parked at the limit must see the end too
            return;
        }
        shared.doorbell.idle(index, &parker, || has_work(&shared));
    }
}

/// True when speculative parts are still queued (the loop goes round again).
fn speculative_queued(shared: &Shared) -> bool {
    !shared.lanes.is_empty_from(PRIORITY_DEMAND + 1)
}

/// Counts the caller in as running a speculative part, if under the limit.
fn reserve_speculative(shared: &Shared) -> bool {
    let running = &shared.speculative_running;
    let mut current = running.load(Ordering::Acquire);
    loop {
        if current >= shared.speculative_limit {
            return false;
        }
        match running.compare_exchange_weak(
            current,
            current + 1,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => {
                shared
                    .speculative_high_water
                    .fetch_max(current + 1, Ordering::Relaxed);
                return true;
            }
            Err(now) => current = now,
        }
    }
}

/// Work this worker may take now: a demand part, a speculative part under the limit,
/// or the end (shutdown with nothing left).
fn has_work(shared: &Shared) -> bool {
    if shared.lanes.len(PRIORITY_DEMAND) > 0 {
        return true;
    }
    if shared.lanes.is_empty_from(PRIORITY_DEMAND + 1) {
        return shared.shutdown.load(Ordering::Acquire);
    }
    shared.speculative_running.load(Ordering::Acquire) < shared.speculative_limit
}

fn execute(shared: &Shared, job: Job) {
    let transfer = &job.transfer;
    if !transfer.claim(job.part) {
        return;
    }
    let begin = Instant::now();
    let outcome = if transfer.has_failed() {
        // Another part failed: the transfer fails anyway, skip the I/O.
        Ok(PartDone {
            part: job.part,
            bytes: 0,
            direct_bytes: 0,
            crc: None,
        })
    } else {
        let fault = shared.faults.take(&site(transfer, job.part));
        // A panic while moving bytes fails this transfer only: the worker goes on, and
        // the waiting completion gets a typed error instead of never arriving.
        catch_unwind(AssertUnwindSafe(|| run_part(transfer, job.part, fault)))
            .unwrap_or_else(|payload| Err(panicked(transfer, job.part, payload.as_ref())))
    };
    let stats = &shared.stats;
    stats
        .busy_nanos
        .fetch_add(begin.elapsed().as_nanos() as u64, Ordering::Relaxed);
    if let Ok(done) = &outcome {
        stats.bytes.fetch_add(done.bytes, Ordering::Relaxed);
        stats
            .direct_bytes
            .fetch_add(done.direct_bytes, Ordering::Relaxed);
    }
    if transfer.finish_part(outcome) {
        shared.finish(transfer, transfer.finalize());
    }
}

/// Where a part runs, for the fault plan.
fn site(transfer: &Transfer, part: u32) -> PartSite {
    let (start, end) = transfer.part_range(part);
    match &transfer.op {
        Op::Read {
            file, file_offset, ..
        } => PartSite {
            file_id: Some(file.id),
            file_range: Some((file_offset + start, file_offset + end)),
        },
        _ => PartSite {
            file_id: None,
            file_range: None,
        },
    }
}

/// The typed error of a part whose worker panicked, naming the file and range.
fn panicked(transfer: &Transfer, part: u32, payload: &(dyn Any + Send)) -> CoreError {
    let (start, end) = transfer.part_range(part);
    match &transfer.op {
        Op::Read {
            file, file_offset, ..
        } => panic_error(
            "read",
            Some(&file.path),
            Some(file_offset + start),
            end - start,
            payload,
        ),
        _ => panic_error("copy", None, None, end - start, payload),
    }
}

fn run_part(transfer: &Transfer, part: u32, fault: Option<Hit>) -> Result<PartDone, CoreError> {
    let (start, end) = transfer.part_range(part);
    let len = end - start;
    let dst = (transfer.dst + start) as *mut u8;
    match fault.map(|hit| hit.kind) {
        Some(FaultKind::Delay(pause)) => std::thread::sleep(pause),
        Some(FaultKind::Panic) => std::panic::resume_unwind(Box::new(INJECTED_PANIC)),
        _ => {}
    }
    match &transfer.op {
        Op::Read {
            file,
            file_offset,
            direct_len,
            expect_crc32,
        } => {
            let direct_here = direct_len.saturating_sub(start).min(len) as usize;
            let at = file_offset + start;
            let read_fault = fault.and_then(|hit| match hit.kind {
                FaultKind::Errno(errno) => Some(ReadFault::Errno(errno)),
                FaultKind::ShortRead => Some(ReadFault::EndAt(aim(
                    hit.offset,
                    at,
                    at + len,
                    at + len / 2,
                ))),
                _ => None,
            });
            // SAFETY: the destination block is pinned (so neither freed nor handed out
            // again) and this part's byte range is written by this worker only.
            let read = unsafe { file.read_at(dst, len as usize, at, direct_here, read_fault) };
            let (got, direct_bytes) = read.map_err(|errno| {
                CoreError::io("read", Some(&file.path), errno, Some(at), Some(len))
            })?;
            if (got as u64) < len {
                let fallback = start + got as u64;
                let file_size = match read_fault {
                    Some(ReadFault::EndAt(end)) => end, // where the injected fault ends the file
                    _ => file.size().unwrap_or(file_offset + fallback),
                };
                return Err(CoreError::ShortRead {
                    path: file.path.clone(),
                    offset: *file_offset,
                    length: transfer.length,
                    got: file_size.saturating_sub(*file_offset).min(transfer.length),
                });
            }
            if let Some(Hit {
                kind: FaultKind::Corrupt,
                offset,
            }) = fault
            {
                let flip = aim(offset, at, at + len, at) - at;
                // SAFETY: inside the range this worker just filled; the block is pinned.
                unsafe { *dst.add(flip as usize) ^= 0xff };
            }
            let crc = expect_crc32.map(|_| {
                // SAFETY: the range was just filled by this worker and is still pinned.
                crc32fast::hash(unsafe { std::slice::from_raw_parts(dst, len as usize) })
            });
            Ok(PartDone {
                part,
                bytes: len,
                direct_bytes: direct_bytes as u64,
                crc,
            })
        }
        Op::HostCopy { src, after } => {
            if let Some(after) = after {
                // The source or destination is still used by work before `after`.
                after.wait_quietly()?;
            }
            // SAFETY: both blocks are pinned and live in host arenas; distinct blocks
            // never overlap and overlapping ranges of one block are refused at
            // submission; this part's range is written by this worker only.
            unsafe {
                std::ptr::copy_nonoverlapping((src + start) as *const u8, dst, len as usize);
            }
            Ok(PartDone {
                part,
                bytes: len,
                direct_bytes: 0,
                crc: None,
            })
        }
        Op::Device { .. } => Err(CoreError::invalid(
            "internal error: a device copy reached a worker; the device queue issues them",
        )),
    }
}
