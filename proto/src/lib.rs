//! # prefixd-proto
//!
//! What a prefixd server and its clients must agree on:
//! - [`v1`]: the gRPC API (`proto/prefixd.proto`, package `prefixd.v1`). The Rust code in
//!   `src/gen/` is generated and committed, so building needs no `protoc`; regenerate it with
//!   `cargo run --manifest-path proto/gen/Cargo.toml` after editing the `.proto`.
//! - [`keys`]: the chunk-key recipe (vLLM-compatible block hashing).
//! - [`dataplane`]: the active-message formats for clients that get no remote key.
//! - [`limits`]: the bounds every request is checked against.

#[allow(clippy::all, clippy::unwrap_used, missing_debug_implementations, missing_docs)]
pub mod v1 {
    include!("gen/prefixd.v1.rs");
}

pub mod dataplane;
pub mod keys;

/// Bounds on request fields, shared by the server's checks and the client's own.
pub mod limits {
    /// Keys in one request (a 1M-token prompt in 256-token chunks).
    pub const MAX_KEYS_PER_REQUEST: usize = 4096;
    /// Namespace length in bytes.
    pub const MAX_NAMESPACE_LEN: usize = 256;
    /// UCX worker address length in bytes.
    pub const MAX_WORKER_ADDRESS_LEN: usize = 65536;
    /// Client name length in bytes.
    pub const MAX_CLIENT_NAME_LEN: usize = 128;
    /// Largest gRPC message either side decodes (keys and descriptors, never chunk data).
    pub const MAX_GRPC_MESSAGE_BYTES: usize = 4 << 20;
}
