//! # prefixd-client
//!
//! The Rust client of prefixd. [`Client::connect`] opens a gRPC session and a UCX endpoint to
//! the server; then [`Client::put`] / [`Client::get`] move the KV bytes of a token prompt, and the
//! chunk-level calls ([`Client::put_chunks`], [`Client::get_chunks`]) move registered buffers
//! without copies.
//!
//! Data path: the server decides. Same-host clients (allowed by the server) write and read pool
//! slots with UCX put/get and flush before committing; everyone else sends chunks as active
//! messages and receives them the same way, choosing its own buffers.
//!
//! Keys follow [`prefixd_proto::keys`]: vLLM's block-hash chain; producers and consumers must use
//! the same [`KeyConfig`]. Only full chunks are cached.

mod access;
pub mod cuda;
mod direct;
mod keepalive;
mod paged;
mod plane;
mod recover;

pub use access::{channel_with, grpc as grpc_client, Access, Grpc, Secret, TlsOptions};
pub use paged::{CopyStream, Fragment, Memory};
pub use recover::Reconnecting;

use plane::{AmPlane, Plane, RmaPlane};

use prefixd_proto::dataplane::{
    FetchAsk, FetchDone, FetchHeader, HelloAck, PutHeader, AM_FETCH, AM_FETCH_ASK, AM_HELLO, AM_HELLO_ACK, AM_PUT,
};
pub use prefixd_proto::keys::{parse_tokens, ChunkKey, KeyConfig};
use prefixd_proto::v1::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use ucx_bindings::{AmData, Endpoint, ErrorMode, MemRegion, RegionSlice, RemoteRegion, Worker};

pub use prefixd_proto::v1::DataPath;
pub use prefixd_proto::v1::StatsResponse as Stats;
pub use ucx_bindings;

/// Transfers in flight at once per call.
const WINDOW: usize = 8;

/// Client errors. [`Error::is_retryable`] says whether the same call may succeed later.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller's input cannot work; nothing was sent.
    #[error("{0}")]
    InvalidArgument(String),
    /// The server answered with an error status.
    #[error("prefixd: {message} ({code:?})")]
    Server { code: tonic::Code, message: String },
    /// The server could not be reached.
    #[error("cannot reach prefixd at {endpoint}: {message}")]
    Connect { endpoint: String, message: String },
    /// A UCX transfer failed.
    #[error("transfer failed: {0}")]
    Transfer(#[from] ucx_bindings::Error),
    /// The lease or reservation ran out before the transfer finished; the bytes are not used.
    #[error("{0} expired before the transfer finished")]
    Expired(&'static str),
    /// An address that lies in none of this session's view of the server's pools: the server
    /// restarted (new pools) or the address came from another server. A new session sees the
    /// current pools.
    #[error("address {0:#x} is in none of the pools this session knows: the server restarted, or the lease came from another server")]
    StalePool(u64),
}

impl Error {
    /// Whether the server refused the caller: no token or an unknown one, or a token without
    /// the grant the call needs.
    pub fn is_access_denied(&self) -> bool {
        matches!(self, Error::Server { code: tonic::Code::Unauthenticated | tonic::Code::PermissionDenied, .. })
    }

    /// The session is gone (server down or restarted, session reaped, data endpoint failed):
    /// a new [`Client`] may succeed where this one never will again.
    pub fn is_session_lost(&self) -> bool {
        match self {
            Error::Connect { .. } => true,
            Error::Server { code: tonic::Code::Unavailable, .. } => true,
            Error::Server { code: tonic::Code::NotFound, message } => message.starts_with("unknown session"),
            Error::Transfer(ucx_bindings::Error::EndpointClosed { .. } | ucx_bindings::Error::WorkerStopped) => true,
            Error::StalePool(_) => true,
            _ => false,
        }
    }

    pub fn is_retryable(&self) -> bool {
        match self {
            Error::InvalidArgument(_) => false,
            Error::Server { code, .. } => matches!(
                code,
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::Aborted
                    | tonic::Code::NotFound // an expired session, lease or put: start over
            ),
            Error::Connect { .. } | Error::Expired(_) | Error::StalePool(_) => true,
            Error::Transfer(e) => e.is_retryable(),
        }
    }
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::Server { code: s.code(), message: s.message().to_owned() }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to connect. Every field has a default that works on one machine.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Name in the server's logs. Default "prefixd-client".
    pub name: String,
    /// UCX transports, as `UCX_TLS`. Default "sm,tcp".
    pub transports: String,
    /// UCX network devices, as `UCX_NET_DEVICES`. Default: all.
    pub net_devices: Option<String>,
    /// Use active messages even when the server would allow RMA. Default false.
    pub force_remote: bool,
    /// Key recipe. Default: seed "0", 16-token blocks, 256-token chunks.
    pub keys: KeyConfig,
    /// Deadline of every call and every transfer. Default 30 s.
    pub timeout: Duration,
    /// Run first on the client's UCX progress thread, e.g. to make the engine's CUDA context
    /// current there (UCX's cuda transports use the current context). Default: nothing.
    pub worker_init: Option<WorkerInit>,
    /// Token and TLS for servers that check callers. Default: none, TLS for `https://`.
    pub access: Access,
}

/// A function run on the client's UCX progress thread when it starts.
#[derive(Clone)]
pub struct WorkerInit(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for WorkerInit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkerInit")
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            name: "prefixd-client".into(),
            transports: "sm,tcp".into(),
            net_devices: None,
            force_remote: false,
            keys: KeyConfig::default(),
            timeout: Duration::from_secs(30),
            worker_init: None,
            access: Access::default(),
        }
    }
}

/// What a put did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PutOutcome {
    /// Chunks in the request.
    pub chunks: usize,
    /// Chunks written.
    pub stored: usize,
    /// Chunks already cached (or being written by someone else), skipped.
    pub skipped: usize,
}

/// Where an AM_FETCH goes: its call's tag, and the chunk's index in it (or, for the FetchDone
/// that ends an AM_FETCH_ASK, a notice to the call).
fn fetch_route(header: &[u8]) -> Option<(u64, ucx_bindings::Slot)> {
    if let Some(h) = FetchHeader::decode(header) {
        return Some((h.tag, ucx_bindings::Slot::Index(h.index as usize)));
    }
    FetchDone::decode(header).map(|d| (d.tag, ucx_bindings::Slot::Notice))
}

/// How a remote get is asked for: a gRPC `Fetch` (answered by its reply), or an AM_FETCH_ASK
/// on the data endpoint (answered by a FetchDone notice).
enum Ask {
    Grpc(FetchRequest),
    Message(FetchAsk, Vec<u8>),
}

/// A session with one prefixd server.
pub struct Client {
    grpc: Grpc,
    channel: Channel,
    /// The session's log id (as the server's logs show it); not a credential.
    session_id: u64,
    /// The session's credential, sent with every call.
    token: Vec<u8>,
    worker: Worker,
    ep: Endpoint,
    /// RMA (same host) or active messages, with what each needs (see `plane`).
    plane: Plane,
    /// Fetched chunks are received on the UCX thread into the buffers each call sets out.
    fetches: ucx_bindings::AmRoutes,
    /// The server answers AM_FETCH_ASK (ConnectResponse.fetch_by_message).
    fetch_by_message: bool,
    next_tag: AtomicU64,
    opts: ClientOptions,
    transports: Vec<String>,
    /// Keeps the session open while the client is quiet (see `keepalive`); None with a server
    /// older than KeepAlive.
    keepalive: Option<keepalive::KeepAlive>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("session", &format_args!("{:016x}", self.session_id))
            .field("path", &self.plane.path())
            .finish()
    }
}

fn host_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// The client id a worker sends with its data connection, telling the server which error mode
/// to accept it in (it must match the client's; see the server's `sessions` module).
pub fn client_id(path: DataPath) -> u64 {
    if path == DataPath::Rma {
        1
    } else {
        2
    }
}

/// The error mode of a data path's endpoint: none for same-host RMA (zero-copy shared-memory
/// RMA), peer for everything else (a dead peer fails operations promptly).
pub fn error_mode(path: DataPath) -> ErrorMode {
    if path == DataPath::Rma {
        ErrorMode::None
    } else {
        ErrorMode::Peer
    }
}

/// The host part of a gRPC endpoint URL, without IPv6 brackets.
fn host_of(endpoint: &str) -> Result<String> {
    let uri: tonic::transport::Uri =
        endpoint.parse().map_err(|e| Error::InvalidArgument(format!("endpoint {endpoint:?}: {e}")))?;
    let host = uri.host().ok_or_else(|| Error::InvalidArgument(format!("endpoint {endpoint:?} names no host")))?;
    Ok(host.trim_start_matches('[').trim_end_matches(']').to_owned())
}

async fn resolve(host: &str, port: u32, endpoint: &str) -> Result<std::net::SocketAddr> {
    let port = u16::try_from(port).map_err(|_| Error::Server {
        code: tonic::Code::Internal,
        message: format!("the server announced data port {port}"),
    })?;
    let conn_err = |m: String| Error::Connect { endpoint: endpoint.to_owned(), message: m };
    tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| conn_err(format!("cannot resolve the data host {host}: {e}")))?
        .next()
        .ok_or_else(|| conn_err(format!("the data host {host} resolves to no address")))
}

/// Connects `worker` to a server's data listener and binds the endpoint to the session of
/// `token` (AM_HELLO, answered by AM_HELLO_ACK); returns the bound endpoint. Fails after
/// `timeout` if the server does not answer (it closes endpoints it refuses).
pub async fn bind_data_endpoint(
    worker: &Worker,
    addr: std::net::SocketAddr,
    path: DataPath,
    token: &[u8],
    timeout: Duration,
) -> Result<Endpoint> {
    let mut acks = worker.listen_am(AM_HELLO_ACK).await?;
    let ep = worker.connect_addr(addr, error_mode(path)).await?;
    ep.am_send(AM_HELLO, token, AmData::None, timeout).await?;
    let ack = tokio::time::timeout(timeout, acks.recv())
        .await
        .map_err(|_| Error::Transfer(ucx_bindings::Error::TimedOut { op: "data endpoint hello", after: timeout }))?
        .ok_or(Error::Transfer(ucx_bindings::Error::WorkerStopped))?;
    if ack.sender() != Some(ep.id()) || HelloAck::decode(ack.header()).is_none() {
        return Err(Error::Server { code: tonic::Code::Internal, message: "malformed hello acknowledgement".into() });
    }
    Ok(ep)
}

impl Client {
    /// Connects with default options. `endpoint` is a URL such as `http://127.0.0.1:50051`.
    pub async fn connect(endpoint: &str) -> Result<Client> {
        Self::connect_with(endpoint, ClientOptions::default()).await
    }

    /// Connects with `opts`. When a same-host session cannot wire up its data endpoint over
    /// shared memory (the server runs as another user, whose segments UCX may not map), it
    /// connects again over tcp, logs a warning, and works at tcp speed: `prefixctl doctor` and
    /// the metric `prefixd_transfer_bytes_total{path="am_local",transport="tcp"}` show it.
    pub async fn connect_with(endpoint: &str, opts: ClientOptions) -> Result<Client> {
        match Self::connect_once(endpoint, opts.clone()).await {
            // Only a failed wire-up (the endpoint closed or never answered), never bad input.
            Err(Error::Transfer(
                e @ (ucx_bindings::Error::EndpointClosed { .. } | ucx_bindings::Error::TimedOut { .. }),
            )) if !opts.force_remote && opts.transports != "tcp" => {
                tracing::warn!(
                    endpoint, error = %e,
                    "the data endpoint could not be set up over shared memory (is the server another user?); using tcp"
                );
                let tcp = ClientOptions { transports: "tcp".into(), force_remote: true, ..opts };
                Self::connect_once(endpoint, tcp).await
            }
            other => other,
        }
    }

    async fn connect_once(endpoint: &str, opts: ClientOptions) -> Result<Client> {
        opts.keys.validate().map_err(Error::InvalidArgument)?;
        let channel = channel_with(endpoint, opts.timeout, &opts.access).await?;
        let mut grpc = access::grpc(channel.clone(), &opts.access)?;

        // The data endpoint is set up through the server's UCX listener, which needs tcp.
        let list = ucx_bindings::TransportList::parse(&opts.transports)?;
        let list = list.with_tcp().unwrap_or(list).to_ucx();
        let mut b = ucx_bindings::ContextBuilder::new().transports(&list)?.name(&opts.name);
        if let Some(d) = &opts.net_devices {
            b = b.net_devices(d);
        }
        let ctx = b.build()?;
        let resp = grpc
            .connect(ConnectRequest {
                host_id: host_id(),
                transports: ctx.info().transports(),
                force_remote: opts.force_remote,
                client_name: opts.name.clone(),
            })
            .await?
            .into_inner();
        let path = DataPath::try_from(resp.data_path).unwrap_or(DataPath::ActiveMessage);
        let init = opts.worker_init.clone();
        let worker = Worker::with_options(&ctx, "client", Some(client_id(path)), move || {
            if let Some(f) = init {
                (f.0)();
            }
        })?;
        let fetches = worker.route_am(AM_FETCH, fetch_route).await?;
        let data_host = if resp.data_host.is_empty() { host_of(endpoint)? } else { resp.data_host.clone() };
        let data_addr = resolve(&data_host, resp.data_port, endpoint).await?;
        let ep = bind_data_endpoint(&worker, data_addr, path, &resp.session_token, opts.timeout).await?;
        let plane = if path == DataPath::Rma {
            let mut pools = Vec::new();
            for p in &resp.pools {
                pools.push(ep.unpack_rkey(&RemoteRegion { base: p.base, len: p.length, rkey: p.rkey.clone() }).await?);
            }
            // Map the host pool where the server offers it; without it, RMA still works.
            let shared = match resp.pools.iter().find(|p| p.tier == "host") {
                Some(host) if !resp.host_pool_socket.is_empty() => {
                    direct::SharedHostPool::open(&resp.host_pool_socket, &resp.session_token, host.base, host.length)
                        .ok()
                }
                _ => None,
            };
            let gpu_ipc = match resp.pools.iter().find(|p| p.tier == "gpu") {
                Some(g) if resp.gpu_pool_ipc_handle.len() == 64 => {
                    Some((resp.gpu_pool_ipc_handle.clone(), g.base, g.length))
                }
                _ => None,
            };
            Plane::Rma(RmaPlane { pools, shared, gpu_ipc, gpu_map: std::sync::OnceLock::new() })
        } else {
            Plane::ActiveMessage(AmPlane { staging: tokio::sync::Mutex::new(None) })
        };
        let keepalive = keepalive::KeepAlive::start(
            grpc.clone(),
            resp.session_token.clone(),
            resp.session_idle_ms,
            resp.session_id,
        );
        Ok(Client {
            grpc,
            channel,
            session_id: resp.session_id,
            token: resp.session_token,
            worker,
            ep,
            plane,
            fetches,
            fetch_by_message: resp.fetch_by_message,
            next_tag: AtomicU64::new(1),
            opts,
            transports: resp.transports,
            keepalive,
        })
    }

    /// The RMA plane, or a clear error naming `what` needs it.
    fn rma(&self, what: &str) -> Result<&RmaPlane> {
        match &self.plane {
            Plane::Rma(r) => Ok(r),
            Plane::ActiveMessage(_) => Err(Error::InvalidArgument(format!("{what}: needs a same-host (RMA) session"))),
        }
    }

    /// The RMA plane and the first fragment's address (its CUDA context is the copies').
    fn check_paged(&self, keys: &[ChunkKey], chunks: &[Vec<Fragment>]) -> Result<(&RmaPlane, u64)> {
        let rma = self.rma("paged chunks")?;
        if keys.len() != chunks.len() {
            return Err(Error::InvalidArgument(format!("{} keys but {} fragment lists", keys.len(), chunks.len())));
        }
        let ctx_ptr = chunks
            .iter()
            .flatten()
            .next()
            .map(|f| f.ptr)
            .ok_or_else(|| Error::InvalidArgument("no fragments".into()))?;
        Ok((rma, ctx_ptr))
    }

    /// Stores chunks given as fragment lists (a chunk's bytes are its fragments in order): every
    /// needed chunk's fragments are gathered into its slot with one kernel launch, on our own
    /// stream. Same-host sessions only; fragments in CUDA or page-locked host memory.
    pub async fn put_paged(
        &self,
        namespace: &str,
        keys: &[ChunkKey],
        parent: Option<ChunkKey>,
        chunks: &[Vec<Fragment>],
    ) -> Result<PutOutcome> {
        self.put_paged_on(namespace, keys, parent, chunks, Memory::Device, CopyStream::Wait).await
    }

    /// As [`Client::put_paged`], with the fragments' memory and the stream named: the gather is
    /// queued on `on` (ordered after the engine's work there: no synchronize of the engine) and
    /// waited for before the commit. Host fragments are copied into the mapped host pool (or,
    /// for a GPU-tier slot, with one copy each).
    pub async fn put_paged_on(
        &self,
        namespace: &str,
        keys: &[ChunkKey],
        parent: Option<ChunkKey>,
        chunks: &[Vec<Fragment>],
        memory: Memory,
        on: CopyStream,
    ) -> Result<PutOutcome> {
        let (rma, ctx_ptr) = self.check_paged(keys, chunks)?;
        let sizes: Vec<u64> = chunks.iter().map(|c| c.iter().map(|f| f.len as u64).sum()).collect();
        let put = self.begin_put(namespace, keys, &sizes, parent).await?;
        let slots: Vec<(u64, u64)> =
            put.begin.slots.iter().zip(&sizes).filter(|(s, _)| !s.present).map(|(s, &n)| (s.address, n)).collect();
        let frags: Vec<&Vec<Fragment>> =
            put.begin.slots.iter().zip(chunks).filter(|(s, _)| !s.present).map(|(_, f)| f).collect();
        let copied = match memory {
            Memory::Device => match (rma.device_copy(&slots, &frags, ctx_ptr, true, on), on) {
                (Ok(()), CopyStream::Caller(stream)) => wait_stream(ctx_ptr, stream).await,
                (r, _) => r,
            },
            Memory::Host => rma.host_copy(&slots, &frags, true),
        };
        let copied =
            copied.and_then(
                |()| {
                    if Instant::now() > put.deadline {
                        Err(Error::Expired("reservation"))
                    } else {
                        Ok(())
                    }
                },
            );
        match copied {
            Ok(()) => put.commit().await,
            Err(e) => {
                put.abort().await;
                Err(e)
            }
        }
    }

    /// Reads the longest cached prefix of `keys` into fragment lists (scatter, one kernel
    /// launch); returns the number of chunks read. Each chunk's fragments must add up to its size.
    pub async fn get_paged(&self, namespace: &str, keys: &[ChunkKey], chunks: &[Vec<Fragment>]) -> Result<usize> {
        self.check_paged(keys, chunks)?;
        let lease = self.lease_keys(namespace, keys).await?;
        let result = if lease.chunks.is_empty() {
            Ok(0) // a miss: nothing to copy, no lease to outrun
        } else {
            self.scatter(&lease.chunks, &chunks[..lease.chunks.len()], Memory::Device, CopyStream::Wait)
                .and_then(|()| if Instant::now() > lease.expires { Err(Error::Expired("lease")) } else { Ok(()) })
                .map(|()| lease.chunks.len())
        };
        self.release_lease(lease.id);
        result
    }

    /// Leases the longest cached prefix of `keys`: the chunks stay where they are (no eviction,
    /// no move) until [`Client::release_lease`] or the lease's expiry. Same-host (RMA) sessions
    /// get each chunk's address, which [`Client::scatter`] reads, from this process or from any
    /// other client process of the same host.
    pub async fn lease_keys(&self, namespace: &str, keys: &[ChunkKey]) -> Result<Lease> {
        self.lease_keys_waiting(namespace, keys, Wait::NONE).await
    }

    /// As [`Client::lease_keys`], once the server has waited as `wait` says (see [`Wait`]). The
    /// wait is a lookup of its own, before the lease: the lease's lifetime then counts from a
    /// call that starts after the wait, as for any lease.
    pub async fn lease_keys_waiting(&self, namespace: &str, keys: &[ChunkKey], wait: Wait) -> Result<Lease> {
        if wait.chunks > 0 && !wait.up_to.is_zero() {
            self.lookup_keys_waiting(namespace, keys, wait).await?;
        }
        let (r, started) = self.lease(namespace, keys).await?;
        let expires = started + Duration::from_millis(r.lease_expires_in_ms);
        let chunks = r
            .chunks
            .iter()
            .map(|c| LeasedChunk { address: c.address, length: c.length, gpu_tier: c.tier == "gpu" })
            .collect();
        Ok(Lease { id: r.lease_id, chunks, expires })
    }

    /// Ends a lease (in the background: the bytes are already read, and a lost release only
    /// means the lease runs out at its TTL).
    pub fn release_lease(&self, lease_id: u64) {
        if lease_id != 0 {
            let mut grpc = self.grpc.clone();
            let session_token = self.token.clone();
            tokio::spawn(async move {
                let _ = grpc.release(ReleaseRequest { session_token, lease_id }).await;
            });
        }
    }

    /// Copies leased chunks (from [`Client::lease_keys`], possibly another client's lease on the
    /// same server) into fragment lists: device fragments by one kernel launch queued on `on`
    /// (returns once queued for `CopyStream::Caller`: the caller's stream orders the readers);
    /// host fragments by direct copies from the mapped pools. Same-host sessions only.
    pub fn scatter(
        &self,
        chunks: &[LeasedChunk],
        frags: &[Vec<Fragment>],
        memory: Memory,
        on: CopyStream,
    ) -> Result<()> {
        let rma = self.rma("reading leased chunks directly")?;
        if chunks.len() != frags.len() {
            return Err(Error::InvalidArgument(format!("{} chunks but {} fragment lists", chunks.len(), frags.len())));
        }
        for (i, (c, f)) in chunks.iter().zip(frags).enumerate() {
            let total: u64 = f.iter().map(|f| f.len as u64).sum();
            if total != c.length {
                return Err(Error::InvalidArgument(format!(
                    "chunk {i}: fragments add up to {total} bytes; the chunk is {} bytes",
                    c.length
                )));
            }
        }
        let Some(ctx_ptr) = frags.iter().flatten().next().map(|f| f.ptr) else {
            return Ok(());
        };
        let ranges: Vec<(u64, u64)> = chunks.iter().map(|c| (c.address, c.length)).collect();
        let frags: Vec<&Vec<Fragment>> = frags.iter().collect();
        match memory {
            Memory::Device => rma.device_copy(&ranges, &frags, ctx_ptr, false, on),
            Memory::Host => rma.host_copy(&ranges, &frags, false),
        }
    }

    /// Reads the longest cached prefix of `keys` into fragment lists on any session; returns
    /// the chunks read. Same-host sessions scatter straight from the pools; others fetch the
    /// chunks (active messages) into a staging buffer and scatter from there.
    pub async fn get_paged_any(
        &self,
        namespace: &str,
        keys: &[ChunkKey],
        chunks: &[Vec<Fragment>],
        memory: Memory,
    ) -> Result<usize> {
        if keys.len() != chunks.len() {
            return Err(Error::InvalidArgument(format!("{} keys but {} fragment lists", keys.len(), chunks.len())));
        }
        let am = match &self.plane {
            Plane::ActiveMessage(am) => am,
            Plane::Rma(_) => {
                let lease = self.lease_keys(namespace, keys).await?;
                let n = lease.chunks.len();
                let r = self.scatter(&lease.chunks, &chunks[..n], memory, CopyStream::Wait).and_then(|()| {
                    if Instant::now() > lease.expires {
                        Err(Error::Expired("lease"))
                    } else {
                        Ok(())
                    }
                });
                self.release_lease(lease.id);
                return r.map(|()| n);
            }
        };
        // One call: the server looks the keys up and sends the hits into a staging buffer laid
        // out by the fragments (a chunk of another size fails its receive: a clear error).
        let sizes: Vec<usize> = chunks.iter().map(|f| f.iter().map(|f| f.len).sum()).collect();
        let total: usize = sizes.iter().sum();
        if total == 0 {
            return Ok(0);
        }
        let mut staging = am.staging.lock().await;
        let st = paged::Staging::ensure(&mut staging, total, || self.alloc(total))?;
        let mut slices = Vec::with_capacity(sizes.len());
        let mut off = 0;
        for &len in &sizes {
            slices.push(st.region.slice(off, len)?);
            off += len;
        }
        let n = self.fetch_keys(namespace, keys, &slices).await?;
        st.scatter(&chunks[..n], memory).map_err(Error::InvalidArgument)?;
        Ok(n)
    }

    /// Prepares this session's direct device copies in the context of device pointer `ctx_ptr`
    /// (any of the caller's): what the first one would do, done now. Nothing to do on the
    /// active-message path.
    pub fn prepare_device(&self, ctx_ptr: u64) -> Result<()> {
        match &self.plane {
            Plane::Rma(r) => r.prepare_device(ctx_ptr),
            _ => Ok(()),
        }
    }

    /// Whether host-tier chunks move by direct copies through the mapped pool (same host).
    pub fn direct_host_pool(&self) -> bool {
        matches!(&self.plane, Plane::Rma(r) if r.shared.is_some())
    }

    /// Registers the caller's CUDA device memory for the chunk-level calls (needs a client whose
    /// transports include cuda_copy/cuda_ipc, and a CUDA context current on its UCX thread: see
    /// [`ClientOptions::worker_init`]).
    ///
    /// # Safety
    /// `ptr..ptr+len` must be device memory that stays allocated while the region or any
    /// transfer using it exists.
    pub unsafe fn register_cuda(&self, ptr: u64, len: usize) -> Result<Arc<MemRegion>> {
        // SAFETY: forwarded from this function's contract.
        Ok(unsafe { MemRegion::register(self.worker.context(), ptr as *mut u8, len, ucx_bindings::MemoryType::Cuda) }?)
    }

    /// The data path the server chose for this session.
    pub fn data_path(&self) -> DataPath {
        self.plane.path()
    }

    /// Transports both sides can use, as the server reported them.
    pub fn transports(&self) -> &[String] {
        &self.transports
    }

    /// The transports this session's UCX endpoint actually uses, e.g. `posix/memory`.
    pub async fn endpoint_transports(&self) -> Result<Vec<String>> {
        Ok(self.ep.transports().await?.iter().map(|t| t.to_string()).collect())
    }

    pub fn key_config(&self) -> &KeyConfig {
        &self.opts.keys
    }

    /// The chunk keys of a token list (full chunks only).
    pub fn keys(&self, tokens: &[u32]) -> Vec<ChunkKey> {
        self.opts.keys.chunk_keys(tokens)
    }

    /// A registered host buffer for the chunk-level calls.
    pub fn alloc(&self, len: usize) -> Result<Arc<MemRegion>> {
        Ok(MemRegion::alloc_host(self.worker.context(), len)?)
    }

    /// The UCX worker, for registering the caller's own memory (`MemRegion::register`).
    pub fn worker(&self) -> &Worker {
        &self.worker
    }

    /// Stores the KV bytes of `tokens`: `bytes` is split evenly over the full chunks.
    pub async fn put(&self, namespace: &str, tokens: &[u32], bytes: &[u8]) -> Result<PutOutcome> {
        let keys = self.keys(tokens);
        if keys.is_empty() {
            return Ok(PutOutcome::default());
        }
        if bytes.is_empty() || bytes.len() % keys.len() != 0 {
            return Err(Error::InvalidArgument(format!(
                "{} bytes do not split evenly over {} full chunks of {} tokens",
                bytes.len(),
                keys.len(),
                self.opts.keys.chunk_tokens
            )));
        }
        let size = bytes.len() / keys.len();
        let staging = self.alloc(bytes.len())?;
        staging.write(0, bytes)?;
        let slices = (0..keys.len()).map(|i| staging.slice(i * size, size)).collect::<Result<Vec<_>, _>>()?;
        self.put_chunks(namespace, &keys, None, &slices).await
    }

    /// Fetches the longest cached prefix of `tokens`: (hit tokens, their bytes).
    pub async fn get(&self, namespace: &str, tokens: &[u32]) -> Result<(usize, Vec<u8>)> {
        let keys = self.keys(tokens);
        if keys.is_empty() {
            return Ok((0, Vec::new()));
        }
        let (lease, started) = self.lease(namespace, &keys).await?;
        let total: u64 = lease.chunks.iter().map(|c| c.length).sum();
        let result = async {
            if total == 0 {
                return Ok::<Vec<u8>, Error>(Vec::new());
            }
            let staging = self.alloc(total as usize)?;
            let mut slices = Vec::new();
            let mut off = 0usize;
            for c in &lease.chunks {
                slices.push(staging.slice(off, c.length as usize)?);
                off += c.length as usize;
            }
            self.read_leased(&lease, started, &slices).await?;
            Ok(staging.to_vec(0, total as usize)?)
        }
        .await;
        self.release_lease(lease.lease_id);
        let bytes = result?;
        Ok((lease.hit_chunks as usize * self.opts.keys.chunk_tokens, bytes))
    }

    /// How many leading tokens of `tokens` are cached (in whole chunks).
    pub async fn lookup(&self, namespace: &str, tokens: &[u32]) -> Result<usize> {
        let keys = self.keys(tokens);
        if keys.is_empty() {
            return Ok(0);
        }
        Ok(self.lookup_keys(namespace, &keys).await? * self.opts.keys.chunk_tokens)
    }

    /// How many leading chunks of `keys` are cached.
    pub async fn lookup_keys(&self, namespace: &str, keys: &[ChunkKey]) -> Result<usize> {
        self.lookup_keys_waiting(namespace, keys, Wait::NONE).await
    }

    /// As [`Client::lookup_keys`], once the server has waited as `wait` says (see [`Wait`]).
    pub async fn lookup_keys_waiting(&self, namespace: &str, keys: &[ChunkKey], wait: Wait) -> Result<usize> {
        let r = self.grpc.clone().lookup(self.lookup_request(namespace, keys, false, wait)).await?.into_inner();
        Ok(r.hit_chunks as usize)
    }

    /// Stores chunks from registered buffers, one per key; `parent` is the key `keys[0]` extends.
    pub async fn put_chunks(
        &self,
        namespace: &str,
        keys: &[ChunkKey],
        parent: Option<ChunkKey>,
        data: &[RegionSlice],
    ) -> Result<PutOutcome> {
        if keys.len() != data.len() {
            return Err(Error::InvalidArgument(format!("{} keys but {} buffers", keys.len(), data.len())));
        }
        let sizes: Vec<u64> = data.iter().map(|d| d.len() as u64).collect();
        let put = self.begin_put(namespace, keys, &sizes, parent).await?;
        match put.write(data).await {
            Ok(()) => put.commit().await,
            Err(e) => {
                put.abort().await;
                Err(e)
            }
        }
    }

    /// The first step of a put, for producers that write chunks as they compute them:
    /// reserves slots (the chunks stay invisible), then [`PendingPut::write`] and
    /// [`PendingPut::commit`]. The reservation expires after the server's lease TTL.
    pub async fn begin_put(
        &self,
        namespace: &str,
        keys: &[ChunkKey],
        sizes: &[u64],
        parent: Option<ChunkKey>,
    ) -> Result<PendingPut<'_>> {
        let started = Instant::now();
        let begin = self
            .grpc
            .clone()
            .begin_put(BeginPutRequest {
                session_token: self.token.clone(),
                namespace: namespace.to_owned(),
                keys: keys.iter().map(|k| k.0.to_vec()).collect(),
                sizes: sizes.to_vec(),
                parent_key: parent.map(|p| p.0.to_vec()).unwrap_or_default(),
            })
            .await?
            .into_inner();
        if begin.slots.len() != keys.len() {
            return Err(Error::Server { code: tonic::Code::Internal, message: "slot count mismatch".into() });
        }
        let deadline = started + Duration::from_millis(begin.expires_in_ms);
        Ok(PendingPut { client: self, begin, deadline })
    }

    async fn write_slots(&self, begin: &BeginPutResponse, data: &[RegionSlice], deadline: Instant) -> Result<()> {
        let t = self.opts.timeout;
        let jobs: Vec<(usize, &PutSlot, &RegionSlice)> = begin
            .slots
            .iter()
            .zip(data)
            .enumerate()
            .filter(|(_, (s, _))| !s.present)
            .map(|(i, (s, d))| (i, s, d))
            .collect();
        for batch in jobs.chunks(WINDOW) {
            let sends = batch.iter().map(|&(i, slot, d)| async move {
                match &self.plane {
                    // Same host, host tier: copy into the mapped pool.
                    Plane::Rma(r) if r.in_shared(slot.address, d.len()) => r.direct(slot.address, d, true),
                    // RMA: write straight into the reserved slot.
                    Plane::Rma(r) => self.ep.put(d, r.pool_at(slot.address)?, slot.address, t).await,
                    // Active message: the server picks the buffer and pulls the data.
                    Plane::ActiveMessage(_) => {
                        let h = PutHeader { put_id: begin.put_id, index: i as u32 };
                        self.ep.am_send(AM_PUT, &h.encode(), AmData::Region(d.clone()), t).await
                    }
                }
            });
            for r in join_all(sends).await {
                r?;
            }
        }
        if let Plane::Rma(_) = self.plane {
            // A put completes locally: make it land before anyone is told the bytes are there.
            self.ep.flush(t).await?;
        }
        if Instant::now() > deadline {
            return Err(Error::Expired("reservation"));
        }
        Ok(())
    }

    /// Reads the longest cached prefix of `keys` into `dest` (one registered buffer per key,
    /// each exactly the chunk's size); returns the number of chunks read.
    pub async fn get_chunks(&self, namespace: &str, keys: &[ChunkKey], dest: &[RegionSlice]) -> Result<usize> {
        if keys.len() != dest.len() {
            return Err(Error::InvalidArgument(format!("{} keys but {} buffers", keys.len(), dest.len())));
        }
        if let Plane::ActiveMessage(_) = self.plane {
            return self.fetch_keys(namespace, keys, dest).await; // one call (`fetch_into`)
        }
        let (lease, started) = self.lease(namespace, keys).await?;
        let hits = lease.hit_chunks as usize;
        let result = async {
            for (i, (c, d)) in lease.chunks.iter().zip(dest).enumerate() {
                if c.length != d.len() as u64 {
                    return Err(Error::InvalidArgument(format!(
                        "buffer {i} is {} bytes; the chunk is {} bytes",
                        d.len(),
                        c.length
                    )));
                }
            }
            self.read_leased(&lease, started, &dest[..hits]).await
        }
        .await;
        self.release_lease(lease.lease_id);
        result.map(|()| hits)
    }

    async fn lease(&self, namespace: &str, keys: &[ChunkKey]) -> Result<(LookupResponse, Instant)> {
        let started = Instant::now();
        let r = self.grpc.clone().lookup(self.lookup_request(namespace, keys, true, Wait::NONE)).await?.into_inner();
        Ok((r, started))
    }

    fn lookup_request(&self, namespace: &str, keys: &[ChunkKey], lease: bool, wait: Wait) -> LookupRequest {
        // The server answers within the wait; the call's own timeout must not cut it short.
        let wait_for = wait.up_to.min(self.opts.timeout.saturating_sub(Duration::from_millis(500)));
        LookupRequest {
            session_token: self.token.clone(),
            namespace: namespace.to_owned(),
            keys: keys.iter().map(|k| k.0.to_vec()).collect(),
            lease,
            lease_ttl_ms: 0,
            chunk_tokens: self.opts.keys.chunk_tokens as u32,
            want_chunks: u32::try_from(wait.chunks).unwrap_or(u32::MAX),
            wait_ms: u32::try_from(wait_for.as_millis()).unwrap_or(u32::MAX),
        }
    }

    /// Moves the leased chunks into `dest` and checks the lease was still valid at the end.
    async fn read_leased(&self, lease: &LookupResponse, started: Instant, dest: &[RegionSlice]) -> Result<()> {
        if dest.is_empty() {
            return Ok(()); // a miss: no lease to outrun
        }
        let deadline = started + Duration::from_millis(lease.lease_expires_in_ms);
        let t = self.opts.timeout;
        match &self.plane {
            Plane::Rma(rma) => {
                let mut done = 0;
                while done < dest.len() {
                    // Window of gets in flight; the futures borrow the pool keys and run concurrently.
                    let end = (done + WINDOW).min(dest.len());
                    let batch = (done..end).map(|i| async move {
                        let addr = lease.chunks[i].address;
                        if rma.in_shared(addr, dest[i].len()) {
                            return rma.direct(addr, &dest[i], false);
                        }
                        self.ep.get(&dest[i], rma.pool_at(addr)?, addr, t).await
                    });
                    for r in join_all(batch).await {
                        r?;
                    }
                    done = end;
                }
            }
            Plane::ActiveMessage(_) => self.fetch(lease, dest).await?,
        }
        if Instant::now() > deadline {
            return Err(Error::Expired("lease"));
        }
        Ok(())
    }

    /// Active-message path: asks the server to send the leased chunks and receives each into
    /// its buffer as soon as its header arrives (the server keeps a window of sends in flight
    /// and waits for them, so every announced chunk must be pulled while the call runs). A
    /// failed call ends the receiving at once.
    async fn fetch(&self, lease: &LookupResponse, dest: &[RegionSlice]) -> Result<()> {
        let req = FetchRequest {
            session_token: self.token.clone(),
            lease_id: lease.lease_id,
            indices: (0..dest.len() as u32).collect(),
            ..Default::default()
        };
        self.fetch_into(Ask::Grpc(req), dest).await.map(|_| ())
    }

    /// A remote get in one call: the server looks `keys` up itself and sends the hits (the
    /// longest cached prefix) into `dest`; returns how many chunks came. Asked on the data
    /// endpoint itself where the server takes that and the request is small (most gets);
    /// by gRPC otherwise.
    async fn fetch_keys(&self, namespace: &str, keys: &[ChunkKey], dest: &[RegionSlice]) -> Result<usize> {
        let chunk_tokens = self.opts.keys.chunk_tokens as u32;
        if self.fetch_by_message {
            if let Some((ask, data)) = FetchAsk::build(0, chunk_tokens, namespace, keys) {
                return self.fetch_into(Ask::Message(ask, data), dest).await;
            }
        }
        let req = FetchRequest {
            session_token: self.token.clone(),
            namespace: namespace.to_owned(),
            keys: keys.iter().map(|k| k.0.to_vec()).collect(),
            chunk_tokens,
            ..Default::default()
        };
        self.fetch_into(Ask::Grpc(req), dest).await
    }

    /// Asks for chunks and receives them (`dest[i]` takes the chunk of index i). Done when
    /// every chunk is in: all of `dest`, or as many as the answer (the gRPC reply, or the
    /// FetchDone notice) says were sent. The answer follows UCX's send completions by up to a
    /// few hundred µs (measured over tcp: data at ~0.22 ms, reply at ~0.49 ms of a 4 KiB
    /// fetch), so a full hit does not wait for it: a gRPC call finishes in the background (its
    /// sends keep their pins on the server until then), and a late notice is dropped.
    async fn fetch_into(&self, ask: Ask, dest: &[RegionSlice]) -> Result<usize> {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let t = self.opts.timeout;
        // Each chunk is received on the UCX thread, straight into its buffer, as it arrives.
        let mut rx = self.fetches.expect(tag, dest.to_vec(), t);
        // Owned and boxed: once every chunk is in, the call is left to finish on its own rather
        // than dropped (a dropped call resets its HTTP/2 stream, and servers refuse clients
        // that reset streams fast: hyper answered ResourceExhausted at ~1,000 gets a second).
        // Its output: the number of chunks sent when it is the answer, None when the answer
        // comes as a notice.
        let mut call: std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<u32>>> + Send>> = match ask {
            Ask::Grpc(mut req) => {
                req.tag = tag;
                let mut grpc = self.grpc.clone();
                Box::pin(async move { Ok(Some(grpc.fetch(req).await?.into_inner().hit_chunks)) })
            }
            Ask::Message(ask, data) => {
                let ep = self.ep.clone();
                let header = FetchAsk { tag, ..ask }.encode();
                Box::pin(async move {
                    ep.am_send(AM_FETCH_ASK, &header, AmData::Bytes(data), t).await.map(|()| None).map_err(Error::from)
                })
            }
        };
        let mut called = false;
        let mut want = dest.len();
        let mut received = 0;
        // Receives are polled here, in this task: no hop through the runtime's other threads
        // between a chunk's arrival and the call's return (it cost ~0.1-0.2 ms a get).
        let mut receiving = futures_util::stream::FuturesUnordered::new();
        let result = loop {
            if received >= want {
                break Ok(want);
            }
            let idle = tokio::time::sleep(t);
            tokio::select! {
                r = &mut call, if !called => match r {
                    Ok(answer) => {
                        called = true;
                        if let Some(sent) = answer {
                            want = want.min(sent as usize);
                        }
                    }
                    Err(e) => break Err(e),
                },
                arrived = rx.recv() => match arrived {
                    // The UCX thread has started its receive (or settled it: a repeated index, a
                    // chunk of another size); its outcome comes on `done`.
                    Some(ucx_bindings::RouteEvent::Data(done)) => receiving.push(done),
                    Some(ucx_bindings::RouteEvent::Notice { header, data }) => match FetchDone::decode(&header) {
                        Some(d) if d.code == 0 => want = want.min(d.hit_chunks as usize),
                        Some(d) => {
                            let message = String::from_utf8_lossy(&data).into_owned();
                            break Err(Error::Server { code: tonic::Code::from_i32(d.code as i32), message });
                        }
                        None => {}
                    },
                    None => break Err(Error::Transfer(ucx_bindings::Error::WorkerStopped)),
                },
                Some(done) = futures_util::StreamExt::next(&mut receiving), if !receiving.is_empty() => match done {
                    Ok(Ok(())) => received += 1,
                    Ok(Err(e)) => break Err(e.into()),
                    Err(_) => break Err(Error::Transfer(ucx_bindings::Error::WorkerStopped)),
                },
                _ = idle => {
                    break Err(Error::Transfer(ucx_bindings::Error::TimedOut { op: "fetch", after: t }));
                }
            }
        };
        self.fetches.forget(tag);
        if !called && result.is_ok() {
            tokio::spawn(call);
        }
        result
    }

    /// Counters, pool usage and transports of the server.
    pub async fn stats(&self) -> Result<Stats> {
        Ok(self.grpc.clone().stats(StatsRequest {}).await?.into_inner())
    }

    /// The standard gRPC health check of the server: true when SERVING.
    pub async fn health(&self) -> Result<bool> {
        health_check(self.channel.clone()).await
    }

    /// Ends the session now (otherwise the server ends it after it has been idle a while).
    pub async fn close(self) -> Result<()> {
        self.disconnect().await
    }

    /// Deletes chunks of `namespace` (needs the admin grant where the server checks tokens);
    /// returns (deleted, still leased and kept).
    pub async fn delete(&self, namespace: &str, keys: &[ChunkKey]) -> Result<(u32, u32)> {
        let r = self
            .grpc
            .clone()
            .delete(DeleteRequest {
                session_token: self.token.clone(),
                namespace: namespace.to_owned(),
                keys: keys.iter().map(|k| k.0.to_vec()).collect(),
            })
            .await?
            .into_inner();
        Ok((r.deleted, r.leased))
    }

    /// Ends the session without consuming the client (for owners that share it, such as the
    /// Python bindings); later calls fail with the server's "unknown session" error.
    pub async fn disconnect(&self) -> Result<()> {
        if let Some(k) = &self.keepalive {
            k.stop();
        }
        self.grpc.clone().disconnect(DisconnectRequest { session_token: self.token.clone() }).await?;
        Ok(())
    }
}

/// Waits for the caller's `stream` on a blocking thread, not an async one: a store's gather may
/// be queued behind a whole forward pass (tens of ms), and the runtime's few threads also carry
/// every other call of the process.
async fn wait_stream(ctx_ptr: u64, stream: u64) -> Result<()> {
    match tokio::task::spawn_blocking(move || paged::synchronize(ctx_ptr, stream)).await {
        Ok(r) => r.map_err(Error::InvalidArgument),
        Err(e) => Err(Error::InvalidArgument(format!("waiting for the copy stream: {e}"))),
    }
}

/// How long a lookup may wait on the server for chunks still being stored (a decode instance
/// waiting for what a prefill announced): until the leading `chunks` keys are all cached, for at
/// most `up_to` (capped by the server at 30 s and by the client's call timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    pub chunks: usize,
    pub up_to: Duration,
}

impl Wait {
    /// Answer at once with what is cached now.
    pub const NONE: Wait = Wait { chunks: 0, up_to: Duration::ZERO };
}

/// Chunks pinned for reading: see [`Client::lease_keys`].
#[derive(Debug, Clone)]
pub struct Lease {
    /// 0 when nothing hit (there is nothing to release).
    pub id: u64,
    /// The hit chunks, in key order.
    pub chunks: Vec<LeasedChunk>,
    /// After this, reading the chunks is no longer safe (their slots may be reused).
    pub expires: Instant,
}

/// Where one leased chunk lives in the server's pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeasedChunk {
    /// The chunk's address in the server's address space (RMA sessions; 0 otherwise).
    pub address: u64,
    pub length: u64,
    /// In the GPU pool (else the host pool).
    pub gpu_tier: bool,
}

/// A put between [`Client::begin_put`] and its commit or abort. Dropping it without either
/// leaves the reservation to expire on the server.
#[derive(Debug)]
pub struct PendingPut<'a> {
    client: &'a Client,
    begin: BeginPutResponse,
    deadline: Instant,
}

impl PendingPut<'_> {
    pub fn put_id(&self) -> u64 {
        self.begin.put_id
    }

    /// Which chunks must be written (false: already cached, skip).
    pub fn needed(&self) -> Vec<bool> {
        self.begin.slots.iter().map(|s| !s.present).collect()
    }

    /// Writes every needed chunk from `data` (one buffer per key, sizes as declared).
    pub async fn write(&self, data: &[RegionSlice]) -> Result<()> {
        if data.len() != self.begin.slots.len() {
            return Err(Error::InvalidArgument(format!(
                "{} buffers for {} chunks",
                data.len(),
                self.begin.slots.len()
            )));
        }
        self.client.write_slots(&self.begin, data, self.deadline).await
    }

    /// Makes the chunks visible (after the server has every byte).
    pub async fn commit(self) -> Result<PutOutcome> {
        let c = self.client;
        let session_token = c.token.clone();
        c.grpc.clone().commit_put(CommitPutRequest { session_token, put_id: self.begin.put_id }).await?;
        let n = self.begin.slots.len();
        let stored = self.begin.slots.iter().filter(|s| !s.present).count();
        Ok(PutOutcome { chunks: n, stored, skipped: n - stored })
    }

    /// Frees the reservation now.
    pub async fn abort(self) {
        let c = self.client;
        let session_token = c.token.clone();
        let _ = c.grpc.clone().abort_put(AbortPutRequest { session_token, put_id: self.begin.put_id }).await;
    }
}

/// The standard gRPC health check of a server, without opening a session.
pub async fn health_check(channel: Channel) -> Result<bool> {
    let r = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await?
        .into_inner();
    Ok(r.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
}

/// Stats of a server without opening a UCX session.
pub async fn stats_only(endpoint: &str, timeout: Duration, access: &Access) -> Result<Stats> {
    let channel = channel_with(endpoint, timeout, access).await?;
    Ok(access::grpc(channel, access)?.stats(StatsRequest {}).await?.into_inner())
}

/// Polls futures concurrently on the current task and returns their outputs in order.
async fn join_all<F: std::future::Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}
