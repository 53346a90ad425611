//! The progress thread: the only thread that touches its `ucp_worker_h` (UCS_THREAD_MODE_SINGLE).
//!
//! Loop: handle queued commands → `ucp_worker_progress` until it reports nothing done → act on
//! what UCX callbacks recorded → expire deadlines → `ucp_worker_arm` → sleep in `poll` on the
//! worker's event fd until a command's `ucp_worker_signal`, network activity, or the next deadline
//! (at most [`MAX_SLEEP`]). Nothing spins while idle.
//!
//! Ownership: every in-flight operation is an [`Op`] in `ops`, and the op owns whatever UCX may
//! still read or write (the region slice, the header, the bytes). The op is removed only when UCX
//! reports completion, so a caller that drops its future, or a deadline that fires, never frees
//! memory UCX is still using. UCX callbacks only record `(id, status)` in thread-local queues; all
//! real work happens after `ucp_worker_progress` returns (no re-entrancy, no progress from within a
//! callback).

use super::command::{AmData, Arrival, ArrivedData, Command, ConnArrival, Reply, RmaKind, Signal};
use super::routes::{Action, RouteTable};
use super::serve::{AmService, Arriving, Served};
use crate::error::{Error, Result};
use crate::memory::RegionSlice;
use crate::result::{self, PtrStatus, Status};
use crate::sockaddr::{self, CSockAddr};
use crate::sys;
use crate::transports::TransportDevice;
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::ffi::{c_void, CStr};
use std::net::SocketAddr;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Longest sleep without a wake-up; keeps UCX keepalive running on idle workers.
const MAX_SLEEP: Duration = Duration::from_millis(100);
/// After UCX last did something, keep polling (instead of arming and sleeping) this long.
/// Protocols that bounce many fragments between the two workers (rendezvous pipelines, the
/// software RMA emulation UCX uses in peer error mode) would otherwise pay a sleep/wake-up per
/// fragment; measured over shared memory, that cost turned a 1 MiB get from ~0.15 ms into ~1 ms.
/// An idle worker still sleeps: the window starts only from real activity. While polling, the
/// thread yields its core after each round: a busy spin took the cores from the very threads
/// it waited for when they outnumber the cores (2-core machine, 1 MiB remote gets over tcp:
/// 0.48-0.61x Redis spinning, 0.69-1.06x with one reader and 0.80-0.87x with four yielding).
/// It polls only while an operation of its own is in flight: a worker with nothing pending has
/// nothing to be quick about, and a server and a client that both kept polling between gets
/// (a get every ~0.3 ms keeps the window open) took most of a core each, leaving the threads
/// that do the work to fight over the rest (the CPU time of both threads fell from 80-99% to
/// 65-86% of a core with one 1 MiB reader on 2 cores). Its latency did not change measurably:
/// slow stretches on that shared machine swamp it (BENCHMARKS.md §6).
const SPIN_AFTER_ACTIVITY: Duration = Duration::from_micros(200);
/// How long a graceful endpoint close may take before it is abandoned.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown waits for force-closed operations to complete.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(2);

thread_local! {
    /// (op id, status) recorded by completion callbacks during ucp_worker_progress.
    static COMPLETIONS: RefCell<Vec<(u64, sys::ucs_status_t)>> = const { RefCell::new(Vec::new()) };
    /// (endpoint id, status) recorded by endpoint error callbacks.
    static EP_ERRORS: RefCell<Vec<(u64, sys::ucs_status_t)>> = const { RefCell::new(Vec::new()) };
    /// (active-message id, reply endpoint handle or 0, arrival) recorded by active-message callbacks.
    static ARRIVALS: RefCell<Vec<(u16, usize, Arrival)>> = const { RefCell::new(Vec::new()) };
    /// (listener id, ucp_conn_request_h) recorded by listener callbacks.
    static CONN_REQUESTS: RefCell<Vec<(u64, usize)>> = const { RefCell::new(Vec::new()) };
}

fn record<T>(queue: &'static std::thread::LocalKey<RefCell<Vec<T>>>, item: T) {
    // The queues are borrowed only here and in `take`, never across a UCX call, so the borrow
    // cannot fail; if it somehow did, the op would still end at its deadline.
    queue.with(|q| {
        if let Ok(mut q) = q.try_borrow_mut() {
            q.push(item);
        }
    });
}

fn take<T>(queue: &'static std::thread::LocalKey<RefCell<Vec<T>>>) -> Vec<T> {
    queue.with(|q| q.try_borrow_mut().map(|mut q| std::mem::take(&mut *q)).unwrap_or_default())
}

unsafe extern "C" fn send_cb(_request: *mut c_void, status: sys::ucs_status_t, user_data: *mut c_void) {
    record(&COMPLETIONS, (user_data as u64, status));
}

unsafe extern "C" fn am_recv_data_cb(
    _request: *mut c_void,
    status: sys::ucs_status_t,
    _length: usize,
    user_data: *mut c_void,
) {
    record(&COMPLETIONS, (user_data as u64, status));
}

unsafe extern "C" fn conn_cb(conn_request: sys::ucp_conn_request_h, arg: *mut c_void) {
    record(&CONN_REQUESTS, (arg as u64, conn_request as usize));
}

unsafe extern "C" fn ep_error_cb(arg: *mut c_void, _ep: sys::ucp_ep_h, status: sys::ucs_status_t) {
    record(&EP_ERRORS, (arg as u64, status));
}

unsafe extern "C" fn am_cb(
    arg: *mut c_void,
    header: *const c_void,
    header_length: usize,
    data: *mut c_void,
    length: usize,
    param: *const sys::ucp_am_recv_param_t,
) -> sys::ucs_status_t {
    let id = arg as usize as u16;
    let header = if header.is_null() || header_length == 0 {
        Vec::new()
    } else {
        // SAFETY: UCX passes `header_length` readable bytes at `header`, valid during the call.
        unsafe { std::slice::from_raw_parts(header.cast::<u8>(), header_length) }.to_vec()
    };
    let (attr, reply_ep) = if param.is_null() {
        (0, std::ptr::null_mut())
    } else {
        // SAFETY: UCX passes a valid param struct for the duration of the callback.
        unsafe { ((*param).recv_attr, (*param).reply_ep) }
    };
    // Only the handle's value is kept, to find which of our endpoints the message came in on.
    let reply_ep = if attr & sys::UCP_AM_RECV_ATTR_FIELD_REPLY_EP as u64 != 0 { reply_ep as usize } else { 0 };
    if attr & sys::UCP_AM_RECV_ATTR_FLAG_RNDV as u64 != 0 {
        // Keep the descriptor: the user chooses the buffer, then ucp_am_recv_data_nbx.
        let data = ArrivedData::Rndv { desc: data as usize };
        record(&ARRIVALS, (id, reply_ep, Arrival { header, length, data, sender: None }));
        return sys::ucs_status_t::UCS_INPROGRESS;
    }
    let bytes = if data.is_null() || length == 0 {
        Vec::new()
    } else {
        // SAFETY: eager data: `length` readable bytes at `data`, valid during the callback.
        unsafe { std::slice::from_raw_parts(data.cast::<u8>(), length) }.to_vec()
    };
    record(&ARRIVALS, (id, reply_ep, Arrival { header, length, data: ArrivedData::Eager(bytes), sender: None }));
    sys::ucs_status_t::UCS_OK
}

/// What an in-flight operation keeps alive until UCX completes it.
#[allow(dead_code)] // fields are held for ownership, not read
enum Owned {
    Nothing,
    Slice(RegionSlice),
    Send { header: Vec<u8>, data: AmData },
}

struct Op {
    name: &'static str,
    request: *mut c_void,
    ep: Option<u64>,
    rkey: Option<u64>,
    started: Instant,
    deadline: Instant,
    reply: Option<Done>,
    _owned: Owned,
    /// Set for an endpoint close request: the endpoint entry is removed on completion.
    closes_ep: Option<u64>,
    /// The deadline passed (after this long): the caller is told so once UCX has completed the
    /// request, never before, since until then UCX may still use the caller's buffer.
    timed_out: Option<Duration>,
}

struct EpState {
    handle: sys::ucp_ep_h,
    /// Operations in flight on this endpoint.
    pending: usize,
    /// The user dropped every handle; close once `pending` reaches 0.
    released: bool,
    /// Why the endpoint can take no more operations (failed, timed out, closing).
    closed: Option<String>,
}

struct ListenerState {
    handle: sys::ucp_listener_h,
    tx: tokio::sync::mpsc::UnboundedSender<ConnArrival>,
}

struct RkeyState {
    handle: sys::ucp_rkey_h,
    pending: usize,
    released: bool,
}

struct IdleWaiter {
    deadline: Instant,
    reply: Reply<bool>,
}

/// Who gets a listened-to active message id's arrivals.
enum Listener {
    /// Each arrival goes to an async receiver (`Worker::listen_am`).
    Channel(tokio::sync::mpsc::UnboundedSender<Arrival>),
    /// Received right here into buffers set out by key (`Worker::route_am`).
    Routed(Arc<RouteTable>),
    /// Answered right here by a service; what it passes goes to the async receiver
    /// (`Worker::serve_am`).
    Served(Arc<dyn AmService>, tokio::sync::mpsc::UnboundedSender<Arrival>),
}

/// Who hears of an operation's end: an async caller, or a callback run right here.
enum Done {
    Reply(Reply<()>),
    Call(Box<dyn FnOnce(Result<()>) + Send>),
}

impl Done {
    fn finish(self, r: Result<()>) {
        match self {
            Done::Reply(tx) => {
                let _ = tx.send(r);
            }
            Done::Call(f) => f(r),
        }
    }
}

pub(crate) struct Progress {
    worker: sys::ucp_worker_h,
    efd: libc::c_int,
    rx: mpsc::Receiver<Command>,
    signal: Arc<Signal>,
    next_id: u64,
    ops: HashMap<u64, Op>,
    deadlines: BTreeSet<(Instant, u64)>,
    eps: HashMap<u64, EpState>,
    /// Our endpoint id of each live `ucp_ep_h`, to name the sender of an active message.
    ep_by_handle: HashMap<usize, u64>,
    rkeys: HashMap<u64, RkeyState>,
    listeners: HashMap<u16, Listener>,
    conn_listeners: HashMap<u64, ListenerState>,
    idle_waiters: Vec<IdleWaiter>,
    shutting_down: bool,
}

/// What `Progress::create` reports back to the thread that spawned the worker.
pub(crate) struct Created {
    pub address: Vec<u8>,
    pub max_am_header: usize,
    pub signal: Arc<Signal>,
}

impl Progress {
    /// Creates the worker on the calling thread (which must be the progress thread).
    pub(crate) fn create(
        ctx: sys::ucp_context_h,
        rx: mpsc::Receiver<Command>,
        client_id: Option<u64>,
    ) -> Result<(Progress, Created)> {
        // SAFETY: plain C struct; zeroes are valid.
        let mut params: sys::ucp_worker_params_t = unsafe { std::mem::zeroed() };
        params.field_mask = sys::UCP_WORKER_PARAM_FIELD_THREAD_MODE as u64;
        params.thread_mode = sys::UCS_THREAD_MODE_SINGLE;
        if let Some(id) = client_id {
            params.field_mask |= sys::UCP_WORKER_PARAM_FIELD_CLIENT_ID as u64;
            params.client_id = id;
        }
        let mut worker: sys::ucp_worker_h = std::ptr::null_mut();
        // SAFETY: ctx is live (the caller holds its Arc for the thread's lifetime); params set
        // for its field_mask; worker is a valid out-pointer.
        let status = unsafe { sys::ucp_worker_create(ctx, &params, &mut worker) };
        result::check(status).map_err(|s| Error::ucx("ucp_worker_create", s))?;

        let destroy = |w| {
            // SAFETY: w was just created and nothing else holds it.
            unsafe { sys::ucp_worker_destroy(w) }
        };
        let mut efd: libc::c_int = -1;
        // SAFETY: live worker created with the WAKEUP feature; efd is a valid out-pointer.
        let status = unsafe { sys::ucp_worker_get_efd(worker, &mut efd) };
        if let Err(s) = result::check(status) {
            destroy(worker);
            return Err(Error::ucx("ucp_worker_get_efd", s));
        }
        // SAFETY: plain C struct; zeroes are valid.
        let mut attr: sys::ucp_worker_attr_t = unsafe { std::mem::zeroed() };
        attr.field_mask = (sys::UCP_WORKER_ATTR_FIELD_ADDRESS | sys::UCP_WORKER_ATTR_FIELD_MAX_AM_HEADER) as u64;
        // SAFETY: live worker, out-struct with field_mask set.
        let status = unsafe { sys::ucp_worker_query(worker, &mut attr) };
        if let Err(s) = result::check(status) {
            destroy(worker);
            return Err(Error::ucx("ucp_worker_query", s));
        }
        // SAFETY: UCX filled `address_length` bytes at `address`.
        let address = unsafe { std::slice::from_raw_parts(attr.address.cast::<u8>(), attr.address_length) }.to_vec();
        // SAFETY: the address came from ucp_worker_query on this worker; released once.
        unsafe { sys::ucp_worker_release_address(worker, attr.address) };

        let signal = Arc::new(Signal::new(worker));
        let progress = Progress {
            worker,
            efd,
            rx,
            signal: signal.clone(),
            next_id: 1,
            ops: HashMap::new(),
            deadlines: BTreeSet::new(),
            eps: HashMap::new(),
            ep_by_handle: HashMap::new(),
            rkeys: HashMap::new(),
            listeners: HashMap::new(),
            conn_listeners: HashMap::new(),
            idle_waiters: Vec::new(),
            shutting_down: false,
        };
        Ok((progress, Created { address, max_am_header: attr.max_am_header, signal }))
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Runs until a `Shutdown` command (or every sender is gone), then tears the worker down.
    pub(crate) fn run(mut self) {
        let mut last_activity = Instant::now();
        loop {
            loop {
                match self.rx.try_recv() {
                    Ok(Command::Shutdown) => self.shutting_down = true,
                    Ok(cmd) => {
                        last_activity = Instant::now();
                        self.handle(cmd)
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        self.shutting_down = true;
                        break;
                    }
                }
            }
            if self.progress_until_idle() {
                last_activity = Instant::now();
            }
            self.expire_deadlines(Instant::now());
            self.answer_idle_waiters();
            if self.shutting_down {
                break;
            }
            if !self.ops.is_empty() && last_activity.elapsed() < SPIN_AFTER_ACTIVITY {
                std::thread::yield_now();
                continue;
            }
            self.sleep();
        }
        self.shutdown();
    }

    /// Progresses until UCX reports nothing more to do; true when anything happened.
    fn progress_until_idle(&mut self) -> bool {
        let mut active = false;
        loop {
            // SAFETY: the worker is live and used only on this thread.
            while unsafe { sys::ucp_worker_progress(self.worker) } != 0 {
                active = true;
            }
            let completions = take(&COMPLETIONS);
            let errors = take(&EP_ERRORS);
            let arrivals = take(&ARRIVALS);
            let requests = take(&CONN_REQUESTS);
            if completions.is_empty() && errors.is_empty() && arrivals.is_empty() && requests.is_empty() {
                return active;
            }
            active = true;
            for (ep, status) in errors {
                self.on_ep_error(ep, status.into());
            }
            for (id, status) in completions {
                self.complete(id, status.into());
            }
            for (am_id, reply_ep, mut arrival) in arrivals {
                arrival.sender = self.ep_by_handle.get(&reply_ep).copied();
                self.dispatch_arrival(am_id, arrival);
            }
            for (listener, request) in requests {
                self.dispatch_conn_request(listener, request);
            }
        }
    }

    /// Arms the worker and sleeps on its event fd until something happens or the next deadline.
    fn sleep(&mut self) {
        // SAFETY: live worker, this thread only.
        let status = unsafe { sys::ucp_worker_arm(self.worker) };
        if Status::from(status) == Status::ERR_BUSY {
            return; // events are pending: progress again
        }
        if let Err(s) = result::check(status) {
            tracing::warn!(status = %s, "ucp_worker_arm failed; sleeping briefly instead");
            std::thread::sleep(Duration::from_millis(1));
            return;
        }
        let now = Instant::now();
        let mut wait = MAX_SLEEP;
        if let Some((t, _)) = self.deadlines.first() {
            wait = wait.min(t.saturating_duration_since(now));
        }
        if let Some(w) = self.idle_waiters.iter().map(|w| w.deadline).min() {
            wait = wait.min(w.saturating_duration_since(now));
        }
        let mut pfd = libc::pollfd { fd: self.efd, events: libc::POLLIN, revents: 0 };
        // Round up so a deadline 0.4 ms away does not become a zero-timeout spin.
        let ms = wait.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd; the efd belongs to the live worker.
        unsafe { libc::poll(&mut pfd, 1, ms) };
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Connect { address, peer_errors, reply } => {
                let r = self.connect(&address, peer_errors);
                let _ = reply.send(r);
            }
            Command::ConnectAddr { addr, peer_errors, reply } => {
                let r = self.connect_addr(addr, peer_errors);
                let _ = reply.send(r);
            }
            Command::Listen { addr, tx, reply } => {
                let r = self.listen_addr(addr, tx);
                let _ = reply.send(r);
            }
            Command::Accept { listener, request, peer_errors, reply } => {
                let r = self.accept(listener, request, peer_errors);
                let _ = reply.send(r);
            }
            Command::Reject { listener, request } => self.reject(listener, request),
            Command::CloseListener { listener } => {
                if let Some(l) = self.conn_listeners.remove(&listener) {
                    // SAFETY: a live listener of this worker, removed from the table so it is
                    // destroyed once.
                    unsafe { sys::ucp_listener_destroy(l.handle) };
                }
            }
            Command::ReleaseEp { ep } => {
                if let Some(st) = self.eps.get_mut(&ep) {
                    st.released = true;
                }
                self.maybe_close_ep(ep);
            }
            Command::UnpackRkey { ep, packed, reply } => {
                let r = self.unpack_rkey(ep, &packed);
                let _ = reply.send(r);
            }
            Command::ReleaseRkey { rkey } => {
                if let Some(st) = self.rkeys.get_mut(&rkey) {
                    st.released = true;
                }
                self.maybe_destroy_rkey(rkey);
            }
            Command::Rma { kind, ep, rkey, local, remote_addr, timeout, reply } => {
                self.start_rma(kind, ep, rkey, local, remote_addr, timeout, reply)
            }
            Command::Flush { ep, timeout, reply } => self.start_flush(ep, timeout, reply),
            Command::AmSend { ep, id, header, data, timeout, reply } => {
                self.start_am_send(ep, id, header, data, timeout, Some(Done::Reply(reply)))
            }
            Command::AmServe { id, service, tx, reply } => {
                let r = self.listen(id, Listener::Served(service, tx));
                let _ = reply.send(r);
            }
            Command::AmListen { id, tx, reply } => {
                let r = self.listen(id, Listener::Channel(tx));
                let _ = reply.send(r);
            }
            Command::AmRoute { id, table, reply } => {
                let r = self.listen(id, Listener::Routed(table));
                let _ = reply.send(r);
            }
            Command::AmRecv { desc, dest, timeout, reply } => self.start_am_recv(desc, dest, timeout, reply),
            Command::AmRelease { desc } => {
                // SAFETY: desc is a rendezvous descriptor UCX handed to am_cb on this worker
                // and that was neither received nor released yet (IncomingAm sends this at most
                // once, and only when it did not receive).
                unsafe { sys::ucp_am_data_release(self.worker, desc as *mut c_void) };
            }
            Command::EpTransports { ep, reply } => {
                let r = self.ep_transports(ep);
                let _ = reply.send(r);
            }
            Command::Idle { timeout, reply } => {
                self.idle_waiters.push(IdleWaiter { deadline: Instant::now() + timeout, reply })
            }
            Command::Shutdown => self.shutting_down = true,
        }
    }

    /// Endpoint parameters common to every way of creating one: error mode and handler.
    fn ep_params(&self, id: u64, peer_errors: bool) -> sys::ucp_ep_params_t {
        // SAFETY: plain C struct; zeroes are valid.
        let mut params: sys::ucp_ep_params_t = unsafe { std::mem::zeroed() };
        params.field_mask = (sys::UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | sys::UCP_EP_PARAM_FIELD_ERR_HANDLER) as u64;
        params.err_mode = if peer_errors { sys::UCP_ERR_HANDLING_MODE_PEER } else { sys::UCP_ERR_HANDLING_MODE_NONE };
        params.err_handler.cb = Some(ep_error_cb);
        params.err_handler.arg = id as usize as *mut c_void;
        params
    }

    /// Creates the endpoint and files it under `id`.
    fn create_ep(&mut self, id: u64, params: &sys::ucp_ep_params_t, what: &'static str) -> Result<u64> {
        let mut ep: sys::ucp_ep_h = std::ptr::null_mut();
        // SAFETY: live worker on its own thread; params initialised for its mask by the caller,
        // whatever they point to outlives the call (UCX copies what it needs).
        let status = unsafe { sys::ucp_ep_create(self.worker, params, &mut ep) };
        result::check(status).map_err(|s| Error::ucx(what, s))?;
        self.eps.insert(id, EpState { handle: ep, pending: 0, released: false, closed: None });
        self.ep_by_handle.insert(ep as usize, id);
        Ok(id)
    }

    /// Forgets an endpoint whose UCX handle is gone (closed, or never to be used again).
    fn forget_ep(&mut self, ep: u64) {
        if let Some(st) = self.eps.remove(&ep) {
            self.ep_by_handle.remove(&(st.handle as usize));
        }
    }

    fn connect(&mut self, address: &[u8], peer_errors: bool) -> Result<u64> {
        if address.is_empty() || address.len() > 64 * 1024 {
            return Err(Error::invalid(format!("worker address of {} bytes is not plausible", address.len())));
        }
        let id = self.next_id();
        let mut params = self.ep_params(id, peer_errors);
        params.field_mask |= sys::UCP_EP_PARAM_FIELD_REMOTE_ADDRESS as u64;
        params.address = address.as_ptr().cast();
        self.create_ep(id, &params, "ucp_ep_create")
    }

    /// A client endpoint to a listener: UCX connects through its connection manager (tcp
    /// sockets), then wires up every transport both workers share. The worker's client id, if
    /// it has one, goes with the request.
    fn connect_addr(&mut self, addr: SocketAddr, peer_errors: bool) -> Result<u64> {
        let id = self.next_id();
        let c = CSockAddr::new(addr);
        let mut params = self.ep_params(id, peer_errors);
        params.field_mask |= (sys::UCP_EP_PARAM_FIELD_FLAGS | sys::UCP_EP_PARAM_FIELD_SOCK_ADDR) as u64;
        params.flags = sys::UCP_EP_PARAMS_FLAGS_CLIENT_SERVER | sys::UCP_EP_PARAMS_FLAGS_SEND_CLIENT_ID;
        params.sockaddr = sys::ucs_sock_addr_t { addr: c.as_ptr(), addrlen: c.len() };
        self.create_ep(id, &params, "ucp_ep_create(sockaddr)")
    }

    fn listen_addr(
        &mut self,
        addr: SocketAddr,
        tx: tokio::sync::mpsc::UnboundedSender<ConnArrival>,
    ) -> Result<(u64, SocketAddr)> {
        let id = self.next_id();
        let c = CSockAddr::new(addr);
        // SAFETY: plain C struct; zeroes are valid.
        let mut params: sys::ucp_listener_params_t = unsafe { std::mem::zeroed() };
        params.field_mask =
            (sys::UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | sys::UCP_LISTENER_PARAM_FIELD_CONN_HANDLER) as u64;
        params.sockaddr = sys::ucs_sock_addr_t { addr: c.as_ptr(), addrlen: c.len() };
        params.conn_handler.cb = Some(conn_cb);
        params.conn_handler.arg = id as usize as *mut c_void;
        let mut handle: sys::ucp_listener_h = std::ptr::null_mut();
        // SAFETY: live worker on its thread; params set for its mask; the sockaddr outlives the
        // call; the callback only records (listener id, request) and its arg is an integer.
        let status = unsafe { sys::ucp_listener_create(self.worker, &params, &mut handle) };
        result::check(status).map_err(|s| Error::ucx("ucp_listener_create", s))?;
        // SAFETY: plain C struct; zeroes are valid.
        let mut attr: sys::ucp_listener_attr_t = unsafe { std::mem::zeroed() };
        attr.field_mask = sys::UCP_LISTENER_ATTR_FIELD_SOCKADDR as u64;
        // SAFETY: live listener; out-struct with its mask set.
        let status = unsafe { sys::ucp_listener_query(handle, &mut attr) };
        let bound = match result::check(status) {
            // SAFETY: UCX filled a sockaddr_storage (zeroes would read as no address).
            Ok(()) => unsafe { sockaddr::from_storage(&attr.sockaddr) }.unwrap_or(addr),
            Err(_) => addr,
        };
        self.conn_listeners.insert(id, ListenerState { handle, tx });
        Ok((id, bound))
    }

    /// Hands a connection request to its listener's owner, or rejects it when nobody listens.
    fn dispatch_conn_request(&mut self, listener: u64, request: usize) {
        // SAFETY: plain C struct; zeroes are valid.
        let mut attr: sys::ucp_conn_request_attr_t = unsafe { std::mem::zeroed() };
        attr.field_mask =
            (sys::UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ADDR | sys::UCP_CONN_REQUEST_ATTR_FIELD_CLIENT_ID) as u64;
        // SAFETY: a pending request UCX handed to conn_cb on this worker; out-struct with its mask.
        let status = unsafe { sys::ucp_conn_request_query(request as sys::ucp_conn_request_h, &mut attr) };
        let (peer, client_id) = match result::check(status) {
            // SAFETY: UCX filled the client address.
            Ok(()) => (unsafe { sockaddr::from_storage(&attr.client_address) }, attr.client_id),
            Err(_) => (None, 0),
        };
        let arrival = ConnArrival { listener, request, client_id, peer };
        let undelivered = match self.conn_listeners.get(&listener) {
            Some(l) => l.tx.send(arrival).err().is_some(),
            None => true,
        };
        if undelivered {
            self.reject(listener, request);
        }
    }

    fn accept(&mut self, listener: u64, request: usize, peer_errors: bool) -> Result<u64> {
        if !self.conn_listeners.contains_key(&listener) {
            return Err(Error::invalid("the listener was closed"));
        }
        let id = self.next_id();
        let mut params = self.ep_params(id, peer_errors);
        params.field_mask |= sys::UCP_EP_PARAM_FIELD_CONN_REQUEST as u64;
        params.conn_request = request as sys::ucp_conn_request_h;
        self.create_ep(id, &params, "ucp_ep_create(conn_request)")
    }

    fn reject(&mut self, listener: u64, request: usize) {
        if let Some(l) = self.conn_listeners.get(&listener) {
            // SAFETY: a pending request of this live listener, neither accepted nor rejected
            // before (ConnRequest hands it back exactly once).
            let status = unsafe { sys::ucp_listener_reject(l.handle, request as sys::ucp_conn_request_h) };
            if let Err(s) = result::check(status) {
                tracing::debug!(status = %s, "ucp_listener_reject failed");
            }
        }
    }

    /// The endpoint, if it can take a new operation.
    fn usable_ep(&self, ep: u64, op: &'static str) -> Result<sys::ucp_ep_h> {
        match self.eps.get(&ep) {
            None => Err(Error::EndpointClosed { op, reason: "unknown endpoint".into() }),
            Some(st) => match &st.closed {
                Some(reason) => Err(Error::EndpointClosed { op, reason: reason.clone() }),
                None => Ok(st.handle),
            },
        }
    }

    fn unpack_rkey(&mut self, ep: u64, packed: &[u8]) -> Result<u64> {
        let handle = self.usable_ep(ep, "rkey_unpack")?;
        if packed.is_empty() {
            return Err(Error::invalid("empty remote key"));
        }
        let mut rkey: sys::ucp_rkey_h = std::ptr::null_mut();
        // SAFETY: live endpoint of this worker; `packed` is readable for the call.
        let status = unsafe { sys::ucp_ep_rkey_unpack(handle, packed.as_ptr().cast(), &mut rkey) };
        result::check(status).map_err(|s| Error::ucx("ucp_ep_rkey_unpack", s))?;
        let id = self.next_id();
        self.rkeys.insert(id, RkeyState { handle: rkey, pending: 0, released: false });
        Ok(id)
    }

    fn request_param(&self, id: u64) -> sys::ucp_request_param_t {
        // SAFETY: plain C struct; zeroes are valid.
        let mut p: sys::ucp_request_param_t = unsafe { std::mem::zeroed() };
        p.op_attr_mask = sys::UCP_OP_ATTR_FIELD_CALLBACK | sys::UCP_OP_ATTR_FIELD_USER_DATA;
        p.cb.send = Some(send_cb);
        p.user_data = id as usize as *mut c_void;
        p
    }

    /// Records an operation UCX accepted, or answers at once if it completed or failed.
    #[allow(clippy::too_many_arguments)]
    fn track(
        &mut self,
        id: u64,
        name: &'static str,
        ptr: sys::ucs_status_ptr_t,
        ep: Option<u64>,
        rkey: Option<u64>,
        timeout: Duration,
        reply: Option<Done>,
        owned: Owned,
    ) {
        match result::ptr_status(ptr) {
            PtrStatus::Done => {
                if let Some(r) = reply {
                    r.finish(Ok(()));
                }
            }
            PtrStatus::Failed(s) => {
                let err = self.error_for(name, ep, s);
                if let Some(r) = reply {
                    r.finish(Err(err));
                }
            }
            PtrStatus::Pending(req) => {
                let now = Instant::now();
                let deadline = now + timeout;
                if let Some(e) = ep.and_then(|e| self.eps.get_mut(&e)) {
                    e.pending += 1;
                }
                if let Some(k) = rkey.and_then(|k| self.rkeys.get_mut(&k)) {
                    k.pending += 1;
                }
                self.deadlines.insert((deadline, id));
                self.ops.insert(
                    id,
                    Op {
                        name,
                        request: req.as_ptr(),
                        ep,
                        rkey,
                        started: now,
                        deadline,
                        reply,
                        _owned: owned,
                        closes_ep: None,
                        timed_out: None,
                    },
                );
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start_rma(
        &mut self,
        kind: RmaKind,
        ep: u64,
        rkey: u64,
        local: RegionSlice,
        remote_addr: u64,
        timeout: Duration,
        reply: Reply<()>,
    ) {
        let name = kind.name();
        let handle = match self.usable_ep(ep, name) {
            Ok(h) => h,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let rk = match self.rkeys.get(&rkey) {
            Some(k) if !k.released => k.handle,
            _ => {
                let _ = reply.send(Err(Error::invalid("remote key was released")));
                return;
            }
        };
        let id = self.next_id();
        let mut p = self.request_param(id);
        p.op_attr_mask |= sys::UCP_OP_ATTR_FIELD_MEMH;
        p.memh = local.region.memh;
        let buf = local.ptr().cast::<c_void>();
        // SAFETY: live endpoint and rkey of this worker; `buf..buf+len` lies inside a region
        // registered as `memh`, and `local` (an Arc of that region) is moved into the op below,
        // so it stays valid until UCX completes the request.
        let ptr = unsafe {
            match kind {
                RmaKind::Put => sys::ucp_put_nbx(handle, buf, local.len, remote_addr, rk, &p),
                RmaKind::Get => sys::ucp_get_nbx(handle, buf, local.len, remote_addr, rk, &p),
            }
        };
        self.track(id, name, ptr, Some(ep), Some(rkey), timeout, Some(Done::Reply(reply)), Owned::Slice(local));
    }

    fn start_flush(&mut self, ep: u64, timeout: Duration, reply: Reply<()>) {
        let handle = match self.usable_ep(ep, "flush") {
            Ok(h) => h,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let id = self.next_id();
        let p = self.request_param(id);
        // SAFETY: live endpoint of this worker; p initialised for its mask.
        let ptr = unsafe { sys::ucp_ep_flush_nbx(handle, &p) };
        self.track(id, "flush", ptr, Some(ep), None, timeout, Some(Done::Reply(reply)), Owned::Nothing);
    }

    fn start_am_send(
        &mut self,
        ep: u64,
        am_id: u16,
        header: Vec<u8>,
        data: AmData,
        timeout: Duration,
        done: Option<Done>,
    ) {
        let handle = match self.usable_ep(ep, "am_send") {
            Ok(h) => h,
            Err(e) => {
                if let Some(d) = done {
                    d.finish(Err(e));
                }
                return;
            }
        };
        let id = self.next_id();
        let mut p = self.request_param(id);
        // Ask for a reply endpoint: the receiver learns which of its endpoints the message came
        // in on (and can hold the sender to the session bound to that endpoint).
        p.op_attr_mask |= sys::UCP_OP_ATTR_FIELD_FLAGS;
        p.flags = sys::UCP_AM_SEND_FLAG_REPLY;
        let (buf, len): (*const c_void, usize) = match &data {
            AmData::None => (std::ptr::null(), 0),
            AmData::Bytes(b) => (b.as_ptr().cast(), b.len()),
            AmData::Region(s) => {
                p.op_attr_mask |= sys::UCP_OP_ATTR_FIELD_MEMH;
                p.memh = s.region.memh;
                (s.ptr().cast_const().cast(), s.len)
            }
        };
        let hdr = if header.is_empty() { std::ptr::null() } else { header.as_ptr().cast::<c_void>() };
        // SAFETY: live endpoint of this worker; header and data buffers are moved into the op
        // (a Vec's heap buffer does not move when the Vec does), so they stay valid until UCX
        // completes the request; a region's memh is passed with its data.
        let ptr = unsafe { sys::ucp_am_send_nbx(handle, am_id as u32, hdr, header.len(), buf, len, &p) };
        self.track(id, "am_send", ptr, Some(ep), None, timeout, done, Owned::Send { header, data });
    }

    fn listen(&mut self, id: u16, listener: Listener) -> Result<()> {
        if self.listeners.get(&id).is_some_and(|l| !matches!(l, Listener::Channel(tx) if tx.is_closed())) {
            return Err(Error::invalid(format!("active-message id {id} already has a listener")));
        }
        // SAFETY: plain C struct; zeroes are valid.
        let mut p: sys::ucp_am_handler_param_t = unsafe { std::mem::zeroed() };
        p.field_mask = (sys::UCP_AM_HANDLER_PARAM_FIELD_ID
            | sys::UCP_AM_HANDLER_PARAM_FIELD_CB
            | sys::UCP_AM_HANDLER_PARAM_FIELD_ARG) as u64;
        p.id = id as u32;
        p.cb = Some(am_cb);
        p.arg = id as usize as *mut c_void;
        // SAFETY: live worker on its thread; the callback is a plain function and its arg an
        // integer, so nothing it refers to can dangle.
        let status = unsafe { sys::ucp_worker_set_am_recv_handler(self.worker, &p) };
        result::check(status).map_err(|s| Error::ucx("ucp_worker_set_am_recv_handler", s))?;
        self.listeners.insert(id, listener);
        Ok(())
    }

    fn dispatch_arrival(&mut self, am_id: u16, arrival: Arrival) {
        let undelivered = match self.listeners.get(&am_id) {
            Some(Listener::Channel(tx)) => tx.send(arrival).err().map(|e| e.0),
            Some(Listener::Routed(table)) => match table.route(&arrival.header, arrival.length, &arrival.data) {
                // Unrouted, or settled without receiving: a rendezvous descriptor goes back.
                Action::Drop | Action::Settled => Some(arrival),
                Action::Receive { dest, timeout, reply } => match arrival.data {
                    ArrivedData::Rndv { desc } => {
                        self.start_am_recv(desc, dest, timeout, reply);
                        None
                    }
                    // `route` settles eager data itself.
                    ArrivedData::Eager(_) => None,
                },
            },
            Some(Listener::Served(service, tx)) => {
                let sender = arrival.sender.map(super::EndpointId);
                let served = service.serve(Arriving::new(sender, &arrival.header, arrival.length, &arrival.data));
                match served {
                    Served::Pass => tx.send(arrival).err().map(|e| e.0),
                    Served::Answered(answers) => {
                        for a in answers {
                            let done = a.done.map(Done::Call);
                            match (arrival.sender, done) {
                                (Some(ep), done) => self.start_am_send(ep, a.id, a.header, a.data, a.timeout, done),
                                (None, Some(d)) => {
                                    d.finish(Err(Error::invalid("an answer to a message of no known endpoint")))
                                }
                                (None, None) => {}
                            }
                        }
                        // Answered without its data: a rendezvous descriptor goes back.
                        Some(arrival)
                    }
                }
            }
            None => Some(arrival),
        };
        if let Some(Arrival { data: ArrivedData::Rndv { desc }, .. }) = undelivered {
            // Nobody listens any more: give UCX its descriptor back.
            // SAFETY: desc came from am_cb on this worker and was not used.
            unsafe { sys::ucp_am_data_release(self.worker, desc as *mut c_void) };
        }
    }

    fn start_am_recv(&mut self, desc: usize, dest: RegionSlice, timeout: Duration, reply: Reply<()>) {
        let id = self.next_id();
        let mut p = self.request_param(id);
        p.cb.recv_am = Some(am_recv_data_cb);
        p.op_attr_mask |= sys::UCP_OP_ATTR_FIELD_MEMH;
        p.memh = dest.region.memh;
        let (buf, desc) = (dest.ptr().cast::<c_void>(), desc as *mut c_void);
        // desc came from an IncomingAm that gave it up by sending this command, or from the route
        // table, straight from the arrival.
        // SAFETY: desc is an unconsumed rendezvous descriptor from am_cb on this worker; dest lies
        // in a region registered as memh and is moved into the op until completion.
        let ptr = unsafe { sys::ucp_am_recv_data_nbx(self.worker, desc, buf, dest.len, &p) };
        self.track(id, "am_recv", ptr, None, None, timeout, Some(Done::Reply(reply)), Owned::Slice(dest));
    }

    fn ep_transports(&mut self, ep: u64) -> Result<Vec<TransportDevice>> {
        let handle = self.usable_ep(ep, "ep_query")?;
        const MAX: usize = 16;
        // SAFETY: plain C structs; zeroes are valid.
        let mut entries: [sys::ucp_transport_entry_t; MAX] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut attr: sys::ucp_ep_attr_t = unsafe { std::mem::zeroed() };
        attr.field_mask = sys::UCP_EP_ATTR_FIELD_TRANSPORTS as u64;
        attr.transports.entries = entries.as_mut_ptr();
        attr.transports.num_entries = MAX as u32;
        attr.transports.entry_size = std::mem::size_of::<sys::ucp_transport_entry_t>();
        // SAFETY: live endpoint; the entries array outlives the call and its size is declared.
        let status = unsafe { sys::ucp_ep_query(handle, &mut attr) };
        result::check(status).map_err(|s| Error::ucx("ucp_ep_query", s))?;
        let n = (attr.transports.num_entries as usize).min(MAX);
        let name = |p: *const libc::c_char| {
            if p.is_null() {
                String::new()
            } else {
                // SAFETY: UCX returns NUL-terminated names that live as long as the endpoint.
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            }
        };
        let mut out: Vec<TransportDevice> = entries[..n]
            .iter()
            .map(|e| TransportDevice { transport: name(e.transport_name), device: name(e.device_name) })
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    fn error_for(&self, op: &'static str, ep: Option<u64>, status: Status) -> Error {
        if let Some(reason) = ep.and_then(|e| self.eps.get(&e)).and_then(|e| e.closed.clone()) {
            return Error::EndpointClosed { op, reason };
        }
        if status.is_peer_failure() {
            return Error::EndpointClosed { op, reason: status.to_string() };
        }
        Error::ucx(op, status)
    }

    fn complete(&mut self, id: u64, status: Status) {
        let Some(op) = self.ops.remove(&id) else {
            return;
        };
        self.deadlines.remove(&(op.deadline, id));
        // SAFETY: the request came from a *_nbx call of this worker, its callback has run, and
        // it is freed exactly once (the op was just removed).
        unsafe { sys::ucp_request_free(op.request) };
        if let Some(ep) = op.closes_ep {
            if let Some(st) = self.eps.get(&ep) {
                if st.released && st.pending == 0 {
                    self.forget_ep(ep);
                }
            }
        }
        let result = match op.timed_out {
            // Completed (cancelled, most likely) after its deadline: the caller hears of the
            // timeout only now that UCX no longer touches its buffers.
            Some(after) => Err(Error::TimedOut { op: op.name, after }),
            None if status == Status::OK => Ok(()),
            None => Err(self.error_for(op.name, op.ep, status)),
        };
        if let Some(r) = op.reply {
            r.finish(result);
        } else if let Err(e) = result {
            tracing::debug!(op = op.name, error = %e, elapsed = ?op.started.elapsed(), "background UCX operation failed");
        }
        if let Some(k) = op.rkey {
            if let Some(st) = self.rkeys.get_mut(&k) {
                st.pending = st.pending.saturating_sub(1);
            }
            self.maybe_destroy_rkey(k);
        }
        if let Some(e) = op.ep {
            if let Some(st) = self.eps.get_mut(&e) {
                st.pending = st.pending.saturating_sub(1);
            }
            self.maybe_close_ep(e);
        }
    }

    fn maybe_destroy_rkey(&mut self, rkey: u64) {
        if let Some(st) = self.rkeys.get(&rkey) {
            if st.released && st.pending == 0 {
                // SAFETY: the rkey came from ucp_ep_rkey_unpack, no operation uses it any more,
                // and it is removed from the table so it is destroyed once.
                unsafe { sys::ucp_rkey_destroy(st.handle) };
                self.rkeys.remove(&rkey);
            }
        }
    }

    /// Closes an endpoint the user released once nothing is in flight on it.
    fn maybe_close_ep(&mut self, ep: u64) {
        let Some(st) = self.eps.get_mut(&ep) else {
            return;
        };
        if !st.released || st.pending > 0 {
            return;
        }
        if st.closed.is_some() {
            // Already force-closed (failure or timeout); nothing left to release.
            self.forget_ep(ep);
            return;
        }
        st.closed = Some("endpoint released".into());
        let handle = st.handle;
        self.close_ep_request(ep, handle, 0, CLOSE_TIMEOUT);
    }

    /// Force-closes an endpoint: UCX completes everything in flight on it with an error.
    fn force_close(&mut self, ep: u64, reason: String) {
        let Some(st) = self.eps.get_mut(&ep) else {
            return;
        };
        if st.closed.is_some() {
            return;
        }
        st.closed = Some(reason);
        let handle = st.handle;
        self.close_ep_request(ep, handle, sys::UCP_EP_CLOSE_FLAG_FORCE, CLOSE_TIMEOUT);
    }

    fn close_ep_request(&mut self, ep: u64, handle: sys::ucp_ep_h, flags: u32, timeout: Duration) {
        let id = self.next_id();
        let mut p = self.request_param(id);
        p.op_attr_mask |= sys::UCP_OP_ATTR_FIELD_FLAGS;
        p.flags = flags;
        // SAFETY: live endpoint of this worker, closed once (`closed` was None until just now).
        let ptr = unsafe { sys::ucp_ep_close_nbx(handle, &p) };
        match result::ptr_status(ptr) {
            PtrStatus::Pending(req) => {
                let now = Instant::now();
                let deadline = now + timeout;
                self.ops.insert(
                    id,
                    Op {
                        name: "ep_close",
                        request: req.as_ptr(),
                        ep: None,
                        rkey: None,
                        started: now,
                        deadline,
                        reply: None,
                        _owned: Owned::Nothing,
                        closes_ep: Some(ep),
                        timed_out: None,
                    },
                );
                self.deadlines.insert((deadline, id));
            }
            PtrStatus::Done | PtrStatus::Failed(_) => {
                if self.eps.get(&ep).is_some_and(|s| s.released && s.pending == 0) {
                    self.forget_ep(ep);
                }
            }
        }
    }

    fn on_ep_error(&mut self, ep: u64, status: Status) {
        tracing::debug!(ep, %status, "endpoint failed");
        // UCX requires a failed endpoint to be closed with FORCE.
        self.force_close(ep, format!("peer failure: {status}"));
    }

    fn expire_deadlines(&mut self, now: Instant) {
        while let Some(&(t, id)) = self.deadlines.first() {
            if t > now {
                break;
            }
            self.deadlines.remove(&(t, id));
            let Some(op) = self.ops.get_mut(&id) else {
                continue;
            };
            let name = op.name;
            let after = now.duration_since(op.started);
            // The reply waits for UCX to complete the request (see `complete`): until then UCX
            // may still read or write the caller's buffer.
            op.timed_out = Some(after);
            let request = op.request;
            match op.ep {
                // The op stays in `ops` (it owns its buffers) until UCX completes it; force-closing
                // the endpoint makes UCX do that promptly.
                Some(ep) => self.force_close(ep, format!("{name} timed out after {after:?}")),
                None if op.closes_ep.is_none() => {
                    // SAFETY: live request of this worker, not yet completed (still in `ops`).
                    unsafe { sys::ucp_request_cancel(self.worker, request) };
                }
                None => {} // an endpoint close that hangs: leave it to worker destruction
            }
        }
    }

    fn answer_idle_waiters(&mut self) {
        if self.idle_waiters.is_empty() {
            return;
        }
        let now = Instant::now();
        // Close requests do not count: they belong to endpoints nobody can use any more.
        let busy = self.ops.values().any(|o| o.closes_ep.is_none());
        let waiters = std::mem::take(&mut self.idle_waiters);
        for w in waiters {
            if !busy {
                let _ = w.reply.send(Ok(true));
            } else if now >= w.deadline {
                let _ = w.reply.send(Ok(false));
            } else {
                self.idle_waiters.push(w);
            }
        }
    }

    fn shutdown(mut self) {
        let eps: Vec<u64> = self.eps.keys().copied().collect();
        for ep in eps {
            self.force_close(ep, "worker shutting down".into());
        }
        let until = Instant::now() + SHUTDOWN_DRAIN;
        while !self.ops.is_empty() && Instant::now() < until {
            self.progress_until_idle();
            self.expire_deadlines(Instant::now());
            if !self.ops.is_empty() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        for w in std::mem::take(&mut self.idle_waiters) {
            let _ = w.reply.send(Ok(self.ops.is_empty()));
        }
        let rkeys: Vec<u64> = self.rkeys.keys().copied().collect();
        for k in rkeys {
            if let Some(st) = self.rkeys.get_mut(&k) {
                st.released = true;
            }
            self.maybe_destroy_rkey(k);
        }
        if !self.ops.is_empty() {
            tracing::warn!(count = self.ops.len(), "UCX operations still in flight at shutdown; leaking their buffers");
            for (_, op) in self.ops.drain() {
                // Never free memory UCX might still touch.
                std::mem::forget(op);
            }
        }
        self.signal.disarm();
        // SAFETY: the signal no longer reaches this worker; every endpoint was force-closed; the
        // worker is destroyed once, on the thread that owns it.
        unsafe { sys::ucp_worker_destroy(self.worker) };
    }
}
