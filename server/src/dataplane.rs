//! The server's half of the active-message data path: chunks of puts from clients that get no
//! remote key arrive as AM_PUT messages; the server picks the buffer (the reserved slot) and
//! UCX pulls the data into it by rendezvous. Anything that does not match a live reservation of
//! the sending session, byte for byte in size, is dropped (and counted), never written.

use crate::shutdown::CancelToken;
use crate::state::State;
use prefixd_cache::Tier;
use prefixd_proto::dataplane::{PutHeader, AM_PUT};
use std::sync::Arc;
use std::time::Instant;
use ucx_bindings::IncomingAm;

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

/// Checks one message and starts receiving it into its slot.
fn accept(state: &Arc<State>, msg: IncomingAm) -> Result<(), &'static str> {
    let h = PutHeader::decode(msg.header()).ok_or("bad_header")?;
    let session = state.sessions.get(&h.session_id).map(|s| s.clone()).ok_or("unknown_session")?;
    session.touch();
    let loc = state.index().begin_receive(h.put_id, h.session_id, h.index, Instant::now()).map_err(|e| {
        tracing::debug!(put = h.put_id, index = h.index, error = %e, "AM_PUT rejected");
        "no_reservation"
    })?;
    if msg.len() as u64 != loc.len {
        state.index().end_receive(h.put_id, h.index, false);
        return Err("wrong_size");
    }
    let slice = match state.pool(loc.tier).map(|p| p.slice(loc.offset as usize, loc.len as usize)) {
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
                let dst = state.pool_base(Tier::Gpu) + loc.offset;
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
        let r = msg.recv_into(&slice, state.cfg.transfer_timeout).await;
        if let Err(e) = &r {
            tracing::warn!(put = h.put_id, index = h.index, error = %e, "AM_PUT data did not arrive");
        }
        state.index().end_receive(h.put_id, h.index, r.is_ok());
        state.arrivals.notify_waiters();
    });
    Ok(())
}
