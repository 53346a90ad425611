//! Active messages answered where they arrive: the progress thread hands each arrival to a
//! service, which either answers it at once (the messages to send back on the same endpoint,
//! posted right there) or passes it on to an async receiver, as [`crate::Worker::listen_am`]
//! would have. A request answered in place costs no thread hand-off at all on this side; on a
//! busy small machine a request/answer exchange is mostly hand-offs.
//!
//! The service runs on the progress thread: it must be quick and must never block (no waiting
//! for other threads, no device copies). What does not fit, it passes on.

use super::command::ArrivedData;
use super::EndpointId;
use crate::error::Result;
use crate::worker::command::AmData;
use std::time::Duration;

/// One arrival, as a service sees it.
#[derive(Debug)]
pub struct Arriving<'a> {
    /// The endpoint it came in on (see [`crate::IncomingAm::sender`]).
    pub sender: Option<EndpointId>,
    pub header: &'a [u8],
    /// Its data when it came eagerly; `None` when it waits at the sender (rendezvous).
    pub data: Option<&'a [u8]>,
    /// Length of its data.
    pub length: usize,
}

impl<'a> Arriving<'a> {
    pub(crate) fn new(sender: Option<EndpointId>, header: &'a [u8], length: usize, data: &'a ArrivedData) -> Self {
        let data = match data {
            ArrivedData::Eager(b) => Some(b.as_slice()),
            ArrivedData::Rndv { .. } => None,
        };
        Arriving { sender, header, data, length }
    }
}

/// A message to send back on the endpoint the request came in on.
pub struct Answer {
    pub id: u16,
    pub header: Vec<u8>,
    pub data: AmData,
    pub timeout: Duration,
    /// Called on the progress thread once UCX is done with `data`, with the send's outcome.
    pub done: Option<Box<dyn FnOnce(Result<()>) + Send>>,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer").field("id", &self.id).field("header_len", &self.header.len()).finish()
    }
}

/// What a service made of an arrival.
#[derive(Debug)]
pub enum Served {
    /// Handled: these go back on the arrival's endpoint, in this order (none: dropped).
    Answered(Vec<Answer>),
    /// Not for here: it goes to the async receiver [`crate::Worker::serve_am`] returned.
    Pass,
}

/// Answers active messages of one id on the progress thread (see [`crate::Worker::serve_am`]).
pub trait AmService: Send + Sync + std::fmt::Debug + 'static {
    fn serve(&self, arriving: Arriving<'_>) -> Served;
}
