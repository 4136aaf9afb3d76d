//! `SlabAllocator` and `BlockHandle`: the Python face of the slab allocator.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use moeflow_core::{Arena, ArenaAllocator, BlockHandle, CoreError};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::arena::{PyArenaBuffer, PyDeviceArena, PyHostArena};
use crate::errors::PyCoreResult;

/// A live block of a SlabAllocator: immutable, hashable, compares by identity fields.
#[pyclass(module = "moeflow._core", name = "BlockHandle", frozen)]
#[derive(Debug)]
pub struct PyBlockHandle {
    pub(crate) inner: BlockHandle,
}

#[pymethods]
impl PyBlockHandle {
    #[getter]
    fn allocator_id(&self) -> u64 {
        self.inner.allocator_id
    }

    #[getter]
    fn size_class(&self) -> u32 {
        self.inner.size_class
    }

    #[getter]
    fn generation(&self) -> u64 {
        self.inner.generation
    }

    /// Byte offset of the block in its arena.
    #[getter]
    fn offset(&self) -> u64 {
        self.inner.offset
    }

    /// Block size in bytes (the class's, aligned).
    #[getter]
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn __hash__(&self) -> u64 {
        let mut hasher = DefaultHasher::new();
        self.inner.hash(&mut hasher);
        hasher.finish()
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<Self>()
            .is_ok_and(|other| other.get().inner == self.inner)
    }

    fn __repr__(&self) -> String {
        let h = &self.inner;
        format!(
            "BlockHandle(allocator_id={}, size_class={}, generation={}, offset={}, size={})",
            h.allocator_id, h.size_class, h.generation, h.offset, h.size
        )
    }
}

/// Slab allocator over an arena: size classes of fixed-size blocks, O(1) alloc and free.
#[pyclass(module = "moeflow._core", name = "SlabAllocator", frozen)]
#[derive(Debug)]
pub struct PySlabAllocator {
    pub(crate) inner: Arc<ArenaAllocator>,
}

#[pymethods]
impl PySlabAllocator {
    #[new]
    #[pyo3(signature = (arena, budget, *, slab_size = None, align = 4096))]
    fn new(
        arena: &Bound<'_, PyAny>,
        budget: u64,
        slab_size: Option<u64>,
        align: u64,
    ) -> PyCoreResult<Self> {
        let arena = if let Ok(host) = arena.cast::<PyHostArena>() {
            Arena::Host(host.get().inner.clone())
        } else if let Ok(device) = arena.cast::<PyDeviceArena>() {
            Arena::Device(device.get().inner.clone())
        } else {
            return Err(PyTypeError::new_err("arena must be a HostArena or a DeviceArena").into());
        };
        Ok(Self {
            inner: Arc::new(ArenaAllocator::new(arena, budget, slab_size, align)?),
        })
    }

    #[getter]
    fn id(&self) -> u64 {
        self.inner.id()
    }

    #[getter]
    fn budget(&self) -> u64 {
        self.inner.lock().budget()
    }

    #[getter]
    fn slab_size(&self) -> u64 {
        self.inner.lock().slab_size()
    }

    #[getter]
    fn arena_kind(&self) -> &'static str {
        self.inner.arena().kind()
    }

    /// Register a size class; returns its id (a class of the same rounded size is shared).
    fn add_class(&self, block_size: u64) -> PyCoreResult<u32> {
        Ok(self.inner.lock().add_class(block_size)?)
    }

    fn block_size(&self, size_class: u32) -> PyCoreResult<u64> {
        Ok(self.inner.lock().block_size(size_class)?)
    }

    /// Raises OutOfBudget (requested, available) when the budget or the arena is exhausted.
    fn alloc(&self, size_class: u32) -> PyCoreResult<PyBlockHandle> {
        let inner = self.inner.lock().alloc(size_class)?;
        Ok(PyBlockHandle { inner })
    }

    fn try_alloc(&self, size_class: u32) -> PyCoreResult<Option<PyBlockHandle>> {
        match self.inner.lock().alloc(size_class) {
            Ok(inner) => Ok(Some(PyBlockHandle { inner })),
            Err(CoreError::OutOfBudget { .. }) => Ok(None),
            Err(other) => Err(other.into()),
        }
    }

    /// Raises StaleHandle (already freed: double free), ForeignHandle, BlockPinned.
    fn free(&self, handle: &PyBlockHandle) -> PyCoreResult<()> {
        Ok(self.inner.free(&handle.inner)?)
    }

    /// Increment the pin count (returns the new count). A pinned block cannot be freed.
    fn pin(&self, handle: &PyBlockHandle) -> PyCoreResult<u32> {
        Ok(self.inner.lock().pin(&handle.inner)?)
    }

    /// Decrement; ValueError when the count is already zero.
    fn unpin(&self, handle: &PyBlockHandle) -> PyCoreResult<u32> {
        Ok(self.inner.lock().unpin(&handle.inner)?)
    }

    fn pin_count(&self, handle: &PyBlockHandle) -> PyCoreResult<u32> {
        Ok(self.inner.lock().pin_count(&handle.inner)?)
    }

    /// True when `handle` belongs to this allocator and is the current generation.
    fn is_live(&self, handle: &PyBlockHandle) -> bool {
        self.inner.lock().is_live(&handle.inner)
    }

    /// Absolute address (host pointer or device pointer).
    fn address(&self, handle: &PyBlockHandle) -> PyCoreResult<u64> {
        Ok(self.inner.address(&handle.inner)?)
    }

    /// Writable buffer over the whole block (host and simulated device arenas;
    /// TypeError on a real device).
    fn view(&self, handle: &PyBlockHandle) -> PyCoreResult<PyArenaBuffer> {
        self.inner.lock().check(&handle.inner)?;
        Ok(PyArenaBuffer::new(
            self.inner.arena().clone(),
            handle.inner.offset,
            handle.inner.size,
        )?)
    }

    #[getter]
    fn used(&self) -> u64 {
        self.inner.lock().used()
    }

    #[getter]
    fn live_blocks(&self) -> u64 {
        self.inner.lock().live_blocks()
    }

    #[getter]
    fn pinned_blocks(&self) -> u64 {
        self.inner.lock().pinned_blocks()
    }

    /// budget, used, available, high_water, live_blocks, pinned_blocks, slab_size,
    /// slabs_total, slabs_free, allocs, frees, and `classes`: a list of dicts
    /// (block_size, blocks_per_slab, live, high_water, slabs).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let out = PyDict::new(py);
        out.set_item("budget", s.budget)?;
        out.set_item("used", s.used)?;
        out.set_item("available", s.available)?;
        out.set_item("high_water", s.high_water)?;
        out.set_item("live_blocks", s.live_blocks)?;
        out.set_item("pinned_blocks", s.pinned_blocks)?;
        out.set_item("slab_size", s.slab_size)?;
        out.set_item("slabs_total", s.slabs_total)?;
        out.set_item("slabs_free", s.slabs_free)?;
        out.set_item("allocs", s.allocs)?;
        out.set_item("frees", s.frees)?;
        let classes = PyList::empty(py);
        for c in &s.classes {
            let class = PyDict::new(py);
            class.set_item("block_size", c.block_size)?;
            class.set_item("blocks_per_slab", c.blocks_per_slab)?;
            class.set_item("live", c.live)?;
            class.set_item("high_water", c.high_water)?;
            class.set_item("slabs", c.slabs)?;
            classes.append(class)?;
        }
        out.set_item("classes", classes)?;
        Ok(out)
    }

    fn __repr__(&self) -> String {
        let slab = self.inner.lock();
        format!(
            "SlabAllocator(id={}, kind={}, budget={}, used={}, live_blocks={})",
            self.inner.id(),
            self.inner.arena().kind(),
            slab.budget(),
            slab.used(),
            slab.live_blocks()
        )
    }
}
