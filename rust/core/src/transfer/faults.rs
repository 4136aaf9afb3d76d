//! Test-only fault injection: a plan of rules that make chosen parts of transfers fail
//! (an errno, a short read, a flipped byte), wait, or panic the worker running them.
//!
//! Tests use it to prove that every failure of the I/O and copy paths reaches the
//! waiting completion as a typed error and leaves the engine serving. Nothing in
//! moeflow arms a plan by itself; an unarmed plan costs one relaxed load per part.
//!
//! The unit a rule counts is a part: one pread (or memcpy) of at most `chunk_size`
//! bytes, the work one worker runs at a time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::error::{CoreError, CoreResult};

/// What an injected fault does to the part it hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The read fails with this errno (e.g. `libc::EIO`), as if pread had returned it.
    Errno(i32),
    /// The file seems to end inside the part (at the rule's offset when that lies in
    /// the part, else halfway): pread returns end of file there, a short read.
    ShortRead,
    /// One byte of the part (at the rule's offset when that lies in the part, else its
    /// first) is flipped after the read: a checksum mismatch when a CRC is expected.
    Corrupt,
    /// The part waits this long before it runs (the worker sleeps).
    Delay(Duration),
    /// The worker panics while running the part.
    Panic,
}

impl FaultKind {
    /// The fault named `name` ("errno", "short_read", "corrupt", "delay" or "panic");
    /// `errno` and `delay_seconds` parametrise the first and the fourth.
    pub fn from_name(name: &str, errno: i32, delay_seconds: f64) -> CoreResult<Self> {
        Ok(match name {
            "errno" => Self::Errno(errno),
            "short_read" => Self::ShortRead,
            "corrupt" => Self::Corrupt,
            "panic" => Self::Panic,
            "delay" => {
                if !(delay_seconds.is_finite() && (0.0..=60.0).contains(&delay_seconds)) {
                    return Err(CoreError::invalid(format!(
                        "delay must be 0 to 60 seconds, got {delay_seconds}"
                    )));
                }
                Self::Delay(Duration::from_secs_f64(delay_seconds))
            }
            other => {
                return Err(CoreError::invalid(format!(
                    "fault kind must be 'errno', 'short_read', 'corrupt', 'delay' or 'panic', \
                     got {other:?}"
                )))
            }
        })
    }
}

/// Which parts a rule may hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    /// file -> host reads.
    Read,
    /// Copies: host -> host (run by the workers) and device copies (at issue).
    Copy,
    /// Both.
    Any,
}

impl FaultOp {
    /// Parses "read", "copy" or "any".
    pub fn parse(name: &str) -> CoreResult<Self> {
        match name {
            "read" => Ok(Self::Read),
            "copy" => Ok(Self::Copy),
            "any" => Ok(Self::Any),
            other => Err(CoreError::invalid(format!(
                "fault op must be 'read', 'copy' or 'any', got {other:?}"
            ))),
        }
    }
}

/// One rule of a fault plan: which parts it hits, and what it does to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    pub kind: FaultKind,
    pub op: FaultOp,
    /// Reads of this registered file only.
    pub file_id: Option<u64>,
    /// Reads whose byte range holds this file offset only.
    pub offset: Option<u64>,
    /// Matching parts let through before the first hit (the Nth matching part: N - 1).
    pub skip: u32,
    /// Parts hit, after which the rule is spent; 0 hits every matching part until cleared.
    pub count: u32,
}

impl FaultRule {
    /// A rule hitting the first matching part once.
    pub fn new(kind: FaultKind, op: FaultOp) -> Self {
        Self {
            kind,
            op,
            file_id: None,
            offset: None,
            skip: 0,
            count: 1,
        }
    }

    /// Refuses rules that could never apply as written.
    pub(crate) fn check(&self) -> CoreResult<()> {
        let reads_only = matches!(
            self.kind,
            FaultKind::Errno(_) | FaultKind::ShortRead | FaultKind::Corrupt
        ) || self.file_id.is_some()
            || self.offset.is_some();
        if reads_only && self.op != FaultOp::Read {
            return Err(CoreError::invalid(format!(
                "a {:?} fault, or one aimed at a file or offset, applies to reads only: \
                 give op 'read', not {:?}",
                self.kind, self.op
            )));
        }
        if let FaultKind::Errno(errno) = self.kind {
            if errno <= 0 {
                return Err(CoreError::invalid(format!(
                    "errno must be positive, got {errno}"
                )));
            }
        }
        Ok(())
    }

    fn matches(&self, part: &PartSite) -> bool {
        let op = match self.op {
            FaultOp::Any => true,
            FaultOp::Read => part.file_id.is_some(),
            FaultOp::Copy => part.file_id.is_none(),
        };
        op && self.file_id.is_none_or(|id| part.file_id == Some(id))
            && self
                .offset
                .is_none_or(|at| part.file_range.is_some_and(|(s, e)| s <= at && at < e))
    }
}

/// Where a part runs: the file and file byte range of a read; neither for a copy.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PartSite {
    pub(crate) file_id: Option<u64>,
    pub(crate) file_range: Option<(u64, u64)>,
}

/// A fault that hit a part: what to do, and the offset its rule aimed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hit {
    pub(crate) kind: FaultKind,
    pub(crate) offset: Option<u64>,
}

#[derive(Debug)]
struct Armed {
    rule: FaultRule,
    seen: u32,
    hits: u32,
}

/// The fault plan of one engine (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct FaultPlan {
    armed: AtomicBool,
    rules: Mutex<Vec<Armed>>,
    hits: Mutex<u64>,
}

impl FaultPlan {
    fn rules(&self) -> MutexGuard<'_, Vec<Armed>> {
        // Only counters change under the lock: never torn by a panic.
        self.rules.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a rule (checked); rules are tried in the order added.
    pub(crate) fn add(&self, rule: FaultRule) -> CoreResult<()> {
        rule.check()?;
        self.rules().push(Armed {
            rule,
            seen: 0,
            hits: 0,
        });
        self.armed.store(true, Ordering::Release);
        Ok(())
    }

    /// Removes every rule.
    pub(crate) fn clear(&self) {
        let mut rules = self.rules();
        rules.clear();
        self.armed.store(false, Ordering::Release);
    }

    /// Parts hit since the engine started.
    pub(crate) fn hits(&self) -> u64 {
        *self.hits.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The fault for a part about to run, if a live rule hits it.
    pub(crate) fn take(&self, part: &PartSite) -> Option<Hit> {
        if !self.armed.load(Ordering::Relaxed) {
            return None;
        }
        let mut rules = self.rules();
        let mut hit = None;
        for armed in rules.iter_mut() {
            let live = armed.rule.count == 0 || armed.hits < armed.rule.count;
            if !live || !armed.rule.matches(part) {
                continue;
            }
            armed.seen += 1;
            if armed.seen > armed.rule.skip {
                hit = Some(armed);
                break;
            }
        }
        let armed = hit?;
        armed.hits += 1;
        *self.hits.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        Some(Hit {
            kind: armed.rule.kind,
            offset: armed.rule.offset,
        })
    }
}

/// Where inside a part of `[start, end)` a fault aimed at `offset` lands: that offset
/// when inside, else `fallback`.
pub(crate) fn aim(offset: Option<u64>, start: u64, end: u64, fallback: u64) -> u64 {
    offset
        .filter(|at| (start..end).contains(at))
        .unwrap_or(fallback)
}

/// The typed error of a transfer whose thread panicked while moving `length` bytes.
pub(crate) fn panic_error(
    op: &'static str,
    path: Option<&str>,
    offset: Option<u64>,
    length: u64,
    payload: &(dyn std::any::Any + Send),
) -> CoreError {
    let reason = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into());
    CoreError::Transfer {
        op,
        path: path.map(str::to_owned),
        errno: None,
        offset,
        length: Some(length),
        message: format!(
            "internal error: the thread panicked ({reason}); this transfer failed, the engine goes on"
        ),
    }
}

/// The payload of an injected panic (raised with `resume_unwind`: no panic hook runs,
/// so a test run prints no backtrace for a panic it asked for).
pub(crate) const INJECTED_PANIC: &str = "injected fault: the worker panicked (test only)";

impl super::TransferEngine {
    /// Testing only: arms a fault rule on this engine (see `transfer::faults`). Rules
    /// are tried in the order added; the first live one matching a part hits it.
    pub fn add_fault(&self, rule: FaultRule) -> CoreResult<()> {
        if let Some(file_id) = rule.file_id {
            self.shared.files.get(file_id)?;
        }
        self.shared.faults.add(rule)
    }

    /// Testing only: removes every fault rule.
    pub fn clear_faults(&self) {
        self.shared.faults.clear();
    }

    /// Testing only: parts an injected fault has hit since the engine started.
    pub fn fault_hits(&self) -> u64 {
        self.shared.faults.hits()
    }

    /// Testing only: the next `count` reads (parts) of `file_id` fail with `errno`.
    pub fn inject_fault(&self, file_id: u64, errno: i32, count: u32) -> CoreResult<()> {
        if count == 0 {
            return Ok(());
        }
        self.add_fault(FaultRule {
            file_id: Some(file_id),
            count,
            ..FaultRule::new(FaultKind::Errno(errno), FaultOp::Read)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_at(file_id: u64, start: u64, end: u64) -> PartSite {
        PartSite {
            file_id: Some(file_id),
            file_range: Some((start, end)),
        }
    }

    #[test]
    fn a_rule_skips_then_hits_count_parts_of_its_file_and_offset() {
        let plan = FaultPlan::default();
        plan.add(FaultRule {
            file_id: Some(1),
            offset: Some(4096),
            skip: 1,
            count: 2,
            ..FaultRule::new(FaultKind::Errno(5), FaultOp::Read)
        })
        .unwrap();
        let aimed = read_at(1, 0, 8192);
        assert_eq!(plan.take(&read_at(2, 0, 8192)), None, "another file");
        assert_eq!(plan.take(&read_at(1, 8192, 16384)), None, "another range");
        assert_eq!(plan.take(&aimed), None, "skipped once");
        assert!(plan.take(&aimed).is_some());
        assert!(plan.take(&aimed).is_some());
        assert_eq!(plan.take(&aimed), None, "spent after two hits");
        assert_eq!(plan.hits(), 2);
        let copy = PartSite {
            file_id: None,
            file_range: None,
        };
        assert_eq!(plan.take(&copy), None);
    }

    #[test]
    fn read_only_faults_refuse_copy_rules_and_bad_errnos() {
        let plan = FaultPlan::default();
        for kind in [
            FaultKind::Errno(5),
            FaultKind::ShortRead,
            FaultKind::Corrupt,
        ] {
            assert!(plan.add(FaultRule::new(kind, FaultOp::Copy)).is_err());
        }
        assert!(plan
            .add(FaultRule::new(FaultKind::Errno(0), FaultOp::Read))
            .is_err());
        plan.add(FaultRule {
            count: 0,
            ..FaultRule::new(FaultKind::Panic, FaultOp::Any)
        })
        .unwrap();
        let copy = PartSite {
            file_id: None,
            file_range: None,
        };
        for _ in 0..3 {
            assert_eq!(plan.take(&copy).map(|hit| hit.kind), Some(FaultKind::Panic));
        }
        plan.clear();
        assert_eq!(plan.take(&copy), None);
    }
}
