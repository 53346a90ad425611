//! Client sessions and the data endpoints bound to them.
//!
//! A session is born in `Connect` with two names: a random 64-bit id for logs and metrics, and a
//! 128-bit random token, the credential every later call carries. It is *unbound* until the
//! client connects a UCX endpoint to the data listener and sends `AM_HELLO` with the token over
//! it; that endpoint is then the session's, and data-plane messages are held to the session of
//! the endpoint they arrive on (a header never names a session). Endpoints that no session
//! claims, and sessions that never bind, are closed after [`BIND_TIMEOUT`].
//!
//! ```text
//!  Connect ──► Session (unbound) ──AM_HELLO(token) on endpoint E──► Session (bound to E)
//!  listener ──► endpoint E (unclaimed) ───────────────┘
//! ```

use prefixd_proto::dataplane::SessionToken;
use prefixd_proto::v1::DataPath;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use ucx_bindings::{Endpoint, EndpointId, ErrorMode};

/// How long an accepted endpoint may wait for its AM_HELLO, and a session for its endpoint.
pub const BIND_TIMEOUT: Duration = Duration::from_secs(10);

/// Client ids a client's UCX worker sends with its connection request, so the server accepts the
/// endpoint in the error mode the client uses (both ends must agree, and the choice is made
/// before the session is known).
pub const CLIENT_ID_RMA: u64 = 1;
pub const CLIENT_ID_AM: u64 = 2;

/// The error mode for each data path: same-host RMA sessions use UCX's default mode, in which
/// shared-memory RMA is zero-copy (cma); peer mode would make UCX emulate it with active
/// messages. The server never sends on such an endpoint, so a dying client cannot hurt it.
pub fn error_mode(path: DataPath) -> ErrorMode {
    if path == DataPath::Rma {
        ErrorMode::None
    } else {
        ErrorMode::Peer
    }
}

/// Fills `buf` from the kernel's CSPRNG. Never falls back to anything weaker.
pub fn random_fill(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled rest of `buf`, which we own.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

#[derive(Debug)]
struct Bound {
    ep: Endpoint,
    /// The UCX transport the endpoint uses for data (metric label), once known.
    transport: OnceLock<String>,
}

/// One connected client.
#[derive(Debug)]
pub struct Session {
    /// For logs and metrics only; not a credential.
    pub id: u64,
    token: SessionToken,
    pub name: String,
    /// The address its gRPC connection came from (the per-peer session limit counts by it).
    pub peer: Option<std::net::IpAddr>,
    pub path: DataPath,
    /// Whether the client announced this server's host (its boot id): active-message bytes of a
    /// same-host session over tcp are a fallback worth an alert; a remote one's are not.
    pub same_host: bool,
    created: Instant,
    bound: OnceLock<Bound>,
    last_seen: Mutex<Instant>,
    /// Calls of this session in flight: a session is never reaped for idleness during one.
    busy: std::sync::atomic::AtomicUsize,
    /// What the token it connected with grants: checks the requests on its data endpoint.
    pub access: crate::auth::Access,
}

/// A session held by a call in flight (see [`Session::enter`]).
#[derive(Debug)]
pub struct InCall(Arc<Session>);

impl std::ops::Deref for InCall {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.0
    }
}

impl Drop for InCall {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Session {
    /// Marks a call of this session in flight until the returned guard drops.
    pub fn enter(self: &Arc<Self>) -> InCall {
        self.busy.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.touch();
        InCall(self.clone())
    }

    fn in_call(&self) -> bool {
        self.busy.load(std::sync::atomic::Ordering::Acquire) > 0
    }

    pub fn touch(&self) {
        *self.last_seen.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    pub fn idle_for(&self) -> Duration {
        self.last_seen.lock().unwrap_or_else(|p| p.into_inner()).elapsed()
    }

    /// The session's data endpoint, once the client has bound it.
    pub fn ep(&self) -> Option<&Endpoint> {
        self.bound.get().map(|b| &b.ep)
    }

    /// The UCX transport the session's endpoint uses for data ("unknown" until measured).
    pub fn transport(&self) -> &str {
        self.bound.get().and_then(|b| b.transport.get()).map_or("unknown", |s| s.as_str())
    }

    pub fn set_transport(&self, t: String) {
        if let Some(b) = self.bound.get() {
            let _ = b.transport.set(t);
        }
    }

    /// The transport label for bytes of `tier` on this session: RMA clients reach the GPU pool
    /// by cuda_ipc and the host pool through its shared mapping when it was offered (else by the
    /// endpoint's lane); active-message sessions use their endpoint's lane.
    pub fn transport_for(&self, tier: prefixd_cache::Tier, host_pool_shared: bool) -> &str {
        match (self.path, tier) {
            (DataPath::Rma, prefixd_cache::Tier::Gpu) => "cuda_ipc",
            (DataPath::Rma, prefixd_cache::Tier::Host) if host_pool_shared => "shm",
            _ => self.transport(),
        }
    }

    /// The data path label of metrics: "rma" (same host, direct), "am_local" (same host,
    /// active messages) or "am" (another host).
    pub fn path_label(&self) -> &'static str {
        match (self.path, self.same_host) {
            (DataPath::Rma, _) => "rma",
            (_, true) => "am_local",
            (_, false) => "am",
        }
    }
}

/// Why an AM_HELLO did not bind (a bounded set: metric labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindError {
    /// The endpoint is not an unclaimed one from the listener (already bound, or closed).
    UnknownEndpoint,
    UnknownSession,
    AlreadyBound,
    /// The endpoint's error mode is not the session's data path's.
    WrongMode,
}

impl BindError {
    pub fn label(self) -> &'static str {
        match self {
            BindError::UnknownEndpoint => "hello_unknown_endpoint",
            BindError::UnknownSession => "hello_unknown_session",
            BindError::AlreadyBound => "hello_already_bound",
            BindError::WrongMode => "hello_wrong_mode",
        }
    }
}

#[derive(Debug)]
struct Unclaimed {
    ep: Endpoint,
    mode: ErrorMode,
    since: Instant,
}

/// Why a session was not made.
#[derive(Debug)]
pub enum CreateError {
    /// A configured limit (`max_sessions`, `max_sessions_per_peer`), with a message naming it.
    Limit(&'static str, String),
    NoRandomness(std::io::Error),
}

/// Every session, by token and by bound endpoint, and the endpoints waiting to be claimed.
#[derive(Debug, Default)]
pub struct Sessions {
    by_token: dashmap::DashMap<SessionToken, Arc<Session>>,
    by_ep: dashmap::DashMap<EndpointId, Arc<Session>>,
    unclaimed: dashmap::DashMap<EndpointId, Unclaimed>,
    per_peer: dashmap::DashMap<std::net::IpAddr, usize>,
    max_total: usize,
    max_per_peer: usize,
}

impl Sessions {
    pub fn new(max_total: usize, max_per_peer: usize) -> Sessions {
        Sessions { max_total, max_per_peer, ..Sessions::default() }
    }

    /// A new, unbound session with fresh random id and token, within the session limits.
    pub fn create(
        &self,
        name: String,
        path: DataPath,
        peer: Option<std::net::IpAddr>,
        same_host: bool,
        access: crate::auth::Access,
    ) -> Result<Arc<Session>, CreateError> {
        if self.by_token.len() >= self.max_total {
            return Err(CreateError::Limit(
                "max_sessions",
                format!("{} sessions are open; the limit (max_sessions) is {}", self.by_token.len(), self.max_total),
            ));
        }
        if let Some(ip) = peer {
            let mut n = self.per_peer.entry(ip).or_default();
            if *n >= self.max_per_peer {
                return Err(CreateError::Limit(
                    "max_sessions_per_peer",
                    format!(
                        "{ip} has {} sessions open; the limit (max_sessions_per_peer) is {}",
                        *n, self.max_per_peer
                    ),
                ));
            }
            *n += 1;
        }
        let made = self.make(name, path, peer, same_host, access);
        if made.is_err() {
            self.forget_peer(peer);
        }
        made.map_err(CreateError::NoRandomness)
    }

    fn forget_peer(&self, peer: Option<std::net::IpAddr>) {
        if let Some(ip) = peer {
            let gone = match self.per_peer.get_mut(&ip) {
                Some(mut n) => {
                    *n = n.saturating_sub(1);
                    *n == 0
                }
                None => false,
            };
            if gone {
                self.per_peer.remove_if(&ip, |_, n| *n == 0);
            }
        }
    }

    fn make(
        &self,
        name: String,
        path: DataPath,
        peer: Option<std::net::IpAddr>,
        same_host: bool,
        access: crate::auth::Access,
    ) -> std::io::Result<Arc<Session>> {
        loop {
            let mut token = [0u8; 16];
            random_fill(&mut token)?;
            let mut id = [0u8; 8];
            random_fill(&mut id)?;
            let id = u64::from_le_bytes(id);
            if id == 0 || self.by_token.contains_key(&token) {
                continue;
            }
            let now = Instant::now();
            let s = Arc::new(Session {
                id,
                token,
                name,
                peer,
                path,
                same_host,
                created: now,
                bound: OnceLock::new(),
                last_seen: Mutex::new(now),
                busy: Default::default(),
                access: access.clone(),
            });
            self.by_token.insert(token, s.clone());
            return Ok(s);
        }
    }

    pub fn token_of(s: &Session) -> SessionToken {
        s.token
    }

    pub fn get(&self, token: &SessionToken) -> Option<Arc<Session>> {
        self.by_token.get(token).map(|s| s.clone())
    }

    /// The session whose data endpoint is `ep`.
    pub fn by_endpoint(&self, ep: EndpointId) -> Option<Arc<Session>> {
        self.by_ep.get(&ep).map(|s| s.clone())
    }

    /// The name of the session with this id (for logs), if it is open.
    pub fn name_of(&self, id: u64) -> Option<String> {
        self.by_token.iter().find(|s| s.id == id).map(|s| s.name.clone())
    }

    pub fn len(&self) -> usize {
        self.by_token.len()
    }

    pub fn unclaimed_len(&self) -> usize {
        self.unclaimed.len()
    }

    /// Files an endpoint accepted from the listener until an AM_HELLO claims it.
    pub fn add_unclaimed(&self, ep: Endpoint, mode: ErrorMode) {
        self.unclaimed.insert(ep.id(), Unclaimed { ep, mode, since: Instant::now() });
    }

    /// Binds endpoint `ep` (unclaimed) to the session of `token`. On failure the endpoint is
    /// dropped, which closes it.
    pub fn bind(&self, token: &SessionToken, ep: EndpointId) -> Result<Arc<Session>, BindError> {
        let (_, u) = self.unclaimed.remove(&ep).ok_or(BindError::UnknownEndpoint)?;
        let s = self.get(token).ok_or(BindError::UnknownSession)?;
        if error_mode(s.path) != u.mode {
            return Err(BindError::WrongMode);
        }
        s.bound.set(Bound { ep: u.ep, transport: OnceLock::new() }).map_err(|_| BindError::AlreadyBound)?;
        self.by_ep.insert(ep, s.clone());
        s.touch();
        Ok(s)
    }

    /// Removes a session (its endpoint closes once no transfer holds it).
    pub fn remove(&self, token: &SessionToken) -> Option<Arc<Session>> {
        let (_, s) = self.by_token.remove(token)?;
        if let Some(ep) = s.ep() {
            self.by_ep.remove(&ep.id());
        }
        self.forget_peer(s.peer);
        Some(s)
    }

    /// Closes endpoints nobody claimed within [`BIND_TIMEOUT`]; returns the sessions to drop:
    /// those never bound within it, and those idle for `idle`.
    pub fn expired(&self, now: Instant, idle: Duration) -> Vec<Arc<Session>> {
        self.unclaimed.retain(|_, u| now.saturating_duration_since(u.since) < BIND_TIMEOUT);
        self.by_token
            .iter()
            .filter(|s| {
                let unbound = s.bound.get().is_none() && now.saturating_duration_since(s.created) >= BIND_TIMEOUT;
                !s.in_call() && (unbound || s.idle_for() > idle)
            })
            .map(|s| s.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_ids_are_random_and_distinct() {
        let s = Sessions::new(10, 10);
        let a = s.create("a".into(), DataPath::ActiveMessage, None, false, Default::default()).unwrap();
        let b = s.create("b".into(), DataPath::ActiveMessage, None, false, Default::default()).unwrap();
        assert_ne!(Sessions::token_of(&a), Sessions::token_of(&b));
        assert_ne!(a.id, b.id);
        // The id is not derived from the token, and neither is a counter.
        assert_ne!(&Sessions::token_of(&a)[..8], &a.id.to_le_bytes()[..]);
        assert_ne!(b.id.wrapping_sub(a.id), 1);
        assert!(s.get(&Sessions::token_of(&a)).is_some_and(|x| x.id == a.id));
        assert!(s.get(&[0; 16]).is_none());
    }

    #[test]
    fn unbound_sessions_expire_after_the_bind_timeout() {
        let s = Sessions::new(10, 10);
        let a = s.create("a".into(), DataPath::Rma, None, false, Default::default()).unwrap();
        assert!(s.expired(Instant::now(), Duration::from_secs(3600)).is_empty());
        let later = Instant::now() + BIND_TIMEOUT + Duration::from_millis(1);
        let gone = s.expired(later, Duration::from_secs(3600));
        assert_eq!(gone.iter().map(|x| x.id).collect::<Vec<_>>(), vec![a.id]);
    }

    #[test]
    fn a_session_in_a_call_is_not_reaped() {
        let s = Sessions::new(10, 10);
        let a = s.create("a".into(), DataPath::Rma, None, false, Default::default()).unwrap();
        let later = Instant::now() + BIND_TIMEOUT + Duration::from_secs(1);
        let call = a.enter();
        assert!(s.expired(later, Duration::ZERO).is_empty(), "busy: kept");
        drop(call);
        assert_eq!(s.expired(later, Duration::ZERO).len(), 1);
    }

    #[test]
    fn session_limits_total_and_per_peer() {
        let s = Sessions::new(3, 2);
        let ip: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let other: std::net::IpAddr = "10.0.0.2".parse().unwrap();
        let a = s.create("a".into(), DataPath::ActiveMessage, Some(ip), false, Default::default()).unwrap();
        s.create("b".into(), DataPath::ActiveMessage, Some(ip), false, Default::default()).unwrap();
        assert!(matches!(
            s.create("c".into(), DataPath::ActiveMessage, Some(ip), false, Default::default()),
            Err(CreateError::Limit("max_sessions_per_peer", _))
        ));
        s.create("d".into(), DataPath::ActiveMessage, Some(other), false, Default::default()).unwrap();
        assert!(matches!(
            s.create("e".into(), DataPath::ActiveMessage, Some(other), false, Default::default()),
            Err(CreateError::Limit("max_sessions", _))
        ));
        s.remove(&Sessions::token_of(&a));
        s.create("f".into(), DataPath::ActiveMessage, Some(ip), false, Default::default()).unwrap();
    }
}
