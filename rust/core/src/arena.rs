//! Arenas: one big host mapping or one device allocation (real, or simulated in host
//! memory) that a slab allocator carves up.
//!
//! An arena is allocated once, up front, so the hot path never calls the OS or the
//! CUDA allocator; blocks are offsets into it. Host arenas are locked (mlock) so
//! O_DIRECT reads and DMA never fault, and page-locked for CUDA when a GPU exists.

use std::ptr::NonNull;
use std::sync::{Arc, OnceLock};

use crate::cuda::{self, PrimaryContext};
use crate::error::{errno_message, CoreError, CoreResult};
use crate::sim::SimDevice;

/// The machine's page size in bytes.
pub fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page > 0 {
            page as usize
        } else {
            4096
        }
    })
}

/// Huge-page size that large mappings are aligned to, so transparent huge pages
/// can back them (fewer TLB misses for memcpy, fewer page pins for O_DIRECT).
const HUGE_PAGE: usize = 2 << 20;

/// Physical RAM and swap in bytes, for refusing arenas the machine cannot back.
fn memory_limits() -> Option<(u64, u64)> {
    // SAFETY: an all-zero sysinfo is a valid value to be overwritten.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid out pointer.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return None;
    }
    let unit = u64::from(info.mem_unit.max(1));
    Some((info.totalram as u64 * unit, info.totalswap as u64 * unit))
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// One page-aligned anonymous mapping.
#[derive(Debug)]
pub struct HostArena {
    ptr: NonNull<u8>,
    size: usize,
    locked: bool,
    lock_error: Option<String>,
    /// The context the mapping is registered with, when page-locked for CUDA.
    cuda: Option<Arc<PrimaryContext>>,
}

// SAFETY: the arena owns its mapping; concurrent access to its bytes is coordinated
// by the slab allocator (one owner per block) and the transfer engine's pins.
unsafe impl Send for HostArena {}
// SAFETY: as above; the struct itself is immutable after construction.
unsafe impl Sync for HostArena {}

impl HostArena {
    /// Maps `size` bytes (rounded up to the page size). With `lock`, mlock is
    /// attempted (failure recorded, not fatal; the pages are then pre-faulted);
    /// with `cuda_register`, the mapping is page-locked for CUDA when a GPU exists.
    pub fn new(size: u64, lock: bool, cuda_register: bool) -> CoreResult<Self> {
        let refuse = |reason: String| CoreError::Arena {
            requested: size,
            reason,
        };
        if size == 0 {
            return Err(refuse("the size is zero".to_owned()));
        }
        let page = page_size() as u64;
        let rounded = size
            .checked_next_multiple_of(page)
            .filter(|&r| r <= isize::MAX as u64)
            .ok_or_else(|| refuse("the size exceeds the address space".to_owned()))?;
        if let Some((ram, swap)) = memory_limits() {
            if rounded > ram.saturating_add(swap) {
                return Err(refuse(format!(
                    "larger than physical memory plus swap ({ram} bytes RAM + {swap} bytes swap)"
                )));
            }
        }
        let len = rounded as usize;
        let ptr = map_aligned(len).map_err(|errno| {
            refuse(format!(
                "mmap of {len} bytes failed: {}",
                errno_message(errno)
            ))
        })?;
        let mut arena = Self {
            ptr,
            size: len,
            locked: false,
            lock_error: None,
            cuda: None,
        };
        if lock {
            arena.lock();
        }
        if cuda_register && cuda::available() {
            // SAFETY: the mapping is live for `len` bytes until Drop unregisters it.
            match unsafe { cuda::host_register(arena.ptr.as_ptr(), len) } {
                Ok(ctx) => arena.cuda = Some(ctx),
                Err(err) => return Err(refuse(format!("cuMemHostRegister failed: {err}"))),
            }
        }
        Ok(arena)
    }

    fn lock(&mut self) {
        // SAFETY: the range is exactly our live mapping.
        if unsafe { libc::mlock(self.ptr.as_ptr().cast(), self.size) } == 0 {
            self.locked = true;
            return;
        }
        let errno = last_errno();
        self.lock_error = Some(match errno {
            libc::ENOMEM | libc::EPERM => {
                format!(
                    "{}: RLIMIT_MEMLOCK",
                    crate::error::errno_name(errno).unwrap_or("ENOMEM")
                )
            }
            _ => errno_message(errno),
        });
        // Still fault the pages in now, so the first transfer into them does not
        // pay for page faults; older kernels lack MADV_POPULATE_WRITE (harmless).
        // SAFETY: the range is exactly our live mapping.
        unsafe {
            libc::madvise(
                self.ptr.as_ptr().cast(),
                self.size,
                libc::MADV_POPULATE_WRITE,
            );
        }
    }

    /// Size in bytes (a multiple of the page size).
    pub fn size(&self) -> usize {
        self.size
    }

    /// Start address.
    pub fn address(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Start pointer.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// mlock succeeded.
    pub fn locked(&self) -> bool {
        self.locked
    }

    /// Why mlock failed, if it did.
    pub fn lock_error(&self) -> Option<&str> {
        self.lock_error.as_deref()
    }

    /// Page-locked through cuMemHostRegister.
    pub fn cuda_registered(&self) -> bool {
        self.cuda.is_some()
    }
}

/// Maps `len` bytes, aligned to a huge page when `len` is at least one (by mapping
/// a little more and trimming), and asks for transparent huge pages.
fn map_aligned(len: usize) -> Result<NonNull<u8>, i32> {
    let align = if len >= HUGE_PAGE {
        HUGE_PAGE
    } else {
        page_size()
    };
    let span = len.checked_add(align - page_size()).ok_or(libc::ENOMEM)?;
    // SAFETY: an anonymous private mapping with no address hint has no preconditions.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(last_errno());
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(align);
    let head = aligned - start;
    let tail = span - head - len;
    // SAFETY: both trimmed ranges lie inside the mapping just created and are
    // page-aligned (mmap returns page-aligned memory; `align` is a page multiple).
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
        if align == HUGE_PAGE {
            libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
    }
    NonNull::new(aligned as *mut u8).ok_or(libc::ENOMEM)
}

impl Drop for HostArena {
    fn drop(&mut self) {
        if let Some(ctx) = self.cuda.take() {
            // SAFETY: registered in `new` with this context; unregistered once.
            // Errors at teardown are not actionable.
            let _ = unsafe { cuda::host_unregister(&ctx, self.ptr.as_ptr()) };
        }
        // SAFETY: unmaps exactly the mapping this arena owns; nothing borrows it any
        // more (views and transfers hold an Arc to the arena).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.size);
        }
    }
}

/// Where a device arena's bytes live.
#[derive(Debug)]
enum DeviceMemory {
    /// cuMemAlloc in the primary context of the device.
    Cuda { ctx: Arc<PrimaryContext>, ptr: u64 },
    /// Host memory standing in for the memory of a simulated device.
    Sim {
        host: HostArena,
        sim: Arc<SimDevice>,
    },
}

/// One device allocation: in the primary context of a CUDA device, or in host
/// memory for a simulated device.
#[derive(Debug)]
pub struct DeviceArena {
    memory: DeviceMemory,
    ordinal: i32,
    size: usize,
}

/// Byte that fills simulated device memory until a copy writes it: 0xFF bytes read
/// as NaN in bf16 and fp32, so a read of never-written memory cannot pass unseen.
pub const SIM_POISON: u8 = 0xFF;

impl DeviceArena {
    /// Allocates `size` bytes on device `ordinal` (cuMemAlloc in its primary context).
    pub fn new(size: u64, ordinal: i32) -> CoreResult<Self> {
        let len = Self::check_size(size)?;
        cuda::require()?;
        let ctx = PrimaryContext::retain(ordinal)?;
        let ptr = cuda::device_alloc(&ctx, len)?;
        Ok(Self {
            memory: DeviceMemory::Cuda { ctx, ptr },
            ordinal,
            size: len,
        })
    }

    /// `size` bytes of simulated device memory (a page-aligned host mapping filled
    /// with [`SIM_POISON`]), registered with the hazard checker of `sim`.
    pub fn new_sim(size: u64, ordinal: i32, sim: Arc<SimDevice>) -> CoreResult<Self> {
        Self::check_size(size)?;
        let host = HostArena::new(size, false, false)?;
        // SAFETY: the mapping is live, writable and ours alone for `size()` bytes.
        unsafe { std::ptr::write_bytes(host.as_ptr(), SIM_POISON, host.size()) };
        sim.register_arena(host.address(), host.size() as u64);
        let size = host.size();
        Ok(Self {
            memory: DeviceMemory::Sim { host, sim },
            ordinal,
            size,
        })
    }

    fn check_size(size: u64) -> CoreResult<usize> {
        if size == 0 {
            return Err(CoreError::Arena {
                requested: 0,
                reason: "the size is zero".to_owned(),
            });
        }
        usize::try_from(size).map_err(|_| CoreError::Arena {
            requested: size,
            reason: "the size exceeds the address space".to_owned(),
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Device pointer of the start (a host pointer on a simulated device).
    pub fn address(&self) -> u64 {
        match &self.memory {
            DeviceMemory::Cuda { ptr, .. } => *ptr,
            DeviceMemory::Sim { host, .. } => host.address(),
        }
    }

    /// Device ordinal.
    pub fn device(&self) -> i32 {
        self.ordinal
    }

    /// The primary context the memory lives in (None on a simulated device).
    pub fn context(&self) -> Option<&Arc<PrimaryContext>> {
        match &self.memory {
            DeviceMemory::Cuda { ctx, .. } => Some(ctx),
            DeviceMemory::Sim { .. } => None,
        }
    }

    /// The simulated device, when the arena is one's.
    pub fn sim(&self) -> Option<&Arc<SimDevice>> {
        match &self.memory {
            DeviceMemory::Cuda { .. } => None,
            DeviceMemory::Sim { sim, .. } => Some(sim),
        }
    }

    /// Start pointer in host memory (simulated devices only).
    pub fn host_ptr(&self) -> Option<*mut u8> {
        match &self.memory {
            DeviceMemory::Cuda { .. } => None,
            DeviceMemory::Sim { host, .. } => Some(host.as_ptr()),
        }
    }
}

impl Drop for DeviceArena {
    fn drop(&mut self) {
        match &self.memory {
            DeviceMemory::Cuda { ctx, ptr } => {
                // SAFETY: allocated in `new` in this context; freed once, after every
                // transfer using it ended (they hold an Arc to the arena).
                let _ = unsafe { cuda::device_free(ctx, *ptr) };
            }
            DeviceMemory::Sim { host, sim } => sim.unregister_arena(host.address()),
        }
    }
}

/// Either kind of arena, shared.
#[derive(Debug, Clone)]
pub enum Arena {
    Host(Arc<HostArena>),
    Device(Arc<DeviceArena>),
}

impl Arena {
    /// Size in bytes.
    pub fn size(&self) -> usize {
        match self {
            Self::Host(a) => a.size(),
            Self::Device(a) => a.size(),
        }
    }

    /// Start address (host pointer or device pointer).
    pub fn address(&self) -> u64 {
        match self {
            Self::Host(a) => a.address(),
            Self::Device(a) => a.address(),
        }
    }

    /// True for host memory.
    pub fn is_host(&self) -> bool {
        matches!(self, Self::Host(_))
    }

    /// The simulated device of a simulated device arena.
    pub fn sim(&self) -> Option<&Arc<SimDevice>> {
        match self {
            Self::Host(_) => None,
            Self::Device(a) => a.sim(),
        }
    }

    /// Start pointer when the bytes are in host memory (host and simulated arenas).
    pub fn host_ptr(&self) -> Option<*mut u8> {
        match self {
            Self::Host(a) => Some(a.as_ptr()),
            Self::Device(a) => a.host_ptr(),
        }
    }

    /// `"host"` or `"device"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Host(_) => "host",
            Self::Device(_) => "device",
        }
    }
}
