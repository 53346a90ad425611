//! Active messages received where they arrive: the progress thread reads a key and an index from
//! each message's header, finds the buffers a caller set out for that key, and starts the receive
//! into the indexed one at once. The caller learns only of completions (and of notices: small
//! messages keyed the same way that carry no buffer's data, such as an answer's end). Compared with handing
//! every arrival to an async task that then asks the progress thread to receive it, this saves
//! two thread hand-offs per message (measured to matter on busy small machines, where a get's
//! cost is mostly context switches).

use super::command::ArrivedData;
use crate::error::{Error, Result};
use crate::memory::RegionSlice;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Reads (key, slot) from a message header; `None` drops the message.
pub type RouteKey = fn(&[u8]) -> Option<(u64, Slot)>;

/// Where a routed message goes within its key's route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Into the buffer of this index.
    Index(usize),
    /// To the caller as it is: header and (eager) data.
    Notice,
}

/// One arrival's outcome, to await: received, or why not.
pub type Routed = oneshot::Receiver<Result<()>>;

/// What a route's caller hears of, in arrival order.
#[derive(Debug)]
pub enum RouteEvent {
    /// A message for one of its buffers: its receive has started (or settled).
    Data(Routed),
    /// A notice: its header, and its data when it came eagerly (empty otherwise).
    Notice { header: Vec<u8>, data: Vec<u8> },
}

pub(crate) struct Route {
    dests: Vec<Option<RegionSlice>>,
    timeout: Duration,
    tx: mpsc::UnboundedSender<RouteEvent>,
}

pub(crate) struct RouteTable {
    key: RouteKey,
    routes: Mutex<HashMap<u64, Route>>,
}

impl std::fmt::Debug for RouteTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouteTable")
    }
}

/// What the progress thread does with one arrival.
pub(crate) enum Action {
    /// No route (a late message of a finished call, or a bad header): release it.
    Drop,
    /// Receive it into `dest` and send the outcome on `reply`.
    Receive { dest: RegionSlice, timeout: Duration, reply: oneshot::Sender<Result<()>> },
    /// Already settled (a duplicate index, a wrong size): nothing to receive.
    Settled,
}

impl RouteTable {
    pub(crate) fn new(key: RouteKey) -> Self {
        RouteTable { key, routes: Mutex::new(HashMap::new()) }
    }

    /// Decides where an arrival goes (called on the progress thread).
    pub(crate) fn route(&self, header: &[u8], length: usize, data: &ArrivedData) -> Action {
        let Some((key, slot)) = (self.key)(header) else { return Action::Drop };
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let Some(route) = routes.get_mut(&key) else { return Action::Drop };
        let index = match slot {
            Slot::Index(i) => i,
            Slot::Notice => {
                let data = match data {
                    ArrivedData::Eager(b) => b.clone(),
                    ArrivedData::Rndv { .. } => Vec::new(),
                };
                let _ = route.tx.send(RouteEvent::Notice { header: header.to_vec(), data });
                return Action::Drop;
            }
        };
        let (reply, rx) = oneshot::channel();
        if route.tx.send(RouteEvent::Data(rx)).is_err() {
            return Action::Drop;
        }
        let dest = match route.dests.get_mut(index).map(Option::take) {
            Some(Some(d)) => d,
            _ => {
                let _ = reply.send(Err(Error::invalid(format!("unexpected message index {index}"))));
                return Action::Settled;
            }
        };
        if dest.len() != length {
            let _ = reply.send(Err(Error::invalid(format!(
                "destination of {} bytes for a message of {length} bytes",
                dest.len()
            ))));
            return Action::Settled;
        }
        if let ArrivedData::Eager(bytes) = data {
            let _ = reply.send(dest.region().write(dest.offset(), bytes));
            return Action::Settled;
        }
        Action::Receive { dest, timeout: route.timeout, reply }
    }
}

/// The routes of one active-message id (see [`crate::Worker::route_am`]).
#[derive(Clone)]
pub struct AmRoutes {
    pub(crate) table: Arc<RouteTable>,
}

impl std::fmt::Debug for AmRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AmRoutes")
    }
}

impl AmRoutes {
    /// Sets out `dests` for the messages keyed `key` (message index i lands in `dests[i]`, which
    /// must be exactly its size). Each arrival is announced on the returned receiver with its
    /// outcome to await (notices, as they are); a second message for one index, or one of
    /// another size, ends in an error there. Call [`AmRoutes::forget`] when done (later
    /// arrivals are dropped).
    pub fn expect(&self, key: u64, dests: Vec<RegionSlice>, timeout: Duration) -> mpsc::UnboundedReceiver<RouteEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        let route = Route { dests: dests.into_iter().map(Some).collect(), timeout, tx };
        self.table.routes.lock().unwrap_or_else(|p| p.into_inner()).insert(key, route);
        rx
    }

    pub fn forget(&self, key: u64) {
        self.table.routes.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
    }
}
