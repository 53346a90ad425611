//! Client errors as Python exceptions: bad input is `ValueError` (nothing was sent), anything a
//! retry may fix is `prefixd.RetryableError`, the rest `prefixd.PrefixdError`.

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::PyErr;

pyo3::create_exception!(prefixd, PrefixdError, PyRuntimeError, "An error from prefixd or its data path.");
pyo3::create_exception!(
    prefixd,
    RetryableError,
    PrefixdError,
    "An error the same call may not meet later: the server is unreachable, busy or draining, \
     a lease or reservation ran out, or a transfer timed out."
);

pyo3::create_exception!(
    prefixd,
    SessionLostError,
    RetryableError,
    "The session is gone (the server is down or restarted, the session was reaped, or its data \
     endpoint failed): this client will not recover, a new one may."
);

pyo3::create_exception!(
    prefixd,
    AccessDeniedError,
    PrefixdError,
    "The server checks callers and refused this one: no token or an unknown one \
     (UNAUTHENTICATED), or the token has no grant for this call on this namespace \
     (PERMISSION_DENIED). Nothing was changed."
);

pub(crate) fn to_py(e: prefixd_client::Error) -> PyErr {
    match e {
        e if e.is_session_lost() => SessionLostError::new_err(e.to_string()),
        e if e.is_access_denied() => AccessDeniedError::new_err(e.to_string()),
        prefixd_client::Error::InvalidArgument(m) => PyValueError::new_err(m),
        prefixd_client::Error::Transfer(e @ prefixd_client::ucx_bindings::Error::InvalidArgument(_)) => {
            PyValueError::new_err(e.to_string())
        }
        e if e.is_retryable() => RetryableError::new_err(e.to_string()),
        e => PrefixdError::new_err(e.to_string()),
    }
}
