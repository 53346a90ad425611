//! The index's error type: a bounded set of kinds (safe as metric labels) with a message for
//! the caller. The server maps each kind to one gRPC code in one place.

pub type Result<T, E = IndexError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    InvalidArgument,
    NotFound,
    PermissionDenied,
    FailedPrecondition,
    ResourceExhausted,
    Expired,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::NotFound => "not_found",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::FailedPrecondition => "failed_precondition",
            ErrorKind::ResourceExhausted => "resource_exhausted",
            ErrorKind::Expired => "expired",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct IndexError {
    pub kind: ErrorKind,
    pub message: String,
    /// The configured limit that refused the call (a metric label), if one did.
    pub limit: Option<&'static str>,
}

impl IndexError {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        IndexError { kind, message: message.into(), limit: None }
    }
    /// RESOURCE_EXHAUSTED because the configured limit `limit` would be passed.
    pub fn limit(limit: &'static str, m: impl Into<String>) -> Self {
        IndexError { kind: ErrorKind::ResourceExhausted, message: m.into(), limit: Some(limit) }
    }
    pub fn invalid(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, m)
    }
    pub fn denied(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::PermissionDenied, m)
    }
    pub fn precondition(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::FailedPrecondition, m)
    }
    pub fn exhausted(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::ResourceExhausted, m)
    }
    pub fn expired(m: impl Into<String>) -> Self {
        Self::new(ErrorKind::Expired, m)
    }
}
