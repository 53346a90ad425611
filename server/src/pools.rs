//! The memory chunks live in: the host pool (always; shareable with same-host clients when the
//! RMA policy allows), the GPU pool (with `--gpu-pool`), and what same-host clients are given to
//! reach them (the host pool's socket, the GPU pool's CUDA IPC handle).

use crate::config::{Config, RmaPolicy};
use crate::gpu::Cuda;
use prefixd_cache::Tier;
use prefixd_proto::dataplane::SessionToken;
use std::sync::Arc;
use ucx_bindings::shm::SharedMemory;
use ucx_bindings::{Context, MemRegion, MemoryType};

/// The GPU tier's memory: one cuMemAlloc'd range, registered with UCX as CUDA memory.
#[derive(Debug)]
pub struct GpuPool {
    pub cuda: Arc<Cuda>,
    pub ptr: u64,
    pub len: usize,
    pub region: Option<Arc<MemRegion>>,
}

impl Drop for GpuPool {
    fn drop(&mut self) {
        // Unregister first; free only if no transfer still holds the registration.
        match self.region.take().map(Arc::try_unwrap) {
            Some(Ok(region)) => {
                drop(region);
                self.cuda.free(self.ptr);
            }
            Some(Err(_)) => tracing::warn!("GPU pool still in use at shutdown; not freed"),
            None => self.cuda.free(self.ptr),
        }
    }
}

/// Keeps the host pool page-locked for CUDA; unlocks it before the pool goes away.
#[derive(Debug)]
struct Pinned {
    cuda: Arc<Cuda>,
    ptr: *mut u8,
}

// SAFETY: only the pointer value is kept, to unregister it; nothing is read or written through it.
unsafe impl Send for Pinned {}
// SAFETY: as above.
unsafe impl Sync for Pinned {}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: ptr was registered with host_register in State::new and is unregistered once.
        unsafe { self.cuda.host_unregister(self.ptr) };
    }
}

/// The pools. Field order is drop order: unpin the host pool and free the GPU pool before the
/// host pool goes, and unmap the host pool's memfd after its registration.
#[derive(Debug)]
pub struct Pools {
    _pinned: Option<Pinned>,
    gpu: Option<GpuPool>,
    host: Arc<MemRegion>,
    /// The memfd behind the host pool (same-host RMA allowed): unmapped after `host`.
    _host_shm: Option<SharedMemory>,
    /// Abstract socket that hands the host pool to same-host clients ("" when not offered).
    host_socket: String,
    /// CUDA IPC handle of the GPU pool for same-host clients (empty without a GPU pool).
    gpu_ipc_handle: Vec<u8>,
}

impl Pools {
    /// Allocates and registers the pools `cfg` asks for. `authorize` and `gone` are the host
    /// pool socket's hooks: whether a proof (a session token) may map the pool, and that a
    /// process that mapped it has let go.
    pub fn new<A, G>(
        cfg: &Config,
        ctx: &Context,
        cuda: Option<&Arc<Cuda>>,
        authorize: A,
        gone: G,
    ) -> anyhow::Result<Pools>
    where
        A: Fn(&SessionToken) -> bool + Send + Sync + 'static,
        G: Fn(&SessionToken) + Send + Sync + 'static,
    {
        let len = cfg.host_pool.0 as usize;
        let (host_pool, host_shm, host_pool_socket) = if cfg.rma == RmaPolicy::SameHost {
            // Shareable memory: same-host clients may map it and copy directly (see ucx_bindings::shm).
            let shm = SharedMemory::create("prefixd-host-pool", len)
                .map_err(|e| anyhow::anyhow!("cannot allocate the {} host pool: {e}", cfg.host_pool))?;
            // SAFETY: the mapping lives in `_host_shm`, which is dropped after `host_pool`.
            let region = unsafe { MemRegion::register(ctx, shm.as_ptr(), len, MemoryType::Host) }
                .map_err(|e| anyhow::anyhow!("cannot register the {} host pool: {e}", cfg.host_pool))?;
            let mut nonce = [0u8; 8];
            crate::sessions::random_fill(&mut nonce)?;
            let name = format!("prefixd-pool-{}-{:016x}", std::process::id(), u64::from_le_bytes(nonce));
            // The serving thread keeps the raw fd; `_host_shm` keeps it open for the process's life.
            let socket = match ucx_bindings::shm::serve_fd(&name, shm.fd(), len as u64, authorize, gone) {
                Ok(()) => format!("@{name}"),
                Err(e) => {
                    tracing::warn!(error = %e, "host pool not shared; same-host clients use RMA only");
                    String::new()
                }
            };
            (region, Some(shm), socket)
        } else {
            let region = MemRegion::alloc_host(ctx, len)
                .map_err(|e| anyhow::anyhow!("cannot allocate and register the {} host pool: {e}", cfg.host_pool))?;
            (region, None, String::new())
        };
        let pinned = cuda.and_then(|c| {
            // SAFETY: the host pool stays mapped until after `pinned` is dropped (field order).
            match unsafe { c.host_register(host_pool.as_ptr(), host_pool.len()) } {
                Ok(true) => Some(Pinned { cuda: c.clone(), ptr: host_pool.as_ptr() }),
                Ok(false) => {
                    tracing::info!("host pool already page-locked (by UCX's registration)");
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %e, "host pool not page-locked; host<->GPU copies will be slower");
                    None
                }
            }
        });
        let gpu_pool = match (cfg.gpu_pool, cuda) {
            (None, _) => None,
            (Some(size), None) => anyhow::bail!("--gpu-pool {size} needs CUDA, which is not available here"),
            (Some(size), Some(c)) => {
                if !ctx.supports(MemoryType::Cuda) {
                    anyhow::bail!(
                        "--gpu-pool needs UCX's cuda transports: add cuda_copy (and cuda_ipc) to --transports (now {})",
                        cfg.transports
                    );
                }
                let len = size.0 as usize;
                let ptr = c.alloc(len).map_err(|e| anyhow::anyhow!("cannot allocate the {size} GPU pool: {e}"))?;
                let mut pool = GpuPool { cuda: c.clone(), ptr, len, region: None };
                // SAFETY: ptr..ptr+len is our cuMemAlloc allocation, freed only in GpuPool's Drop
                // after this registration is gone.
                let region = unsafe { MemRegion::register(ctx, ptr as *mut u8, len, MemoryType::Cuda) }
                    .map_err(|e| anyhow::anyhow!("cannot register the GPU pool with UCX: {e}"))?;
                pool.region = Some(region);
                Some(pool)
            }
        };
        let gpu_ipc_handle = match (&gpu_pool, cfg.rma) {
            (Some(g), RmaPolicy::SameHost) => g.cuda.ipc_handle(g.ptr).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "GPU pool not exported; paged chunks unavailable");
                Vec::new()
            }),
            _ => Vec::new(),
        };
        Ok(Pools {
            _pinned: pinned,
            gpu: gpu_pool,
            host: host_pool,
            _host_shm: host_shm,
            host_socket: host_pool_socket,
            gpu_ipc_handle,
        })
    }

    /// The tiers and their sizes, fastest first.
    pub fn tiers(&self) -> Vec<(Tier, u64)> {
        let mut tiers = Vec::new();
        if let Some(g) = &self.gpu {
            tiers.push((Tier::Gpu, g.len as u64));
        }
        tiers.push((Tier::Host, self.host.len() as u64));
        tiers
    }

    /// Where a tier's pool starts, in this process (slot and chunk addresses are relative to it).
    pub fn base(&self, tier: Tier) -> u64 {
        match tier {
            Tier::Host => self.host.as_ptr() as u64,
            Tier::Gpu => self.gpu.as_ref().map_or(0, |g| g.ptr),
        }
    }

    /// The registered memory of a tier.
    pub fn region(&self, tier: Tier) -> Option<&Arc<MemRegion>> {
        match tier {
            Tier::Host => Some(&self.host),
            Tier::Gpu => self.gpu.as_ref().and_then(|g| g.region.as_ref()),
        }
    }

    pub fn gpu(&self) -> Option<&GpuPool> {
        self.gpu.as_ref()
    }

    /// The abstract socket same-host clients map the host pool through ("" when not offered).
    pub fn host_socket(&self) -> &str {
        &self.host_socket
    }

    /// The GPU pool's CUDA IPC handle for same-host clients (empty without one).
    pub fn gpu_ipc_handle(&self) -> &[u8] {
        &self.gpu_ipc_handle
    }
}
