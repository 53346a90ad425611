//! Host buffers that GPU-tier chunks pass through on their way to active-message clients.
//!
//! A client on another host receives into its own memory over tcp (or RDMA). UCX then has to
//! move a chunk that lives in the GPU pool with a protocol both ends can run from CUDA memory,
//! and a client without CUDA transports has none: seen on 2x H200, "cannot find remote protocol
//! ... rndv_recv into host memory from cuda", and the endpoint reset. So the server copies such a
//! chunk into registered host memory first (one DMA at PCIe speed, far faster than the network
//! it then crosses) and sends from there: every remote client sees host memory, whatever UCX
//! build either side has.

use std::sync::{Arc, Mutex};
use ucx_bindings::{Context, MemRegion};

/// Reusable registered host buffers, kept after use (at most `keep` of them).
#[derive(Debug)]
pub struct BouncePool {
    free: Mutex<Vec<Arc<MemRegion>>>,
    keep: usize,
}

impl BouncePool {
    pub fn new(keep: usize) -> BouncePool {
        BouncePool { free: Mutex::new(Vec::new()), keep }
    }

    /// A buffer of at least `len` bytes (a kept one when one fits without wasting over half).
    pub fn take(&self, ctx: &Context, len: usize) -> ucx_bindings::Result<Arc<MemRegion>> {
        {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = free.iter().position(|r| r.len() >= len && r.len() / 2 <= len) {
                return Ok(free.swap_remove(i));
            }
        }
        MemRegion::alloc_host(ctx, len)
    }

    /// Hands a buffer back once nothing uses it any more.
    pub fn give(&self, region: Arc<MemRegion>) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.keep {
            free.push(region);
        }
    }
}
