//! `prefixctl doctor`: will this node serve KV at full speed, and if not, why.
//!
//! Checks, in order: the server (reachable, version, health, pools), UCX on both sides and the
//! transports they share, a real session (its data path and the UCX lanes it got), the
//! environment traps operators meet (UCX_TLS, UCX_MEMTYPE_CACHE, PYTHONHASHSEED), the GPUs
//! (devices, peer access and link, where the server's GPU pool is), and a short bandwidth run
//! and the latency of a one-chunk get through prefixd's own data path, next to the physical copy. Each prints OK, WARN, FAIL or SKIP
//! with its fix; the exit code is the worst (0 OK, 1 WARN, 2 FAIL).

use crate::gpu;
use crate::report::{Check, Report};
use prefixd_client::ucx_bindings::RegionSlice;
use prefixd_client::{ChunkKey, Client, ClientOptions, DataPath, Stats, WorkerInit};
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;

/// Transports that move bytes between processes of one host without the network.
const SAME_HOST: &[&str] = &["posix", "sysv", "cma", "xpmem", "knem"];
const NAMESPACE: &str = "prefixd-doctor";
const CHUNK: usize = 4 << 20;
/// The chunk whose get latency is measured: about one vLLM block of a small model's KV.
const LATENCY_BYTES: usize = 64 << 10;
const LATENCY_REPS: usize = 21;

#[derive(Debug, Clone)]
pub struct DoctorArgs {
    pub endpoint: String,
    pub opts: ClientOptions,
    /// Transports asked for on the command line (None: the default for this machine).
    pub transports: Option<String>,
    /// The engine's GPU, for the pool-placement check.
    pub device: Option<usize>,
    /// Bytes per direction of the bandwidth run (0: no run).
    pub bench_bytes: usize,
}

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

fn host_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_owned()).unwrap_or_default()
}

pub async fn run(a: DoctorArgs) -> Report {
    let mut checks = Vec::new();
    let devices = gpu::devices();
    let have_gpu = devices.as_ref().is_ok_and(|d| !d.is_empty());
    let transports = a.transports.clone().unwrap_or_else(|| {
        if have_gpu {
            "cuda_ipc,cuda_copy,sm,tcp".into()
        } else {
            "sm,tcp".into()
        }
    });

    // Server: reachable, healthy, what it runs.
    let stats = server(&a, &mut checks).await;
    let same_host = stats.as_ref().is_some_and(|s| !s.host_id.is_empty() && s.host_id == host_id());
    if let Some(s) = &stats {
        checks.push(pools(s, have_gpu));
    }

    // UCX on both sides.
    let local = ucx_local(&transports, a.opts.net_devices.as_deref());
    match (&local, &stats) {
        (Ok((version, tls)), Some(s)) => checks.push(ucx_shared(version, tls, s, same_host)),
        (Ok((version, tls)), None) => {
            checks.push(Check::ok("ucx", format!("UCX {version} here: {}", tls.join(","))));
        }
        (Err(e), _) => checks.push(Check::fail(
            "ucx",
            format!("no UCX context: {e}"),
            "install UCX (scripts/dev.sh installs the libucx-cu13 wheel) or set UCX_HOME",
        )),
    }

    // A real session: the path and lanes this client actually gets.
    let mut opts = a.opts.clone();
    opts.transports = transports.clone();
    opts.name = "prefixctl-doctor".into();
    let client = match &stats {
        Some(s) => session(&a.endpoint, opts.clone(), s, same_host, &mut checks).await,
        None => {
            checks.push(Check::skip("session", "server unreachable"));
            None
        }
    };

    // Environment traps.
    checks.push(env_ucx_tls(stats.as_ref(), same_host));
    checks.push(env_memtype_cache(have_gpu));
    checks.push(env_hash_seed());

    // GPUs.
    match &devices {
        Err(e) => {
            for id in ["gpu.devices", "gpu.peers", "gpu.pool-device"] {
                checks.push(Check::skip(id, e.clone()));
            }
        }
        Ok(d) if d.is_empty() => {
            for id in ["gpu.devices", "gpu.peers", "gpu.pool-device"] {
                checks.push(Check::skip(id, "the CUDA driver sees no GPU"));
            }
        }
        Ok(d) => {
            checks.push(gpu_devices(d));
            checks.push(gpu_peers(d));
            checks.push(pool_device(d, stats.as_ref(), a.device, same_host));
        }
    }

    // Bandwidth through prefixd next to the physical copy.
    match (&client, a.bench_bytes) {
        (_, 0) => checks.push(Check::skip("bandwidth", "--bench-size 0")),
        (None, _) => checks.push(Check::skip("bandwidth", "no session")),
        (Some(c), n) => checks.push(host_bandwidth(c, n).await),
    }
    if let (Ok(d), true, Some(_)) = (&devices, have_gpu, &stats) {
        if a.bench_bytes > 0 {
            checks.push(gpu_bandwidth(&a.endpoint, &opts, d, stats.as_ref(), a.bench_bytes).await);
        }
    } else if a.bench_bytes > 0 {
        checks.push(Check::skip("bandwidth.gpu", "no GPU here"));
    }
    if let Some(c) = client {
        let _ = c.close().await;
    }
    Report::new(&a.endpoint, checks)
}

async fn server(a: &DoctorArgs, checks: &mut Vec<Check>) -> Option<Stats> {
    let fix = "start prefixd (scripts/dev.sh run, the systemd unit or the DaemonSet) or point --endpoint / PREFIXD_ENDPOINT at it";
    let ch = match prefixd_client::channel_with(&a.endpoint, a.opts.timeout, &a.opts.access).await {
        Ok(c) => c,
        Err(e) => {
            checks.push(Check::fail("server", e.to_string(), fix));
            return None;
        }
    };
    let serving = prefixd_client::health_check(ch).await.unwrap_or(false);
    let s = match prefixd_client::stats_only(&a.endpoint, a.opts.timeout, &a.opts.access).await {
        Ok(s) => s,
        Err(e) if e.is_access_denied() => {
            checks.push(Check::fail(
                "server",
                format!("prefixd refused this client: {e}"),
                "pass a token: --token-file FILE or PREFIXD_TOKEN (README: Security)",
            ));
            return None;
        }
        Err(e) => {
            checks.push(Check::fail("server", format!("prefixd answered but stats failed: {e}"), fix));
            return None;
        }
    };
    let data = json!({"version": s.version, "serving": serving, "ucx": s.ucx_version, "rma": s.rma_policy,
        "auth": s.auth_enabled, "same_host": s.host_id == host_id()});
    let summary = format!(
        "prefixd {} {}; RMA {}, tokens {}",
        s.version,
        if serving { "SERVING" } else { "NOT SERVING" },
        s.rma_policy,
        if s.auth_enabled { "on" } else { "off" }
    );
    checks.push(if serving {
        Check::ok("server", summary).data(data)
    } else {
        Check::fail("server", summary, "it is draining (SIGTERM) or starting; wait, or look at its log").data(data)
    });
    Some(s)
}

fn pools(s: &Stats, have_gpu: bool) -> Check {
    let lines: Vec<String> = s
        .tiers
        .iter()
        .map(|t| {
            let pct = if t.capacity_bytes == 0 { 0.0 } else { 100.0 * t.used_bytes as f64 / t.capacity_bytes as f64 };
            format!("{:<5} {} ({pct:.0}% used, {} chunks)", t.tier, gib(t.capacity_bytes), t.entries)
        })
        .collect();
    let gpu_pool = s.tiers.iter().any(|t| t.tier == "gpu");
    let data = json!({"tiers": s.tiers.iter().map(|t| json!({"tier": t.tier, "capacity": t.capacity_bytes,
        "used": t.used_bytes, "entries": t.entries})).collect::<Vec<_>>(), "evictions": s.evictions});
    let summary = format!("{} pool(s); {} evictions so far", s.tiers.len(), s.evictions);
    let c = if have_gpu && !gpu_pool {
        Check::warn(
            "server.pools",
            format!("{summary}; this machine has GPUs but the server has no GPU pool: loads come from host memory at PCIe speed"),
            "start prefixd with --gpu-pool SIZE --gpu N (the engine's GPU)",
        )
    } else {
        Check::ok("server.pools", summary)
    };
    c.detail(lines).data(data)
}

fn ucx_local(transports: &str, net_devices: Option<&str>) -> Result<(String, Vec<String>), String> {
    let mut b = ucx_bindings::ContextBuilder::new().transports(transports).map_err(|e| e.to_string())?;
    if let Some(d) = net_devices {
        b = b.net_devices(d);
    }
    let ctx = b.build().map_err(|e| e.to_string())?;
    let info = ctx.info();
    Ok((info.version.clone(), info.transports()))
}

fn ucx_shared(version: &str, local: &[String], s: &Stats, same_host: bool) -> Check {
    let shared: Vec<String> = local.iter().filter(|t| s.transports.contains(t)).cloned().collect();
    let data = json!({"client_version": version, "server_version": s.ucx_version, "client": local,
        "server": s.transports, "shared": shared, "same_host": same_host});
    let detail = vec![
        format!("client  UCX {version}: {}", local.join(",")),
        format!("server  UCX {}: {}", s.ucx_version, s.transports.join(",")),
        format!("shared  {}", shared.join(",")),
    ];
    let has = |t: &str| shared.iter().any(|x| x == t);
    let gpu_pool = !s.gpu_pool_device.is_empty();
    let check = if shared.is_empty() {
        Check::fail(
            "ucx.transports",
            "client and server share no UCX transport",
            "give both sides a common transport: --transports sm,tcp (client) and prefixd --transports",
        )
    } else if same_host && gpu_pool && !has("cuda_ipc") {
        Check::fail(
            "ucx.transports",
            "the server has a GPU pool but cuda_ipc is not shared: GPU loads cannot go GPU to GPU",
            "add cuda_ipc,cuda_copy to the client's transports (UCX_TLS) and to prefixd's --transports",
        )
    } else if same_host && !SAME_HOST.iter().any(|t| has(t)) && !has("cuda_ipc") {
        Check::warn(
            "ucx.transports",
            "same host, but no shared-memory transport is shared: bytes would cross tcp",
            "add sm (posix, cma) to UCX_TLS / --transports on both sides",
        )
    } else if !version.is_empty() && !s.ucx_version.is_empty() && version != s.ucx_version {
        Check::warn(
            "ucx.transports",
            format!("UCX {version} here, {} in the server", s.ucx_version),
            "use the same UCX on both sides (the libucx-cu13 wheel, or one system UCX)",
        )
    } else {
        Check::ok("ucx.transports", format!("UCX {version}; shared: {}", shared.join(",")))
    };
    check.detail(detail).data(data)
}

async fn session(
    endpoint: &str,
    opts: ClientOptions,
    s: &Stats,
    same_host: bool,
    checks: &mut Vec<Check>,
) -> Option<Client> {
    let forced = opts.force_remote;
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let other_user = same_host && uid != s.uid;
    let users_fix = format!(
        "run this client as the server's user (uid {}: the DaemonSet's runAsUser), or give both sides CAP_SYS_PTRACE and CAP_IPC_OWNER, or use --transports tcp",
        s.uid
    );
    let c = match Client::connect_with(endpoint, opts.clone()).await {
        Ok(c) => c,
        Err(e) if other_user => {
            checks.push(Check::fail(
                "session",
                format!(
                    "cannot open a session: {e}; this client runs as uid {uid}, the server as uid {}: UCX's shared memory between users is refused",
                    s.uid
                ),
                users_fix,
            ));
            return None;
        }
        Err(e) => {
            checks.push(Check::fail(
                "session",
                format!("cannot open a session: {e}"),
                "see the server's log; check --transports and --net-devices",
            ));
            return None;
        }
    };
    let lanes = c.endpoint_transports().await.unwrap_or_default();
    let path = c.data_path();
    let tcp_only = !lanes.is_empty() && lanes.iter().all(|l| l.starts_with("tcp"));
    let data = json!({"data_path": if path == DataPath::Rma { "rma" } else { "active_message" },
        "lanes": lanes, "direct_host_pool": c.direct_host_pool(), "transports": opts.transports});
    let summary = format!(
        "{} path over {}{}",
        if path == DataPath::Rma { "same-host RMA" } else { "active-message" },
        if lanes.is_empty() { "no lanes reported".to_owned() } else { lanes.join(", ") },
        if c.direct_host_pool() { "; host pool mapped" } else { "" }
    );
    let check = if same_host && tcp_only && other_user {
        Check::warn(
            "session",
            format!(
                "{summary}: this client (uid {uid}) and the server (uid {}) are different users, so UCX's shared memory between them is refused and the bytes go over tcp",
                s.uid
            ),
            users_fix,
        )
    } else if same_host && tcp_only {
        Check::warn(
            "session",
            format!("{summary}: this client is on the server's host but its bytes go over tcp"),
            if forced {
                "drop --force-remote: same-host clients get direct RMA".to_owned()
            } else {
                format!(
                    "use shared memory: --transports / PREFIXD_TRANSPORTS / UCX_TLS with sm{} (now {:?})",
                    if s.gpu_pool_device.is_empty() { "" } else { " and cuda_ipc,cuda_copy" },
                    opts.transports
                )
            },
        )
    } else if same_host && path != DataPath::Rma && !forced {
        let why = if s.rma_policy == "never" {
            "the server runs --rma never"
        } else if s.auth_enabled {
            "the server checks tokens and this token lacks the direct grant"
        } else {
            "no shared same-host transport"
        };
        Check::warn(
            "session",
            format!("{summary}: same host, but not the direct path ({why})"),
            "for full speed on one host: --rma same-host and a token with the direct grant (README: Security)",
        )
    } else if !same_host && tcp_only {
        Check::warn(
            "session",
            format!("{summary}: a remote server over tcp"),
            "where the nodes have RDMA, use a UCX with verbs (system UCX or MLNX OFED) and add rc to --transports",
        )
    } else {
        Check::ok("session", summary)
    };
    checks.push(check.data(data));
    Some(c)
}

fn env_ucx_tls(s: Option<&Stats>, same_host: bool) -> Check {
    let Ok(v) = std::env::var("UCX_TLS") else {
        return Check::ok("env.UCX_TLS", "unset: prefixd's clients choose their transports (--transports)");
    };
    let negated = v.starts_with('^');
    let list: Vec<&str> = v.trim_start_matches('^').split(',').map(str::trim).collect();
    let allows = |t: &str| {
        let named = list.iter().any(|x| *x == t || *x == "all" || (*x == "sm" && SAME_HOST.contains(&t)));
        named != negated
    };
    let gpu_pool = s.is_some_and(|s| !s.gpu_pool_device.is_empty());
    let mut missing = Vec::new();
    if same_host && gpu_pool && !allows("cuda_ipc") {
        missing.push("cuda_ipc");
    }
    if gpu_pool && !allows("cuda_copy") {
        missing.push("cuda_copy");
    }
    if !allows("tcp") && !SAME_HOST.iter().any(|t| allows(t)) {
        missing.push("tcp or sm (an active-message lane for wire-up)");
    }
    if missing.is_empty() {
        Check::ok("env.UCX_TLS", format!("UCX_TLS={v}"))
    } else {
        Check::warn(
            "env.UCX_TLS",
            format!("UCX_TLS={v} leaves out {}", missing.join(", ")),
            "with GPU pools on one host: UCX_TLS=cuda_ipc,cuda_copy,sm,tcp (cuda_ipc needs an sm or tcp lane beside it)",
        )
    }
}

fn env_memtype_cache(have_gpu: bool) -> Check {
    let v = std::env::var("UCX_MEMTYPE_CACHE").unwrap_or_default();
    let on = matches!(v.to_ascii_lowercase().as_str(), "y" | "yes" | "1" | "on" | "try");
    if have_gpu && on {
        Check::warn(
            "env.UCX_MEMTYPE_CACHE",
            format!("UCX_MEMTYPE_CACHE={v}: engines that hand UCX raw CUDA pointers (NIXL) may see them taken for host memory"),
            "unset it or set UCX_MEMTYPE_CACHE=n (prefixd itself passes a memory handle with every transfer)",
        )
    } else {
        Check::ok(
            "env.UCX_MEMTYPE_CACHE",
            if v.is_empty() { "unset".to_owned() } else { format!("UCX_MEMTYPE_CACHE={v}") },
        )
    }
}

fn env_hash_seed() -> Check {
    match std::env::var("PYTHONHASHSEED") {
        Ok(v) if !v.is_empty() && v != "random" => Check::ok(
            "env.PYTHONHASHSEED",
            format!("PYTHONHASHSEED={v}: every producer and consumer engine must use this same value"),
        ),
        _ => Check::warn(
            "env.PYTHONHASHSEED",
            "PYTHONHASHSEED is unset (or random) in this shell: vLLM 0.26 then seeds its block hashes at random per process, and prefill and decode engines never share a key (zero hits)",
            "export PYTHONHASHSEED=0 (one value for every engine of the fleet); `prefixctl keys` prints the keys to compare",
        ),
    }
}

fn gpu_devices(d: &[gpu::Device]) -> Check {
    let lines =
        d.iter().map(|g| format!("GPU {} {} {} ({})", g.ordinal, g.name, gib(g.memory_bytes), g.pci_bus_id)).collect();
    Check::ok("gpu.devices", format!("{} GPU(s)", d.len())).detail(lines).data(json!(d))
}

fn gpu_peers(d: &[gpu::Device]) -> Check {
    if d.len() < 2 {
        return Check::skip("gpu.peers", "one GPU: no peer pairs");
    }
    let peers = match gpu::peers(d) {
        Ok(p) => p,
        Err(e) => {
            return Check::warn("gpu.peers", format!("cannot query peer access: {e}"), "check the driver (nvidia-smi)")
        }
    };
    let mut lines = vec![format!(
        "{:>6}{}",
        "",
        d.iter().map(|g| format!("{:>8}", format!("GPU{}", g.ordinal))).collect::<String>()
    )];
    for a in d {
        let mut row = format!("{:>6}", format!("GPU{}", a.ordinal));
        for b in d {
            let cell = if a.ordinal == b.ordinal {
                "-".to_owned()
            } else {
                peers.iter().find(|p| p.from == a.ordinal && p.to == b.ordinal).map_or("?", |p| p.link()).to_owned()
            };
            row += &format!("{cell:>8}");
        }
        lines.push(row);
    }
    let none: Vec<_> = peers.iter().filter(|p| !p.access).collect();
    let data = json!(peers
        .iter()
        .map(|p| json!({"from": p.from, "to": p.to, "access": p.access, "link": p.link(),
        "performance_rank": p.performance_rank}))
        .collect::<Vec<_>>());
    let c = if none.is_empty() {
        let nvlink = peers.iter().all(|p| p.link() == "NVLink");
        Check::ok(
            "gpu.peers",
            if nvlink { "peer access between every pair, over NVLink" } else { "peer access between every pair" },
        )
    } else {
        Check::warn(
            "gpu.peers",
            format!("{} pair(s) without peer access: cuda_ipc between them stages through host memory", none.len()),
            "check `nvidia-smi topo -m`; on PCIe-only hosts disable ACS/IOMMU redirection or keep engine and pool on one GPU",
        )
    };
    // The link kind is inferred: NVLink carries native atomics between peers, PCIe does not.
    lines.push("(link: NVLink where the driver reports native peer atomics, else PCIe)".into());
    c.detail(lines).data(data)
}

fn pool_device(d: &[gpu::Device], s: Option<&Stats>, device: Option<usize>, same_host: bool) -> Check {
    let Some(s) = s else { return Check::skip("gpu.pool-device", "server unreachable") };
    if s.gpu_pool_device.is_empty() {
        return Check::skip("gpu.pool-device", "the server has no GPU pool");
    }
    if !same_host {
        return Check::skip("gpu.pool-device", "the server is on another host");
    }
    let Some(pool) = d.iter().find(|g| g.pci_bus_id == s.gpu_pool_device) else {
        return Check::warn(
            "gpu.pool-device",
            format!("the server's GPU pool is on {}, which this process cannot see", s.gpu_pool_device),
            "run doctor with the engine's CUDA_VISIBLE_DEVICES, or give the sidecar a GPU the engine sees",
        );
    };
    let engine = device.unwrap_or(0);
    let data = json!({"pool_gpu": pool.ordinal, "pool_pci": pool.pci_bus_id, "engine_gpu": engine});
    if pool.ordinal == engine {
        Check::ok(
            "gpu.pool-device",
            format!("GPU pool on GPU {} ({}), the engine's GPU", pool.ordinal, pool.pci_bus_id),
        )
        .data(data)
    } else {
        Check::warn(
            "gpu.pool-device",
            format!(
                "GPU pool on GPU {}, engine on GPU {engine}: every load and store crosses the peer link",
                pool.ordinal
            ),
            format!(
                "start the sidecar with --gpu {engine} (or pass --device to doctor if the engine uses another GPU)"
            ),
        )
        .data(data)
    }
}

fn fresh_keys(n: usize) -> Vec<ChunkKey> {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(7);
    (0..n)
        .map(|i| {
            let mut k = [0u8; 32];
            k[..16].copy_from_slice(&seed.to_le_bytes());
            k[16..24].copy_from_slice(&(i as u64).to_le_bytes());
            k[24..].copy_from_slice(b"doctor!!");
            ChunkKey(k)
        })
        .collect()
}

/// Deletes what a check stored. A get's lease is released in the background, so a chunk can
/// still be leased for a moment after the get returns: try again until it is gone (1 s at most).
async fn clean_up(c: &Client, keys: &[ChunkKey]) {
    for _ in 0..100 {
        match c.delete(NAMESPACE, keys).await {
            Ok((_, 0)) | Err(_) => return,
            Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Median µs of a get of one small chunk through prefixd: lookup with lease, the copy, the
/// release. That is what an engine waits for on a one-block hit, so it is mostly round trips.
async fn get_latency_us(c: &Client, src: &RegionSlice, dst: &RegionSlice) -> prefixd_client::Result<f64> {
    let key = fresh_keys(1);
    c.put_chunks(NAMESPACE, &key, None, std::slice::from_ref(src)).await?;
    let mut times = Vec::with_capacity(LATENCY_REPS);
    let r = async {
        c.get_chunks(NAMESPACE, &key, std::slice::from_ref(dst)).await?; // warm-up
        for _ in 0..LATENCY_REPS {
            let t = Instant::now();
            c.get_chunks(NAMESPACE, &key, std::slice::from_ref(dst)).await?;
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok::<_, prefixd_client::Error>(())
    }
    .await;
    clean_up(c, &key).await;
    r.map(|()| median(&mut times))
}

/// Median µs of a memcpy of `LATENCY_BYTES`, the physical floor of a small host get.
fn memcpy_latency_us() -> f64 {
    median(&mut crate::bench::memcpy_seconds(LATENCY_BYTES, LATENCY_REPS)) * 1e6
}

async fn host_bandwidth(c: &Client, bytes: usize) -> Check {
    let n = bytes.div_ceil(CHUNK).max(1);
    let bytes = n * CHUNK;
    let keys = fresh_keys(n);
    let r = async {
        let src = c.alloc(bytes)?;
        let pattern: Vec<u8> = (0..bytes).map(|i| (i * 31 + i / 4096) as u8).collect();
        src.write(0, &pattern)?;
        let slices = (0..n).map(|i| src.slice(i * CHUNK, CHUNK)).collect::<Result<Vec<_>, _>>()?;
        let t = Instant::now();
        let put = c.put_chunks(NAMESPACE, &keys, None, &slices).await?;
        let put_s = t.elapsed().as_secs_f64();
        let dst = c.alloc(bytes)?;
        let slices = (0..n).map(|i| dst.slice(i * CHUNK, CHUNK)).collect::<Result<Vec<_>, _>>()?;
        let t = Instant::now();
        let hits = c.get_chunks(NAMESPACE, &keys, &slices).await?;
        let get_s = t.elapsed().as_secs_f64();
        let same = hits == n && dst.to_vec(0, bytes)? == pattern;
        let lat = get_latency_us(c, &src.slice(0, LATENCY_BYTES)?, &dst.slice(0, LATENCY_BYTES)?).await?;
        Ok::<_, prefixd_client::Error>((put.stored, put_s, get_s, same, lat))
    }
    .await;
    clean_up(c, &keys).await;
    let (stored, put_s, get_s, same, lat) = match r {
        Ok(v) => v,
        Err(e) => {
            return Check::warn(
                "bandwidth",
                format!("the bandwidth run failed: {e}"),
                "see the session check and the server's log",
            )
        }
    };
    let base = crate::bench::memcpy_gbps(bytes);
    let base_lat = memcpy_latency_us();
    let (put, get) = (bytes as f64 / put_s / 1e9, bytes as f64 / get_s / 1e9);
    let lines = vec![
        format!("{:<24}{:>10}{:>12}{:>8}", "host memory", "prefixd", "memcpy", "ratio"),
        format!("{:<24}{:>8.2} GB/s{:>8.2} GB/s{:>8.2}", "put (client → pool)", put, base, put / base),
        format!("{:<24}{:>8.2} GB/s{:>8.2} GB/s{:>8.2}", "get (pool → client)", get, base, get / base),
        format!("{:<24}{:>8.0} µs{:>10.1} µs{:>8.3}", "get 64 KiB, p50 latency", lat, base_lat, base_lat / lat),
    ];
    let data = json!({"bytes": bytes, "chunk": CHUNK, "put_gbps": put, "get_gbps": get, "memcpy_gbps": base,
        "get_latency_us": lat, "memcpy_latency_us": base_lat, "stored": stored, "verified": same});
    let summary = format!(
        "{} MiB in {} MiB chunks: put {put:.2} GB/s, get {get:.2} GB/s ({:.2}x / {:.2}x memcpy); 64 KiB get {lat:.0} µs",
        bytes >> 20,
        CHUNK >> 20,
        put / base,
        get / base
    );
    let c = if !same {
        Check::fail("bandwidth", format!("{summary}; THE BYTES READ BACK DIFFER"), "report this with the server's log")
    } else if stored < n {
        Check::warn(
            "bandwidth",
            format!("{summary}; only {stored} of {n} chunks stored"),
            "the pool is full or a limit refused the put (see prefixd_limit_rejections_total)",
        )
    } else {
        Check::ok("bandwidth", summary)
    };
    c.detail(lines).data(data)
}

/// Put from and get into each GPU through prefixd, next to the driver's own copies between
/// that GPU and where the pool is (the pool's GPU, or pinned host memory).
async fn gpu_bandwidth(
    endpoint: &str,
    opts: &ClientOptions,
    devices: &[gpu::Device],
    s: Option<&Stats>,
    bytes: usize,
) -> Check {
    let n = bytes.div_ceil(CHUNK).max(1);
    let bytes = n * CHUNK;
    let pool_gpu = s.and_then(|s| devices.iter().find(|g| g.pci_bus_id == s.gpu_pool_device)).map(|g| g.ordinal);
    let mut lines = vec![format!("{:<32}{:>12}{:>14}{:>8}", "GPU data path", "prefixd", "driver copy", "ratio")];
    let mut rows = Vec::new();
    for d in devices {
        match gpu_row(endpoint, opts, d.ordinal, pool_gpu, bytes, n).await {
            Ok(r) => {
                for (what, p, base) in &r.bandwidth {
                    lines.push(format!("{:<32}{:>7.1} GB/s{:>9.1} GB/s{:>8.2}", what, p, base, p / base));
                    rows.push(json!({"path": what, "prefixd_gbps": p, "driver_gbps": base}));
                }
                let (what, p, base) = &r.latency;
                lines.push(format!("{:<32}{:>9.0} µs{:>11.1} µs{:>8.3}", what, p, base, base / p));
                rows.push(json!({"path": what, "prefixd_us": p, "driver_us": base}));
            }
            Err(e) => {
                return Check::warn(
                    "bandwidth.gpu",
                    format!("GPU {}: {e}", d.ordinal),
                    "see the session and gpu checks above",
                )
                .detail(lines);
            }
        }
    }
    let summary = match pool_gpu {
        Some(g) => format!("{} MiB per direction, pool on GPU {g}", bytes >> 20),
        None => format!("{} MiB per direction, pool in host memory", bytes >> 20),
    };
    Check::ok("bandwidth.gpu", summary).detail(lines).data(json!({"bytes": bytes, "rows": rows}))
}

/// One GPU's rows of the matrix: (path, prefixd, driver) in GB/s each way, and the p50 latency
/// of a small get in µs.
struct GpuRow {
    bandwidth: Vec<(String, f64, f64)>,
    latency: (String, f64, f64),
}

async fn gpu_row(
    endpoint: &str,
    opts: &ClientOptions,
    ordinal: usize,
    pool_gpu: Option<usize>,
    bytes: usize,
    n: usize,
) -> Result<GpuRow, String> {
    let g = gpu::Gpu::open(ordinal)?;
    let buf = g.alloc(bytes)?;
    // The driver's copies between this GPU and where the pool is.
    let small = g.alloc(LATENCY_BYTES)?;
    let (to_pool, from_pool, copy_us) = match pool_gpu {
        Some(p) => {
            let pg = gpu::Gpu::open(p)?;
            // Where the driver reports no peer access the copy stages through the host, as
            // prefixd's would: the baseline stays comparable, so a refusal is not an error.
            let _ = g.enable_peer(&pg).and_then(|()| pg.enable_peer(&g));
            let other = pg.alloc(bytes)?;
            let other_small = pg.alloc(LATENCY_BYTES)?;
            g.current()?;
            (
                gpu::best_gbps(bytes, 3, || gpu::copy_dtod(&other, &buf))?,
                gpu::best_gbps(bytes, 3, || gpu::copy_dtod(&buf, &other))?,
                median(&mut gpu::copy_seconds(LATENCY_REPS, || gpu::copy_dtod(&small, &other_small))?) * 1e6,
            )
        }
        None => {
            let host = g.alloc_host(bytes)?;
            (
                gpu::best_gbps(bytes, 3, || gpu::copy_dtoh(&host, &buf))?,
                gpu::best_gbps(bytes, 3, || gpu::copy_htod(&buf, &host))?,
                median(&mut gpu::copy_seconds(LATENCY_REPS, || gpu::copy_htod(&small, &host))?) * 1e6,
            )
        }
    };
    // The same through prefixd, from and into this GPU's memory.
    let ctx_ordinal = ordinal;
    let mut o = opts.clone();
    o.worker_init = Some(WorkerInit(Arc::new(move || {
        if let Ok(g) = gpu::Gpu::open(ctx_ordinal) {
            std::mem::forget(g); // stays current on UCX's thread for the process's life
        }
    })));
    let c = Client::connect_with(endpoint, o).await.map_err(|e| e.to_string())?;
    // SAFETY: `buf` is a live cuMemAlloc allocation of `bytes` bytes that outlives the client's
    // use of it (the client is closed below, before `buf` drops).
    let region = unsafe { c.register_cuda(buf.ptr, bytes) }.map_err(|e| e.to_string())?;
    let slices =
        (0..n).map(|i| region.slice(i * CHUNK, CHUNK)).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
    let keys = fresh_keys(n);
    let t = Instant::now();
    c.put_chunks(NAMESPACE, &keys, None, &slices).await.map_err(|e| e.to_string())?;
    let put = bytes as f64 / t.elapsed().as_secs_f64() / 1e9;
    let t = Instant::now();
    c.get_chunks(NAMESPACE, &keys, &slices).await.map_err(|e| e.to_string())?;
    let get = bytes as f64 / t.elapsed().as_secs_f64() / 1e9;
    clean_up(&c, &keys).await;
    // SAFETY: `small` is a live cuMemAlloc allocation of LATENCY_BYTES that outlives the
    // client's use of it (closed below).
    let small_region = unsafe { c.register_cuda(small.ptr, LATENCY_BYTES) }.map_err(|e| e.to_string())?;
    let whole = small_region.slice(0, LATENCY_BYTES).map_err(|e| e.to_string())?;
    let lat = get_latency_us(&c, &region.slice(0, LATENCY_BYTES).map_err(|e| e.to_string())?, &whole)
        .await
        .map_err(|e| e.to_string());
    let _ = c.close().await;
    let lat = lat?;
    let pool = pool_gpu.map_or("host".to_owned(), |p| format!("GPU {p}"));
    Ok(GpuRow {
        bandwidth: vec![
            (format!("GPU {ordinal} → pool ({pool})"), put, to_pool),
            (format!("pool ({pool}) → GPU {ordinal}"), get, from_pool),
        ],
        latency: (format!("pool ({pool}) → GPU {ordinal}, 64 KiB p50"), lat, copy_us),
    })
}
