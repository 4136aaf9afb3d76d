//! One submitted transfer: its parts, who may run them, and how it ends.
//!
//! A part runs exactly once: a worker claims it with a CAS (queued -> claimed), so
//! the duplicate queue entries that `promote` leaves behind are skipped. Whether a
//! transfer is cancelled or started is decided on one atomic word: `cancel` CASes
//! it from 0 to CANCELLED, a worker ORs in STARTED before touching any byte, and
//! whichever comes first wins. The worker that finishes the last part finalizes.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crate::cuda::DeviceCopy;
use crate::error::CoreError;
use crate::event::Event;
use crate::pool::ArenaAllocator;
use crate::slab::BlockHandle;
use crate::transfer::completion::{Completion, Status};
use crate::transfer::files::FileEntry;

const PART_QUEUED: u8 = 0;
const PART_CLAIMED: u8 = 1;
const STARTED: u32 = 1;
const CANCELLED: u32 = 2;

/// What a transfer moves.
#[derive(Debug)]
pub(crate) enum Op {
    /// file -> host; the first `direct_len` bytes with O_DIRECT.
    Read {
        file: Arc<FileEntry>,
        file_offset: u64,
        direct_len: u64,
        expect_crc32: Option<u32>,
    },
    /// host -> host memcpy from `src`, once `after` completed.
    HostCopy { src: u64, after: Option<Arc<Event>> },
    /// A copy on the device copy stream (CUDA or simulated), in parts issued by the
    /// engine's device queue; the stream waits on `after` before the first part.
    Device {
        kind: DeviceCopy,
        src: u64,
        after: Option<Arc<Event>>,
    },
}

/// A block pinned for the duration of a transfer.
#[derive(Debug)]
pub(crate) struct Hold {
    pub(crate) allocator: Arc<ArenaAllocator>,
    pub(crate) handle: BlockHandle,
}

/// One submitted transfer.
#[derive(Debug)]
pub(crate) struct Transfer {
    pub(crate) id: u64,
    pub(crate) tag: i64,
    pub(crate) op: Op,
    /// Absolute destination address.
    pub(crate) dst: u64,
    pub(crate) length: u64,
    pub(crate) chunk: u64,
    pub(crate) priority: AtomicU8,
    parts: Box<[AtomicU8]>,
    /// CRC-32 of each part, combined in order at the end (reads with a checksum only).
    part_crcs: Box<[AtomicU32]>,
    phase: AtomicU32,
    remaining: AtomicU32,
    failed: AtomicBool,
    error: OnceLock<CoreError>,
    moved: AtomicU64,
    direct_used: AtomicBool,
    /// The event recorded after the last part of a device copy.
    pub(crate) event: OnceLock<Arc<Event>>,
    submitted: Instant,
    /// Nanoseconds after `submitted` when the first part started, plus one (0: never).
    started: AtomicU64,
    dst_hold: Hold,
    src_hold: Option<Hold>,
    owned: bool,
}

impl Transfer {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: u64,
        tag: i64,
        op: Op,
        dst: u64,
        length: u64,
        chunk: u64,
        priority: u8,
        dst_hold: Hold,
        src_hold: Option<Hold>,
        owned: bool,
    ) -> Self {
        // Device copies are cut into parts by the device queue as they are issued
        // (their size depends on the lane), so the worker lanes see none.
        let parts = match op {
            Op::Device { .. } => 0,
            _ => length.div_ceil(chunk).max(1) as usize,
        };
        let crc_parts = match op {
            Op::Read {
                expect_crc32: Some(_),
                ..
            } => parts,
            _ => 0,
        };
        Self {
            id,
            tag,
            op,
            dst,
            length,
            chunk,
            priority: AtomicU8::new(priority),
            parts: (0..parts).map(|_| AtomicU8::new(PART_QUEUED)).collect(),
            part_crcs: (0..crc_parts).map(|_| AtomicU32::new(0)).collect(),
            phase: AtomicU32::new(0),
            remaining: AtomicU32::new(parts as u32),
            failed: AtomicBool::new(false),
            error: OnceLock::new(),
            moved: AtomicU64::new(0),
            direct_used: AtomicBool::new(false),
            event: OnceLock::new(),
            submitted: Instant::now(),
            started: AtomicU64::new(0),
            dst_hold,
            src_hold,
            owned,
        }
    }

    /// Number of parts.
    pub(crate) fn part_count(&self) -> u32 {
        self.parts.len() as u32
    }

    /// Byte range `[start, end)` of part `part` within the transfer.
    pub(crate) fn part_range(&self, part: u32) -> (u64, u64) {
        let start = u64::from(part) * self.chunk;
        (start, (start + self.chunk).min(self.length))
    }

    /// Claims a part for the calling worker; false when it is taken, or the transfer
    /// was cancelled (a stale queue entry).
    pub(crate) fn claim(&self, part: u32) -> bool {
        if self.phase.load(Ordering::Acquire) & CANCELLED != 0 {
            return false;
        }
        let Some(state) = self.parts.get(part as usize) else {
            return false;
        };
        if state
            .compare_exchange(
                PART_QUEUED,
                PART_CLAIMED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return false;
        }
        if self.phase.fetch_or(STARTED, Ordering::AcqRel) & CANCELLED != 0 {
            // `cancel` won the race on the phase word; it owns the cleanup.
            return false;
        }
        let since = self.submitted.elapsed().as_nanos() as u64 + 1;
        let _ = self
            .started
            .compare_exchange(0, since, Ordering::Relaxed, Ordering::Relaxed);
        true
    }

    /// Records the start of the first part (device copies, which claim no parts).
    pub(crate) fn mark_started(&self) {
        let since = self.submitted.elapsed().as_nanos() as u64 + 1;
        let _ = self
            .started
            .compare_exchange(0, since, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Ends a device copy: releases the pins (frees an owned destination unless it is
    /// done) and builds the completion; `bytes` are the bytes that landed.
    pub(crate) fn finish_device(
        &self,
        status: Status,
        bytes: u64,
        error: Option<CoreError>,
    ) -> Completion {
        self.release(self.owned && status != Status::Done);
        let end = self.submitted.elapsed().as_nanos() as u64;
        let started = self.started.load(Ordering::Relaxed);
        let (nanos, queued_nanos) = match started {
            0 => (0, end),
            _ => (end.saturating_sub(started - 1), started - 1),
        };
        Completion {
            id: self.id,
            status,
            bytes,
            nanos,
            queued_nanos,
            direct: false,
            tag: self.tag,
            event: self.event.get().cloned(),
            error,
        }
    }

    /// True when no part has started; from then on no part will.
    pub(crate) fn try_cancel(&self) -> bool {
        self.phase
            .compare_exchange(0, CANCELLED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Parts still waiting to be claimed (for `promote`).
    pub(crate) fn unclaimed_parts(&self) -> impl Iterator<Item = u32> + '_ {
        self.parts
            .iter()
            .enumerate()
            .filter(|(_, s)| s.load(Ordering::Acquire) == PART_QUEUED)
            .map(|(i, _)| i as u32)
    }

    /// True once a part failed: the remaining parts skip their I/O.
    pub(crate) fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Records a part's outcome; returns true when it was the last part.
    pub(crate) fn finish_part(&self, outcome: Result<PartDone, CoreError>) -> bool {
        match outcome {
            Ok(done) => {
                self.moved.fetch_add(done.bytes, Ordering::Relaxed);
                if done.direct_bytes > 0 {
                    self.direct_used.store(true, Ordering::Relaxed);
                }
                if let (Some(crc), Some(slot)) = (done.crc, self.part_crcs.get(done.part as usize))
                {
                    slot.store(crc, Ordering::Relaxed);
                }
            }
            Err(err) => {
                let _ = self.error.set(err);
                self.failed.store(true, Ordering::Relaxed);
            }
        }
        self.remaining.fetch_sub(1, Ordering::AcqRel) == 1
    }

    /// Ends a transfer whose parts all ran: checks the CRC, releases the pins (and
    /// frees an owned destination on failure) and builds the completion.
    pub(crate) fn finalize(&self) -> Completion {
        if !self.has_failed() {
            if let Err(err) = self.verify_crc() {
                let _ = self.error.set(err);
                self.failed.store(true, Ordering::Relaxed);
            }
        }
        let failed = self.has_failed();
        self.release(self.owned && failed);
        let end = self.submitted.elapsed().as_nanos() as u64;
        let started = self.started.load(Ordering::Relaxed).saturating_sub(1);
        Completion {
            id: self.id,
            status: if failed { Status::Failed } else { Status::Done },
            bytes: self.moved.load(Ordering::Relaxed),
            nanos: end.saturating_sub(started),
            queued_nanos: started,
            direct: self.direct_used.load(Ordering::Relaxed),
            tag: self.tag,
            event: self.event.get().cloned(),
            error: if failed {
                self.error.get().cloned()
            } else {
                None
            },
        }
    }

    /// Ends a transfer that `try_cancel` stopped before it started.
    pub(crate) fn finalize_cancelled(&self) -> Completion {
        self.release(self.owned);
        Completion {
            id: self.id,
            status: Status::Cancelled,
            bytes: 0,
            nanos: 0,
            queued_nanos: self.submitted.elapsed().as_nanos() as u64,
            direct: false,
            tag: self.tag,
            event: None,
            error: None,
        }
    }

    /// Releases the pins of a transfer that was never queued (the caller keeps the block).
    pub(crate) fn abandon(&self) {
        self.release(false);
    }

    fn release(&self, free_dst: bool) {
        self.dst_hold
            .allocator
            .release(&self.dst_hold.handle, free_dst);
        if let Some(src) = &self.src_hold {
            src.allocator.release(&src.handle, false);
        }
    }

    fn verify_crc(&self) -> Result<(), CoreError> {
        let Op::Read {
            file,
            file_offset,
            expect_crc32: Some(expected),
            ..
        } = &self.op
        else {
            return Ok(());
        };
        let mut total = crc32fast::Hasher::new();
        for (part, crc) in self.part_crcs.iter().enumerate() {
            let (start, end) = self.part_range(part as u32);
            total.combine(&crc32fast::Hasher::new_with_initial_len(
                crc.load(Ordering::Relaxed),
                end - start,
            ));
        }
        let actual = total.finalize();
        if actual == *expected {
            return Ok(());
        }
        Err(CoreError::ChecksumMismatch {
            path: file.path.clone(),
            offset: *file_offset,
            length: self.length,
            expected: *expected,
            actual,
        })
    }
}

/// What a successful part reports.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PartDone {
    pub(crate) part: u32,
    pub(crate) bytes: u64,
    /// Bytes of `bytes` read with O_DIRECT.
    pub(crate) direct_bytes: u64,
    pub(crate) crc: Option<u32>,
}
