//! # ucx-bindings
//!
//! Rust bindings to UCX 1.22 (UCP), written for prefixd.
//!
//! ## Motivation
//! The crates on crates.io do not serve a CUDA-era UCX: `ucx-sys` builds a 2018 UCX, and the
//! `async-ucx` family binds `ucs_status_t` as a Rust enum (undefined behaviour for unnamed codes),
//! busy-spins its progress loop and frees requests on drop while UCX may still write into the
//! caller's buffer. This crate avoids all three by construction.
//!
//! ## Layers (as in cudarc)
//! - [`sys`]: bindgen output, committed (regenerate with `ucx-bindings/gen/generate.sh`).
//! - [`result`]: status codes as [`result::Status`], the `UCS_PTR_*` macros, `ucp_init_version`.
//! - the safe layer: [`Context`] (features, transports set like `UCX_TLS`, what is available),
//!   [`Worker`] (one progress thread per worker, woken by `ucp_worker_signal`, sleeping on the
//!   event fd after `ucp_worker_arm`), [`Endpoint`] (peer error mode), [`MemRegion`] (one
//!   `ucp_mem_map` per region, host or CUDA), [`RemoteKey`], async put/get/flush, and active
//!   messages whose receiver chooses the buffer ([`IncomingAm::recv_into`]).
//!
//! ## Guarantees
//! - Every operation has a timeout. When it passes, the caller gets [`Error::TimedOut`] and the
//!   endpoint is force-closed so UCX finishes the request promptly.
//! - An operation's buffers belong to the progress thread until UCX completes it: dropping the
//!   future never lets UCX write into freed memory.
//! - All worker-level UCX calls happen on the worker's own thread (`UCS_THREAD_MODE_SINGLE`);
//!   context-level calls (registration) are locked by UCX (`mt_workers_shared`).
//!
//! ## Finding UCX
//! `build.rs` links `libucp` from `UCX_HOME`, pkg-config, or the Python wheel `libucx-cu13`, and
//! sets an rpath. Dependents add the same rpath from `DEP_UCP_LIB_DIR`.

pub mod hex;
pub mod peer_protocol;
pub mod result;
pub mod shm;
pub mod sys;

mod context;
mod error;
mod memory;
mod sockaddr;
mod transports;
mod worker;

pub use context::{Context, ContextBuilder, ContextInfo, MemoryType};
pub use error::{Error, Result};
pub use memory::{MemRegion, RegionSlice, RemoteRegion};
pub use transports::{TransportDevice, TransportList, KNOWN_TRANSPORTS};
pub use worker::{
    AmData, AmReceiver, AmRoutes, AmService, Answer, Arriving, ConnRequest, Endpoint, EndpointId, ErrorMode,
    IncomingAm, Listener, RemoteKey, RouteEvent, RouteKey, Routed, Served, Slot, Worker,
};

/// Compile-time checks of the thread-safety claims made with `unsafe impl`.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    const fn send<T: Send>() {}
    send_sync::<Context>();
    send_sync::<MemRegion>();
    send_sync::<RegionSlice>();
    send_sync::<Worker>();
    send_sync::<Endpoint>();
    send_sync::<RemoteKey>();
    send::<IncomingAm>();
    send::<AmReceiver>();
    send::<Listener>();
    send::<ConnRequest>();
};
