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
