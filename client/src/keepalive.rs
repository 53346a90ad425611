//! Keeps a quiet session open.
//!
//! The server closes a session that makes no call for its idle window (`session_idle_ms`, 2
//! minutes by default): that is how it forgets clients that died without disconnecting. Quiet
//! clients are not dead ones, though. A decode worker on the same node makes no call at all (its
//! loads are device copies from the mapped pools), and an engine between bursts makes none for as
//! long as the lull lasts; the first call after a closed session pays a reconnect. The sixth GPU
//! run's sidecar log showed it: every decode worker's session closed two minutes into the run
//! (BENCHMARKS §5). So each client sends a KeepAlive four times per idle window, whatever else
//! it is doing, until it is dropped or disconnects, or the server no longer knows the session.

use crate::access::Grpc;
use prefixd_proto::v1::KeepAliveRequest;
use std::time::Duration;

/// How often to send one: a quarter of the server's window, so that a late or lost one is not
/// fatal.
fn period(session_idle_ms: u64) -> Duration {
    (Duration::from_millis(session_idle_ms) / 4).max(Duration::from_millis(100))
}

/// The running keep-alive of one session; stops when dropped.
#[derive(Debug)]
pub(crate) struct KeepAlive(tokio::task::AbortHandle);

impl KeepAlive {
    /// Starts sending KeepAlive for `token` four times per `session_idle_ms`, on the current
    /// tokio runtime. None from a server that announces no window: one older than KeepAlive.
    pub(crate) fn start(grpc: Grpc, token: Vec<u8>, session_idle_ms: u64, session_id: u64) -> Option<KeepAlive> {
        if session_idle_ms == 0 {
            return None;
        }
        let every = period(session_idle_ms);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match grpc.clone().keep_alive(KeepAliveRequest { session_token: token.clone() }).await {
                    Ok(_) => {}
                    // The session is gone (closed, or the server restarted): nothing left to
                    // keep. The next call finds out and, with `Reconnecting`, connects again.
                    Err(s) if s.code() == tonic::Code::NotFound => {
                        tracing::debug!(session = format_args!("{session_id:016x}"), "session gone; keep-alive stops");
                        return;
                    }
                    // The server is unreachable or busy: try again at the next tick.
                    Err(s) => {
                        tracing::debug!(session = format_args!("{session_id:016x}"), error = %s, "keep-alive failed");
                    }
                }
            }
        });
        Some(KeepAlive(task.abort_handle()))
    }

    pub(crate) fn stop(&self) {
        self.0.abort();
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_period_is_a_quarter_of_the_servers_window() {
        assert_eq!(period(120_000), Duration::from_secs(30));
        assert_eq!(period(10_000), Duration::from_millis(2_500));
    }
}
