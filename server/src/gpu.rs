//! CUDA, for the GPU tier: the driver API through cudarc, loaded at run time, so the same binary
//! builds and runs where there is no CUDA (the GPU tier is then simply off).
//!
//! The GPU pool is one `cuMemAlloc` allocation (not VMM): UCX's cuda_ipc can export it to other
//! processes on the host. It is registered with UCX once, as CUDA memory. The host pool is
//! page-locked with `cuMemHostRegister` where CUDA is present, so host↔GPU copies run at DMA speed.

use cudarc::driver::sys as cu;
use std::ffi::c_void;
use std::fmt;

/// A failed CUDA driver call, with the call's name and the driver's code.
#[derive(Debug, Clone)]
pub struct CudaError(pub String);

impl std::error::Error for CudaError {}

impl fmt::Display for CudaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `Ok` for `CUDA_SUCCESS`, else the call and the driver's description (cudarc's result layer).
fn check(what: &str, r: cu::CUresult) -> Result<(), CudaError> {
    r.result().map_err(|e| CudaError(format!("{what} failed: {e}")))
}

/// Whether `libcuda.so.1` can be loaded. Asked before any other call: cudarc panics on the
/// first call when the library is absent.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library; no CUDA call is made.
    unsafe { cu::is_culib_present() }
}

/// The primary context of one GPU.
pub struct Cuda {
    ctx: cu::CUcontext,
    pub ordinal: usize,
}

// SAFETY: a CUcontext handle may be made current on any thread (cuCtxSetCurrent is thread-safe);
// the primary context stays retained until Drop, after every buffer (which holds an Arc) is gone.
unsafe impl Send for Cuda {}
// SAFETY: as above; &Cuda only makes the context current and issues thread-safe driver calls.
unsafe impl Sync for Cuda {}

impl fmt::Debug for Cuda {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cuda(gpu {})", self.ordinal)
    }
}

impl Cuda {
    pub fn open(ordinal: usize) -> Result<Cuda, CudaError> {
        if !driver_present() {
            return Err(CudaError("no CUDA driver (libcuda.so.1) on this machine".into()));
        }
        // SAFETY: the driver library is present (checked above); cuInit may be called repeatedly.
        check("cuInit", unsafe { cu::cuInit(0) })?;
        let mut count = 0;
        // SAFETY: valid out-pointer.
        check("cuDeviceGetCount", unsafe { cu::cuDeviceGetCount(&mut count) })?;
        if ordinal >= count.max(0) as usize {
            return Err(CudaError(format!("GPU {ordinal} does not exist ({count} visible)")));
        }
        let mut dev: cu::CUdevice = 0;
        // SAFETY: ordinal < device count; valid out-pointer.
        check("cuDeviceGet", unsafe { cu::cuDeviceGet(&mut dev, ordinal as i32) })?;
        let mut ctx: cu::CUcontext = std::ptr::null_mut();
        // SAFETY: valid device and out-pointer; released in Drop.
        check("cuDevicePrimaryCtxRetain", unsafe { cu::cuDevicePrimaryCtxRetain(&mut ctx, dev) })?;
        let c = Cuda { ctx, ordinal };
        c.make_current()?;
        Ok(c)
    }

    /// The device's PCI bus id, e.g. "0000:18:00.0" (empty if the driver will not say).
    pub fn pci_bus_id(&self) -> String {
        let mut dev: cu::CUdevice = 0;
        let mut buf = [0 as std::ffi::c_char; 32];
        // SAFETY: the ordinal was valid at open; valid out-pointers; the buffer's length is passed.
        let ok = unsafe {
            cu::cuDeviceGet(&mut dev, self.ordinal as i32).result().is_ok()
                && cu::cuDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as i32, dev).result().is_ok()
        };
        if !ok {
            return String::new();
        }
        // SAFETY: the driver wrote a NUL-terminated string into the buffer.
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().to_lowercase()
    }

    /// Makes this GPU's context current on the calling thread (UCX's progress thread needs it).
    pub fn make_current(&self) -> Result<(), CudaError> {
        // SAFETY: ctx is a retained primary context.
        check("cuCtxSetCurrent", unsafe { cu::cuCtxSetCurrent(self.ctx) })
    }

    /// `len` bytes of device memory from cuMemAlloc (exportable through cuda_ipc), with
    /// synchronous memory operations on, as cuda_ipc peers require.
    pub fn alloc(&self, len: usize) -> Result<u64, CudaError> {
        self.make_current()?;
        let mut ptr: cu::CUdeviceptr = 0;
        // SAFETY: context current; valid out-pointer.
        check("cuMemAlloc", unsafe { cu::cuMemAlloc_v2(&mut ptr, len) })?;
        let one: u32 = 1;
        // SAFETY: ptr is a live allocation; the attribute value is a u32 flag.
        let r = unsafe {
            cu::cuPointerSetAttribute(
                (&one as *const u32).cast::<c_void>(),
                cu::CUpointer_attribute::CU_POINTER_ATTRIBUTE_SYNC_MEMOPS,
                ptr,
            )
        };
        if let Err(e) = check("cuPointerSetAttribute(SYNC_MEMOPS)", r) {
            self.free(ptr);
            return Err(e);
        }
        Ok(ptr)
    }

    /// The CUDA IPC handle of an allocation, for same-host processes to map it.
    pub fn ipc_handle(&self, ptr: u64) -> Result<Vec<u8>, CudaError> {
        self.make_current()?;
        let mut h = cu::CUipcMemHandle { reserved: [0; 64] };
        // SAFETY: ptr is a live cuMemAlloc allocation; valid out-pointer.
        check("cuIpcGetMemHandle", unsafe { cu::cuIpcGetMemHandle(&mut h, ptr) })?;
        Ok(h.reserved.iter().map(|b| *b as u8).collect())
    }

    pub fn free(&self, ptr: u64) {
        let _ = self.make_current();
        // SAFETY: ptr came from alloc and is freed once by its owner.
        let r = unsafe { cu::cuMemFree_v2(ptr) };
        if let Err(e) = check("cuMemFree", r) {
            tracing::warn!(error = %e, "GPU pool not freed");
        }
    }

    /// Page-locks host memory for fast, asynchronous-capable copies. Ok(false) when it already
    /// was (UCX's cuda_copy registers host memory it maps): then it must not be unregistered here.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay mapped until [`Cuda::host_unregister`].
    pub unsafe fn host_register(&self, ptr: *mut u8, len: usize) -> Result<bool, CudaError> {
        self.make_current()?;
        // SAFETY: per this function's contract; PORTABLE so every context sees it pinned.
        let r = unsafe { cu::cuMemHostRegister_v2(ptr.cast(), len, 1) };
        if r == cu::CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED {
            return Ok(false);
        }
        check("cuMemHostRegister", r).map(|()| true)
    }

    /// # Safety
    /// `ptr` must have been registered with [`Cuda::host_register`].
    pub unsafe fn host_unregister(&self, ptr: *mut u8) {
        let _ = self.make_current();
        // SAFETY: per this function's contract.
        let _ = unsafe { cu::cuMemHostUnregister(ptr.cast()) };
    }

    /// Copies device → host and waits.
    ///
    /// # Safety
    /// Both ranges must be valid for `len` bytes and not in use by another transfer.
    pub unsafe fn copy_dtoh(&self, dst: *mut u8, src: u64, len: usize) -> Result<(), CudaError> {
        self.make_current()?;
        // SAFETY: per this function's contract.
        check("cuMemcpyDtoH", unsafe { cu::cuMemcpyDtoH_v2(dst.cast(), src, len) })
    }

    /// Fills device memory with zeros and waits.
    ///
    /// # Safety
    /// The range must be valid device memory for `len` bytes, not in use by another transfer.
    pub unsafe fn zero(&self, dst: u64, len: usize) -> Result<(), CudaError> {
        self.make_current()?;
        // SAFETY: per this function's contract; the null stream, waited for below.
        check("cuMemsetD8Async", unsafe { cu::cuMemsetD8Async(dst, 0, len, std::ptr::null_mut()) })?;
        // SAFETY: the null stream of the current context.
        check("cuStreamSynchronize", unsafe { cu::cuStreamSynchronize(std::ptr::null_mut()) })
    }

    /// Copies host → device and waits.
    ///
    /// # Safety
    /// Both ranges must be valid for `len` bytes and not in use by another transfer.
    pub unsafe fn copy_htod(&self, dst: u64, src: *const u8, len: usize) -> Result<(), CudaError> {
        self.make_current()?;
        // SAFETY: per this function's contract.
        check("cuMemcpyHtoD", unsafe { cu::cuMemcpyHtoD_v2(dst, src.cast(), len) })
    }
}

impl Drop for Cuda {
    fn drop(&mut self) {
        let mut dev: cu::CUdevice = 0;
        // SAFETY: valid out-pointer; the ordinal was valid at open.
        if unsafe { cu::cuDeviceGet(&mut dev, self.ordinal as i32) }.result().is_ok() {
            // SAFETY: releases the retain made in open, once.
            let _ = unsafe { cu::cuDevicePrimaryCtxRelease_v2(dev) };
        }
    }
}
