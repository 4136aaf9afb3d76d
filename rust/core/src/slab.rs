//! Slab allocator over an arena's byte range: size classes of fixed-size blocks, O(1)
//! alloc and free, an explicit byte budget, pin counts and handles that can never
//! silently alias a freed block.
//!
//! The arena is cut into slabs of `slab_size` bytes. A slab serves one size class
//! while it holds live blocks and goes back to the shared pool the moment its last
//! block is freed (Bonwick), so memory moves between classes as the working set
//! changes. Each class keeps an index-linked list of its partial slabs; each slab
//! keeps an index-linked free list of its blocks plus a bump count of blocks ever
//! carved, so neither alloc nor free scans anything. Bookkeeping lives beside the
//! memory (the arena may be device memory), in a per-slab vector that grows as
//! blocks are first carved and is truncated in O(1) when the slab is released.
//!
//! This type is single-threaded; [`crate::pool::ArenaAllocator`] puts it behind a mutex.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{BudgetLimit, CoreError, CoreResult};

mod handle;
mod lists;
mod stats;

pub use handle::BlockHandle;
pub use stats::{AllocatorStats, ClassStats};

/// End of an index-linked list.
const NIL: u32 = u32::MAX;

/// Process-wide source of allocator ids, so a handle names the allocator it came from.
static NEXT_ALLOCATOR_ID: AtomicU64 = AtomicU64::new(1);

/// Per-block bookkeeping. `generation == 0` means free.
#[derive(Debug, Clone, Copy)]
struct BlockMeta {
    generation: u64,
    pins: u32,
    next_free: u32,
}

#[derive(Debug)]
struct Slab {
    /// Size class served, or NIL while in the shared pool.
    class: u32,
    live: u32,
    /// Head of the free list of blocks freed since the slab was assigned.
    free_head: u32,
    /// Neighbours in the class's partial list.
    prev: u32,
    next: u32,
    in_partial: bool,
    /// One entry per block carved so far; `blocks.len()` is the bump pointer.
    blocks: Vec<BlockMeta>,
}

#[derive(Debug)]
struct SizeClass {
    block_size: u64,
    blocks_per_slab: u32,
    partial_head: u32,
    live: u64,
    high_water: u64,
    slabs: u32,
}

/// The slab allocator (see the module docs).
#[derive(Debug)]
pub struct SlabAllocator {
    id: u64,
    budget: u64,
    slab_size: u64,
    align: u64,
    slabs: Vec<Slab>,
    /// Stack of slabs in the shared pool.
    free_slabs: Vec<u32>,
    classes: Vec<SizeClass>,
    next_generation: u64,
    used: u64,
    high_water: u64,
    live_blocks: u64,
    pinned_blocks: u64,
    allocs: u64,
    frees: u64,
}

/// Default slab size cap.
pub const DEFAULT_SLAB_SIZE: u64 = 64 << 20;

impl SlabAllocator {
    /// An allocator over `arena_size` bytes with at most `budget` bytes of live blocks.
    /// `slab_size` defaults to min(arena_size, 64 MiB) rounded down to `align`.
    pub fn new(
        arena_size: u64,
        budget: u64,
        slab_size: Option<u64>,
        align: u64,
    ) -> CoreResult<Self> {
        if align == 0 || !align.is_power_of_two() {
            return Err(CoreError::invalid(format!(
                "align must be a power of two, got {align}"
            )));
        }
        if budget == 0 {
            return Err(CoreError::invalid("budget must be positive, got 0"));
        }
        if budget > arena_size {
            return Err(CoreError::invalid(format!(
                "budget {budget} exceeds the arena size {arena_size}"
            )));
        }
        let slab_size = slab_size.unwrap_or(arena_size.min(DEFAULT_SLAB_SIZE) / align * align);
        if slab_size == 0 || slab_size % align != 0 || slab_size > arena_size {
            return Err(CoreError::invalid(format!(
                "slab_size must be a positive multiple of align {align} no larger than the \
                 arena ({arena_size} bytes), got {slab_size}"
            )));
        }
        let count = u32::try_from(arena_size / slab_size)
            .ok()
            .filter(|&n| n < NIL)
            .ok_or_else(|| {
                CoreError::invalid(format!("slab_size {slab_size} makes too many slabs"))
            })?;
        let slabs = (0..count)
            .map(|_| Slab {
                class: NIL,
                live: 0,
                free_head: NIL,
                prev: NIL,
                next: NIL,
                in_partial: false,
                blocks: Vec::new(),
            })
            .collect();
        Ok(Self {
            id: NEXT_ALLOCATOR_ID.fetch_add(1, Ordering::Relaxed),
            budget,
            slab_size,
            align,
            slabs,
            // Reversed so slab 0 is handed out first (low addresses first).
            free_slabs: (0..count).rev().collect(),
            classes: Vec::new(),
            next_generation: 1,
            used: 0,
            high_water: 0,
            live_blocks: 0,
            pinned_blocks: 0,
            allocs: 0,
            frees: 0,
        })
    }

    /// Unique id of this allocator in the process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The byte budget of live blocks.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Slab size in bytes.
    pub fn slab_size(&self) -> u64 {
        self.slab_size
    }

    /// Block alignment in bytes.
    pub fn align(&self) -> u64 {
        self.align
    }

    /// Bytes of live blocks.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Number of live blocks.
    pub fn live_blocks(&self) -> u64 {
        self.live_blocks
    }

    /// Number of live blocks with a non-zero pin count.
    pub fn pinned_blocks(&self) -> u64 {
        self.pinned_blocks
    }

    /// Registers a size class (block_size rounded up to `align`), returning its id;
    /// a class of the same rounded size is shared.
    pub fn add_class(&mut self, block_size: u64) -> CoreResult<u32> {
        let rounded = block_size
            .checked_next_multiple_of(self.align)
            .unwrap_or(u64::MAX);
        if block_size == 0 || rounded > self.slab_size {
            return Err(CoreError::invalid(format!(
                "block_size {block_size} (rounded up to {rounded} by align {}) must be positive \
                 and at most slab_size {}",
                self.align, self.slab_size
            )));
        }
        if let Some(found) = self.classes.iter().position(|c| c.block_size == rounded) {
            return Ok(found as u32);
        }
        let id = u32::try_from(self.classes.len())
            .ok()
            .filter(|&n| n < NIL)
            .ok_or_else(|| CoreError::invalid("too many size classes"))?;
        self.classes.push(SizeClass {
            block_size: rounded,
            blocks_per_slab: (self.slab_size / rounded) as u32,
            partial_head: NIL,
            live: 0,
            high_water: 0,
            slabs: 0,
        });
        Ok(id)
    }

    /// Block size of a class.
    pub fn block_size(&self, size_class: u32) -> CoreResult<u64> {
        self.class(size_class).map(|c| c.block_size)
    }

    fn class(&self, size_class: u32) -> CoreResult<&SizeClass> {
        self.classes.get(size_class as usize).ok_or_else(|| {
            CoreError::invalid(format!(
                "size class {size_class} does not exist ({} classes)",
                self.classes.len()
            ))
        })
    }

    /// Allocates a block of `size_class`.
    pub fn alloc(&mut self, size_class: u32) -> CoreResult<BlockHandle> {
        let block_size = self.class(size_class)?.block_size;
        let available = self.budget - self.used;
        if block_size > available {
            return Err(CoreError::OutOfBudget {
                requested: block_size,
                available,
                limit: BudgetLimit::Budget,
            });
        }
        let class = &self.classes[size_class as usize];
        let slab_index = if class.partial_head != NIL {
            class.partial_head
        } else {
            let Some(fresh) = self.free_slabs.pop() else {
                return Err(CoreError::OutOfBudget {
                    requested: block_size,
                    available: 0,
                    limit: BudgetLimit::ArenaExhausted,
                });
            };
            self.slabs[fresh as usize].class = size_class;
            self.classes[size_class as usize].slabs += 1;
            self.push_partial(size_class, fresh);
            fresh
        };
        let generation = self.next_generation;
        self.next_generation += 1;
        let per_slab = self.classes[size_class as usize].blocks_per_slab;
        let slab = &mut self.slabs[slab_index as usize];
        let meta = BlockMeta {
            generation,
            pins: 0,
            next_free: NIL,
        };
        let block_index = if slab.free_head != NIL {
            let index = slab.free_head;
            slab.free_head = slab.blocks[index as usize].next_free;
            slab.blocks[index as usize] = meta;
            index
        } else {
            slab.blocks.push(meta);
            slab.blocks.len() as u32 - 1
        };
        slab.live += 1;
        let full = slab.free_head == NIL && slab.blocks.len() as u32 == per_slab;
        if full {
            self.remove_partial(size_class, slab_index);
        }
        self.used += block_size;
        self.high_water = self.high_water.max(self.used);
        self.live_blocks += 1;
        self.allocs += 1;
        let class = &mut self.classes[size_class as usize];
        class.live += 1;
        class.high_water = class.high_water.max(class.live);
        Ok(BlockHandle {
            allocator_id: self.id,
            size_class,
            generation,
            offset: u64::from(slab_index) * self.slab_size + u64::from(block_index) * block_size,
            size: block_size,
        })
    }

    /// Frees a block: StaleHandle if already freed, ForeignHandle, BlockPinned.
    pub fn free(&mut self, handle: &BlockHandle) -> CoreResult<()> {
        let (slab_index, block_index) = self.locate(handle)?;
        let slab = &mut self.slabs[slab_index as usize];
        let meta = &mut slab.blocks[block_index as usize];
        if meta.pins > 0 {
            return Err(CoreError::BlockPinned {
                offset: handle.offset,
                pins: meta.pins,
            });
        }
        meta.generation = 0;
        meta.next_free = slab.free_head;
        slab.free_head = block_index;
        slab.live -= 1;
        let (now_empty, was_full) = (slab.live == 0, !slab.in_partial);
        let size_class = handle.size_class;
        if now_empty {
            if !was_full {
                self.remove_partial(size_class, slab_index);
            }
            let slab = &mut self.slabs[slab_index as usize];
            slab.class = NIL;
            slab.free_head = NIL;
            // BlockMeta is Copy: truncation is O(1) and keeps the capacity for reuse.
            slab.blocks.clear();
            self.free_slabs.push(slab_index);
            self.classes[size_class as usize].slabs -= 1;
        } else if was_full {
            self.push_partial(size_class, slab_index);
        }
        self.used -= handle.size;
        self.live_blocks -= 1;
        self.frees += 1;
        self.classes[size_class as usize].live -= 1;
        Ok(())
    }

    /// Increments the pin count; returns the new count.
    pub fn pin(&mut self, handle: &BlockHandle) -> CoreResult<u32> {
        let meta = self.meta_mut(handle)?;
        meta.pins = meta
            .pins
            .checked_add(1)
            .ok_or_else(|| CoreError::invalid("pin count overflow"))?;
        let pins = meta.pins;
        if pins == 1 {
            self.pinned_blocks += 1;
        }
        Ok(pins)
    }

    /// Decrements the pin count; InvalidArgument when it is already zero.
    pub fn unpin(&mut self, handle: &BlockHandle) -> CoreResult<u32> {
        let meta = self.meta_mut(handle)?;
        if meta.pins == 0 {
            return Err(CoreError::invalid(format!(
                "block at offset {} is not pinned",
                handle.offset
            )));
        }
        meta.pins -= 1;
        let pins = meta.pins;
        if pins == 0 {
            self.pinned_blocks -= 1;
        }
        Ok(pins)
    }

    /// Current pin count.
    pub fn pin_count(&self, handle: &BlockHandle) -> CoreResult<u32> {
        let (slab, block) = self.locate(handle)?;
        Ok(self.slabs[slab as usize].blocks[block as usize].pins)
    }
}
