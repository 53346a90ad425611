//! One way to turn a CUDA driver call's status into an error, on cudarc's result layer, for the
//! client, `prefixctl`, the benchmarks and the Python package (each once had its own copy).

use cudarc::driver::sys as cu;

/// `Ok` for `CUDA_SUCCESS`; otherwise "`what`: " and the driver's name and description of the
/// error (cudarc's `DriverError`).
pub fn check(what: &str, r: cu::CUresult) -> Result<(), String> {
    r.result().map_err(|e| format!("{what}: {e}"))
}
