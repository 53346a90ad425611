//! `prefixd._native`: the Rust client behind the Python package `prefixd`.
//!
//! The Python layer (`python/prefixd/`) turns tensors into address ranges and calls these
//! functions; this layer checks every range again before any byte moves, runs the async client
//! on one shared tokio runtime, and releases the GIL for the length of each call so that other
//! Python threads (an engine's scheduler, say) keep running while a transfer is in flight.
//!
//! Memory is named by `(address, length, device)` triples: `device` is a CUDA ordinal, or -1 for
//! host memory. The Python caller keeps the objects behind the addresses alive for the call.

mod buffers;
mod errors;
mod pending;

use buffers::{Bounds, Buffer};
use errors::to_py;
use pending::{Answer, Pending};
use prefixd_client::{
    Access, ChunkKey, Client, ClientOptions, CopyStream, Fragment, KeyConfig, Lease, LeasedChunk, Memory, PutOutcome,
    Reconnecting, Secret, TlsOptions, Wait, WorkerInit,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

/// The runtime every client shares: two threads are plenty for gRPC calls and completions (the
/// bytes move on UCX's and CUDA's own threads and engines).
fn runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("prefixd-py")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| errors::PrefixdError::new_err(format!("cannot start the client runtime: {e}")))
}

fn key_config(seed: String, block_tokens: usize, chunk_tokens: usize) -> PyResult<KeyConfig> {
    let k = KeyConfig { seed, block_tokens, chunk_tokens };
    k.validate().map_err(PyValueError::new_err)?;
    Ok(k)
}

fn parse_keys(keys: Vec<Vec<u8>>) -> PyResult<Vec<ChunkKey>> {
    keys.iter()
        .enumerate()
        .map(|(i, k)| {
            ChunkKey::from_slice(k)
                .ok_or_else(|| PyValueError::new_err(format!("key {i} is {} bytes; keys are 32 bytes", k.len())))
        })
        .collect()
}

/// A paged call's keys and per-chunk fragment lists (each checked against `bounds`), and
/// whether the fragments are device memory.
type Paged = (Vec<ChunkKey>, Vec<Vec<Fragment>>, bool);

fn parse_paged(
    keys: Vec<Vec<u8>>,
    addrs: &[u8],
    fragment_bytes: usize,
    bounds: &[(u64, usize, i32)],
    counts: Option<&[usize]>,
) -> PyResult<Paged> {
    let keys = parse_keys(keys)?;
    let bounds = Bounds::new(bounds)?;
    let chunks = bounds.fragments(addrs, keys.len(), fragment_bytes, counts)?;
    Ok((keys, chunks, bounds.on_device()))
}

fn outcome(o: PutOutcome) -> (usize, usize, usize) {
    (o.chunks, o.stored, o.skipped)
}

/// A put as `paged_put` makes it: (chunks, stored, skipped) when done.
type PutFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = prefixd_client::Result<(usize, usize, usize)>> + Send>>;
type GetFuture = std::pin::Pin<Box<dyn std::future::Future<Output = prefixd_client::Result<usize>> + Send>>;

/// A lease as Python sees it: (lease id, [(address, length, gpu_tier)], seconds left).
pub(crate) type LeaseTuple = (u64, Vec<(u64, u64, bool)>, f64);

fn lease_tuple(lease: Lease) -> LeaseTuple {
    let left = lease.expires.saturating_duration_since(std::time::Instant::now()).as_secs_f64();
    (lease.id, lease.chunks.iter().map(|c| (c.address, c.length, c.gpu_tier)).collect(), left)
}

/// `want` leading chunks, waited for up to `wait_ms` on the server (see `Client.lookup`).
fn wait(want: usize, wait_ms: u64) -> Wait {
    Wait { chunks: want, up_to: Duration::from_millis(wait_ms) }
}

/// A CUDA stream handle from Python (`torch.cuda.Stream.cuda_stream`): queue on it; none: wait.
fn copy_stream(stream: Option<u64>) -> CopyStream {
    stream.map_or(CopyStream::Wait, CopyStream::Caller)
}

fn memory(on_device: bool) -> Memory {
    if on_device {
        Memory::Device
    } else {
        Memory::Host
    }
}

/// Chunk keys of `tokens` (full chunks only): vLLM's sha256_cbor block-hash chain, as the Rust
/// client and server compute it.
#[pyfunction]
#[pyo3(signature = (tokens, seed = "0".to_owned(), block_tokens = 16, chunk_tokens = 256))]
fn chunk_keys(tokens: Vec<u32>, seed: String, block_tokens: usize, chunk_tokens: usize) -> PyResult<Vec<Vec<u8>>> {
    Ok(key_config(seed, block_tokens, chunk_tokens)?.chunk_keys(&tokens).into_iter().map(|k| k.0.to_vec()).collect())
}

/// Makes the primary CUDA context of `device` current on the calling thread (the one PyTorch
/// uses), so that UCX's CUDA transports on the client's progress thread see the engine's memory.
fn bind_primary_context(device: i32) -> Result<(), String> {
    use cudarc::driver::sys as cu;
    // SAFETY: probing for the driver library has no preconditions.
    if !unsafe { cu::is_culib_present() } {
        return Err("no CUDA driver on this machine".into());
    }
    use prefixd_client::cuda::check;
    let mut dev: cu::CUdevice = 0;
    let mut ctx: cu::CUcontext = std::ptr::null_mut();
    // SAFETY: cuInit may be called repeatedly; valid out-pointers; the retained primary context
    // is never released, so it outlives the thread that made it current.
    unsafe {
        check("cuInit", cu::cuInit(0))?;
        check("cuDeviceGet", cu::cuDeviceGet(&mut dev, device))?;
        check("cuDevicePrimaryCtxRetain", cu::cuDevicePrimaryCtxRetain(&mut ctx, dev))?;
        check("cuCtxSetCurrent", cu::cuCtxSetCurrent(ctx))
    }
}

/// One client of a prefixd server. See `prefixd.Client` for the documented interface. Its
/// session reconnects by itself after the server restarts or reaps it: a call that finds the
/// session lost connects again and is tried once more.
#[pyclass(frozen, module = "prefixd._native")]
struct NativeClient {
    client: RwLock<Option<Arc<Reconnecting>>>,
    endpoint: String,
}

impl NativeClient {
    fn recovering(&self) -> PyResult<Arc<Reconnecting>> {
        self.client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| errors::PrefixdError::new_err(format!("client of {} is closed", self.endpoint)))
    }

    /// The session in use now.
    fn get(&self) -> PyResult<Arc<Client>> {
        Ok(self.recovering()?.current())
    }

    /// The work of a paged put, checked and ready to run (`put_paged`, `put_paged_start`).
    #[allow(clippy::too_many_arguments)] // put_paged's arguments, passed on
    fn paged_put(
        &self,
        namespace: String,
        keys: Vec<Vec<u8>>,
        addrs: &[u8],
        fragment_bytes: usize,
        bounds: &[(u64, usize, i32)],
        parent: Option<Vec<u8>>,
        stream: Option<u64>,
        counts: Option<Vec<usize>>,
    ) -> PyResult<impl Fn(Arc<Client>) -> PutFuture + Send + Sync + 'static> {
        let (keys, chunks, on_device) = parse_paged(keys, addrs, fragment_bytes, bounds, counts.as_deref())?;
        let parent = parse_keys(parent.into_iter().collect())?.pop();
        let direct = on_device || self.get()?.direct_host_pool();
        let (mem, on) = (memory(on_device), copy_stream(stream));
        Ok(move |c: Arc<Client>| -> PutFuture {
            let (namespace, keys, chunks) = (namespace.clone(), keys.clone(), chunks.clone());
            Box::pin(async move {
                if direct {
                    c.put_paged_on(&namespace, &keys, parent, &chunks, mem, on).await.map(outcome)
                } else {
                    buffers::put_host_fragments(&c, &namespace, &keys, parent, &chunks).await
                }
            })
        })
    }

    /// The work of a paged get on any session, checked and ready to run (`get_paged_any`,
    /// `get_paged_any_start`).
    fn paged_get_any(
        &self,
        namespace: String,
        keys: Vec<Vec<u8>>,
        addrs: &[u8],
        fragment_bytes: usize,
        bounds: &[(u64, usize, i32)],
        counts: Option<Vec<usize>>,
    ) -> PyResult<impl Fn(Arc<Client>) -> GetFuture + Send + Sync + 'static> {
        let (keys, chunks, on_device) = parse_paged(keys, addrs, fragment_bytes, bounds, counts.as_deref())?;
        let mem = memory(on_device);
        Ok(move |c: Arc<Client>| -> GetFuture {
            let (namespace, keys, chunks) = (namespace.clone(), keys.clone(), chunks.clone());
            Box::pin(async move { c.get_paged_any(&namespace, &keys, &chunks, mem).await })
        })
    }

    /// Runs `f(client)` on the runtime with the GIL released; once more on a new session if
    /// the first finds its session lost (so `f` may run twice: it must own what it needs).
    fn call<T: Send, F>(&self, py: Python<'_>, f: impl Fn(Arc<Client>) -> F + Send + Sync) -> PyResult<T>
    where
        F: std::future::Future<Output = prefixd_client::Result<T>> + Send,
    {
        let client = self.recovering()?;
        let rt = runtime()?;
        py.detach(|| rt.block_on(client.run(f))).map_err(to_py)
    }

    /// As `call`, in the background: returns at once; the answer (made by `answer`) waits in
    /// the returned `Pending`.
    fn start<T, F, Fut>(&self, f: F, answer: fn(T) -> Answer) -> PyResult<Pending>
    where
        F: Fn(Arc<Client>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = prefixd_client::Result<T>> + Send,
        T: Send + 'static,
    {
        let client = self.recovering()?;
        Ok(Pending::spawn(runtime()?, async move { client.run(f).await.map(answer) }))
    }
}

#[pymethods]
impl NativeClient {
    #[new]
    #[pyo3(signature = (endpoint, name, transports, net_devices, force_remote, timeout_s, seed, block_tokens, chunk_tokens, device, token=None, token_file=None, tls=(None, None, None, None)))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        endpoint: String,
        name: String,
        transports: String,
        net_devices: Option<String>,
        force_remote: bool,
        timeout_s: f64,
        seed: String,
        block_tokens: usize,
        chunk_tokens: usize,
        device: Option<i32>,
        token: Option<String>,
        token_file: Option<String>,
        tls: (Option<String>, Option<String>, Option<String>, Option<String>),
    ) -> PyResult<Self> {
        let token = match (token, token_file) {
            (Some(_), Some(_)) => return Err(PyValueError::new_err("give token or token_file, not both")),
            (Some(t), None) => Some(Secret::new(t)),
            (None, Some(f)) => Some(Secret::from_file(f.as_ref()).map_err(to_py)?),
            (None, None) => None,
        };
        let (ca, cert, key, domain) = tls;
        let access = Access {
            token,
            tls: TlsOptions { ca: ca.map(Into::into), cert: cert.map(Into::into), key: key.map(Into::into), domain },
        };
        if !(timeout_s.is_finite() && timeout_s > 0.0 && timeout_s <= 86_400.0) {
            return Err(PyValueError::new_err(format!("timeout must be in (0, 86400] seconds, not {timeout_s}")));
        }
        let worker_init = match device {
            Some(d) if d < 0 => return Err(PyValueError::new_err(format!("device must be >= 0, not {d}"))),
            // Fail here, in the caller's thread, rather than later on UCX's.
            Some(d) => {
                bind_primary_context(d).map_err(|e| errors::PrefixdError::new_err(format!("CUDA device {d}: {e}")))?;
                Some(WorkerInit(Arc::new(move || {
                    // Already checked above; a failure here only leaves CUDA transports unusable,
                    // which the first CUDA transfer then reports.
                    let _ = bind_primary_context(d);
                })))
            }
            None => None,
        };
        let opts = ClientOptions {
            name,
            transports,
            net_devices,
            force_remote,
            keys: key_config(seed, block_tokens, chunk_tokens)?,
            timeout: Duration::from_secs_f64(timeout_s),
            worker_init,
            access,
        };
        let rt = runtime()?;
        let ep = endpoint.clone();
        let client = py.detach(|| rt.block_on(Reconnecting::connect(&ep, opts))).map_err(to_py)?;
        Ok(NativeClient { client: RwLock::new(Some(Arc::new(client))), endpoint })
    }

    /// "rma" (same host: direct reads and writes of the server's pools) or "active_message".
    #[getter]
    fn data_path(&self) -> PyResult<&'static str> {
        Ok(match self.get()?.data_path() {
            prefixd_client::DataPath::Rma => "rma",
            _ => "active_message",
        })
    }

    /// Transports both sides can use, as the server reported them.
    #[getter]
    fn transports(&self) -> PyResult<Vec<String>> {
        Ok(self.get()?.transports().to_vec())
    }

    /// The endpoint's UCX lanes, e.g. ["posix/memory", "cuda_ipc/cuda"].
    fn endpoint_transports(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        self.call(py, |c| async move { c.endpoint_transports().await })
    }

    fn keys(&self, tokens: Vec<u32>) -> PyResult<Vec<Vec<u8>>> {
        Ok(self.get()?.keys(&tokens).into_iter().map(|k| k.0.to_vec()).collect())
    }

    /// Leading chunks of `keys` that are cached. With `want` and `wait_ms`, the server first
    /// waits (up to `wait_ms`) until the leading `want` are all there.
    #[pyo3(signature = (namespace, keys, want = 0, wait_ms = 0))]
    fn lookup(
        &self,
        py: Python<'_>,
        namespace: String,
        keys: Vec<Vec<u8>>,
        want: usize,
        wait_ms: u64,
    ) -> PyResult<usize> {
        let keys = parse_keys(keys)?;
        let w = wait(want, wait_ms);
        self.call(py, |c| {
            let (namespace, keys) = (namespace.clone(), keys.clone());
            async move { c.lookup_keys_waiting(&namespace, &keys, w).await }
        })
    }

    /// As `lookup`, in the background: returns a `Pending` at once (its `result()` is the hits).
    #[pyo3(signature = (namespace, keys, want = 0, wait_ms = 0))]
    fn lookup_start(&self, namespace: String, keys: Vec<Vec<u8>>, want: usize, wait_ms: u64) -> PyResult<Pending> {
        let (keys, w) = (parse_keys(keys)?, wait(want, wait_ms));
        self.start(
            move |c| {
                let (namespace, keys) = (namespace.clone(), keys.clone());
                async move { c.lookup_keys_waiting(&namespace, &keys, w).await }
            },
            Answer::Hits,
        )
    }

    /// Stores one buffer per key: (chunks, stored, skipped).
    #[pyo3(signature = (namespace, keys, buffers, parent = None))]
    fn put_buffers(
        &self,
        py: Python<'_>,
        namespace: String,
        keys: Vec<Vec<u8>>,
        buffers: Vec<(u64, usize, i32)>,
        parent: Option<Vec<u8>>,
    ) -> PyResult<(usize, usize, usize)> {
        let keys = parse_keys(keys)?;
        let parent = parse_keys(parent.into_iter().collect())?.pop();
        let buffers = Buffer::parse_all(&buffers)?;
        self.call(py, move |c| {
            let (namespace, keys, buffers) = (namespace.clone(), keys.clone(), buffers.clone());
            async move {
                let slices = buffers::register(&c, &buffers)?;
                c.put_chunks(&namespace, &keys, parent, &slices).await.map(outcome)
            }
        })
    }

    /// Reads the longest cached prefix of `keys` into one buffer per key; returns the chunks read.
    fn get_buffers(
        &self,
        py: Python<'_>,
        namespace: String,
        keys: Vec<Vec<u8>>,
        buffers: Vec<(u64, usize, i32)>,
    ) -> PyResult<usize> {
        let keys = parse_keys(keys)?;
        let buffers = Buffer::parse_all(&buffers)?;
        self.call(py, move |c| {
            let (namespace, keys, buffers) = (namespace.clone(), keys.clone(), buffers.clone());
            async move {
                let slices = buffers::register(&c, &buffers)?;
                c.get_chunks(&namespace, &keys, &slices).await
            }
        })
    }

    /// Stores chunks made of fragments: `addrs` holds len(keys) x F little-endian u64
    /// addresses, each the start of `fragment_bytes` bytes inside one of `bounds`. Device
    /// fragments: the gather is queued on `stream` when given (after the work already queued
    /// there), and waited for before the commit.
    #[pyo3(signature = (namespace, keys, addrs, fragment_bytes, bounds, parent = None, stream = None, counts = None))]
    #[allow(clippy::too_many_arguments)] // the Python signature, one argument per part of the call
    fn put_paged(
        &self,
        py: Python<'_>,
        namespace: String,
        keys: Vec<Vec<u8>>,
        addrs: Vec<u8>,
        fragment_bytes: usize,
        bounds: Vec<(u64, usize, i32)>,
        parent: Option<Vec<u8>>,
        stream: Option<u64>,
        counts: Option<Vec<usize>>,
    ) -> PyResult<(usize, usize, usize)> {
        let put = self.paged_put(namespace, keys, &addrs, fragment_bytes, &bounds, parent, stream, counts)?;
        self.call(py, put)
    }

    /// As `put_paged`, in the background: returns a `Pending` at once, whose result is
    /// (chunks, stored, skipped). The store thread of an engine needed the GIL back after each
    /// call (up to the interpreter's 5 ms switch interval behind a busy engine loop, several
    /// times a store); the engine now starts its stores and only looks at them once a step.
    #[pyo3(signature = (namespace, keys, addrs, fragment_bytes, bounds, parent = None, stream = None, counts = None))]
    #[allow(clippy::too_many_arguments)] // the Python signature, one argument per part of the call
    fn put_paged_start(
        &self,
        namespace: String,
        keys: Vec<Vec<u8>>,
        addrs: Vec<u8>,
        fragment_bytes: usize,
        bounds: Vec<(u64, usize, i32)>,
        parent: Option<Vec<u8>>,
        stream: Option<u64>,
        counts: Option<Vec<usize>>,
    ) -> PyResult<Pending> {
        let put = self.paged_put(namespace, keys, &addrs, fragment_bytes, &bounds, parent, stream, counts)?;
        self.start(put, Answer::Put)
    }

    /// Reads the longest cached prefix of `keys` into fragments (see `put_paged`); returns the
    /// chunks read. Fragments of chunks past the hit are left untouched.
    fn get_paged(
        &self,
        py: Python<'_>,
        namespace: String,
        keys: Vec<Vec<u8>>,
        addrs: Vec<u8>,
        fragment_bytes: usize,
        bounds: Vec<(u64, usize, i32)>,
    ) -> PyResult<usize> {
        let (keys, chunks, on_device) = parse_paged(keys, &addrs, fragment_bytes, &bounds, None)?;
        self.call(py, move |c| {
            let (namespace, keys, chunks) = (namespace.clone(), keys.clone(), chunks.clone());
            async move {
                if on_device {
                    c.get_paged(&namespace, &keys, &chunks).await
                } else {
                    buffers::get_host_fragments(&c, &namespace, &keys, &chunks).await
                }
            }
        })
    }

    /// Reads the longest cached prefix of `keys` into fragments on any session (same host:
    /// straight from the pools; otherwise fetched, staged and scattered); returns the chunks read.
    #[pyo3(signature = (namespace, keys, addrs, fragment_bytes, bounds, counts = None))]
    #[allow(clippy::too_many_arguments)] // the Python signature, one argument per part of the call
    fn get_paged_any(
        &self,
        py: Python<'_>,
        namespace: String,
        keys: Vec<Vec<u8>>,
        addrs: Vec<u8>,
        fragment_bytes: usize,
        bounds: Vec<(u64, usize, i32)>,
        counts: Option<Vec<usize>>,
    ) -> PyResult<usize> {
        let get = self.paged_get_any(namespace, keys, &addrs, fragment_bytes, &bounds, counts)?;
        self.call(py, get)
    }

    /// As `get_paged_any`, in the background: returns a `Pending` at once, whose result is the
    /// chunks read. An engine's loads from another node's sidecar then need no Python thread
    /// (which would have to win the GIL back from the engine loop after the call).
    #[pyo3(signature = (namespace, keys, addrs, fragment_bytes, bounds, counts = None))]
    #[allow(clippy::too_many_arguments)] // the Python signature, one argument per part of the call
    fn get_paged_any_start(
        &self,
        namespace: String,
        keys: Vec<Vec<u8>>,
        addrs: Vec<u8>,
        fragment_bytes: usize,
        bounds: Vec<(u64, usize, i32)>,
        counts: Option<Vec<usize>>,
    ) -> PyResult<Pending> {
        let get = self.paged_get_any(namespace, keys, &addrs, fragment_bytes, &bounds, counts)?;
        self.start(get, Answer::Hits)
    }

    /// Leases the longest cached prefix of `keys`: (lease id, [(address, length, gpu_tier)],
    /// seconds until it expires). Same-host sessions get addresses that `scatter` reads, from
    /// any client process of this host. Lease id 0: nothing hit. `want`, `wait_ms`: as for
    /// `lookup` (the wait comes first; the lease's lifetime starts after it).
    #[pyo3(signature = (namespace, keys, want = 0, wait_ms = 0))]
    fn lease(
        &self,
        py: Python<'_>,
        namespace: String,
        keys: Vec<Vec<u8>>,
        want: usize,
        wait_ms: u64,
    ) -> PyResult<LeaseTuple> {
        let keys = parse_keys(keys)?;
        let w = wait(want, wait_ms);
        let lease = self.call(py, |c| {
            let (namespace, keys) = (namespace.clone(), keys.clone());
            async move { c.lease_keys_waiting(&namespace, &keys, w).await }
        })?;
        Ok(lease_tuple(lease))
    }

    /// As `lease`, in the background: returns a `Pending` at once (its `result()` is the lease
    /// tuple). A lease nobody takes runs out at its TTL; take it and `release` it.
    #[pyo3(signature = (namespace, keys, want = 0, wait_ms = 0))]
    fn lease_start(&self, namespace: String, keys: Vec<Vec<u8>>, want: usize, wait_ms: u64) -> PyResult<Pending> {
        let (keys, w) = (parse_keys(keys)?, wait(want, wait_ms));
        self.start(
            move |c| {
                let (namespace, keys) = (namespace.clone(), keys.clone());
                async move { c.lease_keys_waiting(&namespace, &keys, w).await }
            },
            |l| Answer::Lease(lease_tuple(l)),
        )
    }

    /// Does now what the session's first device copy would do (page-lock the mapped host pool,
    /// open the GPU pool's mapping, load the copy kernel), in the context of `device_ptr` (any
    /// CUDA pointer of the caller's).
    fn prepare_device(&self, py: Python<'_>, device_ptr: u64) -> PyResult<()> {
        let c = self.get()?;
        py.detach(|| c.prepare_device(device_ptr)).map_err(to_py)
    }

    /// Ends a lease (without waiting for the server's answer).
    fn release(&self, py: Python<'_>, lease_id: u64) -> PyResult<()> {
        let c = self.get()?;
        let rt = runtime()?;
        py.detach(|| {
            let _guard = rt.enter();
            c.release_lease(lease_id);
        });
        Ok(())
    }

    /// Copies leased chunks (`chunks`: (address, length) from `lease`, this client's or another
    /// one's on the same server) into fragments (as in `put_paged`). Device fragments: queued on
    /// `stream` when given (returns at once; that stream orders the readers), else waited for.
    #[pyo3(signature = (chunks, addrs, fragment_bytes, bounds, stream = None, counts = None))]
    #[allow(clippy::too_many_arguments)] // the Python signature, one argument per part of the call
    fn scatter(
        &self,
        py: Python<'_>,
        chunks: Vec<(u64, u64)>,
        addrs: Vec<u8>,
        fragment_bytes: usize,
        bounds: Vec<(u64, usize, i32)>,
        stream: Option<u64>,
        counts: Option<Vec<usize>>,
    ) -> PyResult<()> {
        let bounds = Bounds::new(&bounds)?;
        if chunks.is_empty() {
            return Ok(());
        }
        let frags = bounds.fragments(&addrs, chunks.len(), fragment_bytes, counts.as_deref())?;
        let leased: Vec<LeasedChunk> =
            chunks.iter().map(|&(address, length)| LeasedChunk { address, length, gpu_tier: false }).collect();
        let (mem, on) = (memory(bounds.on_device()), copy_stream(stream));
        let c = self.get()?;
        py.detach(|| c.scatter(&leased, &frags, mem, on)).map_err(to_py)
    }

    /// The server's counters and pools, as a dict.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.call(py, |c| async move { c.stats().await })?;
        let d = PyDict::new(py);
        d.set_item("version", &s.version)?;
        d.set_item("entries", s.entries)?;
        d.set_item("sessions", s.sessions)?;
        d.set_item("active_leases", s.active_leases)?;
        d.set_item("active_reservations", s.active_reservations)?;
        d.set_item("hit_chunks", s.hit_chunks)?;
        d.set_item("miss_chunks", s.miss_chunks)?;
        d.set_item("evictions", s.evictions)?;
        d.set_item("transports", s.transports.clone())?;
        d.set_item("bytes_by_path", s.bytes_by_path.clone())?;
        let tiers = s
            .tiers
            .iter()
            .map(|t| {
                let td = PyDict::new(py);
                td.set_item("tier", &t.tier)?;
                td.set_item("capacity_bytes", t.capacity_bytes)?;
                td.set_item("used_bytes", t.used_bytes)?;
                td.set_item("entries", t.entries)?;
                Ok(td)
            })
            .collect::<PyResult<Vec<_>>>()?;
        d.set_item("tiers", tiers)?;
        Ok(d)
    }

    /// True when the server answers its gRPC health check with SERVING.
    fn health(&self, py: Python<'_>) -> PyResult<bool> {
        self.call(py, |c| async move { c.health().await })
    }

    /// Ends the session; later calls raise. Closing twice is fine.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let taken = self.client.write().unwrap_or_else(|p| p.into_inner()).take();
        match taken {
            Some(c) => {
                c.close();
                let rt = runtime()?;
                py.detach(|| rt.block_on(c.current().disconnect())).map_err(to_py)
            }
            None => Ok(()),
        }
    }

    #[getter]
    fn endpoint(&self) -> &str {
        &self.endpoint
    }

    #[getter]
    fn closed(&self) -> bool {
        self.client.read().unwrap_or_else(|p| p.into_inner()).is_none()
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeClient>()?;
    m.add_class::<Pending>()?;
    m.add_function(wrap_pyfunction!(chunk_keys, m)?)?;
    m.add("PrefixdError", m.py().get_type::<errors::PrefixdError>())?;
    m.add("RetryableError", m.py().get_type::<errors::RetryableError>())?;
    m.add("SessionLostError", m.py().get_type::<errors::SessionLostError>())?;
    m.add("AccessDeniedError", m.py().get_type::<errors::AccessDeniedError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
