//! Direct copies to and from the server's host pool on the same host: the pool is a memfd the
//! server hands over an abstract Unix socket; we map it and copy with `memcpy` (host buffers) or
//! `cuMemcpy` (CUDA buffers, DMA at PCIe speed once the mapping is page-locked). UCX's own path
//! for CUDA memory to a remote host key measured ~0.2 GB/s; this is the replacement for it.
//!
//! Trust is unchanged: a same-host RMA session already holds a remote key to the whole pool.

use crate::cuda::check;
use cudarc::driver::sys as cu;
use std::sync::OnceLock;
use ucx_bindings::shm::SharedMemory;
use ucx_bindings::{MemoryType, RegionSlice};

#[derive(Debug)]
pub(crate) struct SharedHostPool {
    mem: SharedMemory,
    /// The pool's address in the server (what slot and chunk addresses are relative to).
    base: u64,
    /// Whether the mapping is page-locked for CUDA (tried once, on the first CUDA copy).
    /// Once page-locked: the mapping's device address, and whether this process registered it
    /// (None: CUDA cannot reach it).
    pinned: OnceLock<Option<(u64, bool)>>,
    /// Open while this process may write the server's pools (dropped last): the server keeps
    /// this session's expired slots out of use until it closes (see the server's `state`).
    _liveness: std::os::unix::net::UnixStream,
}

/// Makes current the CUDA context that owns device pointer `ptr` (tokio threads have none).
pub(crate) fn bind_context_of(ptr: u64) -> Result<(), String> {
    // SAFETY: only ever reached for regions registered as CUDA memory, so a driver is loaded.
    if !unsafe { cu::is_culib_present() } {
        return Err("CUDA memory but no CUDA driver".into());
    }
    let mut ctx: cu::CUcontext = std::ptr::null_mut();
    // SAFETY: valid out-pointer of the attribute's type (a CUcontext).
    let r = unsafe {
        cu::cuPointerGetAttribute(
            (&mut ctx as *mut cu::CUcontext).cast(),
            cu::CUpointer_attribute::CU_POINTER_ATTRIBUTE_CONTEXT,
            ptr,
        )
    };
    check("cuPointerGetAttribute(CONTEXT)", r)?;
    // SAFETY: a context the driver just reported as live.
    check("cuCtxSetCurrent", unsafe { cu::cuCtxSetCurrent(ctx) })
}

impl SharedHostPool {
    /// Receives and maps the pool; `len` is the length the server's pool descriptor announced.
    /// Maps the pool the server hands out on `socket` to the session of `token`.
    pub(crate) fn open(socket: &str, token: &[u8], base: u64, len: u64) -> std::io::Result<SharedHostPool> {
        let name = socket.strip_prefix('@').unwrap_or(socket);
        let proof: &[u8; ucx_bindings::shm::PROOF_LEN] =
            token.try_into().map_err(|_| std::io::Error::other("the session token is not 16 bytes"))?;
        let (fd, announced, liveness) = ucx_bindings::shm::receive_fd(name, proof)?;
        if announced != len {
            return Err(std::io::Error::other("pool socket and descriptor disagree on the length"));
        }
        let mem = SharedMemory::map(fd, len as usize)?;
        Ok(SharedHostPool { mem, base, pinned: OnceLock::new(), _liveness: liveness })
    }

    /// Whether `[addr, addr+len)` lies in this pool.
    pub(crate) fn contains(&self, addr: u64, len: usize) -> bool {
        addr >= self.base
            && addr - self.base <= self.mem.len() as u64
            && self.mem.len() as u64 - (addr - self.base) >= len as u64
    }

    /// The address by which CUDA (copies and kernels) reaches `[addr, addr+len)` of the pool,
    /// once the whole mapping is page-locked and mapped for devices; None when that failed (a
    /// kernel reading unregistered host memory faults the whole context).
    pub(crate) fn local_for_cuda(&self, addr: u64, len: usize) -> Option<u64> {
        if !self.contains(addr, len) {
            return None;
        }
        let (device_base, _) = (*self.pin_for_cuda())?;
        Some(device_base + (addr - self.base))
    }

    /// Page-locks the mapping once: PORTABLE (1) so every context sees it, DEVICEMAP (2) so
    /// kernels may read it; returns its device address (the host address under UVA).
    pub(crate) fn pin_for_cuda(&self) -> &Option<(u64, bool)> {
        self.pinned.get_or_init(|| {
            // SAFETY: only probes for the driver library (cudarc panics on calls without it).
            if !unsafe { cu::is_culib_present() } {
                return None;
            }
            let host = self.mem.as_ptr();
            // SAFETY: the mapping lives as long as self; flags as above.
            let r = unsafe { cu::cuMemHostRegister_v2(host.cast(), self.mem.len(), 1 | 2) };
            let ours = r.result().is_ok();
            if !ours && r != cu::CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED {
                return None;
            }
            let mut dev: cu::CUdeviceptr = 0;
            // SAFETY: registered above; valid out-pointer; flags must be 0.
            let r = unsafe { cu::cuMemHostGetDevicePointer_v2(&mut dev, host.cast(), 0) };
            (r.result().is_ok() && dev != 0).then_some((dev, ours))
        })
    }

    /// Copies between host fragments and the pool range at `addr` (the fragments in order make
    /// up the range): `to_pool` writes the pool.
    pub(crate) fn copy_fragments(&self, addr: u64, frags: &[crate::Fragment], to_pool: bool) -> Result<(), String> {
        let total: usize = frags.iter().map(|f| f.len).sum();
        if !self.contains(addr, total) {
            return Err(format!("{addr:#x}+{total} is outside the shared host pool"));
        }
        let mut off = (addr - self.base) as usize;
        for f in frags {
            // SAFETY: in range (checked above for the whole run).
            let pool = unsafe { self.mem.as_ptr().add(off) };
            // SAFETY: the pool range is reserved or leased for us, the fragment is host memory
            // the caller vouches for (checked against its tensors), `len` bytes each; raw copies
            // make no Rust references, and the pool mapping never overlaps the caller's memory.
            unsafe {
                if to_pool {
                    std::ptr::copy_nonoverlapping(f.ptr as *const u8, pool, f.len)
                } else {
                    std::ptr::copy_nonoverlapping(pool, f.ptr as *mut u8, f.len)
                }
            };
            off += f.len;
        }
        Ok(())
    }

    /// Copies between `local` and the pool at `addr`: `to_pool` writes the pool.
    pub(crate) fn copy(&self, addr: u64, local: &RegionSlice, to_pool: bool) -> Result<(), String> {
        if !self.contains(addr, local.len()) {
            return Err(format!("{addr:#x}+{} is outside the shared host pool", local.len()));
        }
        // SAFETY: in range (checked above).
        let pool = unsafe { self.mem.as_ptr().add((addr - self.base) as usize) };
        let here = local.as_ptr();
        match local.region().memory_type() {
            MemoryType::Host => {
                // SAFETY: both ranges are `len` bytes of live mappings (the slot is reserved or
                // leased for us; the local slice is kept alive by `local`); a raw copy makes no
                // Rust references, and the two mappings never overlap.
                unsafe {
                    if to_pool {
                        std::ptr::copy_nonoverlapping(here, pool, local.len())
                    } else {
                        std::ptr::copy_nonoverlapping(pool, here, local.len())
                    }
                };
                Ok(())
            }
            MemoryType::Cuda | MemoryType::CudaManaged => {
                bind_context_of(here as u64)?;
                self.pin_for_cuda();
                // SAFETY: device range from a CUDA region of `len` bytes; host range in the pool
                // (checked); both live for the copy, which completes before return.
                let r = unsafe {
                    if to_pool {
                        cu::cuMemcpyDtoH_v2(pool.cast(), here as u64, local.len())
                    } else {
                        cu::cuMemcpyHtoD_v2(here as u64, pool.cast(), local.len())
                    }
                };
                check("cuMemcpy", r)
            }
        }
    }
}

impl Drop for SharedHostPool {
    fn drop(&mut self) {
        if let Some(Some((_, true))) = self.pinned.get() {
            // SAFETY: registered in pin_for_cuda; unregistered once, before the mapping goes.
            unsafe { cu::cuMemHostUnregister(self.mem.as_ptr().cast()) };
        }
    }
}
