//! Everything the server's tasks share: configuration, the index (one mutex), the pools (see
//! `pools`), the UCX worker, client sessions and metrics, and the demotions' copies.

use crate::config::{Config, RmaPolicy};
use crate::gpu::Cuda;
use crate::metrics::Metrics;
use crate::pools::Pools;
use crate::sessions::{Session, Sessions};
use prefixd_cache::{Index, IndexConfig, Move, Tier};
use prefixd_proto::dataplane::SessionToken;
use prefixd_proto::v1::DataPath;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use ucx_bindings::{Context, Worker};

pub struct State {
    pub cfg: Config,
    index: Mutex<Index>,
    pub ctx: Context,
    pub worker: Worker,
    /// The host and GPU pools, and how same-host clients reach them.
    pub pools: Pools,
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
        // The pool socket hands the host pool only to a live same-host RMA session (its token is
        // the proof); the state it asks is set once built.
        let gate: Arc<std::sync::OnceLock<std::sync::Weak<State>>> = Arc::default();
        let (g1, g2) = (gate.clone(), gate.clone());
        let authorize = move |proof: &SessionToken| {
            g1.get().and_then(std::sync::Weak::upgrade).is_some_and(|st| st.writer_arrived(proof))
        };
        let gone = move |proof: &SessionToken| {
            if let Some(st) = g2.get().and_then(std::sync::Weak::upgrade) {
                st.writer_gone(proof);
            }
        };
        let pools = Pools::new(&cfg, &ctx, cuda.as_ref(), authorize, gone)?;
        let index = Index::new(IndexConfig {
            tiers: pools.tiers(),
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
            pools,
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

    /// Counts chunk bytes of a session by direction, data path and (per tier) transport. RMA
    /// clients move bytes themselves: they count at commit (in) and at lease (out).
    pub fn count_bytes(&self, direction: &str, session: &Session, bytes: prefixd_cache::TierBytes) {
        let shared = !self.pools.host_socket().is_empty();
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
        let dst = self.pools.base(m.to.tier) + m.to.offset;
        let src = self.pools.base(m.from.tier) + m.from.offset;
        // The chunk is Moving: no lease can name either slot. The source now belongs to a
        // reservation whose writer gets its address only after this copy (see `finish_moves`).
        // SAFETY: both are in-range slots of our pools, used by nothing else during the copy.
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
