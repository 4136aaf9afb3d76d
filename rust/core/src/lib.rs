//! moeflow-core: the memory core of moeflow — arenas, a slab allocator, lock-free
//! transfer queues and the worker threads that move bytes between disk, host and
//! device. Plain Rust: no Python, no knowledge of models.

pub mod arena;
pub mod cuda;
pub mod error;
pub mod event;
pub mod gemm;
pub mod notify;
pub mod ops;
pub mod pool;
pub mod queue;
pub mod sim;
pub mod slab;
pub mod transfer;

pub use arena::{Arena, DeviceArena, HostArena};
pub use error::{CoreError, CoreResult, HazardKind};
pub use event::Event;
pub use pool::ArenaAllocator;
pub use sim::{SimDevice, SimEvent};
pub use slab::{BlockHandle, SlabAllocator};
pub use transfer::{
    Completion, CopyRequest, DirectMode, FaultKind, FaultOp, FaultRule, ReadRequest, Status,
    TransferEngine, SPECULATIVE_PART_BYTES,
};

/// Alignment (bytes) of file offset, length and address that O_DIRECT reads need.
pub const DIRECT_IO_ALIGN: u64 = 4096;

/// Priority lanes; a lower value runs first.
pub const PRIORITY_DEMAND: u8 = 0;
/// Predicted for a coming layer.
pub const PRIORITY_PREFETCH: u8 = 1;
/// Speculative, far ahead.
pub const PRIORITY_BACKGROUND: u8 = 2;
/// Number of priority lanes.
pub const PRIORITY_LANES: usize = 3;
