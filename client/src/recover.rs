//! A client that survives its server: after a restart, or when the server reaped its session,
//! the next call that finds the session gone connects again and is tried once more.
//!
//! 4e6c6e7's client raised "unknown session" on every call forever after either. Retrying is
//! safe for every call a client makes: puts are idempotent by key (a chunk already stored is
//! skipped), and reads lease anew.

use crate::{Client, ClientOptions, Result};
use std::future::Future;
use std::sync::Arc;

/// A [`Client`] that reconnects by itself when its session is lost ([`crate::Error::is_session_lost`]).
#[derive(Debug)]
pub struct Reconnecting {
    endpoint: String,
    opts: ClientOptions,
    current: std::sync::Mutex<Arc<Client>>,
    /// Serializes reconnects (one new session for many calls that found the old one lost).
    reconnecting: tokio::sync::Mutex<()>,
    /// Set by `close`: a call still in flight that finds its session gone must not open a new
    /// one (it would hold whatever it was granted with nobody left to give it back).
    closed: std::sync::atomic::AtomicBool,
}

impl Reconnecting {
    pub async fn connect(endpoint: &str, opts: ClientOptions) -> Result<Reconnecting> {
        let client = Client::connect_with(endpoint, opts.clone()).await?;
        Ok(Reconnecting {
            endpoint: endpoint.to_owned(),
            opts,
            current: std::sync::Mutex::new(Arc::new(client)),
            reconnecting: tokio::sync::Mutex::new(()),
            closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The session in use now.
    pub fn current(&self) -> Arc<Client> {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Marks the client closed: from now on a lost session stays lost. (The caller then ends the
    /// current session.)
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Runs `f` on the current session; if the session turns out lost (and the client is not
    /// closed), connects again and runs `f` once more on the new one. Other errors come back as
    /// they are.
    pub async fn run<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn(Arc<Client>) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let client = self.current();
        match f(client.clone()).await {
            Err(e) if e.is_session_lost() && !self.closed.load(std::sync::atomic::Ordering::SeqCst) => {
                tracing::info!(endpoint = %self.endpoint, error = %e, "session lost; connecting again");
                let fresh = self.reconnect(&client).await?;
                f(fresh).await
            }
            other => other,
        }
    }

    /// Replaces `stale` with a new session (unless another call already did).
    pub async fn reconnect(&self, stale: &Arc<Client>) -> Result<Arc<Client>> {
        let _one = self.reconnecting.lock().await;
        let now = self.current();
        if !Arc::ptr_eq(&now, stale) {
            return Ok(now);
        }
        let fresh = Arc::new(Client::connect_with(&self.endpoint, self.opts.clone()).await?);
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = fresh.clone();
        Ok(fresh)
    }
}
