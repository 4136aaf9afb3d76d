//! A slab allocator bound to its arena and shared between threads.
//!
//! The transfer engine pins blocks at submission and unpins (or frees) them on its
//! worker threads, while Python allocates on its own thread; one uncontended mutex
//! around the single-threaded [`SlabAllocator`] serves both at a few tens of ns.

use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::arena::Arena;
use crate::error::{CoreError, CoreResult};
use crate::slab::{AllocatorStats, BlockHandle, SlabAllocator};

/// An arena and the allocator that carves it.
#[derive(Debug)]
pub struct ArenaAllocator {
    arena: Arena,
    id: u64,
    slab: Mutex<SlabAllocator>,
}

impl ArenaAllocator {
    /// A slab allocator over all of `arena` (see [`SlabAllocator::new`]).
    pub fn new(arena: Arena, budget: u64, slab_size: Option<u64>, align: u64) -> CoreResult<Self> {
        let slab = SlabAllocator::new(arena.size() as u64, budget, slab_size, align)?;
        Ok(Self {
            arena,
            id: slab.id(),
            slab: Mutex::new(slab),
        })
    }

    /// Locks the allocator. A panic while holding the lock would be a bug in the
    /// allocator itself; its state is still consistent at every return, so a
    /// poisoned lock is recovered rather than propagated.
    pub fn lock(&self) -> MutexGuard<'_, SlabAllocator> {
        self.slab.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The arena.
    pub fn arena(&self) -> &Arena {
        &self.arena
    }

    /// Unique allocator id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Absolute address of a live block (host or device pointer).
    pub fn address(&self, handle: &BlockHandle) -> CoreResult<u64> {
        self.lock().check(handle)?;
        Ok(self.arena.address() + handle.offset)
    }

    /// Absolute address of `[offset, offset+length)` inside a live block.
    pub fn range_address(&self, handle: &BlockHandle, offset: u64, length: u64) -> CoreResult<u64> {
        check_range(handle, offset, length)?;
        self.address(handle).map(|base| base + offset)
    }

    /// Pins a live block and returns the absolute address of the range, in one lock.
    pub fn pin_range(&self, handle: &BlockHandle, offset: u64, length: u64) -> CoreResult<u64> {
        check_range(handle, offset, length)?;
        self.lock().pin(handle)?;
        Ok(self.arena.address() + handle.offset + offset)
    }

    /// Ends a transfer's hold on a block: unpins it and, when `free`, frees it if no
    /// other pin remains. Errors are impossible for a block this engine pinned
    /// (the pin kept it live), so they are ignored.
    pub fn release(&self, handle: &BlockHandle, free: bool) {
        let freed = {
            let mut slab = self.lock();
            matches!(slab.unpin(handle), Ok(0)) && free && slab.free(handle).is_ok()
        };
        if freed {
            self.freed(handle);
        }
    }

    /// Frees a block: StaleHandle if already freed, ForeignHandle, BlockPinned. On a
    /// simulated device its bytes become poison for the hazard checker.
    pub fn free(&self, handle: &BlockHandle) -> CoreResult<()> {
        self.lock().free(handle)?;
        self.freed(handle);
        Ok(())
    }

    fn freed(&self, handle: &BlockHandle) {
        if let Some(sim) = self.arena.sim() {
            sim.poison(self.arena.address() + handle.offset, handle.size);
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> AllocatorStats {
        self.lock().stats()
    }
}

fn check_range(handle: &BlockHandle, offset: u64, length: u64) -> CoreResult<()> {
    if offset
        .checked_add(length)
        .is_none_or(|end| end > handle.size)
    {
        return Err(CoreError::invalid(format!(
            "range of {length} bytes at offset {offset} exceeds the {}-byte block",
            handle.size
        )));
    }
    Ok(())
}
