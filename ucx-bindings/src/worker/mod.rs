//! The async layer: a [`Worker`] runs one UCP worker on its own progress thread; [`Endpoint`],
//! [`RemoteKey`] and [`IncomingAm`] are handles that send it commands. Every operation takes a
//! timeout; every operation's buffers belong to the progress thread until UCX completes it.

mod command;
mod progress;
mod routes;
mod serve;

pub use command::AmData;
pub use routes::{AmRoutes, RouteEvent, RouteKey, Routed, Slot};
pub use serve::{AmService, Answer, Arriving, Served};

use crate::context::Context;
use crate::error::{Error, Result};
use crate::memory::{RegionSlice, RemoteRegion};
use crate::transports::TransportDevice;
use command::{Arrival, ArrivedData, Command, CommandSender, ConnArrival, RmaKind};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

struct WorkerShared {
    cmd: CommandSender,
    address: Vec<u8>,
    max_am_header: usize,
    ctx: Context,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for WorkerShared {
    fn drop(&mut self) {
        let _ = self.cmd.send(Command::Shutdown);
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!("UCX progress thread panicked");
            }
        }
    }
}

/// A UCP worker and its progress thread. Cheap to clone; the thread stops when the last clone
/// and the last [`Endpoint`] are dropped (in-flight operations are force-closed then).
#[derive(Clone)]
pub struct Worker {
    shared: Arc<WorkerShared>,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker").field("address_len", &self.shared.address.len()).finish()
    }
}

impl Worker {
    /// Creates a worker (single-threaded mode) on a new thread named `name`.
    pub fn new(ctx: &Context, name: &str) -> Result<Worker> {
        Self::with_thread_init(ctx, name, || {})
    }

    /// As [`Worker::new`], running `init` first on the progress thread: for example to make a
    /// CUDA context current there, which UCX's cuda transports expect.
    pub fn with_thread_init(ctx: &Context, name: &str, init: impl FnOnce() + Send + 'static) -> Result<Worker> {
        Self::with_options(ctx, name, None, init)
    }

    /// As [`Worker::with_thread_init`], with a client id: a number this worker sends with every
    /// connection request it makes to a listener ([`Worker::connect_addr`]), which the listener's
    /// owner reads from [`ConnRequest::client_id`] before accepting.
    pub fn with_options(
        ctx: &Context,
        name: &str,
        client_id: Option<u64>,
        init: impl FnOnce() + Send + 'static,
    ) -> Result<Worker> {
        let (tx, rx) = mpsc::channel::<Command>();
        let (created_tx, created_rx) = mpsc::channel();
        let ctx_for_thread = ctx.inner.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ucx-{name}"))
            .spawn(move || {
                // The Arc keeps the context alive for as long as this thread uses its worker.
                let ctx = ctx_for_thread;
                init();
                match progress::Progress::create(ctx.handle, rx, client_id) {
                    Ok((p, created)) => {
                        let _ = created_tx.send(Ok(created));
                        p.run();
                    }
                    Err(e) => {
                        let _ = created_tx.send(Err(e));
                    }
                }
                drop(ctx);
            })
            .map_err(|e| Error::invalid(format!("cannot spawn the UCX progress thread: {e}")))?;
        let created = match created_rx.recv() {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(Error::WorkerStopped);
            }
        };
        Ok(Worker {
            shared: Arc::new(WorkerShared {
                cmd: CommandSender::new(tx, created.signal),
                address: created.address,
                max_am_header: created.max_am_header,
                ctx: ctx.clone(),
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// This worker's address, to hand to peers out of band.
    pub fn address(&self) -> &[u8] {
        &self.shared.address
    }

    pub fn context(&self) -> &Context {
        &self.shared.ctx
    }

    /// The largest active-message header this worker can send.
    pub fn max_am_header(&self) -> usize {
        self.shared.max_am_header
    }

    /// Creates an endpoint to the worker whose address is `peer_address`, in peer error mode:
    /// a peer failure fails its operations promptly instead of waiting for their deadlines.
    pub async fn connect(&self, peer_address: &[u8]) -> Result<Endpoint> {
        self.connect_with(peer_address, ErrorMode::Peer).await
    }

    /// As [`Worker::connect`], choosing the error mode. See [`ErrorMode`] for the trade-off.
    pub async fn connect_with(&self, peer_address: &[u8], mode: ErrorMode) -> Result<Endpoint> {
        let address = peer_address.to_vec();
        let peer_errors = mode == ErrorMode::Peer;
        let id = self.shared.cmd.call(|reply| Command::Connect { address, peer_errors, reply }).await?;
        Ok(self.endpoint(id))
    }

    /// Connects to a [`Listener`] at `addr` (UCX's client-server mode): the connection starts
    /// over tcp sockets and then uses every transport both workers share, shared memory and
    /// cuda_ipc included. Operations issued before the connection is up wait for it. Both sides
    /// must use the same error mode.
    pub async fn connect_addr(&self, addr: SocketAddr, mode: ErrorMode) -> Result<Endpoint> {
        let peer_errors = mode == ErrorMode::Peer;
        let id = self.shared.cmd.call(|reply| Command::ConnectAddr { addr, peer_errors, reply }).await?;
        Ok(self.endpoint(id))
    }

    /// Listens for [`Worker::connect_addr`] connections at `addr` (port 0: any free port; see
    /// [`Listener::local_addr`]). No endpoint is ever created from bytes a peer chose: each
    /// request is handed to the owner, who accepts it (choosing the error mode) or rejects it.
    pub async fn listen(&self, addr: SocketAddr) -> Result<Listener> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (id, bound) = self.shared.cmd.call(|reply| Command::Listen { addr, tx, reply }).await?;
        Ok(Listener { id, addr: bound, rx, worker: self.clone() })
    }

    fn endpoint(&self, id: u64) -> Endpoint {
        Endpoint { inner: Arc::new(EpHandle { id, worker: self.clone() }) }
    }

    /// Starts receiving active messages with this id. One listener per id.
    pub async fn listen_am(&self, id: u16) -> Result<AmReceiver> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.shared.cmd.call(|reply| Command::AmListen { id, tx, reply }).await?;
        Ok(AmReceiver { rx, cmd: self.shared.cmd.clone() })
    }

    /// Answers active message `id` on the progress thread itself: `service` sees each arrival
    /// and answers it there (its messages sent back on the arrival's endpoint at once) or passes
    /// it to the returned receiver, as [`Worker::listen_am`] would have delivered it.
    pub async fn serve_am(&self, id: u16, service: Arc<dyn AmService>) -> Result<AmReceiver> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.shared.cmd.call(|reply| Command::AmServe { id, service, tx, reply }).await?;
        Ok(AmReceiver { rx, cmd: self.shared.cmd.clone() })
    }

    /// Receives active message `id` on the progress thread itself, into buffers set out by key
    /// ([`AmRoutes::expect`]): `key` reads (key, index) from each header. Saves the hand-offs of
    /// [`Worker::listen_am`] (an async task per arrival, then a command back to receive).
    pub async fn route_am(&self, id: u16, key: RouteKey) -> Result<AmRoutes> {
        let table = Arc::new(routes::RouteTable::new(key));
        let t = table.clone();
        self.shared.cmd.call(|reply| Command::AmRoute { id, table: t, reply }).await?;
        Ok(AmRoutes { table })
    }

    /// Waits until no operation is in flight (true) or `timeout` passes (false). Every
    /// operation started before the call counts.
    pub async fn wait_idle(&self, timeout: Duration) -> Result<bool> {
        self.shared.cmd.call(|reply| Command::Idle { timeout, reply }).await
    }

    fn check_region(&self, s: &RegionSlice) -> Result<()> {
        if s.region.same_context(&self.shared.ctx.inner) {
            Ok(())
        } else {
            Err(Error::invalid("the region was registered with another UCX context"))
        }
    }
}

/// How an endpoint learns that its peer failed.
///
/// `Peer` (the default) reports a dead peer as an error on the endpoint's operations within a
/// keepalive interval, and keeps this process alive when a peer dies. UCX 1.22 then selects only
/// transports that support peer-failure handling: over tcp, put/get to host memory fall back to
/// software emulation (active messages; measured ~4x slower at 1 MiB than zero-copy), so bulk data
/// over tcp should go by active-message rendezvous instead. `None` is what `ucx_perftest` uses:
/// zero-copy RMA over tcp, but a peer failure is found only by an operation's deadline, and UCX
/// may treat it as fatal to this process. Use it only between processes that live and die together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ErrorMode {
    #[default]
    Peer,
    None,
}

/// Listens for connections from other workers ([`Worker::listen`]). Closed when dropped.
pub struct Listener {
    id: u64,
    addr: SocketAddr,
    rx: tokio::sync::mpsc::UnboundedReceiver<ConnArrival>,
    worker: Worker,
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener").field("addr", &self.addr).finish()
    }
}

impl Listener {
    /// The address the listener is bound to (the real port when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The next connection request; `None` once the worker has stopped.
    pub async fn next(&mut self) -> Option<ConnRequest> {
        let a = self.rx.recv().await?;
        Some(ConnRequest { arrival: Some(a), worker: self.worker.clone() })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.worker.shared.cmd.send(Command::CloseListener { listener: self.id });
    }
}

/// A connection request waiting for its answer. Dropping it rejects it.
pub struct ConnRequest {
    arrival: Option<ConnArrival>,
    worker: Worker,
}

impl fmt::Debug for ConnRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnRequest").field("peer", &self.peer()).field("client_id", &self.client_id()).finish()
    }
}

impl ConnRequest {
    /// The client's socket address, as the connection manager saw it.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.arrival.as_ref().and_then(|a| a.peer)
    }

    /// The client worker's id (see [`Worker::with_options`]); 0 when it sent none.
    pub fn client_id(&self) -> u64 {
        self.arrival.as_ref().map_or(0, |a| a.client_id)
    }

    /// Creates this side of the endpoint, in `mode` (which must be the client's).
    pub async fn accept(mut self, mode: ErrorMode) -> Result<Endpoint> {
        let a = self.arrival.take().ok_or_else(|| Error::invalid("connection request already answered"))?;
        let peer_errors = mode == ErrorMode::Peer;
        let (listener, request) = (a.listener, a.request);
        let id = self.worker.shared.cmd.call(|reply| Command::Accept { listener, request, peer_errors, reply }).await?;
        Ok(self.worker.endpoint(id))
    }

    /// Refuses the connection (also what dropping does).
    pub fn reject(self) {}
}

impl Drop for ConnRequest {
    fn drop(&mut self) {
        if let Some(a) = self.arrival.take() {
            let _ = self.worker.shared.cmd.send(Command::Reject { listener: a.listener, request: a.request });
        }
    }
}

/// Names one endpoint of a worker: [`Endpoint::id`], and [`IncomingAm::sender`] for the
/// endpoint a message came in on. Not a credential: only the worker's own handles carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(u64);

struct EpHandle {
    id: u64,
    worker: Worker,
}

impl Drop for EpHandle {
    fn drop(&mut self) {
        let _ = self.worker.shared.cmd.send(Command::ReleaseEp { ep: self.id });
    }
}

/// A connection to one peer worker. Cheap to clone; closed (after its operations finish) when
/// the last clone and remote key are dropped. Flush before dropping if puts must land.
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<EpHandle>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint").field("id", &self.inner.id).finish()
    }
}

fn check_timeout(t: Duration) -> Result<()> {
    if t.is_zero() {
        Err(Error::invalid("timeout must be greater than zero"))
    } else {
        Ok(())
    }
}

impl Endpoint {
    fn cmd(&self) -> &CommandSender {
        &self.inner.worker.shared.cmd
    }

    /// This endpoint's id within its worker.
    pub fn id(&self) -> EndpointId {
        EndpointId(self.inner.id)
    }

    /// Unpacks a peer region's remote key for use on this endpoint.
    pub async fn unpack_rkey(&self, remote: &RemoteRegion) -> Result<RemoteKey> {
        if remote.len == 0 || remote.base.checked_add(remote.len).is_none() {
            return Err(Error::invalid(format!(
                "remote region {:#x}+{} is empty or wraps around",
                remote.base, remote.len
            )));
        }
        let packed = remote.rkey.clone();
        let ep = self.inner.id;
        let id = self.cmd().call(|reply| Command::UnpackRkey { ep, packed, reply }).await?;
        Ok(RemoteKey { id, base: remote.base, len: remote.len, ep: self.inner.clone() })
    }

    async fn rma(
        &self,
        kind: RmaKind,
        local: &RegionSlice,
        rkey: &RemoteKey,
        remote_addr: u64,
        timeout: Duration,
    ) -> Result<()> {
        check_timeout(timeout)?;
        self.inner.worker.check_region(local)?;
        if !Arc::ptr_eq(&rkey.ep, &self.inner) {
            return Err(Error::invalid("the remote key was unpacked on another endpoint"));
        }
        rkey.check_range(remote_addr, local.len())?;
        let (ep, rk, local) = (self.inner.id, rkey.id, local.clone());
        self.cmd().call(|reply| Command::Rma { kind, ep, rkey: rk, local, remote_addr, timeout, reply }).await
    }

    /// Writes `local` to the peer at `remote_addr`. Completes locally: `flush` before telling
    /// anyone the bytes are there.
    pub async fn put(&self, local: &RegionSlice, rkey: &RemoteKey, remote_addr: u64, timeout: Duration) -> Result<()> {
        self.rma(RmaKind::Put, local, rkey, remote_addr, timeout).await
    }

    /// Reads `local.len()` bytes from the peer at `remote_addr` into `local`.
    pub async fn get(&self, local: &RegionSlice, rkey: &RemoteKey, remote_addr: u64, timeout: Duration) -> Result<()> {
        self.rma(RmaKind::Get, local, rkey, remote_addr, timeout).await
    }

    /// Completes when every put issued on this endpoint before it is complete at the peer.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        check_timeout(timeout)?;
        let ep = self.inner.id;
        self.cmd().call(|reply| Command::Flush { ep, timeout, reply }).await
    }

    /// Sends an active message: `header` (at most `Worker::max_am_header` bytes) and `data`.
    /// Large region data goes by rendezvous into a buffer the receiver chooses.
    pub async fn am_send(&self, id: u16, header: &[u8], data: AmData, timeout: Duration) -> Result<()> {
        check_timeout(timeout)?;
        if header.len() > self.inner.worker.max_am_header() {
            return Err(Error::invalid(format!(
                "active-message header of {} bytes exceeds the limit of {}",
                header.len(),
                self.inner.worker.max_am_header()
            )));
        }
        if let AmData::Region(s) = &data {
            self.inner.worker.check_region(s)?;
        }
        let (ep, header) = (self.inner.id, header.to_vec());
        self.cmd().call(|reply| Command::AmSend { ep, id, header, data, timeout, reply }).await
    }

    /// The transports and devices this endpoint's lanes use (e.g. `tcp/lo`, `cuda_ipc/cuda`),
    /// so a silent fallback shows.
    pub async fn transports(&self) -> Result<Vec<TransportDevice>> {
        let ep = self.inner.id;
        self.cmd().call(|reply| Command::EpTransports { ep, reply }).await
    }
}

/// A peer region's remote key, unpacked on one endpoint. Accesses are checked against the
/// region's bounds before they reach UCX.
pub struct RemoteKey {
    id: u64,
    base: u64,
    len: u64,
    ep: Arc<EpHandle>,
}

impl fmt::Debug for RemoteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteKey").field("base", &self.base).field("len", &self.len).finish()
    }
}

impl RemoteKey {
    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check_range(&self, addr: u64, len: usize) -> Result<()> {
        RemoteRegion { base: self.base, len: self.len, rkey: Vec::new() }.check_range(addr, len)
    }
}

impl Drop for RemoteKey {
    fn drop(&mut self) {
        let _ = self.ep.worker.shared.cmd.send(Command::ReleaseRkey { rkey: self.id });
    }
}

/// Active messages arriving for one id.
pub struct AmReceiver {
    rx: tokio::sync::mpsc::UnboundedReceiver<Arrival>,
    cmd: CommandSender,
}

impl fmt::Debug for AmReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AmReceiver")
    }
}

impl AmReceiver {
    /// The next message; `None` once the worker has stopped.
    pub async fn recv(&mut self) -> Option<IncomingAm> {
        let a = self.rx.recv().await?;
        let sender = a.sender.map(EndpointId);
        Some(IncomingAm { header: a.header, length: a.length, data: Some(a.data), sender, cmd: self.cmd.clone() })
    }
}

/// One received active message. Its data is either here already (eager) or waits at the sender
/// (rendezvous) until [`IncomingAm::recv_into`] names the buffer. Dropping it unreceived releases
/// the sender's data.
pub struct IncomingAm {
    header: Vec<u8>,
    length: usize,
    data: Option<ArrivedData>,
    sender: Option<EndpointId>,
    cmd: CommandSender,
}

impl fmt::Debug for IncomingAm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IncomingAm")
            .field("header_len", &self.header.len())
            .field("length", &self.length)
            .field("rendezvous", &self.is_rendezvous())
            .finish()
    }
}

impl IncomingAm {
    pub fn header(&self) -> &[u8] {
        &self.header
    }

    /// Which of this worker's endpoints the message came in on: known for messages sent by this
    /// crate (they ask for a reply endpoint) over an endpoint this worker created or accepted.
    pub fn sender(&self) -> Option<EndpointId> {
        self.sender
    }

    /// Length of the message's data.
    pub fn len(&self) -> usize {
        self.length
    }

    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    pub fn is_rendezvous(&self) -> bool {
        matches!(self.data, Some(ArrivedData::Rndv { .. }))
    }

    /// Receives the data into `dest`, which must be exactly `len()` bytes: eager data is copied
    /// (host memory), rendezvous data is pulled by UCX straight into the registered buffer.
    pub async fn recv_into(mut self, dest: &RegionSlice, timeout: Duration) -> Result<()> {
        check_timeout(timeout)?;
        if dest.len() != self.length {
            return Err(Error::invalid(format!(
                "destination of {} bytes for a message of {} bytes",
                dest.len(),
                self.length
            )));
        }
        match self.data.take() {
            Some(ArrivedData::Eager(bytes)) => dest.region().write(dest.offset(), &bytes),
            Some(ArrivedData::Rndv { desc }) => {
                let dest = dest.clone();
                self.cmd.call(|reply| Command::AmRecv { desc, dest, timeout, reply }).await
            }
            None => Err(Error::invalid("message data was already taken")),
        }
    }

    /// The data of an eager message, or of an empty one. Rendezvous data must go through
    /// [`IncomingAm::recv_into`].
    pub fn into_eager_bytes(mut self) -> Result<Vec<u8>> {
        match self.data.take() {
            Some(ArrivedData::Eager(bytes)) => Ok(bytes),
            other => {
                self.data = other;
                Err(Error::invalid("rendezvous data must be received into a registered region"))
            }
        }
    }
}

impl Drop for IncomingAm {
    fn drop(&mut self) {
        if let Some(ArrivedData::Rndv { desc }) = self.data.take() {
            let _ = self.cmd.send(Command::AmRelease { desc });
        }
    }
}
