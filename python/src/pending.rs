//! Calls that run on the client's runtime while Python goes on: `lookup_start`,
//! `lease_start` and `put_paged_start` return a [`Pending`] at once. An engine's scheduler then needs no thread of its
//! own per lookup (each of which had to win the GIL back from the engine loop to start, to
//! convert its answer and to hand it over: measured on 2x H200, lookups queued for over 100 ms
//! behind a busy engine); it polls `done()` once per step and takes `result()`.

use crate::errors::to_py;
use pyo3::exceptions::{PyRuntimeError, PyTimeoutError};
use pyo3::prelude::*;
use std::future::Future;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// A finished call's answer, kept as Rust values until Python takes it (so that the runtime's
/// threads never need the GIL).
pub(crate) enum Answer {
    Hits(usize),
    Lease(crate::LeaseTuple),
    /// (chunks, stored, skipped) of a put.
    Put((usize, usize, usize)),
}

enum Slot {
    Waiting,
    Ready(Result<Answer, prefixd_client::Error>),
    Taken,
}

/// What `result()` found.
enum Took {
    NotYet,
    Answer(Result<Answer, prefixd_client::Error>),
    AlreadyTaken,
}

/// A call started in the background. `done()` says whether it has answered; `result()` takes
/// the answer (once) or raises the call's error, as the blocking call would have.
#[pyclass(frozen, module = "prefixd._native")]
pub(crate) struct Pending {
    shared: Arc<(Mutex<Slot>, Condvar)>,
}

impl Pending {
    /// Spawns `call` on `rt`; its answer lands in the returned handle.
    pub(crate) fn spawn<F>(rt: &tokio::runtime::Runtime, call: F) -> Pending
    where
        F: Future<Output = Result<Answer, prefixd_client::Error>> + Send + 'static,
    {
        let shared = Arc::new((Mutex::new(Slot::Waiting), Condvar::new()));
        let theirs = shared.clone();
        rt.spawn(async move {
            let answer = call.await;
            let (slot, ready) = &*theirs;
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Slot::Ready(answer);
            ready.notify_all();
        });
        Pending { shared }
    }
}

#[pymethods]
impl Pending {
    /// Whether the call has answered (its result is waiting to be taken, or was taken).
    fn done(&self) -> bool {
        !matches!(*self.shared.0.lock().unwrap_or_else(|p| p.into_inner()), Slot::Waiting)
    }

    /// Waits up to `timeout` seconds (with the GIL released) for the answer, without taking it;
    /// returns `done()`.
    fn wait(&self, py: Python<'_>, timeout: f64) -> bool {
        let wait = Duration::from_secs_f64(if timeout.is_finite() { timeout.clamp(0.0, 3600.0) } else { 3600.0 });
        py.detach(|| {
            let (slot, ready) = &*self.shared;
            let guard = slot.lock().unwrap_or_else(|p| p.into_inner());
            let guard = ready
                .wait_timeout_while(guard, wait, |s| matches!(s, Slot::Waiting))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            !matches!(*guard, Slot::Waiting)
        })
    }

    /// The call's answer: hits (`lookup_start`) or a lease tuple (`lease_start`), or its error
    /// raised. `timeout` (seconds): wait up to that long with the GIL released; without it, or
    /// when it runs out first, an unanswered call raises TimeoutError (and can be asked again).
    /// The answer can be taken once.
    #[pyo3(signature = (timeout = None))]
    fn result(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Py<PyAny>> {
        let wait = timeout.filter(|t| t.is_finite() && *t > 0.0).map(Duration::from_secs_f64);
        let taken = py.detach(|| {
            let (slot, ready) = &*self.shared;
            let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
            if let (Slot::Waiting, Some(wait)) = (&*guard, wait) {
                guard = ready
                    .wait_timeout_while(guard, wait, |s| matches!(s, Slot::Waiting))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            match std::mem::replace(&mut *guard, Slot::Taken) {
                Slot::Waiting => {
                    *guard = Slot::Waiting;
                    Took::NotYet
                }
                Slot::Ready(answer) => Took::Answer(answer),
                Slot::Taken => Took::AlreadyTaken,
            }
        });
        match taken {
            Took::NotYet => Err(PyTimeoutError::new_err("the call has not answered yet")),
            Took::AlreadyTaken => Err(PyRuntimeError::new_err("this call's result was already taken")),
            Took::Answer(Ok(Answer::Hits(n))) => Ok(n.into_pyobject(py)?.into_any().unbind()),
            Took::Answer(Ok(Answer::Lease(t))) => Ok(t.into_pyobject(py)?.into_any().unbind()),
            Took::Answer(Ok(Answer::Put(t))) => Ok(t.into_pyobject(py)?.into_any().unbind()),
            Took::Answer(Err(e)) => Err(to_py(e)),
        }
    }
}
