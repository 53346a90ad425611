//! Registered memory. A [`MemRegion`] is one `ucp_mem_map` registration, made once and used by
//! every transfer that touches it (never a registration per operation). A [`RegionSlice`] names
//! a range of it; operations take their slice by value (an `Arc` clone), so a region outlives
//! every transfer into or out of it even when the caller drops the future.
//!
//! Bytes in a region are shared with UCX and with peers: they are only ever touched through raw
//! pointers and copies, never lent out as `&[u8]`, since a transfer may write them at any time.

use crate::context::{Context, ContextInner, MemoryType};
use crate::error::{Error, Result};
use crate::result;
use crate::sys;
use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

/// A registered memory range.
pub struct MemRegion {
    pub(crate) ctx: Arc<ContextInner>,
    ptr: NonNull<u8>,
    len: usize,
    mem_type: MemoryType,
    pub(crate) memh: sys::ucp_mem_h,
    packed_rkey: Vec<u8>,
    /// Set when this region allocated its memory (mmap) and must unmap it.
    owns_memory: bool,
}

// SAFETY: memh is a context-level object of a context created with mt_workers_shared, so mapping,
// packing and unmapping it from any thread is locked by UCX. The memory itself is only touched
// through raw pointers (copies), never through Rust references, so sharing the pointer between
// threads creates no aliasing of `&mut`.
unsafe impl Send for MemRegion {}
// SAFETY: as above; &MemRegion only reads immutable fields or copies through raw pointers.
unsafe impl Sync for MemRegion {}

impl MemRegion {
    /// Allocates `len` bytes of page-aligned, zeroed host memory and registers it.
    pub fn alloc_host(ctx: &Context, len: usize) -> Result<Arc<MemRegion>> {
        if len == 0 {
            return Err(Error::invalid("cannot allocate a zero-length region"));
        }
        // SAFETY: anonymous private mapping; no file, no fixed address. Checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::invalid(format!("mmap of {len} bytes failed: {}", std::io::Error::last_os_error())));
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| Error::invalid("mmap returned null"))?;
        // SAFETY: ptr..ptr+len is a fresh mapping this region will own and unmap in Drop.
        match unsafe { Self::map(ctx, ptr, len, MemoryType::Host, true) } {
            Ok(r) => Ok(r),
            Err(e) => {
                // SAFETY: the mapping was not handed to anyone; unmap it once.
                unsafe { libc::munmap(p, len) };
                Err(e)
            }
        }
    }

    /// Registers memory the caller owns: host memory, or CUDA device memory given its device
    /// pointer and `MemoryType::Cuda`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be memory of type `mem_type` that stays allocated, and is not freed
    /// or remapped, until the returned region and every clone and transfer of it are dropped.
    pub unsafe fn register(ctx: &Context, ptr: *mut u8, len: usize, mem_type: MemoryType) -> Result<Arc<MemRegion>> {
        let ptr = NonNull::new(ptr).ok_or_else(|| Error::invalid("cannot register a null pointer"))?;
        if len == 0 {
            return Err(Error::invalid("cannot register a zero-length region"));
        }
        if mem_type != MemoryType::Host && !ctx.supports(mem_type) {
            return Err(Error::invalid(format!(
                "this UCX context cannot register {mem_type:?} memory (transports: {})",
                ctx.info().requested
            )));
        }
        // SAFETY: forwarded from this function's contract.
        unsafe { Self::map(ctx, ptr, len, mem_type, false) }
    }

    /// # Safety
    /// As for [`MemRegion::register`]; with `owns_memory` the memory came from mmap.
    unsafe fn map(
        ctx: &Context,
        ptr: NonNull<u8>,
        len: usize,
        mem_type: MemoryType,
        owns_memory: bool,
    ) -> Result<Arc<MemRegion>> {
        // SAFETY: plain C struct; zeroes are valid.
        let mut params: sys::ucp_mem_map_params_t = unsafe { std::mem::zeroed() };
        params.field_mask = (sys::UCP_MEM_MAP_PARAM_FIELD_ADDRESS
            | sys::UCP_MEM_MAP_PARAM_FIELD_LENGTH
            | sys::UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE) as u64;
        params.address = ptr.as_ptr().cast();
        params.length = len;
        params.memory_type = mem_type.to_ucs();
        let mut memh: sys::ucp_mem_h = std::ptr::null_mut();
        // SAFETY: live context (Arc held); params initialised for its field_mask; the memory is
        // valid per the caller's contract.
        let status = unsafe { sys::ucp_mem_map(ctx.inner.handle, &params, &mut memh) };
        result::check(status).map_err(|s| Error::ucx("ucp_mem_map", s))?;

        let mut region =
            MemRegion { ctx: ctx.inner.clone(), ptr, len, mem_type, memh, packed_rkey: Vec::new(), owns_memory };
        region.packed_rkey = region.pack()?;
        Ok(Arc::new(region))
    }

    /// Packs the remote key. `ucp_rkey_pack`, not `ucp_memh_pack`: in UCX 1.22 `ucp_memh_pack`
    /// without `UCP_MEMH_PACK_FLAG_EXPORT` aborts the process ("packing rkey using
    /// ucp_memh_pack() is unsupported", ucp_rkey.c), so the rkey path is still this one.
    fn pack(&self) -> Result<Vec<u8>> {
        let mut buf: *mut libc::c_void = std::ptr::null_mut();
        let mut size: usize = 0;
        // SAFETY: live context and memh of that context; buf and size are valid out-pointers.
        let status = unsafe { sys::ucp_rkey_pack(self.ctx.handle, self.memh, &mut buf, &mut size) };
        result::check(status).map_err(|s| Error::ucx("ucp_rkey_pack", s))?;
        // SAFETY: UCX returned `size` readable bytes at buf.
        let bytes = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), size) }.to_vec();
        // SAFETY: buf came from ucp_rkey_pack and is released once.
        unsafe { sys::ucp_rkey_buffer_release(buf) };
        Ok(bytes)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn memory_type(&self) -> MemoryType {
        self.mem_type
    }

    /// The region's base address (a device address for CUDA memory).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// What a peer needs to reach this region: base address, length and packed remote key.
    /// Hand it only to peers you trust with this memory.
    pub fn remote(&self) -> RemoteRegion {
        RemoteRegion { base: self.ptr.as_ptr() as u64, len: self.len as u64, rkey: self.packed_rkey.clone() }
    }

    /// A range of this region for a transfer.
    pub fn slice(self: &Arc<Self>, offset: usize, len: usize) -> Result<RegionSlice> {
        self.check_range(offset, len)?;
        Ok(RegionSlice { region: self.clone(), offset, len })
    }

    /// The whole region as a slice.
    pub fn full(self: &Arc<Self>) -> RegionSlice {
        RegionSlice { region: self.clone(), offset: 0, len: self.len }
    }

    fn check_range(&self, offset: usize, len: usize) -> Result<()> {
        if len == 0 {
            return Err(Error::invalid("zero-length range"));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::invalid(format!("range {offset}+{len} is outside a region of {} bytes", self.len))),
        }
    }

    fn check_host(&self) -> Result<()> {
        if self.mem_type == MemoryType::Host {
            Ok(())
        } else {
            Err(Error::invalid(format!("{:?} memory cannot be read or written from the CPU", self.mem_type)))
        }
    }

    /// Copies `data` into the region at `offset` (host memory only). A transfer into the same
    /// range at the same time leaves unspecified bytes there.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check_host()?;
        self.check_range(offset, data.len())?;
        // SAFETY: the range is inside the mapping (checked); a raw copy creates no reference into
        // the region, and `copy` tolerates `data` overlapping it.
        unsafe { std::ptr::copy(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len()) };
        Ok(())
    }

    /// Copies bytes out of the region at `offset` into `out` (host memory only).
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        self.check_host()?;
        self.check_range(offset, out.len())?;
        // SAFETY: the range is inside the mapping (checked); `out` is a distinct &mut the
        // caller owns, and the copy tolerates overlap.
        unsafe { std::ptr::copy(self.ptr.as_ptr().add(offset), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Reads `len` bytes at `offset` into a new vector (host memory only).
    pub fn to_vec(&self, offset: usize, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read(offset, &mut v)?;
        Ok(v)
    }

    pub(crate) fn same_context(&self, ctx: &Arc<ContextInner>) -> bool {
        Arc::ptr_eq(&self.ctx, ctx)
    }
}

impl Drop for MemRegion {
    fn drop(&mut self) {
        // SAFETY: memh came from ucp_mem_map on this context (kept alive by self.ctx) and is
        // unmapped once; no transfer uses it, since each holds an Arc of this region.
        let status = unsafe { sys::ucp_mem_unmap(self.ctx.handle, self.memh) };
        if let Err(s) = result::check(status) {
            tracing::warn!(status = %s, "ucp_mem_unmap failed; memory left registered");
            return; // never free memory UCX may still consider registered
        }
        if self.owns_memory {
            // SAFETY: the mapping came from mmap in alloc_host with this length; unmapped once.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

impl fmt::Debug for MemRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemRegion")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("mem_type", &self.mem_type)
            .finish()
    }
}

/// A range of a registered region, holding the region alive.
#[derive(Clone, Debug)]
pub struct RegionSlice {
    pub(crate) region: Arc<MemRegion>,
    pub(crate) offset: usize,
    pub(crate) len: usize,
}

impl RegionSlice {
    pub fn region(&self) -> &Arc<MemRegion> {
        &self.region
    }
    pub fn offset(&self) -> usize {
        self.offset
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The slice's first byte (a device address for CUDA memory).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr()
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        // SAFETY: offset + len <= region.len was checked when the slice was made, so the
        // result stays inside the mapping.
        unsafe { self.region.as_ptr().add(self.offset) }
    }
}

/// A peer's description of one of its regions: enough to unpack a remote key on an endpoint and
/// to check that every access stays inside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteRegion {
    pub base: u64,
    pub len: u64,
    pub rkey: Vec<u8>,
}

impl RemoteRegion {
    /// `base(8, LE) | len(8, LE) | rkey` for out-of-band exchange.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + self.rkey.len());
        v.extend_from_slice(&self.base.to_le_bytes());
        v.extend_from_slice(&self.len.to_le_bytes());
        v.extend_from_slice(&self.rkey);
        v
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        if b.len() <= 16 {
            return Err(Error::invalid(format!("remote region descriptor of {} bytes is too short", b.len())));
        }
        let (base, rest) = b.split_at(8);
        let (len, rkey) = rest.split_at(8);
        let base = u64::from_le_bytes(base.try_into().map_err(|_| Error::invalid("bad base"))?);
        let len = u64::from_le_bytes(len.try_into().map_err(|_| Error::invalid("bad length"))?);
        Ok(RemoteRegion { base, len, rkey: rkey.to_vec() })
    }

    /// Checks that `[addr, addr+len)` is a non-empty range inside this region.
    pub fn check_range(&self, addr: u64, len: usize) -> Result<()> {
        if len == 0 {
            return Err(Error::invalid("zero-length remote range"));
        }
        let end = addr.checked_add(len as u64);
        match end {
            Some(end) if addr >= self.base && end <= self.base + self.len => Ok(()),
            _ => Err(Error::invalid(format!(
                "remote range {addr:#x}+{len} is outside the peer's region {:#x}+{}",
                self.base, self.len
            ))),
        }
    }
}
