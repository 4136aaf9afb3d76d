//! Submission requests: validated, pinned and turned into a [`Transfer`] before
//! anything is queued, so every bad input is a typed error at the call site.

use std::sync::Arc;

use crate::arena::{Arena, DeviceArena};
use crate::cuda::DeviceCopy;
use crate::error::{CoreError, CoreResult};
use crate::event::Event;
use crate::pool::ArenaAllocator;
use crate::slab::BlockHandle;
use crate::transfer::device::{DeviceQueue, DeviceSide};
use crate::transfer::files::FileEntry;
use crate::transfer::task::{Hold, Op, Transfer};
use crate::{DIRECT_IO_ALIGN, PRIORITY_LANES};

/// Whether a read uses O_DIRECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectMode {
    /// O_DIRECT for the aligned body when offset and address are aligned; the
    /// unaligned tail (or everything, when the start is unaligned) is buffered.
    Auto,
    /// O_DIRECT for everything; unaligned requests are an AlignmentError.
    Require,
    /// Buffered reads only.
    Never,
}

impl DirectMode {
    /// Parses `"auto"`, `"require"` or `"never"`.
    pub fn parse(text: &str) -> CoreResult<Self> {
        match text {
            "auto" => Ok(Self::Auto),
            "require" => Ok(Self::Require),
            "never" => Ok(Self::Never),
            other => Err(CoreError::invalid(format!(
                "direct must be 'auto', 'require' or 'never', got {other:?}"
            ))),
        }
    }
}

/// Validates a lane number.
pub(crate) fn check_priority(priority: u8) -> CoreResult<()> {
    if usize::from(priority) >= PRIORITY_LANES {
        return Err(CoreError::invalid(format!(
            "priority must be 0 (demand), 1 (prefetch) or 2 (background), got {priority}"
        )));
    }
    Ok(())
}

/// file -> host block.
#[derive(Debug, Clone)]
pub struct ReadRequest {
    pub file_id: u64,
    pub file_offset: u64,
    pub length: u64,
    pub dst: Arc<ArenaAllocator>,
    pub dst_handle: BlockHandle,
    pub dst_offset: u64,
    pub priority: u8,
    pub direct: DirectMode,
    pub expect_crc32: Option<u32>,
    pub owned: bool,
    pub tag: i64,
}

impl ReadRequest {
    pub(crate) fn prepare(self, id: u64, file: Arc<FileEntry>, chunk: u64) -> CoreResult<Transfer> {
        check_priority(self.priority)?;
        if !self.dst.arena().is_host() {
            return Err(CoreError::WrongKind(
                "reads go into host memory; the destination allocator is on a device".into(),
            ));
        }
        if self.file_offset.checked_add(self.length).is_none() {
            return Err(CoreError::invalid(format!(
                "file range of {} bytes at offset {} overflows",
                self.length, self.file_offset
            )));
        }
        let address = self
            .dst
            .range_address(&self.dst_handle, self.dst_offset, self.length)?;
        let direct_len = self.direct_len(&file, address)?;
        self.dst
            .pin_range(&self.dst_handle, self.dst_offset, self.length)?;
        let op = Op::Read {
            file,
            file_offset: self.file_offset,
            direct_len,
            expect_crc32: self.expect_crc32,
        };
        let hold = Hold {
            allocator: self.dst,
            handle: self.dst_handle,
        };
        Ok(Transfer::new(
            id,
            self.tag,
            op,
            address,
            self.length,
            chunk,
            self.priority,
            hold,
            None,
            self.owned,
        ))
    }

    /// Bytes from the start to read with O_DIRECT.
    fn direct_len(&self, file: &FileEntry, address: u64) -> CoreResult<u64> {
        let aligned_start =
            self.file_offset % DIRECT_IO_ALIGN == 0 && address % DIRECT_IO_ALIGN == 0;
        match self.direct {
            DirectMode::Never => Ok(0),
            DirectMode::Auto if aligned_start && file.supports_direct() => {
                Ok(self.length / DIRECT_IO_ALIGN * DIRECT_IO_ALIGN)
            }
            DirectMode::Auto => Ok(0),
            DirectMode::Require => {
                if !aligned_start || self.length % DIRECT_IO_ALIGN != 0 {
                    return Err(CoreError::Alignment(format!(
                        "direct='require' needs file offset, length and destination address \
                         aligned to {DIRECT_IO_ALIGN} bytes: offset {}, length {}, address {address:#x}",
                        self.file_offset, self.length
                    )));
                }
                if !file.supports_direct() {
                    return Err(CoreError::Transfer {
                        op: "read",
                        path: Some(file.path.clone()),
                        errno: Some(libc::EINVAL),
                        offset: Some(self.file_offset),
                        length: Some(self.length),
                        message: "direct='require' but the filesystem refuses O_DIRECT".into(),
                    });
                }
                Ok(self.length)
            }
        }
    }
}

/// Block -> block, host or device on either side.
#[derive(Debug, Clone)]
pub struct CopyRequest {
    pub src: Arc<ArenaAllocator>,
    pub src_handle: BlockHandle,
    pub dst: Arc<ArenaAllocator>,
    pub dst_handle: BlockHandle,
    pub length: u64,
    pub src_offset: u64,
    pub dst_offset: u64,
    pub priority: u8,
    pub owned: bool,
    pub tag: i64,
    /// The copy waits for this event before writing any byte: on a device, the copy
    /// stream waits on it (e.g. an event recorded after the kernels that last read the
    /// destination block); a host copy waits for it on its worker.
    pub after: Option<Arc<Event>>,
}

impl CopyRequest {
    /// Validates and pins; device copies also get the device queue they go to.
    pub(crate) fn prepare(
        self,
        id: u64,
        chunk: u64,
        queue_for: impl FnOnce(DeviceSide) -> CoreResult<Arc<DeviceQueue>>,
    ) -> CoreResult<(Transfer, Option<Arc<DeviceQueue>>)> {
        check_priority(self.priority)?;
        let src = self
            .src
            .range_address(&self.src_handle, self.src_offset, self.length)?;
        let dst = self
            .dst
            .range_address(&self.dst_handle, self.dst_offset, self.length)?;
        let same_block = Arc::ptr_eq(&self.src, &self.dst) && self.src_handle == self.dst_handle;
        if same_block
            && self.src_offset < self.dst_offset + self.length
            && self.dst_offset < self.src_offset + self.length
        {
            return Err(CoreError::invalid(format!(
                "source range at {} and destination range at {} ({} bytes) overlap in one block",
                self.src_offset, self.dst_offset, self.length
            )));
        }
        let (kind, side) = match (self.src.arena(), self.dst.arena()) {
            (Arena::Host(_), Arena::Host(_)) => (None, None),
            (Arena::Host(_), Arena::Device(d)) => {
                (Some(DeviceCopy::HostToDevice), Some(side_of(d)))
            }
            (Arena::Device(s), Arena::Host(_)) => {
                (Some(DeviceCopy::DeviceToHost), Some(side_of(s)))
            }
            (Arena::Device(s), Arena::Device(d)) => {
                let (from, to) = (side_of(s), side_of(d));
                if !from.same(&to) {
                    return Err(CoreError::invalid(format!(
                        "copies between devices ({} -> {}) are not supported",
                        from.describe(),
                        to.describe()
                    )));
                }
                (Some(DeviceCopy::DeviceToDevice), Some(to))
            }
        };
        let (op, queue) = match (kind, side) {
            (Some(kind), Some(side)) => {
                let queue = queue_for(side)?;
                if let Some(after) = &self.after {
                    queue.backend.check_after(after)?;
                }
                let op = Op::Device {
                    kind,
                    src,
                    after: self.after.clone(),
                };
                (op, Some(queue))
            }
            _ => (
                Op::HostCopy {
                    src,
                    after: self.after.clone(),
                },
                None,
            ),
        };
        self.dst
            .pin_range(&self.dst_handle, self.dst_offset, self.length)?;
        if let Err(err) = self
            .src
            .pin_range(&self.src_handle, self.src_offset, self.length)
        {
            self.dst.release(&self.dst_handle, false);
            return Err(err);
        }
        let dst_hold = Hold {
            allocator: self.dst,
            handle: self.dst_handle,
        };
        let src_hold = Hold {
            allocator: self.src,
            handle: self.src_handle,
        };
        let transfer = Transfer::new(
            id,
            self.tag,
            op,
            dst,
            self.length,
            chunk,
            self.priority,
            dst_hold,
            Some(src_hold),
            self.owned,
        );
        Ok((transfer, queue))
    }
}

fn side_of(arena: &DeviceArena) -> DeviceSide {
    match arena.sim() {
        Some(sim) => DeviceSide::Sim(sim.clone()),
        None => DeviceSide::Cuda(arena.device()),
    }
}
