//! The thin layer: UCX status codes as a typed value, the `UCS_PTR_*` macros, and the few calls
//! whose C form is a macro or a static inline function. Still `unsafe` where the C call is.

use crate::sys;
use std::ffi::CStr;
use std::fmt;
use std::ptr::NonNull;

/// A UCX status code (`ucs_status_t`). `Status::OK` is success; negative values are errors.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status(pub i8);

impl Status {
    pub const OK: Status = Status(sys::ucs_status_t::UCS_OK.0);
    pub const IN_PROGRESS: Status = Status(sys::ucs_status_t::UCS_INPROGRESS.0);
    pub const ERR_BUSY: Status = Status(sys::ucs_status_t::UCS_ERR_BUSY.0);
    pub const ERR_CANCELED: Status = Status(sys::ucs_status_t::UCS_ERR_CANCELED.0);
    pub const ERR_TIMED_OUT: Status = Status(sys::ucs_status_t::UCS_ERR_TIMED_OUT.0);
    pub const ERR_UNREACHABLE: Status = Status(sys::ucs_status_t::UCS_ERR_UNREACHABLE.0);
    pub const ERR_CONNECTION_RESET: Status = Status(sys::ucs_status_t::UCS_ERR_CONNECTION_RESET.0);
    pub const ERR_ENDPOINT_TIMEOUT: Status = Status(sys::ucs_status_t::UCS_ERR_ENDPOINT_TIMEOUT.0);

    /// UCX's own description of the code ("No pending message", ...).
    pub fn message(self) -> &'static str {
        // SAFETY: ucs_status_string accepts any value and returns a pointer to a static,
        // NUL-terminated string ("Unknown error" for codes it does not name).
        let ptr = unsafe { sys::ucs_status_string(sys::ucs_status_t(self.0)) };
        if ptr.is_null() {
            return "unknown UCX status";
        }
        // SAFETY: non-null, NUL-terminated and static, as above.
        unsafe { CStr::from_ptr(ptr) }.to_str().unwrap_or("non-UTF-8 UCX status")
    }

    /// Peer failure codes: the endpoint is gone and must be re-created.
    pub fn is_peer_failure(self) -> bool {
        matches!(self, Status::ERR_UNREACHABLE | Status::ERR_CONNECTION_RESET | Status::ERR_ENDPOINT_TIMEOUT)
            || self == Status(sys::ucs_status_t::UCS_ERR_REJECTED.0)
            || self == Status(sys::ucs_status_t::UCS_ERR_IO_ERROR.0)
    }
}

impl From<sys::ucs_status_t> for Status {
    fn from(s: sys::ucs_status_t) -> Self {
        Status(s.0)
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Status({}: {})", self.0, self.message())
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (UCX status {})", self.message(), self.0)
    }
}

/// `UCS_OK` → `Ok(())`, anything else → `Err(status)`.
pub fn check(status: sys::ucs_status_t) -> Result<(), Status> {
    if status == sys::ucs_status_t::UCS_OK {
        Ok(())
    } else {
        Err(status.into())
    }
}

/// What a `ucs_status_ptr_t` returned by a non-blocking call means.
#[derive(Debug)]
pub enum PtrStatus {
    /// `NULL`: the operation completed at once and no callback will run.
    Done,
    /// A request that completes later through its callback and must be freed.
    Pending(NonNull<std::ffi::c_void>),
    /// An error code encoded in the pointer; no callback will run.
    Failed(Status),
}

/// `UCS_PTR_IS_ERR` / `UCS_PTR_STATUS` / `UCS_PTR_IS_PTR`: error codes live in the top 100
/// values of the address space (`UCS_ERR_LAST` is -100).
pub fn ptr_status(ptr: sys::ucs_status_ptr_t) -> PtrStatus {
    const ERR_LAST: isize = sys::ucs_status_t::UCS_ERR_LAST.0 as isize;
    let raw = ptr as usize;
    if raw == 0 {
        PtrStatus::Done
    } else if raw >= ERR_LAST as usize {
        // Two's complement: the pointer value is the negative status code.
        PtrStatus::Failed(Status(raw as isize as i8))
    } else {
        // Non-null by the first branch.
        NonNull::new(ptr).map_or(PtrStatus::Done, PtrStatus::Pending)
    }
}

/// `ucp_init` is a static inline function in the headers; this is what it calls.
///
/// # Safety
/// `params` must be a valid, fully initialised `ucp_params_t` whose `field_mask` covers only
/// initialised fields; `config` must be null or a live `ucp_config_t`.
pub unsafe fn init(params: &sys::ucp_params_t, config: *const sys::ucp_config_t) -> Result<sys::ucp_context_h, Status> {
    let mut ctx: sys::ucp_context_h = std::ptr::null_mut();
    // SAFETY: per this function's contract; `ctx` is a valid out-pointer.
    let status = unsafe { sys::ucp_init_version(sys::UCP_API_MAJOR, sys::UCP_API_MINOR, params, config, &mut ctx) };
    check(status).map(|()| ctx)
}

/// The UCX library version string, e.g. "1.22.0".
pub fn version_string() -> String {
    // SAFETY: returns a pointer to a static NUL-terminated string.
    let ptr = unsafe { sys::ucp_get_version_string() };
    if ptr.is_null() {
        return "unknown".into();
    }
    // SAFETY: non-null, static, NUL-terminated.
    unsafe { CStr::from_ptr(ptr) }.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptr_status_decodes_null_errors_and_pointers() {
        assert!(matches!(ptr_status(std::ptr::null_mut()), PtrStatus::Done));
        let err = -16isize as usize as sys::ucs_status_ptr_t;
        match ptr_status(err) {
            PtrStatus::Failed(s) => assert_eq!(s, Status::ERR_CANCELED),
            other => panic!("expected Failed, got {other:?}"),
        }
        let real = 0x1000usize as sys::ucs_status_ptr_t;
        assert!(matches!(ptr_status(real), PtrStatus::Pending(_)));
    }

    #[test]
    fn unknown_codes_are_values_not_ub() {
        // -77 is unnamed; a Rust enum would be UB here, the newtype is fine.
        let s = Status(-77);
        assert!(!s.message().is_empty());
        assert!(check(sys::ucs_status_t(-77)).is_err());
        assert!(check(sys::ucs_status_t::UCS_OK).is_ok());
    }
}
