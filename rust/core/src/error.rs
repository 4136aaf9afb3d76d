//! The one error type of the memory core: every fallible operation returns a [`CoreError`].
//!
//! Variants carry the numbers a caller needs to react (sizes, offsets, errno),
//! not just a message; the Python bindings turn each variant into a typed
//! exception with those numbers as attributes.

use std::fmt;

/// Why an allocation could not be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetLimit {
    /// Live block bytes would exceed the allocator's budget.
    Budget,
    /// The budget has room, but no slab is free for this size class.
    ArenaExhausted,
}

impl fmt::Display for BudgetLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Budget => "budget exhausted",
            Self::ArenaExhausted => "arena exhausted (no free slab for this size class)",
        })
    }
}

/// Which ordering a hazard broke (see [`CoreError::Hazard`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HazardKind {
    /// Compute read bytes whose copy had not landed, or with no edge to that copy.
    ReadBeforeCopy,
    /// A copy overwrote bytes that compute not ordered before it had read.
    CopyOverRead,
    /// Compute read bytes never written since the arena was made or the block freed.
    Poison,
}

impl HazardKind {
    /// The name Python sees (`HazardError.kind`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReadBeforeCopy => "read-before-copy",
            Self::CopyOverRead => "copy-over-read",
            Self::Poison => "poison",
        }
    }
}

impl fmt::Display for HazardKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every failure the memory core reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    /// An allocation would exceed the budget, or the arena has no slab left.
    #[error("out of budget ({limit}): requested {requested} bytes, {available} bytes available")]
    OutOfBudget {
        requested: u64,
        available: u64,
        limit: BudgetLimit,
    },

    /// A handle that does not describe any block this allocator ever handed out.
    #[error("invalid handle: {reason}")]
    InvalidHandle { reason: String },

    /// The handle's block was freed (double free, or freed and reused since).
    #[error(
        "stale handle: block at offset {offset} (generation {generation}) was freed; \
         a double free or a use after free"
    )]
    StaleHandle { offset: u64, generation: u64 },

    /// The handle belongs to another allocator.
    #[error(
        "foreign handle: it belongs to allocator {handle_allocator}, not allocator {allocator}"
    )]
    ForeignHandle {
        handle_allocator: u64,
        allocator: u64,
    },

    /// The block is pinned (a transfer or a caller holds it) and cannot be freed.
    #[error("block at offset {offset} is pinned ({pins} pins) and cannot be freed")]
    BlockPinned { offset: u64, pins: u32 },

    /// An arena could not be created.
    #[error("cannot create a {requested}-byte arena: {reason}")]
    Arena { requested: u64, reason: String },

    /// An O_DIRECT request whose offset, length or address is not aligned.
    #[error("{0}")]
    Alignment(String),

    /// An I/O or copy failure of a transfer.
    #[error("{op} failed{}{}: {message}", fmt_path(.path), fmt_range(*.offset, *.length))]
    Transfer {
        op: &'static str,
        path: Option<String>,
        errno: Option<i32>,
        offset: Option<u64>,
        length: Option<u64>,
        message: String,
    },

    /// The file ends before the requested range does.
    #[error(
        "short read of {path}: wanted {length} bytes at offset {offset}, the file holds {got}"
    )]
    ShortRead {
        path: String,
        offset: u64,
        length: u64,
        got: u64,
    },

    /// The bytes read do not have the expected CRC-32.
    #[error(
        "checksum mismatch reading {path} at offset {offset} ({length} bytes): \
         expected crc32 {expected:#010x}, got {actual:#010x}"
    )]
    ChecksumMismatch {
        path: String,
        offset: u64,
        length: u64,
        expected: u32,
        actual: u32,
    },

    /// A CUDA driver call failed.
    #[error("CUDA error in {op}: {name} ({code})")]
    Cuda {
        op: &'static str,
        code: i32,
        name: String,
    },

    /// No usable CUDA driver or device.
    #[error("CUDA unavailable: {0}")]
    CudaUnavailable(String),

    /// The transfer engine is closed.
    #[error("the transfer engine is closed")]
    EngineClosed,

    /// The simulated device's hazard checker saw an ordering bug: compute read bytes
    /// no copy had landed in (or no event ordered it after), a copy overwrote bytes
    /// compute may still read, or compute read never-written (poisoned) bytes.
    #[error("hazard ({kind}) on {length} bytes at {address:#x}: {detail}")]
    Hazard {
        kind: HazardKind,
        address: u64,
        length: u64,
        detail: String,
    },

    /// A bad argument value (maps to ValueError).
    #[error("{0}")]
    InvalidArgument(String),

    /// An argument of the wrong kind, e.g. a device arena where host memory is needed
    /// (maps to TypeError).
    #[error("{0}")]
    WrongKind(String),
}

fn fmt_path(path: &Option<String>) -> String {
    path.as_ref()
        .map(|p| format!(" on {p}"))
        .unwrap_or_default()
}

fn fmt_range(offset: Option<u64>, length: Option<u64>) -> String {
    match (offset, length) {
        (Some(o), Some(l)) => format!(" (offset {o}, {l} bytes)"),
        (Some(o), None) => format!(" (offset {o})"),
        _ => String::new(),
    }
}

impl CoreError {
    /// A transfer error built from an OS error number.
    pub fn io(
        op: &'static str,
        path: Option<&str>,
        errno: i32,
        offset: Option<u64>,
        length: Option<u64>,
    ) -> Self {
        Self::Transfer {
            op,
            path: path.map(str::to_owned),
            errno: Some(errno),
            offset,
            length,
            message: errno_message(errno),
        }
    }

    /// Shorthand for [`CoreError::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidArgument(message.into())
    }
}

/// `"ENOENT: No such file or directory"`-style text for an errno.
pub fn errno_message(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    // std appends " (os error N)"; the symbolic name is more useful to a reader.
    let text = text.split(" (os error").next().unwrap_or(&text).to_owned();
    match errno_name(errno) {
        Some(name) => format!("{name}: {text}"),
        None => text,
    }
}

/// The symbolic name of the errno values a transfer or an arena commonly meets.
pub fn errno_name(errno: i32) -> Option<&'static str> {
    Some(match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::ENODEV => "ENODEV",
        libc::ENXIO => "ENXIO",
        _ => return None,
    })
}

/// Shorthand for results of the memory core.
pub type CoreResult<T> = Result<T, CoreError>;
