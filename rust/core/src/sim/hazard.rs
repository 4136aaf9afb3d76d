//! The hazard checker of the simulated device: an interval map over the bytes of its
//! arenas saying which copy wrote each byte last and when compute last read it.
//!
//! Time on the copy stream is the sequence number of a copy part (one FIFO stream, so
//! an edge to part `s` is an edge to every part before it). Time on the compute
//! stream is an epoch: reads happen at the current epoch, `record_compute` closes it.

use std::collections::BTreeMap;

use crate::error::{CoreError, HazardKind};

/// What is known about one run of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bytes {
    /// Sequence number of the copy part that wrote them last; None: poison.
    writer: Option<u64>,
    /// Epoch of the last compute read, if any.
    read: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Run {
    end: u64,
    bytes: Bytes,
}

/// The orderings established so far, passed in by the device.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clocks {
    /// Every copy part up to this sequence number has landed.
    pub(crate) landed: u64,
    /// Compute is ordered after every copy part up to this sequence number.
    pub(crate) known: u64,
    /// The copy stream is ordered after every compute read of an epoch below this.
    pub(crate) fence: u64,
    /// Reads of an epoch below this are retired (the host synchronised compute).
    pub(crate) retired: u64,
}

/// Runs of bytes keyed by start address; registered arenas are covered end to end.
#[derive(Debug, Default)]
pub(crate) struct Checker {
    runs: BTreeMap<u64, Run>,
    arenas: BTreeMap<u64, u64>,
}

impl Checker {
    /// Starts tracking an arena: every byte poison, never read.
    pub(crate) fn register(&mut self, base: u64, size: u64) {
        self.arenas.insert(base, size);
        let bytes = Bytes {
            writer: None,
            read: None,
        };
        self.runs.insert(
            base,
            Run {
                end: base + size,
                bytes,
            },
        );
    }

    /// Stops tracking an arena.
    pub(crate) fn unregister(&mut self, base: u64) {
        if let Some(size) = self.arenas.remove(&base) {
            let starts: Vec<u64> = self
                .runs
                .range(base..base + size)
                .map(|(&s, _)| s)
                .collect();
            for start in starts {
                self.runs.remove(&start);
            }
        }
    }

    /// True when `[address, address+length)` lies inside one registered arena.
    pub(crate) fn covers(&self, address: u64, length: u64) -> bool {
        self.arenas
            .range(..=address)
            .next_back()
            .is_some_and(|(&base, &size)| address + length <= base + size)
    }

    /// Compute reads the range: every byte must have been written by a copy that
    /// landed and that compute is ordered after. Records the read on success.
    pub(crate) fn read(
        &mut self,
        address: u64,
        length: u64,
        epoch: u64,
        clocks: Clocks,
    ) -> Result<(), CoreError> {
        self.check_covered(address, length)?;
        for (start, end, bytes) in self.overlapping(address, length) {
            let (kind, detail) = match bytes.writer {
                None => (
                    HazardKind::Poison,
                    "compute read bytes no copy wrote since the arena was made or the block \
                     was freed"
                        .to_owned(),
                ),
                Some(seq) if seq > clocks.landed => (
                    HazardKind::ReadBeforeCopy,
                    format!("compute read bytes whose copy (part {seq}) has not landed yet"),
                ),
                Some(seq) if seq > clocks.known => (
                    HazardKind::ReadBeforeCopy,
                    format!(
                        "compute read bytes of copy part {seq}, which landed, but nothing orders \
                         compute after it (wait on its event, synchronize it or pop its completion)"
                    ),
                ),
                Some(_) => continue,
            };
            return Err(hazard(kind, start, end, detail));
        }
        self.update(address, length, |bytes| bytes.read = Some(epoch));
        Ok(())
    }

    /// A copy part of sequence `seq` is about to overwrite the range: no read of a
    /// live epoch may be left that the copy stream is not ordered after.
    pub(crate) fn write(
        &mut self,
        address: u64,
        length: u64,
        seq: u64,
        clocks: Clocks,
    ) -> Result<(), CoreError> {
        self.check_covered(address, length)?;
        for (start, end, bytes) in self.overlapping(address, length) {
            if let Some(epoch) = bytes.read {
                if epoch >= clocks.retired && epoch >= clocks.fence {
                    let detail = format!(
                        "a copy overwrites bytes compute read at epoch {epoch}, and the copy \
                         stream is ordered only after epochs below {}: pass after= an event \
                         recorded after that compute",
                        clocks.fence
                    );
                    return Err(hazard(HazardKind::CopyOverRead, start, end, detail));
                }
            }
        }
        self.update(address, length, |bytes| bytes.writer = Some(seq));
        Ok(())
    }

    /// A freed block: its bytes are poison again (reads of it stay recorded, since
    /// compute queued before the free may still read them).
    pub(crate) fn poison(&mut self, address: u64, length: u64) {
        if length > 0 && self.covers(address, length) {
            self.update(address, length, |bytes| bytes.writer = None);
        }
    }

    fn check_covered(&self, address: u64, length: u64) -> Result<(), CoreError> {
        if length == 0 || !self.covers(address, length) {
            return Err(CoreError::invalid(format!(
                "range of {length} bytes at {address:#x} is not inside an arena of this simulated device"
            )));
        }
        Ok(())
    }

    /// (start, end, bytes) of every run meeting the range, clipped to it.
    fn overlapping(&self, address: u64, length: u64) -> Vec<(u64, u64, Bytes)> {
        let end = address + length;
        let first = self
            .runs
            .range(..=address)
            .next_back()
            .map_or(address, |(&start, _)| start);
        self.runs
            .range(first..end)
            .filter(|(_, run)| run.end > address)
            .map(|(&start, run)| (start.max(address), run.end.min(end), run.bytes))
            .collect()
    }

    /// Splits the runs at both ends of the range, changes every run inside it, then
    /// merges equal neighbours so the map stays as small as the distinct states.
    fn update(&mut self, address: u64, length: u64, change: impl Fn(&mut Bytes)) {
        let end = address + length;
        self.split_at(address);
        self.split_at(end);
        for (_, run) in self.runs.range_mut(address..end) {
            change(&mut run.bytes);
        }
        let lower = self
            .runs
            .range(..address)
            .next_back()
            .map_or(address, |(&s, _)| s);
        let starts: Vec<u64> = self.runs.range(lower..=end).map(|(&s, _)| s).collect();
        let Some((&first, rest)) = starts.split_first() else {
            return;
        };
        let mut current = first;
        for &next in rest {
            let (Some(&left), Some(&right)) = (self.runs.get(&current), self.runs.get(&next))
            else {
                current = next;
                continue;
            };
            if left.end == next && left.bytes == right.bytes && !self.arenas.contains_key(&next) {
                self.runs.remove(&next);
                if let Some(run) = self.runs.get_mut(&current) {
                    run.end = right.end;
                }
            } else {
                current = next;
            }
        }
    }

    fn split_at(&mut self, at: u64) {
        let Some((&start, &run)) = self.runs.range(..at).next_back() else {
            return;
        };
        if run.end > at {
            self.runs.insert(start, Run { end: at, ..run });
            self.runs.insert(at, run);
        }
    }
}

fn hazard(kind: HazardKind, start: u64, end: u64, detail: String) -> CoreError {
    CoreError::Hazard {
        kind,
        address: start,
        length: end - start,
        detail,
    }
}

#[cfg(test)]
mod tests {
    //! The interval map against a byte-by-byte model of the same rules.

    use proptest::prelude::*;

    use super::{Bytes, Checker, Clocks};
    use crate::error::{CoreError, HazardKind};

    const BASE: u64 = 1 << 20;
    const SIZE: u64 = 96;

    #[derive(Debug, Clone)]
    enum Op {
        Read(u64, u64, u64),
        Write(u64, u64, u64),
        Poison(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let range = (0..SIZE).prop_flat_map(|start| (Just(start), 1..=SIZE - start));
        prop_oneof![
            (range.clone(), 0..6u64).prop_map(|((s, l), e)| Op::Read(s, l, e)),
            (range.clone(), 1..8u64).prop_map(|((s, l), q)| Op::Write(s, l, q)),
            range.prop_map(|(s, l)| Op::Poison(s, l)),
        ]
    }

    fn model_read(
        bytes: &mut [Bytes],
        start: u64,
        len: u64,
        epoch: u64,
        c: Clocks,
    ) -> Option<(HazardKind, u64)> {
        for at in start..start + len {
            let kind = match bytes[at as usize].writer {
                None => HazardKind::Poison,
                Some(seq) if seq > c.landed || seq > c.known => HazardKind::ReadBeforeCopy,
                Some(_) => continue,
            };
            return Some((kind, BASE + at));
        }
        for b in &mut bytes[start as usize..(start + len) as usize] {
            b.read = Some(epoch);
        }
        None
    }

    fn model_write(
        bytes: &mut [Bytes],
        start: u64,
        len: u64,
        seq: u64,
        c: Clocks,
    ) -> Option<(HazardKind, u64)> {
        for at in start..start + len {
            if let Some(epoch) = bytes[at as usize].read {
                if epoch >= c.retired && epoch >= c.fence {
                    return Some((HazardKind::CopyOverRead, BASE + at));
                }
            }
        }
        for b in &mut bytes[start as usize..(start + len) as usize] {
            b.writer = Some(seq);
        }
        None
    }

    fn seen(result: Result<(), CoreError>) -> Option<(HazardKind, u64)> {
        match result {
            Ok(()) => None,
            Err(CoreError::Hazard { kind, address, .. }) => Some((kind, address)),
            Err(other) => panic!("unexpected {other:?}"),
        }
    }

    proptest! {
        #[test]
        fn the_interval_map_agrees_with_a_byte_model(
            ops in proptest::collection::vec(op(), 1..40),
            landed in 0..8u64, known in 0..8u64, fence in 0..6u64, retired in 0..6u64,
        ) {
            let clocks = Clocks { landed, known, fence, retired };
            let mut checker = Checker::default();
            checker.register(BASE, SIZE);
            let mut model = vec![Bytes { writer: None, read: None }; SIZE as usize];
            for op in ops {
                match op {
                    Op::Read(s, l, e) => prop_assert_eq!(
                        seen(checker.read(BASE + s, l, e, clocks)),
                        model_read(&mut model, s, l, e, clocks)
                    ),
                    Op::Write(s, l, q) => prop_assert_eq!(
                        seen(checker.write(BASE + s, l, q, clocks)),
                        model_write(&mut model, s, l, q, clocks)
                    ),
                    Op::Poison(s, l) => {
                        checker.poison(BASE + s, l);
                        for b in &mut model[s as usize..(s + l) as usize] {
                            b.writer = None;
                        }
                    }
                }
            }
            prop_assert!(checker.runs.len() <= SIZE as usize);
            let mut at = BASE;
            for (&start, run) in &checker.runs {
                prop_assert_eq!(start, at, "runs tile the arena");
                at = run.end;
            }
            prop_assert_eq!(at, BASE + SIZE);
        }
    }
}
