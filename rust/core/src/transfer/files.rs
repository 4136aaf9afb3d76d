//! Registered files: opened once (buffered, and O_DIRECT where the filesystem
//! allows) and read with pread from any worker; an injected fault (tests only) can
//! fail a read with an errno or end the file early.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::{CoreError, CoreResult};
use crate::DIRECT_IO_ALIGN;

/// One registered file.
#[derive(Debug)]
pub(crate) struct FileEntry {
    pub(crate) id: u64,
    pub(crate) path: String,
    buffered: File,
    /// None when the filesystem refuses O_DIRECT (tmpfs, some network filesystems).
    direct: Option<File>,
}

/// What an injected fault does to one read (see `transfer::faults`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadFault {
    /// pread fails with this errno.
    Errno(i32),
    /// The file seems to end at this offset.
    EndAt(u64),
}

impl FileEntry {
    fn open(id: u64, path: &str) -> CoreResult<Self> {
        let fail = |err: std::io::Error| {
            CoreError::io(
                "open",
                Some(path),
                err.raw_os_error().unwrap_or(libc::EIO),
                None,
                None,
            )
        };
        // O_NONBLOCK keeps a FIFO from blocking the open; it changes nothing for
        // regular files and block devices, the only kinds accepted.
        let buffered = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(fail)?;
        let kind = buffered.metadata().map_err(fail)?.file_type();
        if !(kind.is_file() || kind.is_block_device()) {
            let errno = if kind.is_dir() {
                libc::EISDIR
            } else {
                libc::EINVAL
            };
            return Err(CoreError::Transfer {
                op: "open",
                path: Some(path.to_owned()),
                errno: Some(errno),
                offset: None,
                length: None,
                message: "not a regular file or block device".into(),
            });
        }
        let direct = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        Ok(Self {
            id,
            path: path.to_owned(),
            buffered,
            direct,
        })
    }

    /// True when O_DIRECT reads are possible.
    pub(crate) fn supports_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Current size in bytes.
    pub(crate) fn size(&self) -> CoreResult<u64> {
        self.buffered.metadata().map(|m| m.len()).map_err(|err| {
            CoreError::io(
                "stat",
                Some(&self.path),
                err.raw_os_error().unwrap_or(libc::EIO),
                None,
                None,
            )
        })
    }

    /// Reads `len` bytes at `offset` into `dst`, the first `direct_len` bytes with
    /// O_DIRECT. Returns (bytes read, of which with O_DIRECT); fewer than `len` only
    /// at end of file.
    /// Retries EINTR and partial reads; falls back to buffered reads when the
    /// filesystem rejects an O_DIRECT read it accepted at open (EINVAL). `fault`
    /// (tests only) fails the read or ends the file early.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `len` bytes and not accessed concurrently.
    pub(crate) unsafe fn read_at(
        &self,
        dst: *mut u8,
        len: usize,
        offset: u64,
        direct_len: usize,
        fault: Option<ReadFault>,
    ) -> Result<(usize, usize), i32> {
        let len = match fault {
            None => len,
            Some(ReadFault::Errno(errno)) => return Err(errno),
            Some(ReadFault::EndAt(end)) => len.min(end.saturating_sub(offset) as usize),
        };
        // O_DIRECT reads whole pages only: an early end leaves the rest to buffered reads.
        let direct_len = direct_len.min(len - len % DIRECT_IO_ALIGN as usize);
        let mut done = 0usize;
        let mut direct_done = 0usize;
        let mut direct = self.direct.as_ref().filter(|_| direct_len > 0);
        while done < len {
            let in_direct =
                direct.is_some() && done < direct_len && done as u64 % DIRECT_IO_ALIGN == 0;
            let (fd, want) = match direct {
                Some(file) if in_direct => (file.as_raw_fd(), direct_len - done),
                _ => (self.buffered.as_raw_fd(), len - done),
            };
            // SAFETY: dst+done..dst+done+want lies inside the caller's range.
            let n = unsafe {
                libc::pread(
                    fd,
                    dst.add(done).cast(),
                    want,
                    (offset + done as u64) as libc::off_t,
                )
            };
            if n < 0 {
                let errno = std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO);
                match errno {
                    libc::EINTR => continue,
                    libc::EINVAL if in_direct => {
                        direct = None;
                        continue;
                    }
                    _ => return Err(errno),
                }
            }
            if n == 0 {
                break;
            }
            done += n as usize;
            if in_direct {
                direct_done += n as usize;
            }
        }
        Ok((done, direct_done))
    }
}

/// The id -> file table of an engine.
#[derive(Debug, Default)]
pub(crate) struct FileTable {
    next_id: AtomicU64,
    files: Mutex<HashMap<u64, Arc<FileEntry>>>,
}

impl FileTable {
    pub(crate) fn register(&self, path: &str) -> CoreResult<u64> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let entry = Arc::new(FileEntry::open(id, path)?);
        self.lock().insert(id, entry);
        Ok(id)
    }

    /// Removes a file; transfers in flight keep their own reference.
    pub(crate) fn unregister(&self, id: u64) -> CoreResult<()> {
        self.lock().remove(&id).map(drop).ok_or_else(|| unknown(id))
    }

    pub(crate) fn get(&self, id: u64) -> CoreResult<Arc<FileEntry>> {
        self.lock().get(&id).cloned().ok_or_else(|| unknown(id))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<FileEntry>>> {
        // Only plain map operations run under the lock; poisoning cannot leave it torn.
        self.files.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn unknown(id: u64) -> CoreError {
    CoreError::invalid(format!("file id {id} is not registered"))
}
