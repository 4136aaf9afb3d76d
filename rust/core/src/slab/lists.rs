//! The index-linked list of partial slabs of each size class: O(1) push and unlink,
//! so alloc and free never scan.

use super::{SlabAllocator, NIL};

impl SlabAllocator {
    /// Puts a slab at the head of its class's partial list.
    pub(super) fn push_partial(&mut self, size_class: u32, slab_index: u32) {
        let head = self.classes[size_class as usize].partial_head;
        if head != NIL {
            self.slabs[head as usize].prev = slab_index;
        }
        let slab = &mut self.slabs[slab_index as usize];
        slab.prev = NIL;
        slab.next = head;
        slab.in_partial = true;
        self.classes[size_class as usize].partial_head = slab_index;
    }

    /// Unlinks a slab from its class's partial list.
    pub(super) fn remove_partial(&mut self, size_class: u32, slab_index: u32) {
        let slab = &mut self.slabs[slab_index as usize];
        let (prev, next) = (slab.prev, slab.next);
        slab.prev = NIL;
        slab.next = NIL;
        slab.in_partial = false;
        if prev != NIL {
            self.slabs[prev as usize].next = next;
        } else {
            self.classes[size_class as usize].partial_head = next;
        }
        if next != NIL {
            self.slabs[next as usize].prev = prev;
        }
    }
}
