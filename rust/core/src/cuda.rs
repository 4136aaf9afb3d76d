//! The CUDA driver, loaded at run time: probing, primary contexts, copy streams, events.
//!
//! libcuda is opened with cudarc's dynamic loading, which panics when the library
//! is missing; every entry point here therefore goes through [`probe`] first, which
//! checks `is_culib_present`, `cuInit` and the device count once per process. A
//! machine without a driver, without devices, or whose `cuInit` fails is simply
//! "unavailable" and every call returns [`CoreError::CudaUnavailable`].

use std::ffi::{c_void, CStr};
use std::sync::{Arc, OnceLock};

use cudarc::driver::sys;

use crate::error::{CoreError, CoreResult};

/// What the one-time probe of the driver found.
fn probe() -> &'static Result<usize, String> {
    static PROBE: OnceLock<Result<usize, String>> = OnceLock::new();
    PROBE.get_or_init(|| {
        // cudarc panics when a symbol cannot be resolved; never let that escape.
        std::panic::catch_unwind(probe_driver)
            .unwrap_or_else(|_| Err("the CUDA driver library could not be used".to_owned()))
    })
}

fn probe_driver() -> Result<usize, String> {
    // SAFETY: only tries to open the library by name; no symbol is called.
    if !unsafe { sys::is_culib_present() } {
        return Err("libcuda could not be loaded".to_owned());
    }
    // SAFETY: libcuda is present (checked above); cuInit has no preconditions.
    let status = unsafe { sys::cuInit(0) };
    check(status, "cuInit").map_err(|e| e.to_string())?;
    let mut count = 0;
    // SAFETY: the driver is initialised and `count` is a valid out pointer.
    let status = unsafe { sys::cuDeviceGetCount(&mut count) };
    check(status, "cuDeviceGetCount").map_err(|e| e.to_string())?;
    if count <= 0 {
        return Err("no CUDA device found".to_owned());
    }
    Ok(count as usize)
}

/// True when libcuda loads, cuInit succeeds and at least one device exists.
pub fn available() -> bool {
    probe().is_ok()
}

/// Number of CUDA devices (0 when CUDA is unavailable).
pub fn device_count() -> usize {
    probe().as_ref().copied().unwrap_or(0)
}

/// Ok when the driver is usable, else the reason as a typed error.
pub fn require() -> CoreResult<usize> {
    probe()
        .as_ref()
        .copied()
        .map_err(|reason| CoreError::CudaUnavailable(reason.clone()))
}

/// Converts a driver status into a result naming the failed call.
fn check(result: sys::CUresult, op: &'static str) -> CoreResult<()> {
    if result == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut name: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: only reached after libcuda was found present (every caller runs
    // after `probe`); `name` is a valid out pointer.
    let named = unsafe { sys::cuGetErrorName(result, &mut name) };
    let name = if named == sys::CUresult::CUDA_SUCCESS && !name.is_null() {
        // SAFETY: the driver returns a static NUL-terminated string.
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    } else {
        format!("{result:?}")
    };
    Err(CoreError::Cuda {
        op,
        code: result as i32,
        name,
    })
}

/// A retained primary context of one device; released when the last Arc goes.
#[derive(Debug)]
pub struct PrimaryContext {
    ordinal: i32,
    device: sys::CUdevice,
    ctx: sys::CUcontext,
}

// SAFETY: a CUcontext is a driver handle usable from any thread once made
// current there; the driver synchronises access to it internally.
unsafe impl Send for PrimaryContext {}
// SAFETY: as above; `&PrimaryContext` only exposes `make_current`.
unsafe impl Sync for PrimaryContext {}

impl PrimaryContext {
    /// Retains the primary context of device `ordinal`.
    pub fn retain(ordinal: i32) -> CoreResult<Arc<Self>> {
        let count = require()?;
        if ordinal < 0 || ordinal as usize >= count {
            return Err(CoreError::invalid(format!(
                "CUDA device {ordinal} does not exist ({count} devices)"
            )));
        }
        let mut device = 0;
        // SAFETY: driver initialised by `require`; valid out pointer.
        let status = unsafe { sys::cuDeviceGet(&mut device, ordinal) };
        check(status, "cuDeviceGet")?;
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: `device` is a valid device handle; valid out pointer.
        let status = unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, device) };
        check(status, "cuDevicePrimaryCtxRetain")?;
        Ok(Arc::new(Self {
            ordinal,
            device,
            ctx,
        }))
    }

    /// Device ordinal of this context.
    pub fn ordinal(&self) -> i32 {
        self.ordinal
    }

    /// Makes this context current on the calling thread (cheap; done before every call
    /// because other libraries on the same thread may have switched contexts).
    pub fn make_current(&self) -> CoreResult<()> {
        // SAFETY: `ctx` is a live retained primary context.
        let status = unsafe { sys::cuCtxSetCurrent(self.ctx) };
        check(status, "cuCtxSetCurrent")
    }
}

impl Drop for PrimaryContext {
    fn drop(&mut self) {
        // SAFETY: balances the retain in `retain`; errors at teardown are not actionable.
        unsafe {
            sys::cuDevicePrimaryCtxRelease_v2(self.device);
        }
    }
}

/// A non-blocking stream dedicated to copies, so they never serialise behind
/// compute on the legacy default stream.
#[derive(Debug)]
pub struct CopyStream {
    ctx: Arc<PrimaryContext>,
    stream: sys::CUstream,
}

// SAFETY: CUstream handles may be used from any thread with the context current.
unsafe impl Send for CopyStream {}
// SAFETY: every method makes the context current and issues thread-safe driver calls.
unsafe impl Sync for CopyStream {}

impl CopyStream {
    /// Creates a non-blocking stream in `ctx`.
    pub fn new(ctx: Arc<PrimaryContext>) -> CoreResult<Self> {
        ctx.make_current()?;
        let mut stream: sys::CUstream = std::ptr::null_mut();
        let flags = sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32;
        // SAFETY: context current; valid out pointer.
        let status = unsafe { sys::cuStreamCreate(&mut stream, flags) };
        check(status, "cuStreamCreate")?;
        Ok(Self { ctx, stream })
    }

    /// The context the stream lives in.
    pub fn context(&self) -> &Arc<PrimaryContext> {
        &self.ctx
    }

    /// Queues a copy of `len` bytes and records an event after it.
    ///
    /// # Safety
    /// `dst` and `src` must be valid for `len` bytes in the spaces `kind` names and
    /// stay valid until the returned event completes.
    pub unsafe fn copy_async(
        &self,
        kind: DeviceCopy,
        dst: u64,
        src: u64,
        len: usize,
    ) -> CoreResult<CudaEvent> {
        self.ctx.make_current()?;
        let s = self.stream;
        // SAFETY: the caller guarantees the pointers; the stream is live.
        let result = unsafe {
            match kind {
                DeviceCopy::HostToDevice => {
                    sys::cuMemcpyHtoDAsync_v2(dst, src as *const c_void, len, s)
                }
                DeviceCopy::DeviceToHost => {
                    sys::cuMemcpyDtoHAsync_v2(dst as *mut c_void, src, len, s)
                }
                DeviceCopy::DeviceToDevice => sys::cuMemcpyDtoDAsync_v2(dst, src, len, s),
            }
        };
        check(result, kind.op())?;
        let event = CudaEvent::new(self.ctx.clone())?;
        // SAFETY: both handles are live and belong to the current context.
        let status = unsafe { sys::cuEventRecord(event.event, s) };
        check(status, "cuEventRecord")?;
        Ok(event)
    }

    /// Makes every later copy on this stream wait for `event` (cuStreamWaitEvent),
    /// e.g. an event recorded on the compute stream after the kernels reading a block.
    pub fn wait_event(&self, event: &CudaEvent) -> CoreResult<()> {
        self.ctx.make_current()?;
        // SAFETY: both handles are live; an event of another context of the same
        // device is allowed by the driver.
        let status = unsafe { sys::cuStreamWaitEvent(self.stream, event.event, 0) };
        check(status, "cuStreamWaitEvent")
    }
}

impl Drop for CopyStream {
    fn drop(&mut self) {
        if self.ctx.make_current().is_ok() {
            // SAFETY: the stream was created in this context and is destroyed once.
            unsafe {
                sys::cuStreamDestroy_v2(self.stream);
            }
        }
    }
}

/// Direction of a copy involving device memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceCopy {
    HostToDevice,
    DeviceToHost,
    DeviceToDevice,
}

impl DeviceCopy {
    fn op(self) -> &'static str {
        match self {
            Self::HostToDevice => "cuMemcpyHtoDAsync",
            Self::DeviceToHost => "cuMemcpyDtoHAsync",
            Self::DeviceToDevice => "cuMemcpyDtoDAsync",
        }
    }
}

/// A CUDA event recorded after a copy; lets other streams wait without the host.
#[derive(Debug)]
pub struct CudaEvent {
    ctx: Arc<PrimaryContext>,
    event: sys::CUevent,
}

// SAFETY: CUevent handles may be queried/synchronised from any thread.
unsafe impl Send for CudaEvent {}
// SAFETY: all methods are thread-safe driver calls on an immutable handle.
unsafe impl Sync for CudaEvent {}

impl CudaEvent {
    fn new(ctx: Arc<PrimaryContext>) -> CoreResult<Self> {
        let mut event: sys::CUevent = std::ptr::null_mut();
        let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        // SAFETY: the caller made `ctx` current; valid out pointer.
        let status = unsafe { sys::cuEventCreate(&mut event, flags) };
        check(status, "cuEventCreate")?;
        Ok(Self { ctx, event })
    }

    /// Records a new event on `stream`, a live CUstream of `ctx`'s device (e.g.
    /// torch's current stream).
    pub fn record(ctx: Arc<PrimaryContext>, stream: usize) -> CoreResult<Self> {
        ctx.make_current()?;
        let event = Self::new(ctx)?;
        // SAFETY: the caller passes a live CUstream (the Python API documents it);
        // the event was just created in the current context.
        let status = unsafe { sys::cuEventRecord(event.event, stream as sys::CUstream) };
        check(status, "cuEventRecord")?;
        Ok(event)
    }

    /// True when the work before the event has finished.
    pub fn query(&self) -> CoreResult<bool> {
        self.ctx.make_current()?;
        // SAFETY: live event handle.
        let result = unsafe { sys::cuEventQuery(self.event) };
        if result == sys::CUresult::CUDA_ERROR_NOT_READY {
            return Ok(false);
        }
        check(result, "cuEventQuery").map(|()| true)
    }

    /// Blocks until the event has completed.
    pub fn synchronize(&self) -> CoreResult<()> {
        self.ctx.make_current()?;
        // SAFETY: live event handle.
        let status = unsafe { sys::cuEventSynchronize(self.event) };
        check(status, "cuEventSynchronize")
    }

    /// Makes `stream` (a CUstream of the same device, e.g. torch's current stream)
    /// wait for this event.
    pub fn wait_on(&self, stream: usize) -> CoreResult<()> {
        self.ctx.make_current()?;
        // SAFETY: the caller passes a live CUstream (the Python API documents it);
        // the event handle is live.
        let status = unsafe { sys::cuStreamWaitEvent(stream as sys::CUstream, self.event, 0) };
        check(status, "cuStreamWaitEvent")
    }
}

impl Drop for CudaEvent {
    fn drop(&mut self) {
        if self.ctx.make_current().is_ok() {
            // SAFETY: destroyed once; the driver defers release until it completes.
            unsafe {
                sys::cuEventDestroy_v2(self.event);
            }
        }
    }
}

/// Allocates `size` bytes of device memory in `ctx`.
pub fn device_alloc(ctx: &PrimaryContext, size: usize) -> CoreResult<u64> {
    ctx.make_current()?;
    let mut ptr: sys::CUdeviceptr = 0;
    // SAFETY: context current; valid out pointer.
    let status = unsafe { sys::cuMemAlloc_v2(&mut ptr, size) };
    check(status, "cuMemAlloc")?;
    Ok(ptr)
}

/// Frees memory from [`device_alloc`].
///
/// # Safety
/// `ptr` must come from `device_alloc` in `ctx` and not be used afterwards.
pub unsafe fn device_free(ctx: &PrimaryContext, ptr: u64) -> CoreResult<()> {
    ctx.make_current()?;
    // SAFETY: guaranteed by the caller.
    let status = unsafe { sys::cuMemFree_v2(ptr) };
    check(status, "cuMemFree")
}

/// Page-locks host memory for DMA (portable to every context); returns the context
/// used, which must outlive the registration.
///
/// # Safety
/// `ptr..ptr+len` must be a live mapping that stays mapped until [`host_unregister`].
pub unsafe fn host_register(ptr: *mut u8, len: usize) -> CoreResult<Arc<PrimaryContext>> {
    let ctx = PrimaryContext::retain(0)?;
    ctx.make_current()?;
    let flags = sys::CU_MEMHOSTREGISTER_PORTABLE;
    // SAFETY: guaranteed by the caller.
    let status = unsafe { sys::cuMemHostRegister_v2(ptr.cast(), len, flags) };
    check(status, "cuMemHostRegister")?;
    Ok(ctx)
}

/// Undoes [`host_register`].
///
/// # Safety
/// `ptr` must have been registered with `host_register` in `ctx`.
pub unsafe fn host_unregister(ctx: &PrimaryContext, ptr: *mut u8) -> CoreResult<()> {
    ctx.make_current()?;
    // SAFETY: guaranteed by the caller.
    let status = unsafe { sys::cuMemHostUnregister(ptr.cast()) };
    check(status, "cuMemHostUnregister")
}
