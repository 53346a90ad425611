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

/// Copies `sizes[i]` bytes from `srcs[i]` to `dsts[i]` for every i, as one batch on a fresh
/// stream, and waits. `ctx_ptr` is any device pointer of the caller's, to find its context.
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
    let mut stream: cu::CUstream = std::ptr::null_mut();
    // SAFETY: a context is current; valid out-pointer; CU_STREAM_NON_BLOCKING (1).
    ok("cuStreamCreate", unsafe { cu::cuStreamCreate(&mut stream, 1) })?;
    // SAFETY: plain C struct; zeroed location hints mean "no hint".
    let mut attr: cu::CUmemcpyAttributes = unsafe { std::mem::zeroed() };
    attr.srcAccessOrder = cu::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM;
    let mut attr_idx = [0usize];
    // SAFETY: three arrays of `count` entries; every range is a fragment or a pool slot the caller
    // vouches for (reserved or leased); one attribute applying from index 0; a live stream.
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
    // SAFETY: the stream is live; synchronising also covers a failed launch.
    let sync = unsafe { cu::cuStreamSynchronize(stream) };
    // SAFETY: destroyed once, after its work is done.
    unsafe { cu::cuStreamDestroy_v2(stream) };
    ok("cuMemcpyBatchAsync", r)?;
    ok("cuStreamSynchronize", sync)
}
