//! The one place where internal errors become gRPC statuses. Messages say what was wrong with
//! the request; codes say whether retrying can help (UNAVAILABLE, DEADLINE_EXCEEDED,
//! RESOURCE_EXHAUSTED: maybe later; INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED: no).

use prefixd_cache::{ErrorKind, IndexError};
use tonic::Status;

pub fn index_status(e: IndexError) -> Status {
    match e.kind {
        ErrorKind::InvalidArgument => Status::invalid_argument(e.message),
        ErrorKind::NotFound => Status::not_found(e.message),
        ErrorKind::PermissionDenied => Status::permission_denied(e.message),
        ErrorKind::FailedPrecondition => Status::failed_precondition(e.message),
        ErrorKind::ResourceExhausted => Status::resource_exhausted(e.message),
        ErrorKind::Expired => Status::deadline_exceeded(e.message),
    }
}

pub fn ucx_status(e: ucx_bindings::Error) -> Status {
    match &e {
        ucx_bindings::Error::TimedOut { .. } => Status::deadline_exceeded(format!("transfer: {e}")),
        ucx_bindings::Error::InvalidArgument(_) => Status::invalid_argument(format!("transfer: {e}")),
        _ => Status::unavailable(format!("transfer: {e}")),
    }
}
