//! Exact accounting of a slab allocator: the snapshot types and how they are taken.

use super::SlabAllocator;

/// Counters of one size class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassStats {
    pub block_size: u64,
    pub blocks_per_slab: u32,
    pub live: u64,
    pub high_water: u64,
    pub slabs: u32,
}

/// Exact accounting of an allocator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocatorStats {
    pub budget: u64,
    pub used: u64,
    pub available: u64,
    pub high_water: u64,
    pub live_blocks: u64,
    pub pinned_blocks: u64,
    pub slab_size: u64,
    pub slabs_total: u32,
    pub slabs_free: u32,
    pub allocs: u64,
    pub frees: u64,
    pub classes: Vec<ClassStats>,
}

impl SlabAllocator {
    /// A snapshot of every counter.
    pub fn stats(&self) -> AllocatorStats {
        AllocatorStats {
            budget: self.budget,
            used: self.used,
            available: self.budget - self.used,
            high_water: self.high_water,
            live_blocks: self.live_blocks,
            pinned_blocks: self.pinned_blocks,
            slab_size: self.slab_size,
            slabs_total: self.slabs.len() as u32,
            slabs_free: self.free_slabs.len() as u32,
            allocs: self.allocs,
            frees: self.frees,
            classes: self
                .classes
                .iter()
                .map(|c| ClassStats {
                    block_size: c.block_size,
                    blocks_per_slab: c.blocks_per_slab,
                    live: c.live,
                    high_water: c.high_water,
                    slabs: c.slabs,
                })
                .collect(),
        }
    }
}
