//! The crate's one error type. Each variant says where the failure came from and
//! [`Error::is_retryable`] says whether trying again can help, so callers decide from the type.

use crate::result::Status;
use std::time::Duration;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// UCX returned an error code for this operation.
    #[error("{op}: {status}")]
    Ucx { op: &'static str, status: Status },
    /// The operation did not finish before its deadline. Its endpoint was force-closed so the
    /// operation cannot complete later into memory the caller thinks is idle.
    #[error("{op} timed out after {after:?}")]
    TimedOut { op: &'static str, after: Duration },
    /// The endpoint failed (peer died, connection reset) or was closed.
    #[error("{op}: endpoint closed: {reason}")]
    EndpointClosed { op: &'static str, reason: String },
    /// The caller passed something that cannot work; nothing was sent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The worker's progress thread has stopped (the `Worker` was dropped).
    #[error("the UCX worker has stopped")]
    WorkerStopped,
}

impl Error {
    pub(crate) fn ucx(op: &'static str, status: Status) -> Self {
        Error::Ucx { op, status }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// Whether the same call may succeed if tried again (on a new endpoint where it says so).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::TimedOut { .. } | Error::EndpointClosed { .. } => true,
            Error::Ucx { status, .. } => {
                status.is_peer_failure() || *status == Status::ERR_BUSY || *status == Status::ERR_TIMED_OUT
            }
            Error::InvalidArgument(_) | Error::WorkerStopped => false,
        }
    }

    /// A short, bounded label for metrics (never includes free text).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Ucx { .. } => "ucx",
            Error::TimedOut { .. } => "timeout",
            Error::EndpointClosed { .. } => "endpoint_closed",
            Error::InvalidArgument(_) => "invalid_argument",
            Error::WorkerStopped => "worker_stopped",
        }
    }
}
