//! Block handles and their validation: a handle names its allocator and a generation
//! that is never reused, so a stale or foreign handle is always detected, never aliased.

use super::{BlockMeta, SlabAllocator};
use crate::error::{CoreError, CoreResult};

/// A live block: who handed it out, where it is, and which allocation it is.
///
/// `generation` is unique across the allocator's lifetime, so a handle to a freed
/// (and maybe reused) block never matches the block's current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHandle {
    pub allocator_id: u64,
    pub size_class: u32,
    pub generation: u64,
    /// Byte offset of the block in the arena.
    pub offset: u64,
    /// Block size in bytes (the class's).
    pub size: u64,
}

impl SlabAllocator {
    /// True when `handle` belongs to this allocator and is the current generation.
    pub fn is_live(&self, handle: &BlockHandle) -> bool {
        self.locate(handle).is_ok()
    }

    /// Validates a handle (Foreign, Invalid or Stale otherwise).
    pub fn check(&self, handle: &BlockHandle) -> CoreResult<()> {
        self.locate(handle).map(|_| ())
    }

    pub(super) fn meta_mut(&mut self, handle: &BlockHandle) -> CoreResult<&mut BlockMeta> {
        let (slab, block) = self.locate(handle)?;
        Ok(&mut self.slabs[slab as usize].blocks[block as usize])
    }

    /// Slab and block index of a live handle.
    pub(super) fn locate(&self, handle: &BlockHandle) -> CoreResult<(u32, u32)> {
        if handle.allocator_id != self.id {
            return Err(CoreError::ForeignHandle {
                handle_allocator: handle.allocator_id,
                allocator: self.id,
            });
        }
        let invalid = |reason: &str| CoreError::InvalidHandle {
            reason: format!(
                "{reason} (offset {}, class {})",
                handle.offset, handle.size_class
            ),
        };
        let class = self
            .classes
            .get(handle.size_class as usize)
            .ok_or_else(|| invalid("unknown size class"))?;
        let slab_index = handle.offset / self.slab_size;
        let within = handle.offset % self.slab_size;
        if handle.generation == 0
            || handle.size != class.block_size
            || slab_index >= self.slabs.len() as u64
            || within % class.block_size != 0
        {
            return Err(invalid("not a block of this allocator"));
        }
        let block_index = within / class.block_size;
        let slab = &self.slabs[slab_index as usize];
        let current = slab.blocks.get(block_index as usize).map(|m| m.generation);
        if slab.class != handle.size_class || current != Some(handle.generation) {
            return Err(CoreError::StaleHandle {
                offset: handle.offset,
                generation: handle.generation,
            });
        }
        Ok((slab_index as u32, block_index as u32))
    }
}
