//! Paged chunks: a chunk whose bytes are many fragments, as in vLLM's paged KV layout (per layer,
//! K and V, 16-token blocks: 1152 fragments of 32 KiB for a 256-token chunk of a Qwen3-4B-shaped
//! model). One UCX operation or one copy launch per fragment wastes most of NVLink, so the whole
//! gather (put) or scatter (get) is one kernel launch through mappings of the server's pools:
//! the GPU pool through its CUDA IPC handle, the host pool through its memfd (page-locked and
//! mapped for devices).
//!
//! Copies run on a stream: the caller's, so that they are ordered with the engine's own work
//! without stalling it (no legacy default stream, no device-wide synchronize), or one of ours
//! that the call waits for.

use crate::cuda::check;
use cudarc::driver::sys as cu;

/// One fragment of a paged chunk: `len` bytes at `ptr` (device memory, or page-locked host memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment {
    pub ptr: u64,
    pub len: usize,
}

/// The server's GPU pool opened in this process (cuIpcOpenMemHandle), in the context that was
/// current when it was opened.
#[derive(Debug)]
pub(crate) struct GpuPoolMapping {
    /// The pool's address in the server, and its length.
    pub remote_base: u64,
    pub len: u64,
    /// The same memory's address here.
    pub local_base: u64,
}

// SAFETY: plain addresses; the mapping stays open for the life of the process.
unsafe impl Send for GpuPoolMapping {}
// SAFETY: as above.
unsafe impl Sync for GpuPoolMapping {}

impl GpuPoolMapping {
    /// Opens the pool from its IPC handle, in the context of device pointer `any_local_ptr`.
    pub(crate) fn open(handle: &[u8], remote_base: u64, len: u64, any_local_ptr: u64) -> Result<Self, String> {
        crate::direct::bind_context_of(any_local_ptr)?;
        let mut h = cu::CUipcMemHandle { reserved: [0; 64] };
        if handle.len() != h.reserved.len() {
            return Err(format!("GPU pool IPC handle of {} bytes", handle.len()));
        }
        for (d, s) in h.reserved.iter_mut().zip(handle) {
            *d = *s as _;
        }
        let mut local: cu::CUdeviceptr = 0;
        // SAFETY: a handle the server made with cuIpcGetMemHandle; LAZY_ENABLE_PEER_ACCESS (1)
        // lets a pool on another GPU be reached over NVLink; valid out-pointer.
        check("cuIpcOpenMemHandle", unsafe { cu::cuIpcOpenMemHandle_v2(&mut local, h, 1) })?;
        Ok(GpuPoolMapping { remote_base, len, local_base: local })
    }

    /// The local address of `[addr, addr+len)` in the server's pool, if it lies there.
    pub(crate) fn translate(&self, addr: u64, len: u64) -> Option<u64> {
        let off = addr.checked_sub(self.remote_base)?;
        (off.checked_add(len)? <= self.len).then_some(self.local_base + off)
    }
}

/// A gather/scatter kernel: block b copies fragments b, b + gridDim, ... with 16-byte loads and
/// stores, its threads striding over the fragment. Plain PTX, JIT-compiled by the driver for the
/// GPU at hand (no toolkit needed). SM copies through the peer mapping run near NVLink speed even
/// for 32 KiB fragments, where copy-engine batches stall on per-copy overhead.
const GATHER_PTX: &str = r#"
.version 7.0
.target sm_70
.address_size 64

.visible .entry gather(.param .u64 p_dst, .param .u64 p_src, .param .u64 p_len, .param .u64 p_n)
{
    .reg .pred %p<3>;
    .reg .b32 %r<5>;
    .reg .b64 %rd<32>;
    ld.param.u64 %rd1, [p_dst];
    ld.param.u64 %rd2, [p_src];
    ld.param.u64 %rd3, [p_len];
    ld.param.u64 %rd4, [p_n];
    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
    cvta.to.global.u64 %rd3, %rd3;
    mov.u32 %r1, %ctaid.x;
    mov.u32 %r2, %nctaid.x;
    mov.u32 %r3, %tid.x;
    mov.u32 %r4, %ntid.x;
    cvt.u64.u32 %rd5, %r1;
FRAG:
    setp.ge.u64 %p1, %rd5, %rd4;
    @%p1 bra DONE;
    shl.b64 %rd6, %rd5, 3;
    add.u64 %rd7, %rd1, %rd6;
    ld.global.u64 %rd8, [%rd7];
    add.u64 %rd9, %rd2, %rd6;
    ld.global.u64 %rd10, [%rd9];
    add.u64 %rd11, %rd3, %rd6;
    ld.global.u64 %rd12, [%rd11];
    cvta.to.global.u64 %rd8, %rd8;
    cvta.to.global.u64 %rd10, %rd10;
    shr.u64 %rd13, %rd12, 4;
    cvt.u64.u32 %rd14, %r3;
WORD:
    // Four 16-byte words in flight per thread while they all fit, then one at a time.
    cvt.u64.u32 %rd20, %r4;
    shl.b64 %rd22, %rd20, 1;
    add.u64 %rd22, %rd22, %rd20;
    add.u64 %rd23, %rd14, %rd22;
    setp.lt.u64 %p2, %rd23, %rd13;
    @!%p2 bra ONE;
    shl.b64 %rd15, %rd14, 4;
    shl.b64 %rd21, %rd20, 4;
    add.u64 %rd16, %rd10, %rd15;
    add.u64 %rd17, %rd8, %rd15;
    ld.global.v2.u64 {%rd18, %rd19}, [%rd16];
    add.u64 %rd16, %rd16, %rd21;
    ld.global.v2.u64 {%rd24, %rd25}, [%rd16];
    add.u64 %rd16, %rd16, %rd21;
    ld.global.v2.u64 {%rd26, %rd27}, [%rd16];
    add.u64 %rd16, %rd16, %rd21;
    ld.global.v2.u64 {%rd28, %rd29}, [%rd16];
    st.global.v2.u64 [%rd17], {%rd18, %rd19};
    add.u64 %rd17, %rd17, %rd21;
    st.global.v2.u64 [%rd17], {%rd24, %rd25};
    add.u64 %rd17, %rd17, %rd21;
    st.global.v2.u64 [%rd17], {%rd26, %rd27};
    add.u64 %rd17, %rd17, %rd21;
    st.global.v2.u64 [%rd17], {%rd28, %rd29};
    shl.b64 %rd22, %rd20, 2;
    add.u64 %rd14, %rd14, %rd22;
    bra WORD;
ONE:
    setp.ge.u64 %p2, %rd14, %rd13;
    @%p2 bra NEXT;
    shl.b64 %rd15, %rd14, 4;
    add.u64 %rd16, %rd10, %rd15;
    add.u64 %rd17, %rd8, %rd15;
    ld.global.v2.u64 {%rd18, %rd19}, [%rd16];
    st.global.v2.u64 [%rd17], {%rd18, %rd19};
    add.u64 %rd14, %rd14, %rd20;
    bra ONE;
NEXT:
    cvt.u64.u32 %rd21, %r2;
    add.u64 %rd5, %rd5, %rd21;
    bra FRAG;
DONE:
    ret;
}
"#;

/// Where a paged call's fragments live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory {
    /// CUDA device memory (or page-locked host memory mapped for devices).
    Device,
    /// Ordinary host memory.
    Host,
}

/// Where a paged copy runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyStream {
    /// On the caller's CUDA stream (a `CUstream` handle, as `torch.cuda.Stream.cuda_stream`
    /// gives it): ordered after the work already queued there, and the call returns once the
    /// copy is queued. The caller's stream orders whatever reads the data next.
    Caller(u64),
    /// On a stream of the client's own; the call returns when the copy is complete.
    Wait,
}

/// What a CUDA context needs for queued copies: the kernel (a module belongs to the context it
/// was loaded in) and page-locked buffers for the fragment tables, so that queuing a table
/// upload never waits for the stream (an upload from pageable memory may).
struct ContextCopier {
    kernel: cu::CUfunction,
    /// Page-locked table buffers, each free again once its event has completed.
    slabs: Vec<Slab>,
    /// A stream of our own, for `CopyStream::Wait`.
    own_stream: cu::CUstream,
}

struct Slab {
    host: *mut u64,
    /// In u64 words.
    cap: usize,
    /// Recorded after the upload out of this slab.
    done: cu::CUevent,
}

// SAFETY: CUDA handles (function, stream, events) and page-locked host memory may be used from
// any thread with their context current; the mutex around the table serializes every use.
unsafe impl Send for ContextCopier {}

/// Largest table buffer kept (in u64 words): 18k fragments of an 8k-token prompt use 55k words.
const SLAB_WORDS_MIN: usize = 64 << 10;

static COPIERS: std::sync::Mutex<Vec<(usize, Result<ContextCopier, String>)>> = std::sync::Mutex::new(Vec::new());

fn current_context() -> Result<cu::CUcontext, String> {
    let mut ctx: cu::CUcontext = std::ptr::null_mut();
    // SAFETY: valid out-pointer; the caller made a context current.
    check("cuCtxGetCurrent", unsafe { cu::cuCtxGetCurrent(&mut ctx) })?;
    Ok(ctx)
}

impl ContextCopier {
    fn load() -> Result<ContextCopier, String> {
        let ptx = std::ffi::CString::new(GATHER_PTX).map_err(|e| e.to_string())?;
        let mut module: cu::CUmodule = std::ptr::null_mut();
        // SAFETY: NUL-terminated PTX text; valid out-pointer; the module is never unloaded.
        check("cuModuleLoadData", unsafe { cu::cuModuleLoadData(&mut module, ptx.as_ptr().cast()) })?;
        let mut kernel: cu::CUfunction = std::ptr::null_mut();
        // SAFETY: a loaded module and a NUL-terminated name present in it.
        check("cuModuleGetFunction", unsafe { cu::cuModuleGetFunction(&mut kernel, module, c"gather".as_ptr()) })?;
        let mut own_stream: cu::CUstream = std::ptr::null_mut();
        // SAFETY: a context is current; valid out-pointer; CU_STREAM_NON_BLOCKING (1): never
        // implicitly ordered with the legacy default stream.
        check("cuStreamCreate", unsafe { cu::cuStreamCreate(&mut own_stream, 1) })?;
        Ok(ContextCopier { kernel, slabs: Vec::new(), own_stream })
    }

    /// A page-locked slab of at least `words` u64s whose previous upload has completed.
    fn slab(&mut self, words: usize) -> Result<usize, String> {
        for (i, s) in self.slabs.iter().enumerate() {
            // SAFETY: an event we created; querying has no other effect.
            if s.cap >= words && unsafe { cu::cuEventQuery(s.done) }.result().is_ok() {
                return Ok(i);
            }
        }
        let cap = words.max(SLAB_WORDS_MIN).next_power_of_two();
        let mut host: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: valid out-pointer; PORTABLE (1). Freed never: slabs live as long as the process.
        check("cuMemHostAlloc", unsafe { cu::cuMemHostAlloc(&mut host, cap * 8, 1) })?;
        let mut done: cu::CUevent = std::ptr::null_mut();
        // SAFETY: valid out-pointer; DISABLE_TIMING (2). A fresh event counts as completed.
        check("cuEventCreate", unsafe { cu::cuEventCreate(&mut done, 2) })?;
        self.slabs.push(Slab { host: host.cast(), cap, done });
        Ok(self.slabs.len() - 1)
    }

    /// Queues the copy on `stream`: the table upload, the kernel, and the table's release, all
    /// stream-ordered. Every address and length must be 16-byte aligned.
    fn queue(&mut self, stream: cu::CUstream, dsts: &[u64], srcs: &[u64], sizes: &[usize]) -> Result<(), String> {
        let n = dsts.len();
        let words = 3 * n;
        let i = self.slab(words)?;
        let slab = &self.slabs[i];
        // SAFETY: the slab holds at least `words` u64s and no queued upload reads it any more
        // (its event completed); we are the only writer (the COPIERS mutex is held).
        let table = unsafe { std::slice::from_raw_parts_mut(slab.host, words) };
        table[..n].copy_from_slice(dsts);
        table[n..2 * n].copy_from_slice(srcs);
        for (t, &s) in table[2 * n..].iter_mut().zip(sizes) {
            *t = s as u64;
        }
        let bytes = words * 8;
        let mut dev: cu::CUdeviceptr = 0;
        // SAFETY: valid out-pointer; a live stream of the current context (stream-ordered
        // allocation from the device's default pool, released below in the same order).
        check("cuMemAllocAsync", unsafe { cu::cuMemAllocAsync(&mut dev, bytes, stream) })?;
        // SAFETY: `dev` holds `bytes`; the page-locked source stays untouched until `done`.
        check("cuMemcpyHtoDAsync", unsafe { cu::cuMemcpyHtoDAsync_v2(dev, slab.host.cast(), bytes, stream) })?;
        // SAFETY: an event of ours, recorded on a live stream.
        check("cuEventRecord", unsafe { cu::cuEventRecord(slab.done, stream) })?;
        let (mut pd, mut ps, mut pl, mut pn) = (dev, dev + 8 * n as u64, dev + 16 * n as u64, n as u64);
        let mut params: [*mut std::ffi::c_void; 4] = [
            (&mut pd as *mut u64).cast(),
            (&mut ps as *mut u64).cast(),
            (&mut pl as *mut u64).cast(),
            (&mut pn as *mut u64).cast(),
        ];
        let grid = n.min(8192) as u32;
        // SAFETY: the kernel's four u64 parameters point at live locals (copied at launch); the
        // tables describe ranges the caller vouches for (fragments, reserved or leased slots).
        let launched = check("cuLaunchKernel", unsafe {
            cu::cuLaunchKernel(self.kernel, grid, 1, 1, 256, 1, 1, 0, stream, params.as_mut_ptr(), std::ptr::null_mut())
        });
        // SAFETY: allocated above on this stream; freed once, after the kernel in stream order.
        let freed = check("cuMemFreeAsync", unsafe { cu::cuMemFreeAsync(dev, stream) });
        launched.and(freed)
    }
}

/// Runs `f` with the copier of the current context (loaded on first use there).
fn with_copier<T>(f: impl FnOnce(&mut ContextCopier) -> Result<T, String>) -> Result<T, String> {
    let ctx = current_context()? as usize;
    let mut copiers = COPIERS.lock().unwrap_or_else(|p| p.into_inner());
    if !copiers.iter().any(|(c, _)| *c == ctx) {
        copiers.push((ctx, ContextCopier::load()));
    }
    match copiers.iter_mut().find(|(c, _)| *c == ctx) {
        Some((_, Ok(c))) => f(c),
        Some((_, Err(e))) => Err(e.clone()),
        None => Err("no copier".into()),
    }
}

/// Copies `sizes[i]` bytes from `srcs[i]` to `dsts[i]` for every i, on `on` (see
/// [`CopyStream`]). `ctx_ptr` is any device pointer of the caller's, to find its context. The
/// sources must be complete in the order of `on` (for `Wait`: complete now).
///
/// The gather kernel when everything is 16-byte aligned (the usual KV layout: SM copies
/// through the peer mapping run near NVLink speed even for 32 KiB fragments, where copy-engine
/// batches stall on per-copy overhead); copy-engine batches otherwise.
pub(crate) fn batch_copy(
    ctx_ptr: u64,
    dsts: Vec<u64>,
    srcs: Vec<u64>,
    sizes: Vec<usize>,
    on: CopyStream,
) -> Result<(), String> {
    if dsts.is_empty() {
        return Ok(());
    }
    if dsts.len() != srcs.len() || dsts.len() != sizes.len() {
        return Err("batch copy: mismatched lists".into());
    }
    crate::direct::bind_context_of(ctx_ptr)?;
    let aligned = dsts.iter().chain(&srcs).all(|a| a % 16 == 0) && sizes.iter().all(|s| s % 16 == 0);
    with_copier(|c| {
        let stream = match on {
            CopyStream::Caller(s) => s as cu::CUstream,
            CopyStream::Wait => c.own_stream,
        };
        if aligned {
            c.queue(stream, &dsts, &srcs, &sizes)?;
        } else {
            engine_batch(stream, dsts, srcs, sizes)?;
        }
        if on == CopyStream::Wait {
            // SAFETY: a live stream; waits for the copy just queued.
            check("cuStreamSynchronize", unsafe { cu::cuStreamSynchronize(stream) })?;
        }
        Ok(())
    })
}

/// Loads the copier of the calling thread's current context now (the gather kernel is PTX, which
/// the driver compiles on first load), so that the first copy does not pay for it.
pub(crate) fn prepare() -> Result<(), String> {
    with_copier(|_| Ok(()))
}

/// Waits until every copy queued so far on the caller's `stream` is complete.
pub(crate) fn synchronize(ctx_ptr: u64, stream: u64) -> Result<(), String> {
    crate::direct::bind_context_of(ctx_ptr)?;
    // SAFETY: a stream handle of the caller's, in the context just made current.
    check("cuStreamSynchronize", unsafe { cu::cuStreamSynchronize(stream as cu::CUstream) })
}

/// Unaligned fragments: one copy-engine batch on `stream` (slower per fragment than the kernel).
fn engine_batch(
    stream: cu::CUstream,
    mut dsts: Vec<u64>,
    mut srcs: Vec<u64>,
    mut sizes: Vec<usize>,
) -> Result<(), String> {
    // SAFETY: plain C struct; zeroed location hints mean "no hint".
    let mut attr: cu::CUmemcpyAttributes = unsafe { std::mem::zeroed() };
    // Sources are complete in stream order: any order may read them.
    attr.srcAccessOrder = cu::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM;
    let mut attr_idx = [0usize];
    // SAFETY: three arrays of the same length (checked by the caller), copied by the driver
    // during the call; every range is a fragment or a pool slot the caller vouches for; one
    // attribute from index 0; a live stream.
    let r = unsafe {
        cu::cuMemcpyBatchAsync_v2(
            dsts.as_mut_ptr(),
            srcs.as_mut_ptr(),
            sizes.as_mut_ptr(),
            dsts.len(),
            &mut attr,
            attr_idx.as_mut_ptr(),
            1,
            stream,
        )
    };
    check("cuMemcpyBatchAsync", r)
}

/// A registered host buffer that fetched chunks land in before their scatter into fragments,
/// page-locked and mapped for devices on first use with device fragments.
#[derive(Debug)]
pub(crate) struct Staging {
    pub region: std::sync::Arc<ucx_bindings::MemRegion>,
    /// The region's device address, once page-locked for CUDA.
    device: Option<u64>,
    /// Whether we page-locked it (UCX's cuda_copy may have done so first: then it unregisters).
    registered_here: bool,
}

// SAFETY: the region is Send + Sync; `device` is a plain address.
unsafe impl Send for Staging {}

impl Staging {
    /// The staging buffer in `slot`, at least `len` bytes (a larger one replaces a smaller).
    pub(crate) fn ensure(
        slot: &mut Option<Staging>,
        len: usize,
        alloc: impl FnOnce() -> crate::Result<std::sync::Arc<ucx_bindings::MemRegion>>,
    ) -> crate::Result<&mut Staging> {
        if !slot.as_ref().is_some_and(|s| s.region.len() >= len) {
            *slot = None; // unregisters the old buffer before a new one is made
            *slot = Some(Staging { region: alloc()?, device: None, registered_here: false });
        }
        slot.as_mut().ok_or_else(|| crate::Error::InvalidArgument("no staging buffer".into()))
    }

    /// Copies the staged chunks (back to back from offset 0) into their fragments.
    pub(crate) fn scatter(&mut self, chunks: &[Vec<Fragment>], memory: Memory) -> Result<(), String> {
        let base = self.region.as_ptr() as u64;
        match memory {
            Memory::Host => {
                let mut off = 0usize;
                for f in chunks.iter().flatten() {
                    // SAFETY: `off..off+len` lies in the region (the chunks were received back to
                    // back into it); the fragment is host memory the caller vouches for; the two
                    // never overlap (the region is ours alone).
                    unsafe { std::ptr::copy_nonoverlapping((base as *const u8).add(off), f.ptr as *mut u8, f.len) };
                    off += f.len;
                }
                Ok(())
            }
            Memory::Device => {
                let Some(first) = chunks.iter().flatten().next() else { return Ok(()) };
                crate::direct::bind_context_of(first.ptr)?;
                let dev = match self.device {
                    Some(d) => d,
                    None => {
                        let host = self.region.as_ptr();
                        // SAFETY: the region lives as long as self (unregistered before it goes);
                        // PORTABLE | DEVICEMAP.
                        let r = unsafe { cu::cuMemHostRegister_v2(host.cast(), self.region.len(), 1 | 2) };
                        // UCX registers host buffers itself when its context has cuda_copy (a
                        // remote client with a GPU): the region is page-locked already, which
                        // is all the copy needs (found on 2x H200: every remote load failed).
                        if r != cu::CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED {
                            check("cuMemHostRegister", r)?;
                            self.registered_here = true;
                        }
                        let mut d: cu::CUdeviceptr = 0;
                        // SAFETY: registered above; valid out-pointer; flags 0.
                        let r = unsafe { cu::cuMemHostGetDevicePointer_v2(&mut d, host.cast(), 0) };
                        // Without DEVICEMAP (UCX's registration), unified addressing still maps
                        // page-locked memory at its host address.
                        let d = if r.result().is_ok() && d != 0 { d } else { host as u64 };
                        self.device = Some(d);
                        d
                    }
                };
                let n: usize = chunks.iter().map(|c| c.len()).sum();
                let (mut dsts, mut srcs, mut lens) =
                    (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
                let mut off = 0u64;
                for f in chunks.iter().flatten() {
                    dsts.push(f.ptr);
                    srcs.push(dev + off);
                    lens.push(f.len);
                    off += f.len as u64;
                }
                batch_copy(first.ptr, dsts, srcs, lens, CopyStream::Wait)
            }
        }
    }

    fn unregister(&self) {
        if self.registered_here {
            // SAFETY: registered in `scatter`, once, by us; the region is still mapped.
            unsafe { cu::cuMemHostUnregister(self.region.as_ptr().cast()) };
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        self.unregister();
    }
}
