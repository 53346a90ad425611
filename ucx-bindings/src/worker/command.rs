//! Messages from handles (any thread) to a worker's progress thread, and the wake-up that goes
//! with each one.

use crate::error::{Error, Result};
use crate::memory::RegionSlice;
use crate::sys;
use crate::transports::TransportDevice;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

pub(crate) type Reply<T> = oneshot::Sender<Result<T>>;

/// Data carried by an active message.
#[derive(Debug, Clone)]
pub enum AmData {
    /// Header only.
    None,
    /// A small owned buffer (copied by the caller; unregistered host memory).
    Bytes(Vec<u8>),
    /// A range of a registered region: zero-copy, eligible for rendezvous.
    Region(RegionSlice),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RmaKind {
    Put,
    Get,
}

impl RmaKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            RmaKind::Put => "put",
            RmaKind::Get => "get",
        }
    }
}

/// What arrives for an active-message id, before the user picks where the data goes.
#[derive(Debug)]
pub(crate) enum ArrivedData {
    /// Eager data, already copied out of UCX's buffer.
    Eager(Vec<u8>),
    /// Rendezvous: `desc` is UCX's data descriptor, to be passed to `ucp_am_recv_data_nbx`
    /// or released with `ucp_am_data_release`.
    Rndv { desc: usize },
}

#[derive(Debug)]
pub(crate) struct Arrival {
    pub header: Vec<u8>,
    pub length: usize,
    pub data: ArrivedData,
    /// The endpoint of this worker the message came in on, when the sender asked for a reply
    /// endpoint (every send of this crate does) and that endpoint is one of ours.
    pub sender: Option<u64>,
}

/// A connection request that reached one of the worker's listeners, before it is accepted or
/// rejected.
#[derive(Debug)]
pub(crate) struct ConnArrival {
    pub listener: u64,
    /// UCX's `ucp_conn_request_h`, to be passed to `ucp_ep_create` or `ucp_listener_reject`.
    pub request: usize,
    /// The id the client's worker sends with its request (0 when it sends none).
    pub client_id: u64,
    pub peer: Option<std::net::SocketAddr>,
}

#[derive(Debug)]
pub(crate) enum Command {
    Connect {
        peer_errors: bool,
        address: Vec<u8>,
        reply: Reply<u64>,
    },
    /// Creates a client endpoint to a listener at a socket address.
    ConnectAddr {
        addr: std::net::SocketAddr,
        peer_errors: bool,
        reply: Reply<u64>,
    },
    /// Starts a listener; replies with its id and the address it is bound to.
    Listen {
        addr: std::net::SocketAddr,
        tx: tokio::sync::mpsc::UnboundedSender<ConnArrival>,
        reply: Reply<(u64, std::net::SocketAddr)>,
    },
    /// Accepts a connection request: creates the server side of the endpoint.
    Accept {
        listener: u64,
        request: usize,
        peer_errors: bool,
        reply: Reply<u64>,
    },
    Reject {
        listener: u64,
        request: usize,
    },
    CloseListener {
        listener: u64,
    },
    ReleaseEp {
        ep: u64,
    },
    UnpackRkey {
        ep: u64,
        packed: Vec<u8>,
        reply: Reply<u64>,
    },
    ReleaseRkey {
        rkey: u64,
    },
    Rma {
        kind: RmaKind,
        ep: u64,
        rkey: u64,
        local: RegionSlice,
        remote_addr: u64,
        timeout: Duration,
        reply: Reply<()>,
    },
    Flush {
        ep: u64,
        timeout: Duration,
        reply: Reply<()>,
    },
    AmSend {
        ep: u64,
        id: u16,
        header: Vec<u8>,
        data: AmData,
        timeout: Duration,
        reply: Reply<()>,
    },
    AmListen {
        id: u16,
        tx: tokio::sync::mpsc::UnboundedSender<Arrival>,
        reply: Reply<()>,
    },
    /// Answers arrivals of `id` on the progress thread; what it passes goes to `tx` (see
    /// `Worker::serve_am`).
    AmServe {
        id: u16,
        service: std::sync::Arc<dyn super::serve::AmService>,
        tx: tokio::sync::mpsc::UnboundedSender<Arrival>,
        reply: Reply<()>,
    },
    /// Routes arrivals of `id` on the progress thread (see `Worker::route_am`).
    AmRoute {
        id: u16,
        table: std::sync::Arc<super::routes::RouteTable>,
        reply: Reply<()>,
    },
    AmRecv {
        desc: usize,
        dest: RegionSlice,
        timeout: Duration,
        reply: Reply<()>,
    },
    AmRelease {
        desc: usize,
    },
    EpTransports {
        ep: u64,
        reply: Reply<Vec<TransportDevice>>,
    },
    /// Completes once every command sent before it has been handled and no operation is in
    /// flight (or the timeout passes): a barrier for tests and orderly shutdown.
    Idle {
        timeout: Duration,
        reply: Reply<bool>,
    },
    Shutdown,
}

/// The worker handle as used only for `ucp_worker_signal`.
struct WorkerPtr(sys::ucp_worker_h);

// SAFETY: the only call made through this pointer off the progress thread is ucp_worker_signal,
// which UCX documents as callable from any thread, also for UCS_THREAD_MODE_SINGLE workers. The
// mutex around it is cleared by the progress thread before ucp_worker_destroy, so no signal can
// reach a destroyed worker.
unsafe impl Send for WorkerPtr {}

/// Wakes the progress thread from its `ucp_worker_arm` + poll sleep.
pub(crate) struct Signal {
    worker: Mutex<Option<WorkerPtr>>,
}

impl Signal {
    pub(crate) fn new(worker: sys::ucp_worker_h) -> Self {
        Signal { worker: Mutex::new(Some(WorkerPtr(worker))) }
    }

    pub(crate) fn wake(&self) {
        let guard = self.worker.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = guard.as_ref() {
            // SAFETY: the worker is live while the mutex holds Some (cleared before destroy),
            // and ucp_worker_signal is thread-safe (see WorkerPtr).
            unsafe { sys::ucp_worker_signal(w.0) };
        }
    }

    /// Called by the progress thread just before it destroys the worker.
    pub(crate) fn disarm(&self) {
        *self.worker.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// A cloneable way to send commands to a progress thread. Holding one does not keep the worker
/// running: once the worker stops, sends fail with `WorkerStopped`.
#[derive(Clone)]
pub(crate) struct CommandSender {
    tx: mpsc::Sender<Command>,
    signal: Arc<Signal>,
}

impl std::fmt::Debug for CommandSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommandSender")
    }
}

impl CommandSender {
    pub(crate) fn new(tx: mpsc::Sender<Command>, signal: Arc<Signal>) -> Self {
        CommandSender { tx, signal }
    }

    pub(crate) fn send(&self, cmd: Command) -> Result<()> {
        self.tx.send(cmd).map_err(|_| Error::WorkerStopped)?;
        self.signal.wake();
        Ok(())
    }

    /// Sends a command built around a reply channel and waits for the reply.
    pub(crate) async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        rx.await.map_err(|_| Error::WorkerStopped)?
    }
}
