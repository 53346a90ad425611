//! Everything the server's tasks share: configuration, the index (one mutex), the host pool,
//! the UCX worker, client sessions and metrics.

use crate::config::{Config, RmaPolicy};
use crate::gpu::Cuda;
use crate::metrics::Metrics;
use crate::sessions::{Session, Sessions};
use prefixd_cache::{Index, IndexConfig, Move, Tier};
use prefixd_proto::dataplane::SessionToken;
use prefixd_proto::v1::DataPath;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use ucx_bindings::shm::SharedMemory;
use ucx_bindings::{Context, MemRegion, MemoryType, Worker};

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

pub struct State {
    pub cfg: Config,
    index: Mutex<Index>,
    pub ctx: Context,
    pub worker: Worker,
    // Field order is drop order: unpin the host pool and free the GPU pool before the host pool
    // and the context go.
    _pinned: Option<Pinned>,
    pub gpu_pool: Option<GpuPool>,
    pub host_pool: Arc<MemRegion>,
    /// The memfd behind the host pool (same-host RMA allowed): unmapped after `host_pool`.
    _host_shm: Option<SharedMemory>,
    /// Abstract socket that hands the host pool to same-host clients ("" when not offered).
    pub host_pool_socket: String,
    /// CUDA IPC handle of the GPU pool for same-host clients (empty without a GPU pool).
    pub gpu_ipc_handle: Vec<u8>,
    pub cuda: Option<Arc<Cuda>>,
    pub sessions: Sessions,
    pub metrics: Metrics,
    /// Bearer tokens and their grants (empty: authentication off).
    pub auth: crate::auth::Auth,
    /// Host buffers GPU-tier chunks pass through to active-message clients.
    pub bounce: crate::bounce::BouncePool,
    pub host_id: String,
    /// Transports the server's context can use.
    pub transports: Vec<String>,
    /// Woken whenever active-message put data lands (CommitPut waits on it).
    pub arrivals: Notify,
    /// Woken whenever a put commits, and when draining starts (lookups that wait for chunks).
    pub commits: Notify,
    /// Held by a BeginPut from its allocation until its demotions' copies are done: the room a
    /// demotion frees (more than the new chunk may take, or all of it if the put then fails)
    /// must not go to another put while the old bytes are still being copied out of it.
    /// Lookups, commits and reads never take it.
    pub alloc_gate: Arc<tokio::sync::Mutex<()>>,
    draining: AtomicBool,
    /// Same-host RMA sessions whose process holds the shared host pool (and may write the pools
    /// until it exits): token -> session id.
    writers: Mutex<HashMap<SessionToken, u64>>,
    /// Live sessions whose process has let go of the pool: nothing of theirs can write the
    /// pools any more, so what of theirs expires later is freed at once, not quarantined until
    /// the session is reaped.
    writerless: Mutex<std::collections::HashSet<u64>>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").field("sessions", &self.sessions.len()).finish()
    }
}

/// This machine's boot id: equal ids mean the same host (and kernel instance).
pub fn host_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned())
}

impl State {
    pub fn new(
        cfg: Config,
        ctx: Context,
        worker: Worker,
        metrics: Metrics,
        cuda: Option<Arc<Cuda>>,
        auth: crate::auth::Auth,
    ) -> anyhow::Result<Arc<State>> {
        let len = cfg.host_pool.0 as usize;
        // The pool socket hands the host pool only to a live same-host RMA session (its token is
        // the proof); the state it asks is set once built.
        let gate: Arc<std::sync::OnceLock<std::sync::Weak<State>>> = Arc::default();
        let (host_pool, host_shm, host_pool_socket) = if cfg.rma == RmaPolicy::SameHost {
            // Shareable memory: same-host clients may map it and copy directly (see ucx_bindings::shm).
            let shm = SharedMemory::create("prefixd-host-pool", len)
                .map_err(|e| anyhow::anyhow!("cannot allocate the {} host pool: {e}", cfg.host_pool))?;
            // SAFETY: the mapping lives in `_host_shm`, which is dropped after `host_pool`.
            let region = unsafe { MemRegion::register(&ctx, shm.as_ptr(), len, MemoryType::Host) }
                .map_err(|e| anyhow::anyhow!("cannot register the {} host pool: {e}", cfg.host_pool))?;
            let mut nonce = [0u8; 8];
            crate::sessions::random_fill(&mut nonce)?;
            let name = format!("prefixd-pool-{}-{:016x}", std::process::id(), u64::from_le_bytes(nonce));
            // The serving thread keeps the raw fd; `_host_shm` keeps it open for the process's life.
            let (g1, g2) = (gate.clone(), gate.clone());
            let authorize = move |proof: &SessionToken| {
                g1.get().and_then(std::sync::Weak::upgrade).is_some_and(|st| st.writer_arrived(proof))
            };
            let gone = move |proof: &SessionToken| {
                if let Some(st) = g2.get().and_then(std::sync::Weak::upgrade) {
                    st.writer_gone(proof);
                }
            };
            let socket = match ucx_bindings::shm::serve_fd(&name, shm.fd(), len as u64, authorize, gone) {
                Ok(()) => format!("@{name}"),
                Err(e) => {
                    tracing::warn!(error = %e, "host pool not shared; same-host clients use RMA only");
                    String::new()
                }
            };
            (region, Some(shm), socket)
        } else {
            let region = MemRegion::alloc_host(&ctx, len)
                .map_err(|e| anyhow::anyhow!("cannot allocate and register the {} host pool: {e}", cfg.host_pool))?;
            (region, None, String::new())
        };
        let pinned = cuda.as_ref().and_then(|c| {
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
        let gpu_pool = match (cfg.gpu_pool, &cuda) {
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
                let region = unsafe { MemRegion::register(&ctx, ptr as *mut u8, len, MemoryType::Cuda) }
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
        let mut tiers = Vec::new();
        if let Some(g) = &gpu_pool {
            tiers.push((Tier::Gpu, g.len as u64));
        }
        tiers.push((Tier::Host, cfg.host_pool.0));
        let index = Index::new(IndexConfig {
            tiers,
            max_chunk_size: cfg.max_chunk_size.0,
            high_watermark: cfg.high_watermark,
            low_watermark: cfg.low_watermark,
            // Late RMA transfers of a client that missed its deadline land before the slot is reused.
            grace: (cfg.lease_ttl / 2).min(Duration::from_secs(2)),
            max_namespaces: cfg.limits.max_namespaces,
            max_reserved_bytes_per_session: cfg.max_reserved_per_session(),
            max_leases_per_session: cfg.limits.max_leases_per_session,
            max_leased_bytes_per_session: cfg.max_leased_per_session(),
            ..IndexConfig::default()
        });
        let transports = ctx.info().transports();
        let sessions = Sessions::new(cfg.limits.max_sessions, cfg.limits.max_sessions_per_peer);
        let state = Arc::new(State {
            cfg,
            index: Mutex::new(index),
            ctx,
            worker,
            _pinned: pinned,
            gpu_pool,
            host_pool,
            _host_shm: host_shm,
            host_pool_socket,
            gpu_ipc_handle,
            cuda,
            sessions,
            metrics,
            auth,
            bounce: crate::bounce::BouncePool::new(16),
            host_id: host_id(),
            transports,
            arrivals: Notify::new(),
            commits: Notify::new(),
            alloc_gate: Arc::new(tokio::sync::Mutex::new(())),
            draining: AtomicBool::new(false),
            writers: Mutex::new(HashMap::new()),
            writerless: Mutex::new(Default::default()),
        });
        let _ = gate.set(Arc::downgrade(&state));
        state.metrics.preset(&state.transports);
        Ok(state)
    }

    /// The index, locked. Never held across an await.
    pub fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends a session: frees its reservations and leases; its endpoint closes when the last
    /// in-flight transfer holding it ends.
    pub fn drop_session(&self, token: &SessionToken, why: &str) -> bool {
        let Some(s) = self.sessions.remove(token) else {
            return false;
        };
        let freed = self.index().drop_session(s.id);
        // Its RMA puts went to quarantine; free them now unless its process still holds the
        // pool (it may still write), in which case `writer_gone` will.
        self.writerless.lock().unwrap_or_else(|p| p.into_inner()).remove(&s.id);
        let writing = self.writers.lock().unwrap_or_else(|p| p.into_inner()).contains_key(token);
        if !writing {
            self.index().release_quarantine(s.id);
        }
        tracing::info!(
            session = format_args!("{:016x}", s.id), client = %s.name, puts = freed.puts, leases = freed.leases,
            why, "session closed"
        );
        true
    }

    /// RMA for same-host clients when the policy allows it and both sides share a transport that
    /// does RMA natively (shared memory, cma, cuda_ipc); active messages otherwise. (Over tcp,
    /// UCX in peer error mode emulates put/get with active messages, several times slower than
    /// our own rendezvous path.)
    pub fn data_path_for(&self, client_host: &str, force_remote: bool, client_transports: &[String]) -> DataPath {
        const NATIVE_RMA: &[&str] = &["cma", "posix", "sysv", "xpmem", "knem", "cuda_ipc"];
        let shared_rma =
            client_transports.iter().any(|t| NATIVE_RMA.contains(&t.as_str()) && self.transports.contains(t));
        if !force_remote && shared_rma && self.cfg.rma == RmaPolicy::SameHost && client_host == self.host_id {
            DataPath::Rma
        } else {
            DataPath::ActiveMessage
        }
    }

    pub fn pool_base(&self, tier: Tier) -> u64 {
        match tier {
            Tier::Host => self.host_pool.as_ptr() as u64,
            Tier::Gpu => self.gpu_pool.as_ref().map_or(0, |g| g.ptr),
        }
    }

    /// The registered memory of a tier.
    pub fn pool(&self, tier: Tier) -> Option<&Arc<MemRegion>> {
        match tier {
            Tier::Host => Some(&self.host_pool),
            Tier::Gpu => self.gpu_pool.as_ref().and_then(|g| g.region.as_ref()),
        }
    }

    /// Counts chunk bytes of a session by direction, data path and (per tier) transport. RMA
    /// clients move bytes themselves: they count at commit (in) and at lease (out).
    pub fn count_bytes(&self, direction: &str, session: &Session, bytes: prefixd_cache::TierBytes) {
        let shared = !self.host_pool_socket.is_empty();
        for (tier, n) in [(Tier::Gpu, bytes.gpu), (Tier::Host, bytes.host)] {
            if n > 0 {
                let transport = session.transport_for(tier, shared);
                self.metrics.transfer_bytes.with_label_values(&[direction, session.path_label(), transport]).inc_by(n);
            }
        }
    }

    /// Copies demoted chunks GPU -> host, then makes each Ready at its new place, or drops it if
    /// its copy failed (its new slot holds no valid bytes: 4e6c6e7 served it). Runs without the
    /// index lock (4e6c6e7 held it for every copy, up to 36 MiB each over PCIe, and every call
    /// waited), on a blocking thread; the chunks are Moving meanwhile (see `Index::take_moves`).
    /// The caller hands the old slots to their put's writer only after this returns.
    pub async fn finish_moves(self: &Arc<Self>, moves: Vec<Move>) {
        if moves.is_empty() {
            return;
        }
        let st = self.clone();
        let copied = tokio::task::spawn_blocking(move || {
            let copied: Vec<bool> = moves.iter().map(|m| st.copy_move(m)).collect();
            (moves, copied)
        })
        .await;
        let Ok((moves, copied)) = copied else {
            tracing::error!("a demotion copy thread died; its chunks stay Moving until restart");
            return;
        };
        {
            let mut idx = self.index();
            for (m, ok) in moves.iter().zip(&copied) {
                idx.finish_move(m, *ok);
            }
        }
        self.metrics.demotions.inc_by(moves.len() as u64);
        // Waiting lookups may have been waiting for one of these.
        self.commits.notify_waiters();
    }

    fn copy_move(&self, m: &Move) -> bool {
        let Some(cuda) = &self.cuda else {
            tracing::error!("a demotion without CUDA; the chunk is dropped");
            return false;
        };
        let dst = self.pool_base(m.to.tier) + m.to.offset;
        let src = self.pool_base(m.from.tier) + m.from.offset;
        // SAFETY: both ranges are slots of our pools (the index hands out in-range offsets). The
        // chunk is Moving: no lease can name either slot, the destination is its own new slot,
        // and the source now belongs to a reservation whose writer gets its address only after
        // this copy (`finish_moves`' caller waits for it).
        match unsafe { cuda.copy_dtoh(dst as *mut u8, src, m.from.len as usize) } {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "demotion copy failed; the chunk is dropped");
                false
            }
        }
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.commits.notify_waiters();
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Copies the index's numbers into the gauges (on scrape).
    pub fn refresh_gauges(&self) {
        let idx = self.index();
        for u in idx.usage() {
            self.metrics.pool_used.with_label_values(&[u.tier.as_str()]).set(u.used as i64);
            self.metrics.pool_capacity.with_label_values(&[u.tier.as_str()]).set(u.capacity as i64);
        }
        self.metrics.entries.set(idx.entries() as i64);
        self.metrics.active_leases.set(idx.active_leases() as i64);
        self.metrics.active_reservations.set(idx.active_reservations() as i64);
        self.metrics.quarantined.set(idx.quarantined_bytes() as i64);
        let c = idx.counters();
        drop(idx);
        let ev = self.metrics.evictions.get();
        if c.evictions > ev {
            self.metrics.evictions.inc_by(c.evictions - ev);
        }
        for (what, n) in [("put", c.expired_puts), ("lease", c.expired_leases)] {
            let m = self.metrics.expired.with_label_values(&[what]);
            if n > m.get() {
                m.inc_by(n - m.get());
            }
        }
        self.metrics.sessions.set(self.sessions.len() as i64);
    }

    /// A process asks for the shared host pool with a session token: yes for a live same-host
    /// RMA session, which is then counted as a writer until its connection closes.
    fn writer_arrived(&self, token: &SessionToken) -> bool {
        let Some(s) = self.sessions.get(token).filter(|s| s.path == DataPath::Rma) else {
            return false;
        };
        self.writers.lock().unwrap_or_else(|p| p.into_inner()).insert(*token, s.id);
        true
    }

    /// The process of a writer is gone (or let go of the pool): nothing of it can write the
    /// pools any more, so its quarantined slots are free.
    fn writer_gone(&self, token: &SessionToken) {
        let Some(id) = self.writers.lock().unwrap_or_else(|p| p.into_inner()).remove(token) else {
            return;
        };
        if self.sessions.get(token).is_some() {
            self.writerless.lock().unwrap_or_else(|p| p.into_inner()).insert(id);
        }
        let (puts, bytes) = self.index().release_quarantine(id);
        if puts > 0 {
            tracing::info!(session = format_args!("{id:016x}"), puts, bytes, "writer gone: quarantined slots freed");
        }
    }

    /// Expires reservations and leases, and drops sessions idle for `session_idle`.
    pub fn reap(&self, session_idle: Duration) {
        let expired = self.index().expire(Instant::now());
        let writerless: Vec<u64> = self.writerless.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect();
        if !writerless.is_empty() {
            let mut idx = self.index();
            for id in writerless {
                idx.release_quarantine(id);
            }
        }
        if expired.puts + expired.leases > 0 {
            tracing::info!(puts = expired.puts, leases = expired.leases, "expired");
        }
        for s in self.sessions.expired(Instant::now(), session_idle) {
            let why = if s.ep().is_none() { "no data endpoint bound in time" } else { "idle too long" };
            self.drop_session(&Sessions::token_of(&s), why);
        }
        self.refresh_gauges();
    }
}
