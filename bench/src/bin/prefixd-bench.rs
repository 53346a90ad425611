//! `prefixd-bench`: prefixd put/get throughput and Lookup latency on one machine, against
//! redis-server SET/GET with the same payloads and ucx_perftest on the same transport, in one run.
//!
//! `prefixd-bench [--tls sm,tcp] [--sizes 1M,4M,36M] [--concurrency 1,2,4,8] [--bytes 256M]
//!                [--batch 8] [--redis-server PATH] [--perftest PATH]`
//!
//! `--batch B`: chunks per call on both sides: one prefixd get/put of B chunks (a prompt of B
//! chunks, as an engine asks), one Redis MGET/MSET of B keys.
//!
//! Per transport a fresh prefixd (found beside this binary) runs with `--transports T`; clients
//! use the same list, so `sm` takes the same-host RMA path and `tcp` the active-message path.
//! Each concurrency level runs that many clients (own session, own UCX worker), each putting its
//! own chunks and reading them back. Redis gets one connection per client. Bandwidths are GB/s
//! (10^9 bytes/s).

use prefixd_bench::{find_perftest, human, parse_size, quantile, run_perftest, BoxResult};
use prefixd_client::{Client, ClientOptions, KeyConfig};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

const USAGE: &str = "usage: prefixd-bench [--tls sm,tcp] [--sizes 1M,4M,36M] [--concurrency 1,2,4,8] [--bytes 256M] [--batch 8] [--redis-server PATH] [--perftest PATH]";

struct Args {
    transports: Vec<String>,
    sizes: Vec<usize>,
    concurrency: Vec<usize>,
    bytes: usize,
    redis: String,
    batch: usize,
    perftest: Option<std::path::PathBuf>,
}

fn parse_args() -> BoxResult<Args> {
    let mut a = Args {
        transports: vec!["sm".into(), "tcp".into()],
        sizes: vec![1 << 20, 4 << 20, 36 << 20],
        concurrency: vec![1, 2, 4, 8],
        bytes: 256 << 20,
        redis: "redis-server".into(),
        batch: 8,
        perftest: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--tls" => a.transports = value()?.split(',').map(str::to_owned).collect(),
            "--sizes" => a.sizes = value()?.split(',').map(parse_size).collect::<BoxResult<_>>()?,
            "--concurrency" => {
                a.concurrency = value()?.split(',').map(|c| c.parse::<usize>()).collect::<Result<_, _>>()?
            }
            "--bytes" => a.bytes = parse_size(&value()?)?,
            "--redis-server" => a.redis = value()?,
            "--batch" => a.batch = value()?.parse()?,
            "--perftest" => a.perftest = Some(value()?.into()),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}").into()),
        }
    }
    if a.sizes.contains(&0) || a.concurrency.contains(&0) || a.batch == 0 {
        return Err("sizes and concurrency must be positive".into());
    }
    Ok(a)
}

fn main() {
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("prefixd-bench: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run()) {
        eprintln!("prefixd-bench: {e}");
        std::process::exit(1);
    }
}

/// A child process killed on drop.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_prefixd(tls: &str, pool: usize) -> BoxResult<(Proc, String)> {
    let exe = std::env::current_exe()?.with_file_name("prefixd");
    let mut child = Command::new(&exe)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--net-devices", "lo"])
        .args(["--transports", tls, "--host-pool", &format!("{}MiB", pool >> 20), "--log", "warn"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    let grpc = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .ok_or_else(|| format!("unexpected start line {line:?}"))?;
    Ok((Proc(child), format!("http://{grpc}")))
}

fn start_redis(exe: &str, port: u16) -> BoxResult<Proc> {
    let child = Command::new(exe)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--protected-mode", "no", "--proto-max-bulk-len", "1gb", "--maxmemory", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {exe} (apt-get install redis-server, or --redis-server PATH): {e}"))?;
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(Proc(child));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err("redis-server did not start".into())
}

#[derive(Default, Clone, Copy)]
struct Point {
    put_gbs: f64,
    get_gbs: f64,
    get_chunks_s: f64,
}

async fn run() -> BoxResult<()> {
    let args = parse_args()?;
    let perftest = match &args.perftest {
        Some(p) => p.clone(),
        None => find_perftest()?,
    };
    let max_size = *args.sizes.iter().max().ok_or("no sizes")?;
    let max_c = *args.concurrency.iter().max().ok_or("no concurrency")?;
    // Room for every client's chunks at the largest point, plus slack.
    let per_client = (args.bytes / max_size).max(2) * max_size;
    let pool = (per_client * max_c + (64 << 20)).next_power_of_two().max(256 << 20);
    let redis_port = 16379 + (std::process::id() % 1000) as u16;
    let _redis = start_redis(&args.redis, redis_port)?;
    let mut rows = Vec::new();
    let mut lookups = Vec::new();
    let mut port = 14400 + (std::process::id() % 500) as u16;
    for tls in &args.transports {
        let (_server, endpoint) = start_prefixd(tls, pool)?;
        for &size in &args.sizes {
            for &c in &args.concurrency {
                let n = ((args.bytes / size / c).max(2)).div_ceil(args.batch) * args.batch;
                eprintln!("[prefixd] {tls} {} x{n} per client, {c} clients", human(size));
                let ours = prefixd_point(&endpoint, tls, size, c, n, args.batch).await?;
                eprintln!("   put {:.2} GB/s, get {:.2} GB/s", ours.put_gbs, ours.get_gbs);
                eprintln!("[redis] {} x{n} per client, {c} clients", human(size));
                let redis = redis_point(redis_port, size, c, n, args.batch).await?;
                eprintln!("   set {:.2} GB/s, get {:.2} GB/s", redis.put_gbs, redis.get_gbs);
                rows.push((tls.clone(), size, c, ours, redis, None::<f64>));
            }
            port += 1;
            let iters = (args.bytes / size).clamp(20, 10_000);
            eprintln!("[ucx_perftest] {tls} ucp_get {} x{iters}", human(size));
            let pf = run_perftest(&perftest, tls, "ucp_get", size, iters, 8, port)
                .map_err(|e| eprintln!("   perftest failed: {e}"))
                .ok();
            for r in rows.iter_mut().filter(|r| r.0 == *tls && r.1 == size) {
                r.5 = pf;
            }
        }
        eprintln!("[lookup] {tls}: 8 clients x 2000 lookups of a 64-chunk prefix");
        lookups.push((tls.clone(), lookup_latency(&endpoint, tls, 8, 2000).await?));
    }

    println!();
    println!("| transport | chunk | clients | chunks/call | put GB/s | get GB/s | get chunks/s | Redis SET GB/s | Redis GET GB/s | get / Redis GET | ucx_perftest get GB/s | get / perftest |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (tls, size, c, ours, redis, pf) in &rows {
        let (pf_s, pf_ratio) = match pf {
            Some(p) if *p > 0.0 => (format!("{p:.2}"), format!("{:.2}", ours.get_gbs / p)),
            _ => ("n/a".into(), "n/a".into()),
        };
        println!(
            "| {tls} | {} | {c} | {} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.2} | {pf_s} | {pf_ratio} |",
            human(*size),
            args.batch,
            ours.put_gbs,
            ours.get_gbs,
            ours.get_chunks_s,
            redis.put_gbs,
            redis.get_gbs,
            ours.get_gbs / redis.get_gbs.max(1e-9),
        );
    }
    println!();
    println!("| transport | Lookup of 64 chunks, 8 clients | p50 µs | p99 µs |");
    println!("|---|---|---|---|");
    for (tls, (p50, p99)) in &lookups {
        println!("| {tls} | 16000 calls | {p50:.0} | {p99:.0} |");
    }
    Ok(())
}

fn opts(tls: &str) -> ClientOptions {
    ClientOptions {
        name: "prefixd-bench".into(),
        transports: tls.to_owned(),
        net_devices: Some("lo".into()),
        keys: KeyConfig::default(),
        timeout: Duration::from_secs(120),
        ..ClientOptions::default()
    }
}

/// `c` clients, each putting `n` distinct chunks of `size` then reading them back.
async fn prefixd_point(endpoint: &str, tls: &str, size: usize, c: usize, n: usize, batch: usize) -> BoxResult<Point> {
    let mut clients = Vec::new();
    for _ in 0..c {
        clients.push(Arc::new(Client::connect_with(endpoint, opts(tls)).await?));
    }
    let salt = Instant::now().elapsed().as_nanos() as u32 ^ std::process::id();
    // Buffers registered and touched before timing, as an engine's KV memory would be.
    let mut bufs = Vec::new();
    for (ci, client) in clients.iter().enumerate() {
        let buf = client.alloc(size * n)?;
        let mut fill = vec![0u8; size * n];
        ucx_bindings::peer_protocol::fill_random(&mut fill, ci as u64 + 1);
        buf.write(0, &fill)?;
        bufs.push(buf);
    }
    let run = |phase: &'static str| {
        let mut set = tokio::task::JoinSet::new();
        for (ci, client) in clients.iter().enumerate() {
            let client = client.clone();
            let buf = bufs[ci].clone();
            set.spawn(async move {
                // Distinct keys per client and run: key i of client ci.
                let keys: Vec<_> = (0..n)
                    .map(|i| {
                        let mut k = [0u8; 32];
                        k[..4].copy_from_slice(&salt.to_le_bytes());
                        k[4..8].copy_from_slice(&(ci as u32).to_le_bytes());
                        k[8..16].copy_from_slice(&(i as u64).to_le_bytes());
                        k[16..24].copy_from_slice(&(size as u64).to_le_bytes());
                        prefixd_client::ChunkKey(k)
                    })
                    .collect();
                let slices: Vec<_> = (0..n).map(|i| buf.slice(i * size, size)).collect::<Result<_, _>>()?;
                // `batch` chunks per call: one prompt's worth.
                for (k, s) in keys.chunks(batch).zip(slices.chunks(batch)) {
                    if phase == "put" {
                        client.put_chunks("bench", k, None, s).await?;
                    } else if client.get_chunks("bench", k, s).await? != k.len() {
                        return Err::<(), BoxErr>("a chunk went missing during the benchmark".into());
                    }
                }
                Ok(())
            });
        }
        set
    };
    let total = (size * n * c) as f64;
    let t0 = Instant::now();
    let mut set = run("put");
    while let Some(r) = set.join_next().await {
        r??;
    }
    let put = total / t0.elapsed().as_secs_f64() / 1e9;
    let t0 = Instant::now();
    let mut set = run("get");
    while let Some(r) = set.join_next().await {
        r??;
    }
    let secs = t0.elapsed().as_secs_f64();
    for cl in clients {
        if let Ok(cl) = Arc::try_unwrap(cl) {
            cl.close().await.ok();
        }
    }
    Ok(Point { put_gbs: put, get_gbs: total / secs / 1e9, get_chunks_s: (n * c) as f64 / secs })
}

type BoxErr = Box<dyn std::error::Error + Send + Sync>;

/// Minimal RESP client: SET and GET of binary values.
struct Redis {
    r: tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Redis {
    async fn connect(port: u16) -> BoxResult<Redis> {
        let s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        Ok(Redis { r: tokio::io::BufReader::with_capacity(1 << 20, r), w })
    }

    async fn set(&mut self, key: &[u8], value: &[u8]) -> BoxResult<()> {
        let head = format!("*3\r\n$3\r\nSET\r\n${}\r\n", key.len());
        self.w.write_all(head.as_bytes()).await?;
        self.w.write_all(key).await?;
        self.w.write_all(format!("\r\n${}\r\n", value.len()).as_bytes()).await?;
        self.w.write_all(value).await?;
        self.w.write_all(b"\r\n").await?;
        let mut line = String::new();
        self.r.read_line(&mut line).await?;
        if !line.starts_with("+OK") {
            return Err(format!("redis SET: {line:?}").into());
        }
        Ok(())
    }

    /// MSET of several keys to the same value.
    async fn mset(&mut self, keys: &[String], value: &[u8]) -> BoxResult<()> {
        self.w.write_all(format!("*{}\r\n$4\r\nMSET\r\n", 1 + 2 * keys.len()).as_bytes()).await?;
        for k in keys {
            self.w.write_all(format!("${}\r\n{k}\r\n${}\r\n", k.len(), value.len()).as_bytes()).await?;
            self.w.write_all(value).await?;
            self.w.write_all(b"\r\n").await?;
        }
        let mut line = String::new();
        self.r.read_line(&mut line).await?;
        if !line.starts_with("+OK") {
            return Err(format!("redis MSET: {line:?}").into());
        }
        Ok(())
    }

    /// MGET of several keys, each value read into `out`.
    async fn mget(&mut self, keys: &[String], out: &mut [u8]) -> BoxResult<()> {
        self.w.write_all(format!("*{}\r\n$4\r\nMGET\r\n", 1 + keys.len()).as_bytes()).await?;
        for k in keys {
            self.w.write_all(format!("${}\r\n{k}\r\n", k.len()).as_bytes()).await?;
        }
        let mut line = String::new();
        self.r.read_line(&mut line).await?;
        if line.trim() != format!("*{}", keys.len()) {
            return Err(format!("redis MGET: {line:?}").into());
        }
        for _ in keys {
            line.clear();
            self.r.read_line(&mut line).await?;
            let len: usize = line
                .trim()
                .strip_prefix('$')
                .and_then(|l| l.parse().ok())
                .ok_or_else(|| format!("redis MGET: {line:?}"))?;
            if len != out.len() {
                return Err(format!("redis MGET returned {len} bytes, expected {}", out.len()).into());
            }
            self.r.read_exact(out).await?;
            let mut crlf = [0u8; 2];
            self.r.read_exact(&mut crlf).await?;
        }
        Ok(())
    }

    async fn get(&mut self, key: &[u8], out: &mut [u8]) -> BoxResult<()> {
        self.w.write_all(format!("*2\r\n$3\r\nGET\r\n${}\r\n", key.len()).as_bytes()).await?;
        self.w.write_all(key).await?;
        self.w.write_all(b"\r\n").await?;
        let mut line = String::new();
        self.r.read_line(&mut line).await?;
        let len: usize =
            line.trim().strip_prefix('$').and_then(|l| l.parse().ok()).ok_or_else(|| format!("redis GET: {line:?}"))?;
        if len != out.len() {
            return Err(format!("redis GET returned {len} bytes, expected {}", out.len()).into());
        }
        self.r.read_exact(out).await?;
        let mut crlf = [0u8; 2];
        self.r.read_exact(&mut crlf).await?;
        Ok(())
    }
}

async fn redis_point(port: u16, size: usize, c: usize, n: usize, batch: usize) -> BoxResult<Point> {
    let value = Arc::new(vec![0x5au8; size]);
    let total = (size * n * c) as f64;
    let phase = |get: bool| {
        let mut set = tokio::task::JoinSet::new();
        for ci in 0..c {
            let value = value.clone();
            set.spawn(async move {
                let mut r = Redis::connect(port).await?;
                let mut out = vec![0u8; size];
                let keys: Vec<String> = (0..n).map(|i| format!("bench:{size}:{ci}:{i}")).collect();
                for group in keys.chunks(batch) {
                    match (get, group.len()) {
                        (true, 1) => r.get(group[0].as_bytes(), &mut out).await?,
                        (false, 1) => r.set(group[0].as_bytes(), &value).await?,
                        (true, _) => r.mget(group, &mut out).await?,
                        (false, _) => r.mset(group, &value).await?,
                    }
                }
                Ok::<(), BoxErr>(())
            });
        }
        set
    };
    let t0 = Instant::now();
    let mut s = phase(false);
    while let Some(r) = s.join_next().await {
        r??;
    }
    let put = total / t0.elapsed().as_secs_f64() / 1e9;
    let t0 = Instant::now();
    let mut s = phase(true);
    while let Some(r) = s.join_next().await {
        r??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let mut r = Redis::connect(port).await?;
    r.w.write_all(b"*1\r\n$8\r\nFLUSHALL\r\n").await?;
    let mut line = String::new();
    r.r.read_line(&mut line).await?;
    Ok(Point { put_gbs: put, get_gbs: total / secs / 1e9, get_chunks_s: (n * c) as f64 / secs })
}

/// `c` clients each looking up a cached 64-chunk prefix `calls` times; (p50, p99) in µs.
async fn lookup_latency(endpoint: &str, tls: &str, c: usize, calls: usize) -> BoxResult<(f64, f64)> {
    let seeder = Client::connect_with(endpoint, opts(tls)).await?;
    let tokens: Vec<u32> = (0..64 * 256).map(|i| 7 + i as u32).collect();
    seeder.put("lookup-bench", &tokens, &vec![1u8; 64 * 4096]).await?;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..c {
        let (endpoint, tokens, o) = (endpoint.to_owned(), tokens.clone(), opts(tls));
        set.spawn(async move {
            let client = Client::connect_with(&endpoint, o).await?;
            let keys = client.keys(&tokens);
            let mut lat = Vec::with_capacity(calls);
            for _ in 0..calls {
                let t0 = Instant::now();
                let hits = client.lookup_keys("lookup-bench", &keys).await?;
                lat.push(t0.elapsed().as_secs_f64() * 1e6);
                if hits != 64 {
                    return Err::<Vec<f64>, BoxErr>(format!("lookup hit {hits} of 64").into());
                }
            }
            Ok(lat)
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r??);
    }
    Ok((quantile(&mut all, 0.5), quantile(&mut all, 0.99)))
}
