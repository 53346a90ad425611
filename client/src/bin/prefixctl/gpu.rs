//! What the CUDA driver says about this machine's GPUs, for `prefixctl doctor`: devices, peer
//! access and its link, and the physical copy bandwidth the data path is compared with.
//!
//! The driver is loaded at run time; without it every function here says so and the checks
//! that need it are skipped.

use cudarc::driver::sys as cu;
use prefixd_client::cuda::check;
use std::time::Instant;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Device {
    pub ordinal: usize,
    pub name: String,
    pub memory_bytes: u64,
    pub pci_bus_id: String,
}

/// Peer access from one GPU to another, as the driver reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Peer {
    pub from: usize,
    pub to: usize,
    pub access: bool,
    /// Native atomics over the peer link: NVLink has them, PCIe does not.
    pub native_atomics: bool,
    pub performance_rank: i32,
}

impl Peer {
    pub fn link(&self) -> &'static str {
        match (self.access, self.native_atomics) {
            (false, _) => "none",
            (true, true) => "NVLink",
            (true, false) => "PCIe",
        }
    }
}

/// The GPUs, or why there are none to look at.
pub fn devices() -> Result<Vec<Device>, String> {
    // SAFETY: only probes for the driver library (cudarc panics on calls without it).
    if !unsafe { cu::is_culib_present() } {
        return Err("no CUDA driver (libcuda.so.1) on this machine".into());
    }
    // SAFETY: the library is present; cuInit may be called any number of times.
    check("cuInit", unsafe { cu::cuInit(0) })?;
    let mut n = 0;
    // SAFETY: valid out-pointer.
    check("cuDeviceGetCount", unsafe { cu::cuDeviceGetCount(&mut n) })?;
    let mut out = Vec::new();
    for i in 0..n.max(0) {
        let mut dev: cu::CUdevice = 0;
        // SAFETY: i < count; valid out-pointer.
        check("cuDeviceGet", unsafe { cu::cuDeviceGet(&mut dev, i) })?;
        let mut name = [0 as std::ffi::c_char; 128];
        let mut bus = [0 as std::ffi::c_char; 32];
        let mut mem = 0usize;
        // SAFETY: valid device, out-pointers and buffer lengths; the strings come back
        // NUL-terminated.
        unsafe {
            check("cuDeviceGetName", cu::cuDeviceGetName(name.as_mut_ptr(), name.len() as i32, dev))?;
            check("cuDeviceGetPCIBusId", cu::cuDeviceGetPCIBusId(bus.as_mut_ptr(), bus.len() as i32, dev))?;
            check("cuDeviceTotalMem", cu::cuDeviceTotalMem_v2(&mut mem, dev))?;
        }
        // SAFETY: NUL-terminated by the driver (above).
        let text =
            |b: &[std::ffi::c_char]| unsafe { std::ffi::CStr::from_ptr(b.as_ptr()) }.to_string_lossy().into_owned();
        out.push(Device {
            ordinal: i as usize,
            name: text(&name),
            memory_bytes: mem as u64,
            pci_bus_id: text(&bus).to_lowercase(),
        });
    }
    Ok(out)
}

/// Peer access between every ordered pair of GPUs.
pub fn peers(devices: &[Device]) -> Result<Vec<Peer>, String> {
    let mut out = Vec::new();
    for a in devices {
        for b in devices.iter().filter(|b| b.ordinal != a.ordinal) {
            let (mut da, mut db) = (0, 0);
            let (mut access, mut atomics, mut rank) = (0, 0, 0);
            // SAFETY: ordinals from `devices`; valid out-pointers.
            unsafe {
                check("cuDeviceGet", cu::cuDeviceGet(&mut da, a.ordinal as i32))?;
                check("cuDeviceGet", cu::cuDeviceGet(&mut db, b.ordinal as i32))?;
                check("cuDeviceCanAccessPeer", cu::cuDeviceCanAccessPeer(&mut access, da, db))?;
                let attr = cu::CUdevice_P2PAttribute::CU_DEVICE_P2P_ATTRIBUTE_NATIVE_ATOMIC_SUPPORTED;
                check("cuDeviceGetP2PAttribute", cu::cuDeviceGetP2PAttribute(&mut atomics, attr, da, db))?;
                let attr = cu::CUdevice_P2PAttribute::CU_DEVICE_P2P_ATTRIBUTE_PERFORMANCE_RANK;
                check("cuDeviceGetP2PAttribute", cu::cuDeviceGetP2PAttribute(&mut rank, attr, da, db))?;
            }
            out.push(Peer {
                from: a.ordinal,
                to: b.ordinal,
                access: access != 0,
                native_atomics: atomics != 0,
                performance_rank: rank,
            });
        }
    }
    Ok(out)
}

/// A GPU's primary context, current on the calling thread while in use.
#[derive(Debug)]
pub struct Gpu {
    ctx: cu::CUcontext,
    dev: cu::CUdevice,
}

impl Gpu {
    pub fn open(ordinal: usize) -> Result<Gpu, String> {
        let mut dev = 0;
        let mut ctx = std::ptr::null_mut();
        // SAFETY: the driver was initialised by `devices`; valid out-pointers; released in Drop.
        unsafe {
            check("cuDeviceGet", cu::cuDeviceGet(&mut dev, ordinal as i32))?;
            check("cuDevicePrimaryCtxRetain", cu::cuDevicePrimaryCtxRetain(&mut ctx, dev))?;
        }
        let g = Gpu { ctx, dev };
        g.current()?;
        Ok(g)
    }

    pub fn current(&self) -> Result<(), String> {
        // SAFETY: a retained primary context.
        check("cuCtxSetCurrent", unsafe { cu::cuCtxSetCurrent(self.ctx) })
    }

    /// Lets this GPU's context reach `other`'s memory directly (NVLink or PCIe P2P), as the
    /// engines and UCX's cuda_ipc do. Without it cuMemcpyPeer stages through host memory, and
    /// the baseline measures that instead of the link (found on 2x H200: 38 GB/s over NVLink).
    pub fn enable_peer(&self, other: &Gpu) -> Result<(), String> {
        if self.dev == other.dev {
            return Ok(());
        }
        self.current()?;
        // SAFETY: both are retained primary contexts; flags must be 0.
        let r = unsafe { cu::cuCtxEnablePeerAccess(other.ctx, 0) };
        if r == cu::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED {
            return Ok(());
        }
        check("cuCtxEnablePeerAccess", r)
    }

    /// Device memory, freed with the returned guard.
    pub fn alloc(&self, len: usize) -> Result<DeviceBuffer, String> {
        self.current()?;
        let mut ptr = 0;
        // SAFETY: valid out-pointer, current context.
        check("cuMemAlloc", unsafe { cu::cuMemAlloc_v2(&mut ptr, len) })?;
        Ok(DeviceBuffer { ptr, len, ctx: self.ctx })
    }

    /// Page-locked host memory of `len` bytes.
    pub fn alloc_host(&self, len: usize) -> Result<HostBuffer, String> {
        self.current()?;
        let mut p = std::ptr::null_mut();
        // SAFETY: valid out-pointer; freed in HostBuffer's Drop.
        check("cuMemAllocHost", unsafe { cu::cuMemAllocHost_v2(&mut p, len) })?;
        Ok(HostBuffer { ptr: p.cast(), len, ctx: self.ctx })
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // SAFETY: retained in open.
        unsafe { cu::cuDevicePrimaryCtxRelease_v2(self.dev) };
    }
}

#[derive(Debug)]
pub struct DeviceBuffer {
    pub ptr: u64,
    pub len: usize,
    ctx: cu::CUcontext,
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in ctx by Gpu::alloc; nothing uses it after the guard is dropped.
        unsafe {
            cu::cuCtxSetCurrent(self.ctx);
            cu::cuMemFree_v2(self.ptr);
        }
    }
}

#[derive(Debug)]
pub struct HostBuffer {
    pub ptr: *mut u8,
    pub len: usize,
    ctx: cu::CUcontext,
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemAllocHost in ctx.
        unsafe {
            cu::cuCtxSetCurrent(self.ctx);
            cu::cuMemFreeHost(self.ptr.cast());
        }
    }
}

/// GB/s of the best of `reps` runs of `copy` moving `bytes`, each waited for.
pub fn best_gbps(bytes: usize, reps: usize, copy: impl FnMut() -> Result<(), String>) -> Result<f64, String> {
    let best = copy_seconds(reps, copy)?.into_iter().fold(f64::MAX, f64::min);
    Ok(bytes as f64 / best / 1e9)
}

/// The seconds each of `reps` runs of `copy` took, each waited for, after one warm-up run
/// (first touch, peer mappings).
pub fn copy_seconds(reps: usize, mut copy: impl FnMut() -> Result<(), String>) -> Result<Vec<f64>, String> {
    copy()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        copy()?;
        // SAFETY: waits for the current context's work.
        check("cuCtxSynchronize", unsafe { cu::cuCtxSynchronize() })?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(times)
}

/// A synchronous device-to-device copy (peer or local), as cudaMemcpy would do it.
pub fn copy_dtod(dst: &DeviceBuffer, src: &DeviceBuffer) -> Result<(), String> {
    let len = dst.len.min(src.len);
    // SAFETY: both buffers are live device allocations of at least `len` bytes; the driver
    // picks the peer path between contexts.
    check("cuMemcpyPeer", unsafe { cu::cuMemcpyPeer(dst.ptr, dst.ctx, src.ptr, src.ctx, len) })
}

pub fn copy_htod(dst: &DeviceBuffer, src: &HostBuffer) -> Result<(), String> {
    let len = dst.len.min(src.len);
    // SAFETY: live buffers of at least `len` bytes.
    check("cuMemcpyHtoD", unsafe { cu::cuMemcpyHtoD_v2(dst.ptr, src.ptr.cast(), len) })
}

pub fn copy_dtoh(dst: &HostBuffer, src: &DeviceBuffer) -> Result<(), String> {
    let len = dst.len.min(src.len);
    // SAFETY: live buffers of at least `len` bytes.
    check("cuMemcpyDtoH", unsafe { cu::cuMemcpyDtoH_v2(dst.ptr.cast(), src.ptr, len) })
}
