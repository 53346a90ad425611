//! The gRPC service (`prefixd.v1.Prefixd`). Each call checks its input first (changing nothing
//! when it is bad), then works on the index under its mutex (never across an await), then moves
//! bytes (the Fetch call) with a deadline on every transfer.

use crate::auth::Grant;
use crate::errors::{index_status, ucx_status};
use crate::sessions::{CreateError, InCall, Session, Sessions};
use crate::state::State;
use prefixd_cache::{Slot, Tier};
use prefixd_proto::dataplane::{token_from, FetchAsk, FetchHeader, AM_FETCH};
use prefixd_proto::keys::ChunkKey;
use prefixd_proto::limits::MAX_CLIENT_NAME_LEN;
use prefixd_proto::v1::prefixd_server::Prefixd;
use prefixd_proto::v1::*;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};
use ucx_bindings::AmData;

/// Sends in flight at once per Fetch call.
const FETCH_WINDOW: usize = 8;
/// The longest a Lookup may wait for chunks (`wait_ms`): a waiting call holds one of the
/// `max_concurrent_rpcs`, so it cannot be parked for ever.
const MAX_LOOKUP_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Service {
    pub state: Arc<State>,
    /// Calls in flight (max_concurrent_rpcs): a call that finds none left is refused at once.
    pub inflight: Arc<tokio::sync::Semaphore>,
    /// Where the data listener is bound: its port (and its host, when it is one address) goes
    /// to every client in ConnectResponse.
    pub data_addr: std::net::SocketAddr,
}

/// Keeps a lease pinned for the life of a `Fetch`, however that ends: tonic drops the handler's
/// future when the client goes away, and an unpin after an `.await` would then never run.
struct LeasePin {
    state: Arc<State>,
    lease_id: u64,
    /// A lease the Fetch took itself (looked up by keys): released with the pin, once every
    /// send is done with its slot.
    own: Option<prefixd_cache::SessionId>,
}

impl Drop for LeasePin {
    fn drop(&mut self) {
        let mut idx = self.state.index();
        idx.unpin_lease(self.lease_id);
        if let Some(session) = self.own {
            let _ = idx.release(self.lease_id, session);
        }
    }
}

fn keys_from(raw: &[Vec<u8>], what: &str) -> Result<Vec<ChunkKey>, Status> {
    raw.iter()
        .enumerate()
        .map(|(i, k)| {
            ChunkKey::from_slice(k)
                .ok_or_else(|| Status::invalid_argument(format!("{what}[{i}] is {} bytes; keys are 32 bytes", k.len())))
        })
        .collect()
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

impl Service {
    /// An index error as a status, counting it when a configured limit refused the call.
    fn index_err(&self, e: prefixd_cache::IndexError) -> Status {
        if let Some(limit) = e.limit {
            self.state.metrics.limit_hit(limit, &e.message);
        }
        index_status(e)
    }

    /// The session a request's token names.
    /// The session a request's token names, held as in a call until the guard drops.
    fn session(&self, token: &[u8]) -> Result<InCall, Status> {
        let token = token_from(token).ok_or_else(|| {
            Status::invalid_argument(format!("session_token is {} bytes; tokens are 16 bytes", token.len()))
        })?;
        let s = self.state.sessions.get(&token).ok_or_else(|| {
            Status::not_found("unknown session (expired, closed, or the server restarted); connect again")
        })?;
        Ok(s.enter())
    }

    /// Counts a lookup's hit and missed chunks, and their tokens (`chunk_tokens` 0: 256).
    fn count_lookup(&self, keys: usize, hits: usize, chunk_tokens: u32) {
        let m = &self.state.metrics;
        let tokens = if chunk_tokens == 0 { 256 } else { chunk_tokens as u64 };
        let (hits, misses) = (hits as u64, (keys - hits) as u64);
        m.hit_chunks.inc_by(hits);
        m.miss_chunks.inc_by(misses);
        m.hit_tokens.inc_by(hits * tokens);
        m.miss_tokens.inc_by(misses * tokens);
    }

    /// Records one finished call: its count by status code, and its latency since `t0`.
    fn record_call(&self, op: &str, code: &str, t0: Instant) {
        self.state.metrics.requests.with_label_values(&[op, code]).inc();
        self.state.metrics.duration.with_label_values(&[op]).observe(t0.elapsed().as_secs_f64());
    }

    /// Runs one call, recording its count by status code and its latency.
    async fn observe<T>(
        &self,
        op: &'static str,
        f: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<Response<T>, Status> {
        // Draining: refuse new work; let calls that finish work (commit, abort, fetch, release) in.
        if self.state.is_draining() && matches!(op, "connect" | "begin_put") {
            self.state.metrics.requests.with_label_values(&[op, "Unavailable"]).inc();
            return Err(Status::unavailable("prefixd is shutting down"));
        }
        let Ok(_permit) = self.inflight.clone().try_acquire_owned() else {
            let limit = self.state.cfg.limits.max_concurrent_rpcs;
            let msg = format!("{limit} calls are in flight; the limit (max_concurrent_rpcs) is {limit}: retry");
            self.state.metrics.limit_hit("max_concurrent_rpcs", &msg);
            self.state.metrics.requests.with_label_values(&[op, "ResourceExhausted"]).inc();
            return Err(Status::resource_exhausted(msg));
        };
        let t0 = Instant::now();
        let r = f.await;
        let code = match &r {
            Ok(_) => "Ok".to_owned(),
            Err(s) => format!("{:?}", s.code()),
        };
        self.record_call(op, &code, t0);
        r.map(Response::new)
    }

    async fn do_connect(
        &self,
        r: ConnectRequest,
        peer: Option<std::net::IpAddr>,
        access: crate::auth::Access,
        direct: bool,
    ) -> Result<ConnectResponse, Status> {
        if r.client_name.len() > MAX_CLIENT_NAME_LEN || r.host_id.len() > 256 {
            return Err(Status::invalid_argument("client_name (<= 128 bytes) or host_id (<= 256 bytes) too long"));
        }
        if r.transports.len() > 64 || r.transports.iter().any(|t| t.len() > 64) {
            return Err(Status::invalid_argument("transports: at most 64 names of at most 64 bytes"));
        }
        let st = &self.state;
        // Tokens without the direct grant get the active-message path even on this host.
        let path = st.data_path_for(&r.host_id, r.force_remote || !direct, &r.transports);
        let both: Vec<String> = st.transports.iter().filter(|t| r.transports.contains(t)).cloned().collect();
        let name = if r.client_name.is_empty() { "unnamed".to_owned() } else { r.client_name.clone() };
        let same_host = !r.host_id.is_empty() && r.host_id == st.host_id;
        let caller = access.caller().name().to_owned();
        let session = st.sessions.create(name, path, peer, same_host, access).map_err(|e| match e {
            CreateError::Limit(limit, msg) => {
                st.metrics.limit_hit(limit, &msg);
                Status::resource_exhausted(msg)
            }
            CreateError::NoRandomness(e) => Status::internal(format!("no randomness for a token: {e}")),
        })?;
        let pools = if path == DataPath::Rma {
            [Tier::Gpu, Tier::Host]
                .into_iter()
                .filter_map(|t| st.pools.region(t).map(|p| (t, p.remote())))
                .map(|(t, remote)| PoolDescriptor {
                    tier: t.to_string(),
                    base: remote.base,
                    length: remote.len,
                    rkey: remote.rkey,
                })
                .collect()
        } else {
            Vec::new()
        };
        tracing::info!(session = format_args!("{:016x}", session.id), client = %session.name, caller, path = ?path, "session opened");
        let data_host =
            if self.data_addr.ip().is_unspecified() { String::new() } else { self.data_addr.ip().to_string() };
        Ok(ConnectResponse {
            session_id: session.id,
            session_token: Sessions::token_of(&session).to_vec(),
            data_port: self.data_addr.port() as u32,
            data_host,
            fetch_by_message: true,
            transports: both,
            lease_ttl_ms: ms(st.cfg.lease_ttl),
            session_idle_ms: ms(st.cfg.session_idle()),
            max_chunk_size: st.cfg.max_chunk_size.0,
            max_keys_per_request: prefixd_proto::limits::MAX_KEYS_PER_REQUEST as u32,
            data_path: path as i32,
            pools,
            server_host_id: st.host_id.clone(),
            host_pool_socket: if path == DataPath::Rma { st.pools.host_socket().to_owned() } else { String::new() },
            gpu_pool_ipc_handle: if path == DataPath::Rma { st.pools.gpu_ipc_handle().to_vec() } else { Vec::new() },
        })
    }

    async fn do_begin_put(&self, r: BeginPutRequest) -> Result<BeginPutResponse, Status> {
        let session = self.session(&r.session_token)?;
        let keys = keys_from(&r.keys, "keys")?;
        let parent = match r.parent_key.len() {
            0 => None,
            32 => ChunkKey::from_slice(&r.parent_key),
            n => return Err(Status::invalid_argument(format!("parent_key is {n} bytes; keys are 32 bytes"))),
        };
        let am = session.path != DataPath::Rma;
        let st = &self.state;
        let gate = st.alloc_gate.clone().lock_owned().await;
        let (b, moves) = {
            let mut idx = st.index();
            let b =
                idx.begin_put(session.id, &r.namespace, &keys, &r.sizes, parent, am, Instant::now(), st.cfg.lease_ttl);
            (b, idx.take_moves())
        };
        // Chunks demoted to make room (even for a put that then failed) are copied out of the
        // slots this put takes over, without the index lock, before its writer learns them. In a
        // task of its own: a caller that goes away must not leave chunks Moving for ever.
        if !moves.is_empty() {
            let st = st.clone();
            let _ = tokio::spawn(async move {
                st.finish_moves(moves).await;
                drop(gate);
            })
            .await;
        } else {
            drop(gate);
        }
        let b = b.map_err(|e| self.index_err(e))?;
        if !am {
            self.scrub(&b.slots).await?;
        }
        let slots = b
            .slots
            .iter()
            .map(|s| match s {
                Slot::Present => PutSlot { present: true, address: 0 },
                Slot::Reserved(loc) if !am => PutSlot { present: false, address: st.pools.base(loc.tier) + loc.offset },
                Slot::Reserved(_) => PutSlot { present: false, address: 0 },
            })
            .collect();
        Ok(BeginPutResponse { put_id: b.put_id, slots, expires_in_ms: ms(st.cfg.lease_ttl) })
    }

    async fn do_commit_put(&self, r: CommitPutRequest) -> Result<CommitPutResponse, Status> {
        let session = self.session(&r.session_token)?;
        let st = &self.state;
        // Active-message data may still be landing: wait for it, up to the transfer timeout.
        let give_up = Instant::now() + st.cfg.transfer_timeout;
        loop {
            let notified = st.arrivals.notified();
            let result = st.index().commit_put(r.put_id, session.id, Instant::now());
            match result {
                Ok((chunks, bytes)) => {
                    st.count_bytes("in", &session, bytes);
                    st.commits.notify_waiters();
                    return Ok(CommitPutResponse { committed: chunks });
                }
                Err(e) if e.kind == prefixd_cache::ErrorKind::FailedPrecondition && Instant::now() < give_up => {
                    let _ = tokio::time::timeout_at(give_up.into(), notified).await;
                }
                Err(e) => return Err(index_status(e)),
            }
        }
    }

    async fn do_abort_put(&self, r: AbortPutRequest) -> Result<AbortPutResponse, Status> {
        let session = self.session(&r.session_token)?;
        let freed = self.state.index().abort_put(r.put_id, session.id).map_err(index_status)?;
        Ok(AbortPutResponse { freed })
    }

    async fn do_lookup(&self, r: LookupRequest) -> Result<LookupResponse, Status> {
        let keys = keys_from(&r.keys, "keys")?;
        let st = &self.state;
        if r.lease && st.is_draining() {
            return Err(Status::unavailable("prefixd is shutting down"));
        }
        let (lease, session) = if r.lease {
            let s = self.session(&r.session_token)?;
            let ttl = if r.lease_ttl_ms == 0 { st.cfg.lease_ttl } else { Duration::from_millis(r.lease_ttl_ms) };
            (Some((s.id, ttl.min(st.cfg.max_lease_ttl))), Some(s))
        } else {
            (None, None)
        };
        // After the session check: a bad token fails at once rather than after the wait.
        let want = (r.want_chunks as usize).min(keys.len());
        if want > 0 && r.wait_ms > 0 {
            let wait = Duration::from_millis(r.wait_ms.into()).min(MAX_LOOKUP_WAIT);
            self.wait_for_chunks(&r.namespace, &keys, want, wait).await?;
            // A lease granted now, after the wait, must have someone to give it back: not while
            // draining (it would hold the drain up until its TTL), and not to a session that
            // closed during the wait.
            if r.lease {
                if st.is_draining() {
                    return Err(Status::unavailable("prefixd is shutting down"));
                }
                self.session(&r.session_token)?;
            }
        }
        let now = Instant::now();
        let res = st.index().lookup(&r.namespace, &keys, lease, now).map_err(|e| self.index_err(e))?;
        self.count_lookup(keys.len(), res.hits, r.chunk_tokens);
        let rma = session.as_ref().is_some_and(|s| s.path == DataPath::Rma);
        let chunks: Vec<ChunkLocation> = res
            .locations
            .iter()
            .map(|l| ChunkLocation {
                address: if rma { st.pools.base(l.tier) + l.offset } else { 0 },
                length: l.len,
                tier: l.tier.to_string(),
            })
            .collect();
        if let (Some(s), true) = (&session, rma) {
            let mut bytes = prefixd_cache::TierBytes::default();
            for l in &res.locations {
                bytes.add(l.tier, l.len);
            }
            st.count_bytes("out", s, bytes);
        }
        let (lease_id, expires_in) = match res.lease {
            Some((id, expires)) => (id, ms(expires.saturating_duration_since(now))),
            None => (0, 0),
        };
        Ok(LookupResponse { hit_chunks: res.hits as u32, lease_id, chunks, lease_expires_in_ms: expires_in })
    }

    /// Waits until the leading `want` of `keys` are all cached, `wait` runs out, or the server
    /// starts draining, whichever comes first. A decode instance waiting for the chunks a prefill
    /// is still storing then makes one call, answered the moment the last one commits, instead of
    /// polling. Holds no lock while it waits; a caller that goes away just drops it.
    async fn wait_for_chunks(&self, ns: &str, keys: &[ChunkKey], want: usize, wait: Duration) -> Result<(), Status> {
        let st = &self.state;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Made before the check: a commit between the check and the await still wakes it.
            let committed = st.commits.notified();
            let ready = st.index().ready_prefix(ns, keys).map_err(|e| self.index_err(e))?;
            if ready >= want || st.is_draining() {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, committed).await.is_err() {
                return Ok(());
            }
        }
    }

    /// Answers an AM_FETCH_ASK that came on `session`'s data endpoint: the same work as a
    /// `Fetch` by keys, under the grants the session connected with, counted as a fetch.
    /// Returns the number of chunks sent.
    pub async fn answer_fetch_ask(&self, session: &Session, ask: &FetchAsk, data: &[u8]) -> Result<u32, Status> {
        let parsed = ask.parse(data).ok_or_else(|| {
            Status::invalid_argument(format!(
                "malformed fetch request: {} bytes of data for a namespace of {} bytes and {} keys",
                data.len(),
                ask.namespace_len,
                ask.keys
            ))
        });
        self.observe("fetch", async {
            let (namespace, keys) = parsed?;
            session.access.caller().check(Grant::Read, namespace)?;
            if keys.is_empty() {
                return Ok(0);
            }
            let r = FetchRequest {
                session_token: Sessions::token_of(session).to_vec(),
                namespace: namespace.to_owned(),
                keys: keys.iter().map(|k| k.0.to_vec()).collect(),
                chunk_tokens: ask.chunk_tokens,
                tag: ask.tag,
                ..Default::default()
            };
            Ok(self.do_fetch(r).await?.hit_chunks)
        })
        .await
        .map(Response::into_inner)
    }

    async fn do_fetch(&self, r: FetchRequest) -> Result<FetchResponse, Status> {
        let session = self.session(&r.session_token)?;
        let ep = session
            .ep()
            .cloned()
            .ok_or_else(|| Status::failed_precondition("the session has no data endpoint bound yet (send AM_HELLO)"))?;
        let st = &self.state;
        let mut r = r;
        let own = if r.lease_id == 0 && !r.keys.is_empty() {
            // One call for a remote get: look the keys up under a lease of this call's own.
            let found = self
                .do_lookup(LookupRequest {
                    session_token: r.session_token.clone(),
                    namespace: std::mem::take(&mut r.namespace),
                    keys: std::mem::take(&mut r.keys),
                    lease: true,
                    lease_ttl_ms: 0,
                    chunk_tokens: r.chunk_tokens,
                    want_chunks: 0,
                    wait_ms: 0,
                })
                .await?;
            if found.lease_id == 0 {
                return Ok(FetchResponse { bytes: 0, hit_chunks: 0 });
            }
            r.lease_id = found.lease_id;
            r.indices.clear();
            Some(session.id)
        } else {
            None
        };
        let pinned = st.index().pin_lease(r.lease_id, session.id, Instant::now()).map_err(index_status);
        let n = match pinned {
            Ok(n) => n,
            Err(e) => {
                if own.is_some() {
                    let _ = st.index().release(r.lease_id, session.id);
                }
                return Err(e);
            }
        };
        // Every send holds the pin until UCX has finished reading the slot, even when this call
        // is dropped half-way (the client went away): the sends run on as detached tasks.
        let pin = Arc::new(LeasePin { state: st.clone(), lease_id: r.lease_id, own });
        let indices: Vec<u32> = if r.indices.is_empty() { (0..n as u32).collect() } else { r.indices.clone() };
        if indices.len() > prefixd_proto::limits::MAX_KEYS_PER_REQUEST {
            return Err(Status::invalid_argument("too many indices"));
        }
        let mut jobs = Vec::with_capacity(indices.len());
        for &i in &indices {
            let loc = st.index().lease_chunk(r.lease_id, session.id, i, Instant::now()).map_err(index_status)?;
            jobs.push((i, loc));
        }
        let timeout = st.cfg.transfer_timeout;
        let out_bytes =
            st.metrics.transfer_bytes.with_label_values(&["out", session.path_label(), session.transport()]);
        let mut inflight = std::collections::VecDeque::new();
        let mut bytes = 0u64;
        let join = |r: Result<ucx_bindings::Result<u64>, tokio::task::JoinError>| -> Result<u64, Status> {
            r.map_err(|e| Status::internal(e.to_string()))?.map_err(ucx_status)
        };
        for (i, loc) in jobs {
            if inflight.len() >= FETCH_WINDOW {
                if let Some(h) = inflight.pop_front() {
                    bytes += join(h.await)?;
                }
            }
            let (slice, bounced) = self.fetch_source(loc)?;
            let (ep, pin, st2) = (ep.clone(), pin.clone(), st.clone());
            let header = FetchHeader { tag: r.tag, lease_id: r.lease_id, index: i }.encode();
            let out_bytes = out_bytes.clone();
            inflight.push_back(tokio::spawn(async move {
                let _pin = pin;
                let len = slice.len() as u64;
                let r = ep.am_send(AM_FETCH, &header, AmData::Region(slice), timeout).await.map(|()| len);
                if let Some(b) = bounced {
                    st2.bounce.give(b); // the send has completed: UCX no longer reads it
                }
                // Counted per send, so a call that fails half-way still counts what went out.
                if r.is_ok() {
                    out_bytes.inc_by(len);
                }
                r
            }));
        }
        let sent = indices.len() as u32;
        drop(pin);
        for h in inflight {
            bytes += join(h.await)?;
        }
        Ok(FetchResponse { bytes, hit_chunks: sent })
    }
}

impl Service {
    /// Zeroes the slots an RMA put reserved before their addresses go out: the server cannot
    /// see RMA writes, so a commit of a slot the client never wrote would otherwise publish
    /// whatever the slot held before (another namespace's deleted chunk, in 4e6c6e7). Nothing
    /// else touches a reserved slot; GPU slots cost a device memset, host slots a memset off
    /// the async workers. Active-message puts need none: the server writes every byte itself.
    async fn scrub(&self, slots: &[Slot]) -> Result<(), Status> {
        let st = &self.state;
        let mut host = Vec::new();
        for s in slots {
            let Slot::Reserved(loc) = s else { continue };
            let at = st.pools.base(loc.tier) + loc.offset;
            match (loc.tier, &st.cuda) {
                (Tier::Gpu, Some(cuda)) => {
                    // SAFETY: a slot of the GPU pool reserved by this put; nobody else uses it
                    // until its address is handed out below.
                    unsafe { cuda.zero(at, loc.len as usize) }
                        .map_err(|e| Status::internal(format!("clearing a reserved GPU slot: {e}")))?;
                }
                (Tier::Gpu, None) => return Err(Status::internal("a GPU-tier slot without CUDA")),
                (Tier::Host, _) => host.push((at as usize, loc.len as usize)),
            }
        }
        if host.is_empty() {
            return Ok(());
        }
        tokio::task::spawn_blocking(move || {
            for (at, len) in host {
                // SAFETY: a slot of the host pool reserved by this put, inside the pool's
                // mapping (the index hands out in-range offsets); nobody else uses it yet.
                unsafe { std::ptr::write_bytes(at as *mut u8, 0, len) };
            }
        })
        .await
        .map_err(|e| Status::internal(format!("clearing reserved slots: {e}")))
    }

    /// What an AM_FETCH of chunk `loc` sends from: its pool slot, or, for a GPU-tier chunk, a
    /// host copy of it (see `bounce`), returned with the buffer to give back after the send.
    fn fetch_source(
        &self,
        loc: prefixd_cache::Location,
    ) -> Result<(ucx_bindings::RegionSlice, Option<Arc<ucx_bindings::MemRegion>>), Status> {
        let st = &self.state;
        let pool = st.pools.region(loc.tier).ok_or_else(|| Status::internal("chunk in a tier without a pool"))?;
        let (cuda, Tier::Gpu) = (&st.cuda, loc.tier) else {
            let slice = pool
                .slice(loc.offset as usize, loc.len as usize)
                .map_err(|e| Status::internal(format!("pool slice: {e}")))?;
            return Ok((slice, None));
        };
        let cuda = cuda.as_ref().ok_or_else(|| Status::internal("a GPU-tier chunk without CUDA"))?;
        let len = loc.len as usize;
        let b = st.bounce.take(&st.ctx, len).map_err(ucx_status)?;
        let src = st.pools.base(Tier::Gpu) + loc.offset;
        // SAFETY: the destination is a fresh or returned bounce buffer of at least `len` bytes that
        // nothing else uses; the source is a slot of the GPU pool pinned by the caller's lease.
        unsafe { cuda.copy_dtoh(b.as_ptr(), src, len) }
            .map_err(|e| Status::internal(format!("copying a GPU-tier chunk for the remote path: {e}")))?;
        let slice = b.slice(0, len).map_err(|e| Status::internal(format!("bounce slice: {e}")))?;
        Ok((slice, Some(b)))
    }
}

#[tonic::async_trait]
impl Prefixd for Service {
    async fn connect(&self, req: Request<ConnectRequest>) -> Result<Response<ConnectResponse>, Status> {
        let peer = req.remote_addr().map(|a| a.ip());
        let caller = self.state.auth.caller(req.metadata()).map(|c| (c.to_access(), c.may_use_direct()));
        let r = req.into_inner();
        self.observe("connect", async {
            let (access, direct) = caller?;
            self.do_connect(r, peer, access, direct).await
        })
        .await
    }

    async fn disconnect(&self, req: Request<DisconnectRequest>) -> Result<Response<DisconnectResponse>, Status> {
        let caller = self.state.auth.caller(req.metadata()).map(|_| ());
        let token = req.into_inner().session_token;
        self.observe("disconnect", async {
            caller?;
            let s = self.session(&token)?;
            self.state.drop_session(&Sessions::token_of(&s), "disconnected");
            Ok(DisconnectResponse {})
        })
        .await
    }

    async fn keep_alive(&self, req: Request<KeepAliveRequest>) -> Result<Response<KeepAliveResponse>, Status> {
        let caller = self.state.auth.caller(req.metadata()).map(|_| ());
        let token = req.into_inner().session_token;
        self.observe("keep_alive", async {
            caller?;
            // Entering the session is what keeps it: the guard marks it seen.
            self.session(&token)?;
            Ok(KeepAliveResponse {})
        })
        .await
    }

    async fn begin_put(&self, req: Request<BeginPutRequest>) -> Result<Response<BeginPutResponse>, Status> {
        let caller = self.state.auth.caller(req.metadata());
        let r = req.into_inner();
        self.observe("begin_put", async {
            caller?.check(Grant::Write, &r.namespace)?;
            self.do_begin_put(r).await
        })
        .await
    }

    async fn commit_put(&self, req: Request<CommitPutRequest>) -> Result<Response<CommitPutResponse>, Status> {
        let caller = self.state.auth.caller(req.metadata()).map(|_| ());
        let r = req.into_inner();
        self.observe("commit_put", async {
            caller?;
            self.do_commit_put(r).await
        })
        .await
    }

    async fn abort_put(&self, req: Request<AbortPutRequest>) -> Result<Response<AbortPutResponse>, Status> {
        let caller = self.state.auth.caller(req.metadata()).map(|_| ());
        let r = req.into_inner();
        self.observe("abort_put", async {
            caller?;
            self.do_abort_put(r).await
        })
        .await
    }

    async fn lookup(&self, req: Request<LookupRequest>) -> Result<Response<LookupResponse>, Status> {
        let caller = self.state.auth.caller(req.metadata());
        let r = req.into_inner();
        self.observe("lookup", async {
            caller?.check(Grant::Read, &r.namespace)?;
            self.do_lookup(r).await
        })
        .await
    }

    async fn fetch(&self, req: Request<FetchRequest>) -> Result<Response<FetchResponse>, Status> {
        let caller = self.state.auth.caller(req.metadata());
        let r = req.into_inner();
        // With keys it looks them up itself: the same grant as Lookup.
        let allowed = caller.and_then(|c| {
            if r.lease_id == 0 && !r.keys.is_empty() {
                c.check(Grant::Read, &r.namespace).map(|_| ())
            } else {
                Ok(())
            }
        });
        self.observe("fetch", async {
            allowed?;
            self.do_fetch(r).await
        })
        .await
    }

    async fn release(&self, req: Request<ReleaseRequest>) -> Result<Response<ReleaseResponse>, Status> {
        let caller = self.state.auth.caller(req.metadata()).map(|_| ());
        let r = req.into_inner();
        self.observe("release", async {
            caller?;
            let s = self.session(&r.session_token)?;
            self.state.index().release(r.lease_id, s.id).map_err(index_status)?;
            Ok(ReleaseResponse {})
        })
        .await
    }

    async fn delete(&self, req: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        let caller = self.state.auth.caller(req.metadata());
        let r = req.into_inner();
        self.observe("delete", async {
            caller?.check(Grant::Admin, &r.namespace)?;
            self.session(&r.session_token)?;
            let keys = keys_from(&r.keys, "keys")?;
            let (deleted, leased) = self.state.index().delete(&r.namespace, &keys).map_err(index_status)?;
            Ok(DeleteResponse { deleted, leased })
        })
        .await
    }

    async fn stats(&self, req: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        let caller = self.state.auth.caller(req.metadata()).map(|_| ());
        self.observe("stats", async {
            caller?;
            let st = &self.state;
            st.refresh_gauges();
            let idx = st.index();
            let tiers = idx
                .usage()
                .iter()
                .map(|u| TierStats {
                    tier: u.tier.to_string(),
                    used_bytes: u.used,
                    capacity_bytes: u.capacity,
                    entries: u.entries,
                })
                .collect();
            let c = idx.counters();
            let (entries, leases, reservations, quarantined_bytes) = (
                idx.entries() as u64,
                idx.active_leases() as u64,
                idx.active_reservations() as u64,
                idx.quarantined_bytes(),
            );
            drop(idx);
            let mut bytes_by_path = std::collections::HashMap::new();
            for dir in ["in", "out"] {
                for path in ["rma", "am_local", "am"] {
                    let extra = ["cuda_ipc", "shm", "unknown"].map(str::to_owned);
                    for t in st.transports.iter().chain(extra.iter()) {
                        if let Ok(m) = st.metrics.transfer_bytes.get_metric_with_label_values(&[dir, path, t]) {
                            if m.get() > 0 {
                                bytes_by_path.insert(format!("{dir} {path}:{t}"), m.get());
                            }
                        }
                    }
                }
            }
            Ok(StatsResponse {
                tiers,
                entries,
                sessions: st.sessions.len() as u64,
                active_leases: leases,
                active_reservations: reservations,
                hit_chunks: c.hit_chunks,
                miss_chunks: c.miss_chunks,
                evictions: c.evictions,
                transports: st.transports.clone(),
                bytes_by_path,
                version: env!("CARGO_PKG_VERSION").to_owned(),
                quarantined_bytes,
                ucx_version: st.ctx.info().version.clone(),
                gpu_pool_device: match (&st.cuda, &st.pools.gpu()) {
                    (Some(c), Some(_)) => c.pci_bus_id(),
                    _ => String::new(),
                },
                rma_policy: st.cfg.rma.as_str().to_owned(),
                auth_enabled: st.auth.enabled(),
                host_id: st.host_id.clone(),
                // SAFETY: getuid has no preconditions and cannot fail.
                uid: unsafe { libc::getuid() },
            })
        })
        .await
    }
}

/// Answers AM_FETCH_ASK on the UCX progress thread itself where it can (`ucx_bindings::AmService`):
/// a well-formed request from a bound session whose grants allow it, with a call slot free, for
/// chunks all in host memory. Its chunks and its FetchDone are posted right there, with no hop to
/// an async task and back. Everything else, errors included, is passed on to the async path
/// (`dataplane::serve_fetch_asks`), which answers it in full. Only servers without a GPU pool use
/// it: a GPU-tier chunk is first copied to host memory for the remote path, which must never
/// happen on the progress thread.
#[derive(Debug)]
pub struct InlineFetch(pub Service);

/// What a fetch answered in place holds until UCX is done with its last send: the lease's pin,
/// the session's in-call mark and the call slot.
struct FetchHold {
    _pin: LeasePin,
    _call: InCall,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl ucx_bindings::AmService for InlineFetch {
    fn serve(&self, a: ucx_bindings::Arriving<'_>) -> ucx_bindings::Served {
        use ucx_bindings::{Answer, Served};
        let svc = &self.0;
        let st = &svc.state;
        let (Some(ask), Some(data), Some(from)) = (FetchAsk::decode(a.header), a.data, a.sender) else {
            return Served::Pass;
        };
        let Some(session) = st.sessions.by_endpoint(from) else { return Served::Pass };
        let Some((ns, keys)) = ask.parse(data) else { return Served::Pass };
        if keys.is_empty() || st.is_draining() || session.access.caller().check(Grant::Read, ns).is_err() {
            return Served::Pass;
        }
        let Ok(permit) = svc.inflight.clone().try_acquire_owned() else { return Served::Pass };
        let t0 = Instant::now();
        let ttl = st.cfg.lease_ttl.min(st.cfg.max_lease_ttl);
        // One hold of the index: look up under a lease of this call's own and pin it. A fresh
        // lease's locations are the ones to send (pinned, they do not move).
        let leased = {
            let mut idx = st.index();
            let Ok(res) = idx.lookup(ns, &keys, Some((session.id, ttl)), t0) else { return Served::Pass };
            match res.lease {
                None => None,
                Some((lease_id, _)) => {
                    let host_only = res.locations.iter().all(|l| l.tier != Tier::Gpu);
                    if !host_only || idx.pin_lease(lease_id, session.id, t0).is_err() {
                        let _ = idx.release(lease_id, session.id);
                        return Served::Pass;
                    }
                    Some((lease_id, res.locations))
                }
            }
        };
        let timeout = st.cfg.transfer_timeout;
        let fetch_done = move |hits: u32| Answer {
            id: AM_FETCH,
            header: prefixd_proto::dataplane::FetchDone { tag: ask.tag, hit_chunks: hits, code: 0 }.encode().to_vec(),
            data: AmData::None,
            timeout,
            done: None,
        };
        let count = |hits: usize| {
            svc.count_lookup(keys.len(), hits, ask.chunk_tokens);
            svc.record_call("fetch", "Ok", t0);
            st.metrics.fetch_asks.with_label_values(&["inline"]).inc();
        };
        let Some((lease_id, locations)) = leased else {
            count(0);
            return Served::Answered(vec![fetch_done(0)]);
        };
        // From here the pin's drop unpins and releases the lease (the index is no longer held).
        let pin = LeasePin { state: st.clone(), lease_id, own: Some(session.id) };
        let n = locations.len();
        let mut slices = Vec::with_capacity(n);
        for (i, loc) in (0u32..).zip(locations) {
            match svc.fetch_source(loc) {
                Ok((slice, None)) => slices.push((i, slice)),
                _ => return Served::Pass, // `pin` drops here: unpinned and released
            }
        }
        let hold = Arc::new(FetchHold { _pin: pin, _call: session.enter(), _permit: permit });
        let out_bytes =
            st.metrics.transfer_bytes.with_label_values(&["out", session.path_label(), session.transport()]);
        let mut answers = Vec::with_capacity(n + 1);
        for (i, slice) in slices {
            let (hold, out_bytes, len) = (hold.clone(), out_bytes.clone(), slice.len() as u64);
            answers.push(Answer {
                id: AM_FETCH,
                header: FetchHeader { tag: ask.tag, lease_id, index: i }.encode().to_vec(),
                data: AmData::Region(slice),
                timeout,
                done: Some(Box::new(move |r: ucx_bindings::Result<()>| {
                    if r.is_ok() {
                        out_bytes.inc_by(len);
                    }
                    drop(hold); // the last send done ends the pin, the call and its slot
                })),
            });
        }
        answers.push(fetch_done(n as u32));
        count(n);
        Served::Answered(answers)
    }
}
