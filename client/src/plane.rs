//! How a session's bytes move, fixed when it connects: the server chooses RMA for a client on
//! its own host and active messages for everyone else. Each plane holds only what it needs: the
//! parts of the other plane do not exist there, so a call that needs them fails with a clear
//! error instead of finding them empty.

use crate::direct::{self, SharedHostPool};
use crate::paged::{self, CopyStream, Fragment, GpuPoolMapping, Staging};
use crate::{Error, Result};
use prefixd_proto::v1::DataPath;
use std::sync::OnceLock;
use ucx_bindings::{RegionSlice, RemoteKey};

pub(crate) enum Plane {
    /// Same host: one-sided UCX puts and gets into the server's pools, direct copies through
    /// the mapped host pool and through the GPU pool's IPC mapping.
    Rma(RmaPlane),
    /// Another host, or forced: chunks travel as active messages; the server picks its buffers.
    ActiveMessage(AmPlane),
}

impl Plane {
    pub(crate) fn path(&self) -> DataPath {
        match self {
            Plane::Rma(_) => DataPath::Rma,
            Plane::ActiveMessage(_) => DataPath::ActiveMessage,
        }
    }
}

pub(crate) struct RmaPlane {
    /// The server's pools (GPU and host), found by address.
    pub(crate) pools: Vec<RemoteKey>,
    /// The server's host pool mapped here, for direct copies (where the server offers it;
    /// without it, RMA still works).
    pub(crate) shared: Option<SharedHostPool>,
    /// The GPU pool's IPC handle, base and length, opened on first paged use.
    pub(crate) gpu_ipc: Option<(Vec<u8>, u64, u64)>,
    pub(crate) gpu_map: OnceLock<std::result::Result<GpuPoolMapping, String>>,
}

pub(crate) struct AmPlane {
    /// Where paged gets land before their scatter (kept, and grown, across calls: registering
    /// memory costs more than the copy).
    pub(crate) staging: tokio::sync::Mutex<Option<Staging>>,
}

impl RmaPlane {
    /// Whether `addr..+len` lies in the mapped host pool (then it moves by a direct copy).
    pub(crate) fn in_shared(&self, addr: u64, len: usize) -> bool {
        self.shared.as_ref().is_some_and(|p| p.contains(addr, len))
    }

    /// A direct copy to (`to_pool`) or from the mapped host pool.
    pub(crate) fn direct(&self, addr: u64, local: &RegionSlice, to_pool: bool) -> ucx_bindings::Result<()> {
        let pool = self.shared.as_ref().ok_or(ucx_bindings::Error::WorkerStopped)?;
        pool.copy(addr, local, to_pool).map_err(ucx_bindings::Error::InvalidArgument)
    }

    /// The server pool holding `addr`.
    pub(crate) fn pool_at(&self, addr: u64) -> ucx_bindings::Result<&RemoteKey> {
        self.pools.iter().find(|p| addr >= p.base() && addr - p.base() < p.len()).ok_or_else(|| {
            ucx_bindings::Error::InvalidArgument(format!("address {addr:#x} is in none of the server's pools"))
        })
    }

    /// The local address of a server pool range, for batched copies: the GPU pool through its
    /// IPC mapping (opened on first use, in the context of `ctx_ptr`), the host pool through its
    /// memfd mapping.
    fn local_address(&self, addr: u64, len: u64, ctx_ptr: u64) -> Result<u64> {
        if let Some(sh) = &self.shared {
            if let Some(local) = sh.local_for_cuda(addr, len as usize) {
                return Ok(local);
            }
        }
        if let Some(local) = self.gpu_mapping(ctx_ptr)?.and_then(|m| m.translate(addr, len)) {
            return Ok(local);
        }
        Err(Error::StalePool(addr))
    }

    /// The server's GPU pool as this process maps it (opened on first use, in the context of
    /// `ctx_ptr`); None when the server has no GPU pool to share.
    fn gpu_mapping(&self, ctx_ptr: u64) -> Result<Option<&GpuPoolMapping>> {
        let Some((handle, base, plen)) = &self.gpu_ipc else { return Ok(None) };
        match self.gpu_map.get_or_init(|| GpuPoolMapping::open(handle, *base, *plen, ctx_ptr)) {
            Ok(m) => Ok(Some(m)),
            Err(e) => Err(Error::InvalidArgument(format!("cannot map the server's GPU pool: {e}"))),
        }
    }

    /// Does now what the first device copy would do: page-locks the mapped host pool, opens the
    /// GPU pool's IPC mapping (in the context of device pointer `ctx_ptr`) and loads the copy
    /// kernel. Page-locking a large pool takes seconds, and that first copy may be a load inside
    /// an engine step.
    pub(crate) fn prepare_device(&self, ctx_ptr: u64) -> Result<()> {
        direct::bind_context_of(ctx_ptr).map_err(Error::InvalidArgument)?;
        if let Some(sh) = &self.shared {
            let _ = sh.pin_for_cuda(); // None: CUDA cannot reach it, which the copies report
        }
        self.gpu_mapping(ctx_ptr)?;
        paged::prepare().map_err(Error::InvalidArgument)
    }

    /// Queues one kernel copying between pool ranges (`(address, length)`, server addresses)
    /// and device fragments: into the pool (`to_pool`) or out of it.
    pub(crate) fn device_copy(
        &self,
        ranges: &[(u64, u64)],
        frags: &[&Vec<Fragment>],
        ctx_ptr: u64,
        to_pool: bool,
        on: CopyStream,
    ) -> Result<()> {
        // The pools' local addresses are made in the caller's context (this thread may not have
        // it current, e.g. a fresh Python thread).
        direct::bind_context_of(ctx_ptr).map_err(Error::InvalidArgument)?;
        let n: usize = frags.iter().map(|f| f.len()).sum();
        let (mut dsts, mut srcs, mut lens) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        for (&(addr, len), fs) in ranges.iter().zip(frags) {
            let mut at = self.local_address(addr, len, ctx_ptr)?;
            for f in fs.iter() {
                let (d, s) = if to_pool { (at, f.ptr) } else { (f.ptr, at) };
                dsts.push(d);
                srcs.push(s);
                lens.push(f.len);
                at += f.len as u64;
            }
        }
        paged::batch_copy(ctx_ptr, dsts, srcs, lens, on).map_err(Error::InvalidArgument)
    }

    /// Copies between host-pool ranges and host fragments, by memcpy through the mapped pool.
    /// (GPU-tier chunks and host fragments do not meet here: a client of host memory talks to a
    /// server whose chunks are in host memory, or uses the whole-chunk calls.)
    pub(crate) fn host_copy(&self, ranges: &[(u64, u64)], frags: &[&Vec<Fragment>], to_pool: bool) -> Result<()> {
        for (&(addr, len), fs) in ranges.iter().zip(frags) {
            let pool = self.shared.as_ref().filter(|p| p.contains(addr, len as usize)).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{addr:#x}+{len} is not in the mapped host pool: host fragments move only to and from it"
                ))
            })?;
            pool.copy_fragments(addr, fs, to_pool).map_err(Error::InvalidArgument)?;
        }
        Ok(())
    }
}
