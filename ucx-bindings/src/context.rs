//! `Context`: one UCP context with the features prefixd needs (RMA, active messages, wakeup),
//! shared by its workers (`mt_workers_shared`), on the transports the caller chose.

use crate::error::{Error, Result};
use crate::result;
use crate::sys;
use crate::transports::{parse_context_info, TransportDevice, TransportList};
use std::ffi::CString;
use std::fmt;
use std::sync::Arc;

/// Kinds of memory UCX can register and move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemoryType {
    Host,
    Cuda,
    CudaManaged,
}

impl MemoryType {
    pub(crate) fn to_ucs(self) -> sys::ucs_memory_type_t {
        match self {
            MemoryType::Host => sys::UCS_MEMORY_TYPE_HOST,
            MemoryType::Cuda => sys::UCS_MEMORY_TYPE_CUDA,
            MemoryType::CudaManaged => sys::UCS_MEMORY_TYPE_CUDA_MANAGED,
        }
    }
}

/// What the context found on this machine, after the transport list was applied.
#[derive(Debug, Clone)]
pub struct ContextInfo {
    /// UCX library version, e.g. "1.22.0".
    pub version: String,
    /// The `TLS` list the context was created with ("all" when none was given).
    pub requested: String,
    /// Transports and devices the context can use (from `ucp_context_print_info`).
    pub resources: Vec<TransportDevice>,
    /// Memory types the context can register (host always; cuda where the cuda module loaded
    /// and a driver is present).
    pub memory_types: Vec<MemoryType>,
}

impl ContextInfo {
    /// Distinct transport names, sorted.
    pub fn transports(&self) -> Vec<String> {
        let mut t: Vec<String> = self.resources.iter().map(|r| r.transport.clone()).collect();
        t.dedup();
        t
    }
}

/// Builds a [`Context`]. Defaults: all transports UCX finds (as with `UCX_TLS` unset), every
/// network device, and whatever `UCX_*` environment variables say; builder settings win over
/// the environment.
#[derive(Debug, Default, Clone)]
pub struct ContextBuilder {
    transports: Option<TransportList>,
    net_devices: Option<String>,
    extra: Vec<(String, String)>,
    name: Option<String>,
}

/// prefixd's tcp segment sizes (see `ContextBuilder::build`); `UCX_TCP_TX_SEG_SIZE` and
/// `UCX_TCP_RX_SEG_SIZE` in the environment override them.
pub const TCP_SEGMENTS: &[(&str, &str)] = &[("TCP_TX_SEG_SIZE", "512k"), ("TCP_RX_SEG_SIZE", "512k")];

impl ContextBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A `UCX_TLS`-style list: `tcp,sm`, `cuda_ipc,cuda_copy,sm,tcp`, `^tcp`. Unknown names are
    /// an error here rather than UCX's warning. Default: all.
    pub fn transports(mut self, list: &str) -> Result<Self> {
        self.transports = Some(TransportList::parse(list)?);
        Ok(self)
    }

    /// A `UCX_NET_DEVICES`-style list, e.g. `lo` to keep tcp on loopback. Default: all.
    pub fn net_devices(mut self, list: &str) -> Self {
        self.net_devices = Some(list.to_owned());
        self
    }

    /// Any other UCX setting, named without the `UCX_` prefix (`RNDV_THRESH`, `KEEPALIVE_INTERVAL`).
    pub fn config(mut self, key: &str, value: &str) -> Self {
        self.extra.push((key.to_owned(), value.to_owned()));
        self
    }

    /// A name that shows up in UCX logs. Default: UCX's own (host:pid).
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_owned());
        self
    }

    pub fn build(self) -> Result<Context> {
        // Every endpoint uses peer error mode; shared-memory transports offer it only with
        // MM_ERROR_HANDLING on (off by default in UCX), so turn it on unless the caller says.
        let mut settings: Vec<(String, String)> = vec![("MM_ERROR_HANDLING".into(), "y".into())];
        if let Some(t) = &self.transports {
            settings.push(("TLS".into(), t.to_ucx()));
        }
        if let Some(d) = &self.net_devices {
            settings.push(("NET_DEVICES".into(), d.clone()));
        }
        // UCX's tcp transport moves data in 8 KiB send and 64 KiB receive segments by default:
        // on loopback that caps a 1 MiB message at ~1.3 GB/s (770 µs), against ~4.8-6 GB/s with
        // 256 KiB-1 MiB segments (ucx_perftest ucp_am_bw, BENCHMARKS.md §6). KV chunks are MiBs,
        // so take larger segments unless the environment or the caller chose.
        for (key, value) in TCP_SEGMENTS {
            let chosen = std::env::var_os(format!("UCX_{key}")).is_some() || self.extra.iter().any(|(k, _)| k == key);
            if !chosen {
                settings.push(((*key).to_owned(), (*value).to_owned()));
            }
        }
        settings.extend(self.extra.iter().cloned());
        let requested = self.transports.as_ref().map_or_else(|| "all".to_owned(), |t| t.to_ucx());

        let config = Config::read()?;
        for (k, v) in &settings {
            config.modify(k, v)?;
        }
        let name = match &self.name {
            Some(n) => Some(CString::new(n.as_str()).map_err(|_| Error::invalid("context name has a NUL byte"))?),
            None => None,
        };
        // SAFETY: ucp_params_t is a plain C struct for which all-zeroes is a valid value.
        let mut params: sys::ucp_params_t = unsafe { std::mem::zeroed() };
        params.field_mask = (sys::UCP_PARAM_FIELD_FEATURES
            | sys::UCP_PARAM_FIELD_MT_WORKERS_SHARED
            | sys::UCP_PARAM_FIELD_ESTIMATED_NUM_EPS) as u64;
        params.features = (sys::UCP_FEATURE_RMA | sys::UCP_FEATURE_AM | sys::UCP_FEATURE_WAKEUP) as u64;
        // Regions are registered from the caller's thread while the worker thread moves data:
        // the context must take its own lock.
        params.mt_workers_shared = 1;
        params.estimated_num_eps = 64;
        if let Some(n) = &name {
            params.field_mask |= sys::UCP_PARAM_FIELD_NAME as u64;
            params.name = n.as_ptr();
        }
        // SAFETY: params is initialised for every bit in field_mask; `name` outlives the call;
        // config is live until `config` drops at the end of this function.
        let handle = unsafe { result::init(&params, config.ptr) }.map_err(|s| Error::ucx("ucp_init", s))?;
        let inner = ContextInner {
            handle,
            info: ContextInfo {
                version: result::version_string(),
                requested,
                resources: Vec::new(),
                memory_types: Vec::new(),
            },
        };
        let mut inner = inner;
        inner.info.resources = inner.query_resources();
        inner.info.memory_types = inner.query_memory_types()?;
        if inner.info.resources.is_empty() {
            return Err(Error::invalid(format!("UCX found no usable transport for TLS={}", inner.info.requested)));
        }
        Ok(Context { inner: Arc::new(inner) })
    }
}

/// A UCX configuration (`ucp_config_t`), released on drop.
struct Config {
    ptr: *mut sys::ucp_config_t,
}

impl Config {
    fn read() -> Result<Config> {
        let mut ptr: *mut sys::ucp_config_t = std::ptr::null_mut();
        // SAFETY: null env prefix and file name ask for the defaults plus UCX_* variables;
        // `ptr` is a valid out-pointer.
        let status = unsafe { sys::ucp_config_read(std::ptr::null(), std::ptr::null(), &mut ptr) };
        result::check(status).map_err(|s| Error::ucx("ucp_config_read", s))?;
        Ok(Config { ptr })
    }

    fn modify(&self, key: &str, value: &str) -> Result<()> {
        let k = CString::new(key).map_err(|_| Error::invalid("UCX setting name has a NUL byte"))?;
        let v = CString::new(value).map_err(|_| Error::invalid("UCX setting value has a NUL byte"))?;
        // SAFETY: self.ptr is live (released only in Drop); both strings are NUL-terminated
        // and UCX copies them.
        let status = unsafe { sys::ucp_config_modify(self.ptr, k.as_ptr(), v.as_ptr()) };
        result::check(status).map_err(|s| Error::InvalidArgument(format!("UCX rejected setting {key}={value}: {s}")))
    }
}

impl Drop for Config {
    fn drop(&mut self) {
        // SAFETY: ptr came from ucp_config_read and is released exactly once.
        unsafe { sys::ucp_config_release(self.ptr) }
    }
}

pub(crate) struct ContextInner {
    pub(crate) handle: sys::ucp_context_h,
    pub(crate) info: ContextInfo,
}

// SAFETY: the context is created with mt_workers_shared = 1, so UCX serialises the context-level
// calls made through it (ucp_mem_map/unmap, ucp_memh_pack, ucp_worker_create) with its own lock;
// every worker-level call happens on that worker's progress thread. The handle is cleaned up once,
// in Drop, after every Worker and MemRegion (which hold an Arc of this) is gone.
unsafe impl Send for ContextInner {}
// SAFETY: as above; shared references only make context-level calls, which UCX locks.
unsafe impl Sync for ContextInner {}

impl ContextInner {
    fn query_resources(&self) -> Vec<TransportDevice> {
        let mut buf: *mut libc::c_char = std::ptr::null_mut();
        let mut size: libc::size_t = 0;
        // SAFETY: open_memstream takes two valid out-pointers; it returns null on failure.
        let file = unsafe { libc::open_memstream(&mut buf, &mut size) };
        if file.is_null() {
            return Vec::new();
        }
        // SAFETY: handle is a live context; file is a live FILE* (libc's FILE is the same C
        // type bindgen names sys::FILE).
        unsafe { sys::ucp_context_print_info(self.handle, file.cast()) };
        // SAFETY: file is live and closed once; fclose finalises buf/size.
        unsafe { libc::fclose(file) };
        if buf.is_null() {
            return Vec::new();
        }
        // SAFETY: after fclose, buf points to `size` bytes allocated by open_memstream.
        let text = unsafe { std::slice::from_raw_parts(buf as *const u8, size) };
        let parsed = parse_context_info(&String::from_utf8_lossy(text));
        // SAFETY: buf was malloc'd by open_memstream and is freed once.
        unsafe { libc::free(buf.cast()) };
        parsed
    }

    fn query_memory_types(&self) -> Result<Vec<MemoryType>> {
        // SAFETY: ucp_context_attr_t is a plain C struct; zeroes are valid.
        let mut attr: sys::ucp_context_attr_t = unsafe { std::mem::zeroed() };
        attr.field_mask = sys::UCP_ATTR_FIELD_MEMORY_TYPES as u64;
        // SAFETY: live context, valid out-struct with field_mask set.
        let status = unsafe { sys::ucp_context_query(self.handle, &mut attr) };
        result::check(status).map_err(|s| Error::ucx("ucp_context_query", s))?;
        Ok([MemoryType::Host, MemoryType::Cuda, MemoryType::CudaManaged]
            .into_iter()
            .filter(|m| attr.memory_types & (1u64 << m.to_ucs()) != 0)
            .collect())
    }
}

impl Drop for ContextInner {
    fn drop(&mut self) {
        // SAFETY: handle came from ucp_init and is cleaned up once; workers and regions hold an
        // Arc of this, so none is left.
        unsafe { sys::ucp_cleanup(self.handle) }
    }
}

/// A UCP context. Cheap to clone; the C context lives until the last clone, worker and
/// registered region are gone.
#[derive(Clone)]
pub struct Context {
    pub(crate) inner: Arc<ContextInner>,
}

impl Context {
    /// What this context can use: version, transports and devices, memory types.
    pub fn info(&self) -> &ContextInfo {
        &self.inner.info
    }

    /// Whether CUDA device memory can be registered and moved.
    pub fn supports(&self, m: MemoryType) -> bool {
        self.inner.info.memory_types.contains(&m)
    }
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context").field("info", &self.inner.info).finish()
    }
}
