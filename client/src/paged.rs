//! Paged chunks: a chunk whose bytes are many fragments, as in vLLM's paged KV layout (per layer,
//! K and V, 16-token blocks: 1152 fragments of 32 KiB for a 256-token chunk of a Qwen3-4B-shaped
//! model). One UCX operation or one copy launch per fragment wastes most of NVLink, so the whole
//! gather (put) or scatter (get) is one `cuMemcpyBatchAsync` through mappings of the server's
//! pools: the GPU pool through its CUDA IPC handle, the host pool through its memfd.

use cudarc::driver::sys as cu;

/// One fragment of a paged chunk: `len` bytes at `ptr` (device memory, or page-locked host memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment {
    pub ptr: u64,
    pub len: usize,
}

fn ok(what: &str, r: cu::CUresult) -> Result<(), String> {
    if r == cu::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(format!("{what}: {r:?}"))
    }
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
        ok("cuIpcOpenMemHandle", unsafe { cu::cuIpcOpenMemHandle_v2(&mut local, h, 1) })?;
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

/// The loaded kernel of one CUDA context (a module belongs to the context it was loaded in).
#[derive(Clone, Copy)]
struct Kernel(cu::CUfunction);
// SAFETY: a CUfunction handle may be launched from any thread with its context current.
unsafe impl Send for Kernel {}

/// The kernel for the current context, loaded on first use there (one per GPU a process uses).
fn kernel() -> Result<cu::CUfunction, String> {
    static LOADED: std::sync::Mutex<Vec<(usize, Result<Kernel, String>)>> = std::sync::Mutex::new(Vec::new());
    let mut ctx: cu::CUcontext = std::ptr::null_mut();
    // SAFETY: valid out-pointer; the caller made a context current.
    ok("cuCtxGetCurrent", unsafe { cu::cuCtxGetCurrent(&mut ctx) })?;
    let mut loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, k)) = loaded.iter().find(|(c, _)| *c == ctx as usize) {
        return k.as_ref().map(|k| k.0).map_err(|e| e.clone());
    }
    let load = || -> Result<Kernel, String> {
        let ptx = std::ffi::CString::new(GATHER_PTX).map_err(|e| e.to_string())?;
        let mut module: cu::CUmodule = std::ptr::null_mut();
        // SAFETY: NUL-terminated PTX text; valid out-pointer; the module is never unloaded.
        ok("cuModuleLoadData", unsafe { cu::cuModuleLoadData(&mut module, ptx.as_ptr().cast()) })?;
        let mut f: cu::CUfunction = std::ptr::null_mut();
        // SAFETY: a loaded module and a NUL-terminated name present in it.
        ok("cuModuleGetFunction", unsafe { cu::cuModuleGetFunction(&mut f, module, c"gather".as_ptr()) })?;
        Ok(Kernel(f))
    };
    let k = load();
    loaded.push((ctx as usize, k.clone()));
    k.map(|k| k.0)
}

/// Gathers/scatters with the kernel: every address and length must be 16-byte aligned.
fn kernel_copy(dsts: &[u64], srcs: &[u64], sizes: &[usize]) -> Result<(), String> {
    let f = kernel()?;
    let n = dsts.len();
    let table: Vec<u64> = dsts.iter().chain(srcs).copied().chain(sizes.iter().map(|&s| s as u64)).collect();
    let bytes = table.len() * 8;
    let mut dev: cu::CUdeviceptr = 0;
    // SAFETY: a context is current (the caller bound it); valid out-pointer.
    ok("cuMemAlloc", unsafe { cu::cuMemAlloc_v2(&mut dev, bytes) })?;
    let run = || -> Result<(), String> {
        // SAFETY: dev holds `bytes` bytes; the table is that long.
        ok("cuMemcpyHtoD", unsafe { cu::cuMemcpyHtoD_v2(dev, table.as_ptr().cast(), bytes) })?;
        let (mut pd, mut ps, mut pl, mut pn) = (dev, dev + 8 * n as u64, dev + 16 * n as u64, n as u64);
        let mut params: [*mut std::ffi::c_void; 4] = [
            (&mut pd as *mut u64).cast(),
            (&mut ps as *mut u64).cast(),
            (&mut pl as *mut u64).cast(),
            (&mut pn as *mut u64).cast(),
        ];
        let grid = n.min(8192) as u32;
        // SAFETY: the kernel's four u64 parameters point at live locals; the tables describe
        // ranges the caller vouches for (fragments, reserved or leased slots); default stream,
        // synchronised below.
        ok("cuLaunchKernel", unsafe {
            cu::cuLaunchKernel(
                f,
                grid,
                1,
                1,
                256,
                1,
                1,
                0,
                std::ptr::null_mut(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })?;
        // SAFETY: waits for the launch above.
        ok("cuCtxSynchronize", unsafe { cu::cuCtxSynchronize() })
    };
    let r = run();
    // SAFETY: allocated above, freed once after the kernel finished (or failed).
    unsafe { cu::cuMemFree_v2(dev) };
    r
}

/// Copy engines a batch is spread over: one stream feeds one engine at a time, and an H100 has
/// several, so the batch is cut into this many parts on as many streams.
const STREAMS: usize = 8;

/// Copies `sizes[i]` bytes from `srcs[i]` to `dsts[i]` for every i, as batches on fresh
/// streams, and waits. `ctx_ptr` is any device pointer of the caller's, to find its context.
/// The caller must have finished writing the sources (e.g. synchronised its own stream).
pub(crate) fn batch_copy(
    ctx_ptr: u64,
    mut dsts: Vec<u64>,
    mut srcs: Vec<u64>,
    mut sizes: Vec<usize>,
) -> Result<(), String> {
    if dsts.is_empty() {
        return Ok(());
    }
    if dsts.len() != srcs.len() || dsts.len() != sizes.len() {
        return Err("batch copy: mismatched lists".into());
    }
    crate::direct::bind_context_of(ctx_ptr)?;
    // The kernel when everything is 16-byte aligned (the usual KV layout); copy-engine batches
    // otherwise, or when the kernel cannot load.
    let aligned = dsts.iter().chain(&srcs).all(|a| a % 16 == 0) && sizes.iter().all(|s| s % 16 == 0);
    if aligned {
        match kernel_copy(&dsts, &srcs, &sizes) {
            Ok(()) => return Ok(()),
            Err(e) if e.starts_with("cuModule") => {} // no kernel here: fall back
            Err(e) => return Err(e),
        }
    }
    let per = dsts.len().div_ceil(STREAMS);
    let mut streams = Vec::new();
    let mut first_err = None;
    for start in (0..dsts.len()).step_by(per) {
        let end = (start + per).min(dsts.len());
        let mut stream: cu::CUstream = std::ptr::null_mut();
        // SAFETY: a context is current; valid out-pointer; CU_STREAM_NON_BLOCKING (1).
        if let Err(e) = ok("cuStreamCreate", unsafe { cu::cuStreamCreate(&mut stream, 1) }) {
            first_err.get_or_insert(e);
            break;
        }
        streams.push(stream);
        // SAFETY: plain C struct; zeroed location hints mean "no hint".
        let mut attr: cu::CUmemcpyAttributes = unsafe { std::mem::zeroed() };
        // Sources are complete before the call (the caller's duty): any order may read them.
        attr.srcAccessOrder = cu::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_ANY;
        let mut attr_idx = [0usize];
        // SAFETY: three arrays with `end - start` entries from `start`; every range is a fragment
        // or a pool slot the caller vouches for (reserved or leased); one attribute from index 0;
        // a live stream.
        let r = unsafe {
            cu::cuMemcpyBatchAsync_v2(
                dsts.as_mut_ptr().add(start),
                srcs.as_mut_ptr().add(start),
                sizes.as_mut_ptr().add(start),
                end - start,
                &mut attr,
                attr_idx.as_mut_ptr(),
                1,
                stream,
            )
        };
        if let Err(e) = ok("cuMemcpyBatchAsync", r) {
            first_err.get_or_insert(e);
            break;
        }
    }
    for stream in streams {
        // SAFETY: a live stream; synchronising also covers a failed launch; destroyed once.
        let sync = unsafe { cu::cuStreamSynchronize(stream) };
        // SAFETY: as above.
        unsafe { cu::cuStreamDestroy_v2(stream) };
        if let Err(e) = ok("cuStreamSynchronize", sync) {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}
