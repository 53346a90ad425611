//! The server's half of the data plane: the UCX listener that client endpoints connect to, the
//! AM_HELLO that binds an endpoint to its session, AM_PUT, the chunks of clients that get no
//! remote key (the server picks the buffer, the reserved slot, and UCX pulls the data into it by
//! rendezvous), and AM_FETCH_ASK, their remote gets asked on the endpoint itself.
//!
//! No endpoint is created from bytes a client chose: clients connect to the listener (UCX
//! client-server mode), and a packed worker address never reaches `ucp_ep_create`. A message is
//! held to the session of the endpoint it arrived on; anything that does not match a live
//! reservation of that session, byte for byte in size, is dropped (and counted), never written.

use crate::service::Service;
use crate::sessions::{self, Sessions, CLIENT_ID_AM, CLIENT_ID_RMA};
use crate::shutdown::CancelToken;
use crate::state::State;
use prefixd_cache::Tier;
use prefixd_proto::dataplane::{
    token_from, FetchAsk, FetchDone, HelloAck, PutHeader, AM_FETCH, AM_FETCH_ASK, AM_HELLO, AM_HELLO_ACK, AM_PUT,
    MAX_FETCH_DONE_MESSAGE,
};
use prefixd_proto::v1::DataPath;
use std::sync::Arc;
use std::time::Instant;
use ucx_bindings::{AmData, IncomingAm, Listener};

/// Endpoints accepted but not yet claimed by an AM_HELLO, at most: a flood of connections
/// without sessions is refused beyond this many.
const MAX_UNCLAIMED: usize = 1024;

/// Accepts connections to the data listener until `stop` fires.
pub async fn serve_connections(state: Arc<State>, mut listener: Listener, stop: CancelToken) {
    loop {
        let req = tokio::select! {
            r = listener.next() => match r { Some(r) => r, None => return },
            _ = stop.cancelled() => return,
        };
        // The client tells the error mode it uses (both ends must agree) by its worker's id.
        let path = match req.client_id() {
            CLIENT_ID_RMA => DataPath::Rma,
            CLIENT_ID_AM => DataPath::ActiveMessage,
            other => {
                tracing::debug!(peer = ?req.peer(), client_id = other, "connection with an unknown client id refused");
                state.metrics.rejected.with_label_values(&["connect_unknown_client_id"]).inc();
                req.reject();
                continue;
            }
        };
        if state.sessions.unclaimed_len() >= MAX_UNCLAIMED {
            state.metrics.rejected.with_label_values(&["connect_too_many_unclaimed"]).inc();
            req.reject();
            continue;
        }
        match req.accept(sessions::error_mode(path)).await {
            Ok(ep) => state.sessions.add_unclaimed(ep, sessions::error_mode(path)),
            Err(e) => tracing::warn!(error = %e, "cannot accept a data connection"),
        }
    }
}

/// Binds endpoints to sessions (AM_HELLO) until `stop` fires.
pub async fn serve_hellos(state: Arc<State>, stop: CancelToken) -> anyhow::Result<()> {
    let mut rx = state.worker.listen_am(AM_HELLO).await?;
    loop {
        let msg = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => return Ok(()) },
            _ = stop.cancelled() => return Ok(()),
        };
        let Some(from) = msg.sender() else {
            state.metrics.rejected.with_label_values(&["hello_no_endpoint"]).inc();
            continue;
        };
        let Some(token) = token_from(msg.header()) else {
            state.metrics.rejected.with_label_values(&["bad_header"]).inc();
            continue;
        };
        match state.sessions.bind(&token, from) {
            Ok(session) => {
                tracing::info!(session = format_args!("{:016x}", session.id), "data endpoint bound");
                let state = state.clone();
                tokio::spawn(async move {
                    let Some(ep) = session.ep() else { return };
                    let ack = HelloAck { session_id: session.id }.encode();
                    if let Err(e) = ep.am_send(AM_HELLO_ACK, &ack, AmData::None, state.cfg.transfer_timeout).await {
                        tracing::warn!(session = format_args!("{:016x}", session.id), error = %e, "hello ack failed");
                        state.drop_session(&Sessions::token_of(&session), "data endpoint failed");
                        return;
                    }
                    // The transport label for byte metrics: the first data lane the endpoint uses.
                    if let Ok(t) = ep.transports().await {
                        if let Some(t) = t.iter().map(|t| t.transport.clone()).find(|t| t != "self") {
                            session.set_transport(t);
                        }
                    }
                });
            }
            Err(e) => {
                tracing::debug!(reason = e.label(), "AM_HELLO refused");
                state.metrics.rejected.with_label_values(&[e.label()]).inc();
            }
        }
    }
}

/// Receives AM_PUT messages until `stop` fires.
pub async fn serve_puts(state: Arc<State>, stop: CancelToken) -> anyhow::Result<()> {
    let mut rx = state.worker.listen_am(AM_PUT).await?;
    loop {
        let msg = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => return Ok(()) },
            _ = stop.cancelled() => return Ok(()),
        };
        if let Err(reason) = accept(&state, msg) {
            state.metrics.rejected.with_label_values(&[reason]).inc();
        }
    }
}

/// Answers remote gets asked on data endpoints (AM_FETCH_ASK) until `stop` fires: each is held
/// to the session of the endpoint it came on, checked against that session's grants, and
/// answered on that endpoint: its chunks, then a FetchDone with the count or the error.
pub async fn serve_fetch_asks(svc: Service, stop: CancelToken) -> anyhow::Result<()> {
    let state = svc.state.clone();
    // Without a GPU pool every chunk is in host memory: requests are answered on the progress
    // thread itself where they can be, and only the rest come here.
    let mut rx = if state.pools.region(Tier::Gpu).is_none() {
        let inline: Arc<dyn ucx_bindings::AmService> = Arc::new(crate::service::InlineFetch(svc.clone()));
        state.worker.serve_am(AM_FETCH_ASK, inline).await?
    } else {
        state.worker.listen_am(AM_FETCH_ASK).await?
    };
    loop {
        let msg = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => return Ok(()) },
            _ = stop.cancelled() => return Ok(()),
        };
        let Some(ask) = FetchAsk::decode(msg.header()) else {
            state.metrics.rejected.with_label_values(&["bad_header"]).inc();
            continue;
        };
        // The session is the one bound to the endpoint the request came in on; an endpoint of
        // no session has nobody to answer to.
        let Some((session, ep)) = msg
            .sender()
            .and_then(|from| state.sessions.by_endpoint(from))
            .and_then(|s| s.ep().cloned().map(|ep| (s, ep)))
        else {
            state.metrics.rejected.with_label_values(&["unbound_endpoint"]).inc();
            continue;
        };
        state.metrics.fetch_asks.with_label_values(&["async"]).inc();
        // Clients send at most MAX_FETCH_ASK_DATA bytes, which travel eagerly; anything that
        // came by rendezvous is longer than that and is refused without being received.
        let data = if msg.is_rendezvous() { Err(msg.len()) } else { msg.into_eager_bytes().map_err(|_| 0) };
        let svc = svc.clone();
        tokio::spawn(async move {
            let answer = match &data {
                Ok(bytes) => svc.answer_fetch_ask(&session, &ask, bytes).await,
                Err(len) => Err(tonic::Status::invalid_argument(format!(
                    "a fetch request of {len} bytes; at most {} are taken",
                    prefixd_proto::dataplane::MAX_FETCH_ASK_DATA
                ))),
            };
            let (done, message) = match answer {
                Ok(sent) => (FetchDone { tag: ask.tag, hit_chunks: sent, code: 0 }, Vec::new()),
                Err(status) => {
                    let mut m = status.message();
                    let mut cut = m.len().min(MAX_FETCH_DONE_MESSAGE);
                    while !m.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    m = &m[..cut];
                    (FetchDone { tag: ask.tag, hit_chunks: 0, code: status.code() as u32 }, m.as_bytes().to_vec())
                }
            };
            let data = if message.is_empty() { AmData::None } else { AmData::Bytes(message) };
            if let Err(e) = ep.am_send(AM_FETCH, &done.encode(), data, svc.state.cfg.transfer_timeout).await {
                tracing::debug!(session = format_args!("{:016x}", session.id), error = %e, "fetch answer not sent");
            }
        });
    }
}

/// Checks one message and starts receiving it into its slot.
fn accept(state: &Arc<State>, msg: IncomingAm) -> Result<(), &'static str> {
    let h = PutHeader::decode(msg.header()).ok_or("bad_header")?;
    // The session is the one bound to the endpoint the message came in on, whatever it claims.
    let session = msg.sender().and_then(|ep| state.sessions.by_endpoint(ep)).ok_or("unbound_endpoint")?;
    session.touch();
    let loc = state.index().begin_receive(h.put_id, session.id, h.index, Instant::now()).map_err(|e| {
        tracing::debug!(put = h.put_id, index = h.index, error = %e, "AM_PUT rejected");
        "no_reservation"
    })?;
    if msg.len() as u64 != loc.len {
        state.index().end_receive(h.put_id, h.index, false);
        return Err("wrong_size");
    }
    let slice = match state.pools.region(loc.tier).map(|p| p.slice(loc.offset as usize, loc.len as usize)) {
        Some(Ok(s)) => s,
        _ => {
            state.index().end_receive(h.put_id, h.index, false);
            return Err("bad_slot");
        }
    };
    if loc.tier == Tier::Gpu && !msg.is_rendezvous() {
        // Eager data is already here in host memory: copy it to the GPU slot.
        let ok = match (msg.into_eager_bytes(), &state.cuda) {
            (Ok(bytes), Some(cuda)) => {
                let dst = state.pools.base(Tier::Gpu) + loc.offset;
                // SAFETY: the slot is reserved for this receive (begin_receive) and `bytes` holds
                // exactly loc.len bytes (checked above).
                unsafe { cuda.copy_htod(dst, bytes.as_ptr(), bytes.len()) }.is_ok()
            }
            _ => false,
        };
        state.index().end_receive(h.put_id, h.index, ok);
        state.arrivals.notify_waiters();
        return if ok { Ok(()) } else { Err("gpu_copy") };
    }
    let state = state.clone();
    tokio::spawn(async move {
        let r = if loc.tier == Tier::Gpu {
            receive_via_bounce(&state, msg, &loc).await
        } else {
            msg.recv_into(&slice, state.cfg.transfer_timeout).await.map_err(|e| e.to_string())
        };
        if let Err(e) = &r {
            tracing::warn!(put = h.put_id, index = h.index, error = %e, "AM_PUT data did not arrive");
        }
        state.index().end_receive(h.put_id, h.index, r.is_ok());
        state.arrivals.notify_waiters();
    });
    Ok(())
}

/// Receives a rendezvous AM_PUT bound for a GPU-tier slot through a host bounce buffer, then
/// copies it up. A client whose UCX has no CUDA transport (tcp alone: another node, or a
/// forced remote path) cannot send into device memory: UCX finds no protocol for "rndv_send
/// from host memory to cuda" and the endpoint fails (found by `prefixctl doctor` on 2x H200).
/// The get path bounces the same way (`Service::fetch_source`).
async fn receive_via_bounce(state: &State, msg: IncomingAm, loc: &prefixd_cache::Location) -> Result<(), String> {
    let cuda = state.cuda.as_ref().ok_or("a GPU-tier slot without CUDA")?;
    let len = loc.len as usize;
    let b = state.bounce.take(&state.ctx, len).map_err(|e| e.to_string())?;
    let r = async {
        let slice = b.slice(0, len).map_err(|e| e.to_string())?;
        msg.recv_into(&slice, state.cfg.transfer_timeout).await.map_err(|e| e.to_string())?;
        let dst = state.pools.base(Tier::Gpu) + loc.offset;
        // SAFETY: the slot is reserved for this receive (begin_receive); the bounce buffer holds
        // the `len` bytes just received and nothing else uses it until it is given back below.
        unsafe { cuda.copy_htod(dst, b.as_ptr(), len) }.map_err(|e| format!("copy to the GPU slot: {e}"))
    }
    .await;
    // recv_into returns only once UCX has let go of the buffer (or the endpoint is closed).
    state.bounce.give(b);
    r
}
