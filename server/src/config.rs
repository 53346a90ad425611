//! Configuration: defaults, then a TOML file (`--config`), then `PREFIXD_*` environment
//! variables, then flags. Resolved and validated once, in `main`; nothing below reads the
//! environment.

use crate::units::{parse_duration, ByteSize};
use clap::{Parser, ValueEnum};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Who may write and read pool memory directly with UCX RMA (a remote key into server memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RmaPolicy {
    /// Clients on this host (same boot id): one trust domain. Others use active messages.
    SameHost,
    /// Nobody: every client uses active messages; no key into server memory ever leaves.
    Never,
}

impl RmaPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RmaPolicy::SameHost => "same-host",
            RmaPolicy::Never => "never",
        }
    }
}

const ABOUT: &str = "prefixd: a KV-cache sidecar for disaggregated LLM inference.

A prefill engine pushes the KV cache of a prompt into prefixd; a decode engine pulls it instead
of recomputing. Chunks are keyed by token-prefix hash (vLLM-compatible), kept in a host-memory
pool, and moved over UCX (shared memory, tcp, cuda_ipc, RDMA, as UCX_TLS would choose). Control
and lookup calls go over gRPC; Prometheus metrics, /healthz and /readyz on the metrics port.

Settings come from defaults, then --config FILE (TOML, same names with underscores), then
PREFIXD_* environment variables, then flags. SIGTERM drains in-flight calls and exits 0;
SIGINT exits at once.";

#[derive(Debug, Parser)]
#[command(name = "prefixd", version, about = "prefixd: a KV-cache sidecar for disaggregated LLM inference", long_about = ABOUT)]
pub struct Cli {
    /// TOML file with any of the settings below (e.g. host_pool = "8GiB").
    #[arg(long, env = "PREFIXD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long, env = "PREFIXD_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// UCX listener for clients' data endpoints (UCX client-server mode; its port goes to
    /// clients in ConnectResponse) [default: the --listen address's IP, any free port].
    #[arg(long, env = "PREFIXD_DATA_LISTEN", value_name = "ADDR")]
    pub data_listen: Option<SocketAddr>,

    /// Metrics, /healthz and /readyz listen address [default: 127.0.0.1:9400].
    #[arg(long, env = "PREFIXD_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    /// Host-memory pool size, registered once with UCX [default: 1GiB].
    #[arg(long, env = "PREFIXD_HOST_POOL", value_name = "SIZE")]
    pub host_pool: Option<ByteSize>,

    /// GPU-memory pool (the fast tier) on --gpu, e.g. 8GiB. Needs a CUDA driver; off by default.
    /// New chunks go there first; under pressure the least-recent ones are copied to the host pool.
    #[arg(long, env = "PREFIXD_GPU_POOL", value_name = "SIZE")]
    pub gpu_pool: Option<ByteSize>,

    /// CUDA device ordinal of the GPU pool [default: 0].
    #[arg(long, env = "PREFIXD_GPU", value_name = "ORDINAL")]
    pub gpu: Option<usize>,

    /// UCX transports, in the form of UCX_TLS (e.g. "sm,tcp" or "cuda_ipc,cuda_copy,sm,tcp")
    /// [default: "sm,tcp"; with --gpu-pool "cuda_ipc,cuda_copy,sm,tcp"].
    #[arg(long, env = "PREFIXD_TRANSPORTS", value_name = "LIST")]
    pub transports: Option<String>,

    /// Network devices UCX may use, in the form of UCX_NET_DEVICES (e.g. "lo", "eth0") [default:
    /// the device of the --data-listen address: lo for loopback, every device for 0.0.0.0].
    #[arg(long, env = "PREFIXD_NET_DEVICES", value_name = "LIST")]
    pub net_devices: Option<String>,

    /// Default lifetime of a lease and of a put's reservation; a client that dies loses both
    /// after this long. A session with no call for 4 times this (at least 10s) is closed; live
    /// clients send keep-alives while they are quiet [default: 30s].
    #[arg(long, env = "PREFIXD_LEASE_TTL", value_name = "DURATION", value_parser = parse_duration)]
    pub lease_ttl: Option<Duration>,

    /// Longest lease a client may ask for [default: 5m].
    #[arg(long, env = "PREFIXD_MAX_LEASE_TTL", value_name = "DURATION", value_parser = parse_duration)]
    pub max_lease_ttl: Option<Duration>,

    /// Largest chunk accepted [default: 256MiB, or the host pool if smaller].
    #[arg(long, env = "PREFIXD_MAX_CHUNK_SIZE", value_name = "SIZE")]
    pub max_chunk_size: Option<ByteSize>,

    /// Who gets a remote key into pool memory [default: same-host].
    #[arg(long, env = "PREFIXD_RMA", value_enum, value_name = "POLICY")]
    pub rma: Option<RmaPolicy>,

    /// Timeout of every UCX transfer the server makes [default: 30s].
    #[arg(long, env = "PREFIXD_TRANSFER_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub transfer_timeout: Option<Duration>,

    /// How long SIGTERM waits for in-flight calls before exiting anyway [default: 30s].
    #[arg(long, env = "PREFIXD_DRAIN_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub drain_timeout: Option<Duration>,

    /// Most client sessions at once; Connect beyond it gets RESOURCE_EXHAUSTED [default: 4096].
    #[arg(long, env = "PREFIXD_MAX_SESSIONS", value_name = "N")]
    pub max_sessions: Option<usize>,

    /// Most sessions from one peer address [default: 512].
    #[arg(long, env = "PREFIXD_MAX_SESSIONS_PER_PEER", value_name = "N")]
    pub max_sessions_per_peer: Option<usize>,

    /// Most gRPC calls in flight at once [default: 1024].
    #[arg(long, env = "PREFIXD_MAX_CONCURRENT_RPCS", value_name = "N")]
    pub max_concurrent_rpcs: Option<usize>,

    /// Most namespaces alive at once (holding chunks, puts or leases) [default: 65536].
    #[arg(long, env = "PREFIXD_MAX_NAMESPACES", value_name = "N")]
    pub max_namespaces: Option<usize>,

    /// Most bytes one session may hold reserved by puts not yet committed [default: half the
    /// pools].
    #[arg(long, env = "PREFIXD_MAX_RESERVED_PER_SESSION", value_name = "SIZE")]
    pub max_reserved_per_session: Option<ByteSize>,

    /// Most leases one session may hold [default: 4096].
    #[arg(long, env = "PREFIXD_MAX_LEASES_PER_SESSION", value_name = "N")]
    pub max_leases_per_session: Option<usize>,

    /// Most bytes one session may hold leased [default: half the pools].
    #[arg(long, env = "PREFIXD_MAX_LEASED_PER_SESSION", value_name = "SIZE")]
    pub max_leased_per_session: Option<ByteSize>,

    /// Bearer tokens and what each may do per namespace (TOML; see README, "Security").
    /// Without it every call is allowed, and prefixd listens on loopback only.
    #[arg(long, env = "PREFIXD_AUTH_FILE", value_name = "FILE")]
    pub auth_file: Option<PathBuf>,

    /// Listen beyond loopback without --auth-file (anyone who reaches the port may read and
    /// write every namespace).
    #[arg(long, env = "PREFIXD_ALLOW_INSECURE_REMOTE")]
    pub allow_insecure_remote: bool,

    /// TLS certificate chain (PEM) for gRPC and the metrics port; with --tls-key.
    #[arg(long, env = "PREFIXD_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM) of --tls-cert.
    #[arg(long, env = "PREFIXD_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// CA (PEM) that client certificates must chain to (mutual TLS on gRPC); needs --tls-cert.
    #[arg(long, env = "PREFIXD_TLS_CLIENT_CA", value_name = "FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Log filter, in the form of RUST_LOG (e.g. "info", "prefixd=debug") [default: info].
    #[arg(long, env = "PREFIXD_LOG", value_name = "FILTER")]
    pub log: Option<String>,

    /// Print the resolved configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,

    /// Print the table of exported metrics (Markdown) and exit.
    #[arg(long)]
    pub list_metrics: bool,
}

/// The settings a TOML file may hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_listen: Option<SocketAddr>,
    metrics_listen: Option<SocketAddr>,
    host_pool: Option<String>,
    gpu_pool: Option<String>,
    gpu: Option<usize>,
    transports: Option<String>,
    net_devices: Option<String>,
    lease_ttl: Option<String>,
    max_lease_ttl: Option<String>,
    max_chunk_size: Option<String>,
    rma: Option<RmaPolicy>,
    transfer_timeout: Option<String>,
    drain_timeout: Option<String>,
    log: Option<String>,
    high_watermark: Option<f64>,
    low_watermark: Option<f64>,
    max_sessions: Option<usize>,
    max_sessions_per_peer: Option<usize>,
    max_concurrent_rpcs: Option<usize>,
    max_namespaces: Option<usize>,
    max_reserved_per_session: Option<String>,
    max_leases_per_session: Option<usize>,
    max_leased_per_session: Option<String>,
    auth_file: Option<PathBuf>,
    allow_insecure_remote: Option<bool>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
}

/// The resolved, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// None: the gRPC listen IP with an ephemeral port.
    pub data_listen: Option<SocketAddr>,
    pub metrics_listen: SocketAddr,
    pub host_pool: ByteSize,
    /// None: no GPU tier.
    pub gpu_pool: Option<ByteSize>,
    pub gpu: usize,
    pub transports: String,
    pub net_devices: Option<String>,
    pub lease_ttl: Duration,
    pub max_lease_ttl: Duration,
    pub max_chunk_size: ByteSize,
    pub rma: RmaPolicy,
    pub transfer_timeout: Duration,
    pub drain_timeout: Duration,
    pub log: String,
    pub high_watermark: f64,
    pub low_watermark: f64,
    pub limits: Limits,
    pub auth_file: Option<PathBuf>,
    pub allow_insecure_remote: bool,
    pub tls: Option<TlsFiles>,
}

/// PEM files of the server's TLS identity.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// What one client may hold, and how many of them there may be (see `prefixd --help`).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_sessions: usize,
    pub max_sessions_per_peer: usize,
    pub max_concurrent_rpcs: usize,
    pub max_namespaces: usize,
    /// None: half the pools.
    pub max_reserved_per_session: Option<ByteSize>,
    pub max_leases_per_session: usize,
    /// None: half the pools.
    pub max_leased_per_session: Option<ByteSize>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: 4096,
            max_sessions_per_peer: 512,
            max_concurrent_rpcs: 1024,
            max_namespaces: 65536,
            max_reserved_per_session: None,
            max_leases_per_session: 4096,
            max_leased_per_session: None,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data_listen: None,
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9400)),
            host_pool: ByteSize(1 << 30),
            gpu_pool: None,
            gpu: 0,
            transports: "sm,tcp".into(),
            net_devices: None,
            lease_ttl: Duration::from_secs(30),
            max_lease_ttl: Duration::from_secs(300),
            max_chunk_size: ByteSize(256 << 20),
            rma: RmaPolicy::SameHost,
            transfer_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            log: "info".into(),
            high_watermark: 0.95,
            low_watermark: 0.85,
            limits: Limits::default(),
            auth_file: None,
            allow_insecure_remote: false,
            tls: None,
        }
    }
}

fn field<T>(name: &str, v: Option<String>, parse: impl Fn(&str) -> Result<T, String>) -> Result<Option<T>, String> {
    v.map(|s| parse(&s).map_err(|e| format!("{name}: {e}"))).transpose()
}

impl Config {
    /// Defaults, then the file, then environment and flags (clap has merged those two, flags
    /// winning), then validation.
    pub fn resolve(cli: &Cli) -> Result<Config, String> {
        let file = match &cli.config {
            Some(path) => Some((
                std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?,
                path.display().to_string(),
            )),
            None => None,
        };
        Self::resolve_text(cli, file.as_ref().map(|(text, name)| (text.as_str(), name.as_str())))
    }

    /// As [`Config::resolve`], with the configuration file's text (and its name, for errors)
    /// given: every byte of it is the user's, so nothing here may panic on it (fuzzed).
    pub fn resolve_text(cli: &Cli, file: Option<(&str, &str)>) -> Result<Config, String> {
        let mut c = Config::default();
        let mut chunk_size_set = cli.max_chunk_size.is_some();
        let mut transports_set = cli.transports.is_some();
        if let Some((text, name)) = file {
            let f: FileConfig = toml::from_str(text).map_err(|e| format!("{name}: {e}"))?;
            let size = |s: &str| s.parse::<ByteSize>();
            c.listen = f.listen.unwrap_or(c.listen);
            c.data_listen = f.data_listen.or(c.data_listen);
            c.metrics_listen = f.metrics_listen.unwrap_or(c.metrics_listen);
            c.host_pool = field("host_pool", f.host_pool, size)?.unwrap_or(c.host_pool);
            c.gpu_pool = field("gpu_pool", f.gpu_pool, size)?.or(c.gpu_pool);
            c.gpu = f.gpu.unwrap_or(c.gpu);
            transports_set |= f.transports.is_some();
            c.transports = f.transports.unwrap_or(c.transports);
            c.net_devices = f.net_devices.or(c.net_devices);
            c.lease_ttl = field("lease_ttl", f.lease_ttl, parse_duration)?.unwrap_or(c.lease_ttl);
            c.max_lease_ttl = field("max_lease_ttl", f.max_lease_ttl, parse_duration)?.unwrap_or(c.max_lease_ttl);
            chunk_size_set |= f.max_chunk_size.is_some();
            c.max_chunk_size = field("max_chunk_size", f.max_chunk_size, size)?.unwrap_or(c.max_chunk_size);
            c.rma = f.rma.unwrap_or(c.rma);
            c.transfer_timeout =
                field("transfer_timeout", f.transfer_timeout, parse_duration)?.unwrap_or(c.transfer_timeout);
            c.drain_timeout = field("drain_timeout", f.drain_timeout, parse_duration)?.unwrap_or(c.drain_timeout);
            c.log = f.log.unwrap_or(c.log);
            c.high_watermark = f.high_watermark.unwrap_or(c.high_watermark);
            c.low_watermark = f.low_watermark.unwrap_or(c.low_watermark);
            let l = &mut c.limits;
            l.max_sessions = f.max_sessions.unwrap_or(l.max_sessions);
            l.max_sessions_per_peer = f.max_sessions_per_peer.unwrap_or(l.max_sessions_per_peer);
            l.max_concurrent_rpcs = f.max_concurrent_rpcs.unwrap_or(l.max_concurrent_rpcs);
            l.max_namespaces = f.max_namespaces.unwrap_or(l.max_namespaces);
            l.max_reserved_per_session =
                field("max_reserved_per_session", f.max_reserved_per_session, size)?.or(l.max_reserved_per_session);
            l.max_leases_per_session = f.max_leases_per_session.unwrap_or(l.max_leases_per_session);
            l.max_leased_per_session =
                field("max_leased_per_session", f.max_leased_per_session, size)?.or(l.max_leased_per_session);
            c.auth_file = f.auth_file.or(c.auth_file);
            c.allow_insecure_remote = f.allow_insecure_remote.unwrap_or(c.allow_insecure_remote);
            c.tls = match (f.tls_cert, f.tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles { cert, key, client_ca: f.tls_client_ca }),
                (None, None) if f.tls_client_ca.is_none() => None,
                _ => return Err(format!("{name}: tls_cert and tls_key go together (tls_client_ca needs them)")),
            };
        }
        c.listen = cli.listen.unwrap_or(c.listen);
        c.data_listen = cli.data_listen.or(c.data_listen);
        c.metrics_listen = cli.metrics_listen.unwrap_or(c.metrics_listen);
        c.host_pool = cli.host_pool.unwrap_or(c.host_pool);
        c.gpu_pool = cli.gpu_pool.or(c.gpu_pool).filter(|g| g.0 > 0);
        c.gpu = cli.gpu.unwrap_or(c.gpu);
        c.transports = cli.transports.clone().unwrap_or(c.transports);
        if !transports_set && c.gpu_pool.is_some() {
            c.transports = "cuda_ipc,cuda_copy,sm,tcp".into();
        }
        c.net_devices = cli.net_devices.clone().or(c.net_devices);
        c.lease_ttl = cli.lease_ttl.unwrap_or(c.lease_ttl);
        c.max_lease_ttl = cli.max_lease_ttl.unwrap_or(c.max_lease_ttl);
        c.max_chunk_size = cli.max_chunk_size.unwrap_or(c.max_chunk_size);
        c.rma = cli.rma.unwrap_or(c.rma);
        c.transfer_timeout = cli.transfer_timeout.unwrap_or(c.transfer_timeout);
        c.drain_timeout = cli.drain_timeout.unwrap_or(c.drain_timeout);
        c.log = cli.log.clone().unwrap_or(c.log);
        let l = &mut c.limits;
        l.max_sessions = cli.max_sessions.unwrap_or(l.max_sessions);
        l.max_sessions_per_peer = cli.max_sessions_per_peer.unwrap_or(l.max_sessions_per_peer);
        l.max_concurrent_rpcs = cli.max_concurrent_rpcs.unwrap_or(l.max_concurrent_rpcs);
        l.max_namespaces = cli.max_namespaces.unwrap_or(l.max_namespaces);
        l.max_reserved_per_session = cli.max_reserved_per_session.or(l.max_reserved_per_session);
        l.max_leases_per_session = cli.max_leases_per_session.unwrap_or(l.max_leases_per_session);
        l.max_leased_per_session = cli.max_leased_per_session.or(l.max_leased_per_session);
        c.auth_file = cli.auth_file.clone().or(c.auth_file);
        c.allow_insecure_remote |= cli.allow_insecure_remote;
        if let (Some(cert), Some(key)) = (&cli.tls_cert, &cli.tls_key) {
            c.tls = Some(TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: cli.tls_client_ca.clone() });
        }
        if !chunk_size_set {
            // The default follows a small pool down rather than making it invalid.
            c.max_chunk_size = c.max_chunk_size.min(c.host_pool);
        }
        c.validate()?;
        Ok(c)
    }

    /// How long a session may go without a call before it is closed: how the server forgets a
    /// client that died without disconnecting. Clients keep quiet sessions open with KeepAlive.
    pub fn session_idle(&self) -> Duration {
        (self.lease_ttl * 4).max(Duration::from_secs(10))
    }

    /// Where the UCX data listener binds.
    pub fn data_listen_addr(&self) -> SocketAddr {
        self.data_listen.unwrap_or(SocketAddr::new(self.listen.ip(), 0))
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.host_pool.0 < 1 << 20 {
            return Err(format!("host_pool {} is below the 1MiB minimum", self.host_pool));
        }
        if let Some(g) = self.gpu_pool {
            if g.0 < 1 << 20 {
                return Err(format!("gpu_pool {g} is below the 1MiB minimum"));
            }
        }
        if self.max_chunk_size.0 == 0 || self.max_chunk_size.0 > self.host_pool.0 {
            return Err(format!(
                "max_chunk_size {} must be positive and at most host_pool {}",
                self.max_chunk_size, self.host_pool
            ));
        }
        if self.lease_ttl.is_zero() || self.lease_ttl > self.max_lease_ttl {
            return Err(format!(
                "lease_ttl {:?} must be positive and at most max_lease_ttl {:?}",
                self.lease_ttl, self.max_lease_ttl
            ));
        }
        if self.transfer_timeout.is_zero() {
            return Err("transfer_timeout must be positive".into());
        }
        if !(0.0 < self.low_watermark && self.low_watermark <= self.high_watermark && self.high_watermark <= 1.0) {
            return Err(format!(
                "watermarks must satisfy 0 < low ({}) <= high ({}) <= 1",
                self.low_watermark, self.high_watermark
            ));
        }
        ucx_bindings::TransportList::parse(&self.transports).map_err(|e| format!("transports: {e}"))?;
        let l = &self.limits;
        for (name, v) in [
            ("max_sessions", l.max_sessions),
            ("max_sessions_per_peer", l.max_sessions_per_peer),
            ("max_concurrent_rpcs", l.max_concurrent_rpcs),
            ("max_namespaces", l.max_namespaces),
            ("max_leases_per_session", l.max_leases_per_session),
        ] {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        Ok(())
    }

    /// Total bytes of the pools.
    pub fn pool_bytes(&self) -> u64 {
        self.host_pool.0 + self.gpu_pool.map_or(0, |g| g.0)
    }

    /// The per-session reservation limit (default: half the pools).
    pub fn max_reserved_per_session(&self) -> u64 {
        self.limits.max_reserved_per_session.map_or(self.pool_bytes() / 2, |b| b.0)
    }

    /// The per-session leased-bytes limit (default: half the pools).
    pub fn max_leased_per_session(&self) -> u64 {
        self.limits.max_leased_per_session.map_or(self.pool_bytes() / 2, |b| b.0)
    }

    /// The configuration as a TOML file would state it.
    pub fn to_toml(&self) -> String {
        let rma = self.rma.as_str();
        let mut s = format!(
            "listen = \"{}\"\nmetrics_listen = \"{}\"\nhost_pool = \"{}\"\ntransports = \"{}\"\n",
            self.listen, self.metrics_listen, self.host_pool, self.transports
        );
        if let Some(d) = &self.net_devices {
            s += &format!("net_devices = \"{d}\"\n");
        }
        if let Some(d) = &self.data_listen {
            s += &format!("data_listen = \"{d}\"\n");
        }
        if let Some(a) = &self.auth_file {
            s += &format!("auth_file = {:?}\n", a.display().to_string());
        }
        if self.allow_insecure_remote {
            s += "allow_insecure_remote = true\n";
        }
        if let Some(t) = &self.tls {
            s += &format!(
                "tls_cert = {:?}\ntls_key = {:?}\n",
                t.cert.display().to_string(),
                t.key.display().to_string()
            );
            if let Some(ca) = &t.client_ca {
                s += &format!("tls_client_ca = {:?}\n", ca.display().to_string());
            }
        }
        if let Some(g) = &self.gpu_pool {
            s += &format!("gpu_pool = \"{g}\"\ngpu = {}\n", self.gpu);
        }
        s += &format!(
            "lease_ttl = \"{}\"\nmax_lease_ttl = \"{}\"\nmax_chunk_size = \"{}\"\nrma = \"{rma}\"\n\
             transfer_timeout = \"{}\"\ndrain_timeout = \"{}\"\nlog = \"{}\"\nhigh_watermark = {}\nlow_watermark = {}\n",
            humantime::format_duration(self.lease_ttl),
            humantime::format_duration(self.max_lease_ttl),
            self.max_chunk_size,
            humantime::format_duration(self.transfer_timeout),
            humantime::format_duration(self.drain_timeout),
            self.log,
            self.high_watermark,
            self.low_watermark
        );
        let l = &self.limits;
        s += &format!(
            "max_sessions = {}\nmax_sessions_per_peer = {}\nmax_concurrent_rpcs = {}\nmax_namespaces = {}\n\
             max_reserved_per_session = \"{}\"\nmax_leases_per_session = {}\nmax_leased_per_session = \"{}\"\n",
            l.max_sessions,
            l.max_sessions_per_peer,
            l.max_concurrent_rpcs,
            l.max_namespaces,
            ByteSize(self.max_reserved_per_session()),
            l.max_leases_per_session,
            ByteSize(self.max_leased_per_session()),
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut v = vec!["prefixd"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap()
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::resolve(&cli(&[])).unwrap();
        assert_eq!(c.host_pool.0, 1 << 30);
        assert_eq!(c.listen.to_string(), "127.0.0.1:50051");
    }

    #[test]
    fn file_then_flags() {
        let dir = std::env::temp_dir().join(format!("prefixd-cfg-{}", std::process::id()));
        std::fs::write(&dir, "host_pool = \"64MiB\"\nlease_ttl = \"5s\"\nrma = \"never\"\n").unwrap();
        let path = dir.to_str().unwrap();
        let c = Config::resolve(&cli(&["--config", path, "--lease-ttl", "7s"])).unwrap();
        assert_eq!(c.host_pool.0, 64 << 20);
        assert_eq!(c.lease_ttl, Duration::from_secs(7), "flag beats file");
        assert_eq!(c.rma, RmaPolicy::Never);
        // The printed configuration reads back to the same values.
        std::fs::write(&dir, c.to_toml()).unwrap();
        let again = Config::resolve(&cli(&["--config", path])).unwrap();
        assert_eq!(again.to_toml(), c.to_toml());
        std::fs::write(&dir, "host_pol = \"1GiB\"\n").unwrap();
        let e = Config::resolve(&cli(&["--config", path])).unwrap_err();
        assert!(e.contains("host_pol"), "{e}");
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn rejects_bad_values() {
        assert!(Config::resolve(&cli(&["--host-pool", "1KiB"])).is_err());
        assert!(Config::resolve(&cli(&["--transports", "tcp,nope"])).is_err());
        assert!(Config::resolve(&cli(&["--lease-ttl", "10m"])).is_err());
        assert!(Config::resolve(&cli(&["--max-chunk-size", "2GiB"])).is_err());
        assert!(Cli::try_parse_from(["prefixd", "--host-pool", "lots"]).is_err());
    }
}
