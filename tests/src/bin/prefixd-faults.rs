//! `prefixd-faults`: randomized faults against real processes, with every byte read checked.
//!
//! The orchestrator starts a prefixd server and worker processes (producers and consumers, on
//! the same-host RMA path and the active-message path), then injects faults one after another:
//! kill -9 or SIGSTOP (short, or past the lease TTL) of a worker in the middle of its transfers,
//! SIGKILL and restart of the server, and pool exhaustion (a process that reserves all it may,
//! then dies). Every chunk's bytes are a function of (namespace, key), so a consumer checks each
//! byte it reads. At the end it stops the workers, waits out the TTL and asks the server what is
//! still reserved, leased or quarantined.
//!
//! It prints faults injected, operations, corrupt reads (must be 0), leaked reservations and
//! leases (must be 0) and hangs past the deadline (must be 0), and exits non-zero otherwise.
//!
//! `prefixd-faults --faults N [--seed S] [--workers W] [--bin-dir DIR]`
//! (`worker ...` and `hog ...` are its own child processes.)

use prefixd_client::{ChunkKey, ClientOptions, Reconnecting};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The lease TTL the server runs with: short, so stalls outlive it and leaks show soon.
const TTL: Duration = Duration::from_secs(1);
/// A running worker silent for longer than this is hung (its calls time out after 5 s).
const HANG: Duration = Duration::from_secs(30);
/// Prompts per namespace, and namespaces: more bytes than the pool, so it evicts.
const PROMPTS: u64 = 48;
const NAMESPACES: [&str; 3] = ["tenant-a", "tenant-b", "tenant-c"];
const CHUNK_TOKENS: usize = 256;

/// A small deterministic generator (xorshift64*), so a run is repeatable from its seed.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The bytes every chunk must hold: a function of its namespace and key.
fn chunk_len(key: &ChunkKey) -> usize {
    4096 * (1 + key.0[0] as usize % 64)
}

fn chunk_bytes(ns: &str, key: &ChunkKey) -> Vec<u8> {
    let mut seed = 0xcbf2_9ce4_8422_2325u64;
    for b in ns.as_bytes().iter().chain(key.0.iter()) {
        seed = (seed ^ *b as u64).wrapping_mul(0x100_0000_01b3);
    }
    let mut r = Rng::new(seed);
    let len = chunk_len(key);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&r.next().to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Prompt `p`: 1-4 chunks; the first is shared by every eighth prompt (a common system prompt).
fn prompt(p: u64) -> Vec<u32> {
    let chunks = 1 + (p % 4) as usize;
    let mut t = Vec::with_capacity(chunks * CHUNK_TOKENS);
    for c in 0..chunks {
        let base = if c == 0 { (p % 8) * 1_000_000 } else { p * 1_000_000 + c as u64 * 1000 };
        t.extend((0..CHUNK_TOKENS as u64).map(|i| (base + i) as u32));
    }
    t
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("worker") => worker(&args[1..]),
        Some("hog") => hog(&args[1..]),
        Some("-h" | "--help") => {
            println!("{}", HELP);
            Ok(true)
        }
        _ => orchestrate(&args),
    };
    match r {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("prefixd-faults: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

const HELP: &str = "prefixd-faults: randomized faults against a real prefixd and real clients

usage: prefixd-faults [--faults N] [--seed S] [--workers W] [--bin-dir DIR]

  --faults N    faults to inject (default 200)
  --seed S      seed of every random choice (default: the clock); printed, to repeat a run
  --workers W   worker processes, half producers, half consumers, alternating paths (default 4)
  --bin-dir D   where prefixd is (default: next to this binary)

Exit 0 when corrupt reads, leaked reservations, leaked leases, quarantined bytes and hangs are
all 0; 1 otherwise; 2 when the run itself could not be set up.";

// ---------------------------------------------------------------------------------------------
// Worker processes
// ---------------------------------------------------------------------------------------------

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn options(remote: bool) -> ClientOptions {
    ClientOptions {
        name: "faults".into(),
        net_devices: Some("lo".into()),
        force_remote: remote,
        timeout: Duration::from_secs(5),
        ..ClientOptions::default()
    }
}

/// `worker ENDPOINT producer|consumer rma|am SEED`: puts or gets forever, one line per call.
fn worker(args: &[String]) -> anyhow::Result<bool> {
    let [endpoint, role, path, seed] = args else {
        anyhow::bail!("usage: worker ENDPOINT producer|consumer rma|am SEED");
    };
    let producer = role == "producer";
    let remote = path == "am";
    let mut rng = Rng::new(seed.parse()?);
    let rt = runtime()?;
    rt.block_on(async {
        let client = loop {
            match Reconnecting::connect(endpoint, options(remote)).await {
                Ok(c) => break c,
                Err(e) => {
                    say(&format!("err connect {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        loop {
            let ns = NAMESPACES[rng.below(NAMESPACES.len() as u64) as usize];
            let tokens = prompt(rng.below(PROMPTS));
            let r = if producer { produce(&client, ns, &tokens).await } else { consume(&client, ns, &tokens).await };
            match r {
                Ok(line) => say(&line),
                Err(e) => {
                    say(&format!("err {}", e.to_string().replace('\n', " ")));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    })
}

async fn produce(c: &Reconnecting, ns: &str, tokens: &[u32]) -> prefixd_client::Result<String> {
    let ns = ns.to_owned();
    let tokens = tokens.to_vec();
    let o = c
        .run(|client| {
            let (ns, tokens) = (ns.clone(), tokens.clone());
            async move {
                let keys = client.keys(&tokens);
                let lens: Vec<usize> = keys.iter().map(chunk_len).collect();
                let buf = client.alloc(lens.iter().sum())?;
                let mut slices = Vec::new();
                let mut off = 0;
                for (k, len) in keys.iter().zip(&lens) {
                    buf.write(off, &chunk_bytes(&ns, k))?;
                    slices.push(buf.slice(off, *len)?);
                    off += len;
                }
                client.put_chunks(&ns, &keys, None, &slices).await
            }
        })
        .await?;
    Ok(format!("put {} {}", o.stored, o.skipped))
}

async fn consume(c: &Reconnecting, ns: &str, tokens: &[u32]) -> prefixd_client::Result<String> {
    let ns = ns.to_owned();
    let tokens = tokens.to_vec();
    c.run(|client| {
        let (ns, tokens) = (ns.clone(), tokens.clone());
        async move {
            let keys = client.keys(&tokens);
            let (hit, bytes) = client.get(&ns, &tokens).await?;
            let chunks = hit / CHUNK_TOKENS;
            let mut off = 0;
            for k in &keys[..chunks] {
                let want = chunk_bytes(&ns, k);
                let end = off + want.len();
                if bytes.get(off..end) != Some(want.as_slice()) {
                    return Ok(format!("corrupt {ns} {k}"));
                }
                off = end;
            }
            if off != bytes.len() {
                return Ok(format!("corrupt {ns}: {} bytes for {chunks} chunks", bytes.len()));
            }
            Ok(format!("get {chunks}"))
        }
    })
    .await
}

/// `hog ENDPOINT SEED`: reserves as much of the pool as it may (ResourceExhausted tells it when
/// to stop), says `held`, and waits to be killed.
fn hog(args: &[String]) -> anyhow::Result<bool> {
    let [endpoint, seed] = args else { anyhow::bail!("usage: hog ENDPOINT SEED") };
    let mut rng = Rng::new(seed.parse()?);
    let rt = runtime()?;
    rt.block_on(async {
        let client = prefixd_client::Client::connect_with(endpoint, options(rng.below(2) == 0)).await?;
        let mut held = Vec::new();
        for _ in 0..64 {
            let keys: Vec<ChunkKey> = (0..4).map(|_| ChunkKey(std::array::from_fn(|_| rng.next() as u8))).collect();
            match client.begin_put("hog", &keys, &[1 << 20; 4], None).await {
                Ok(p) => held.push(p),
                Err(_) => break,
            }
        }
        say(&format!("held {}", held.len()));
        std::future::pending::<()>().await;
        Ok(true)
    })
}

// ---------------------------------------------------------------------------------------------
// Orchestrator
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Tally {
    puts: AtomicU64,
    gets: AtomicU64,
    errors: AtomicU64,
    corrupt: AtomicU64,
}

struct Worker {
    args: Vec<String>,
    child: Child,
    /// Last time it printed a line (a finished call, or an error).
    last: Arc<Mutex<Instant>>,
    stopped_until: Option<Instant>,
}

struct Run {
    bin_dir: PathBuf,
    grpc_port: u16,
    dir: PathBuf,
    server: Child,
    restarts: u64,
    tally: Arc<Tally>,
}

fn pid(c: &Child) -> i32 {
    c.id() as i32
}

fn signal(c: &Child, sig: i32) {
    // SAFETY: kill(2) on a child we started and have not reaped.
    unsafe { libc::kill(pid(c), sig) };
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Run {
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    fn start_server(bin_dir: &std::path::Path, port: u16, dir: &std::path::Path, n: u64) -> anyhow::Result<Child> {
        let log = std::fs::File::create(dir.join(format!("prefixd-{n}.log")))?;
        let mut child = Command::new(bin_dir.join("prefixd"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--metrics-listen", "127.0.0.1:0"])
            .args(["--net-devices", "lo", "--host-pool", "48MiB", "--max-chunk-size", "1MiB"])
            .args(["--lease-ttl", &format!("{}ms", TTL.as_millis())])
            .env("PREFIXD_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut line = String::new();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the server never blocks on a full pipe.
            let mut sink = String::new();
            while r.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        match rx.recv_timeout(HANG) {
            Ok(l) if l.contains("grpc=") => Ok(child),
            _ => {
                let _ = child.kill();
                anyhow::bail!("prefixd did not start on port {port} (log in {})", dir.display())
            }
        }
    }

    fn spawn(&self, args: &[String]) -> anyhow::Result<Worker> {
        let mut child =
            Command::new(std::env::current_exe()?).args(args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let last = Arc::new(Mutex::new(Instant::now()));
        let (l, tally) = (last.clone(), self.tally.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                *l.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                let counter = match line.split_whitespace().next() {
                    Some("put") => &tally.puts,
                    Some("get") => &tally.gets,
                    Some("corrupt") => {
                        eprintln!("CORRUPT READ: {line}");
                        &tally.corrupt
                    }
                    _ => &tally.errors,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(Worker { args: args.to_vec(), child, last, stopped_until: None })
    }

    fn restart_server(&mut self) -> anyhow::Result<()> {
        signal(&self.server, libc::SIGKILL);
        let _ = self.server.wait();
        self.restarts += 1;
        self.server = Run::start_server(&self.bin_dir, self.grpc_port, &self.dir, self.restarts)?;
        Ok(())
    }
}

fn flag<T: std::str::FromStr>(args: &[String], name: &str) -> anyhow::Result<Option<T>> {
    match args.iter().position(|a| a == name) {
        None => Ok(None),
        Some(i) => {
            let v = args.get(i + 1).ok_or_else(|| anyhow::anyhow!("{name} needs a value"))?;
            v.parse().map(Some).map_err(|_| anyhow::anyhow!("{name}: cannot parse {v:?}"))
        }
    }
}

fn orchestrate(args: &[String]) -> anyhow::Result<bool> {
    let faults: u64 = flag(args, "--faults")?.unwrap_or(200);
    let seed: u64 = flag(args, "--seed")?.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    let workers: usize = flag(args, "--workers")?.unwrap_or(4).max(2);
    let bin_dir: PathBuf = match flag::<String>(args, "--bin-dir")? {
        Some(d) => d.into(),
        None => std::env::current_exe()?.parent().ok_or_else(|| anyhow::anyhow!("no bin dir"))?.to_path_buf(),
    };
    let dir = std::env::temp_dir().join(format!("prefixd-faults-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!("prefixd-faults: {faults} faults, seed {seed}, {workers} workers, logs in {}", dir.display());
    let mut rng = Rng::new(seed);
    let port = free_port()?;
    let server = Run::start_server(&bin_dir, port, &dir, 0)?;
    let mut run = Run { bin_dir, grpc_port: port, dir, server, restarts: 0, tally: Arc::default() };
    let endpoint = run.endpoint();

    let mut pool: Vec<Worker> = Vec::new();
    for i in 0..workers {
        let role = if i % 2 == 0 { "producer" } else { "consumer" };
        let path = if (i / 2) % 2 == 0 { "rma" } else { "am" };
        let args = vec!["worker".into(), endpoint.clone(), role.into(), path.into(), rng.next().to_string()];
        pool.push(run.spawn(&args)?);
    }
    std::thread::sleep(Duration::from_millis(500));

    let kinds = ["kill", "stop-short", "stop-long", "server-restart", "exhaust"];
    let mut injected = [0u64; 5];
    let mut hangs = 0u64;
    let t0 = Instant::now();
    for n in 0..faults {
        let now = Instant::now();
        // Resume workers whose stop is over; look for hung ones.
        for w in pool.iter_mut() {
            if w.stopped_until.is_some_and(|t| now >= t) {
                signal(&w.child, libc::SIGCONT);
                w.stopped_until = None;
                *w.last.lock().unwrap_or_else(|p| p.into_inner()) = now;
            }
            let silent = now.duration_since(*w.last.lock().unwrap_or_else(|p| p.into_inner()));
            if w.stopped_until.is_none() && silent > HANG {
                hangs += 1;
                eprintln!("HANG: worker {:?} silent for {silent:?}; replacing it", w.args);
                signal(&w.child, libc::SIGKILL);
                let _ = w.child.wait();
                *w = run.spawn(&w.args.clone())?;
            }
        }
        // Weights: kills and stops most often; the server restarts one fault in 25.
        let k = match rng.below(100) {
            0..=34 => 0,
            35..=59 => 1,
            60..=79 => 2,
            80..=83 => 3,
            _ => 4,
        };
        injected[k] += 1;
        let i = rng.below(pool.len() as u64) as usize;
        // Let the victim get into its transfers first.
        std::thread::sleep(Duration::from_millis(rng.below(150)));
        match kinds[k] {
            "kill" => {
                let w = &mut pool[i];
                signal(&w.child, libc::SIGKILL);
                let _ = w.child.wait();
                let mut args = w.args.clone();
                args[4] = rng.next().to_string();
                *w = run.spawn(&args)?;
            }
            "stop-short" | "stop-long" if pool[i].stopped_until.is_none() => {
                let ms = if k == 1 { 20 + rng.below(300) } else { TTL.as_millis() as u64 + 200 + rng.below(2000) };
                signal(&pool[i].child, libc::SIGSTOP);
                pool[i].stopped_until = Some(Instant::now() + Duration::from_millis(ms));
            }
            "stop-short" | "stop-long" => {} // already stopped: counted, it stays stopped
            "server-restart" => run.restart_server()?,
            _ => {
                let mut hog = run.spawn(&["hog".into(), endpoint.clone(), rng.next().to_string()])?;
                std::thread::sleep(Duration::from_millis(100 + rng.below(600)));
                signal(&hog.child, libc::SIGKILL);
                let _ = hog.child.wait();
            }
        }
        if (n + 1) % 100 == 0 || n + 1 == faults {
            let t = &run.tally;
            println!(
                "  {:>6} faults  {:>7} puts  {:>7} gets  {:>6} errors  {} corrupt  ({:.0} s)",
                n + 1,
                t.puts.load(Ordering::Relaxed),
                t.gets.load(Ordering::Relaxed),
                t.errors.load(Ordering::Relaxed),
                t.corrupt.load(Ordering::Relaxed),
                t0.elapsed().as_secs_f64()
            );
        }
    }

    // Wind down: every worker dies, then everything they held must come back after the TTL.
    for w in pool.iter_mut() {
        signal(&w.child, libc::SIGCONT);
        signal(&w.child, libc::SIGKILL);
        let _ = w.child.wait();
    }
    let rt = runtime()?;
    let deadline = Instant::now() + TTL * 4 + Duration::from_secs(5);
    let stats = loop {
        let s = rt.block_on(prefixd_client::stats_only(&endpoint, Duration::from_secs(5), &Default::default()))?;
        if (s.active_reservations == 0 && s.active_leases == 0 && s.quarantined_bytes == 0) || Instant::now() > deadline
        {
            break s;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // The stats channel's connection lives on `rt`'s tasks: end it before asking for a drain.
    drop(rt);
    let drain = Instant::now();
    signal(&run.server, libc::SIGTERM);
    let exit = run.server.wait()?;
    let drained = drain.elapsed();
    let t = &run.tally;
    let corrupt = t.corrupt.load(Ordering::Relaxed);
    let quarantined = stats.quarantined_bytes;
    println!("faults injected: {faults} (kill -9 {}, SIGSTOP short {}, SIGSTOP past TTL {}, server SIGKILL+restart {}, pool exhaustion {})",
        injected[0], injected[1], injected[2], injected[3], injected[4]);
    println!(
        "operations: {} puts, {} gets, {} errors (expected under faults)",
        t.puts.load(Ordering::Relaxed),
        t.gets.load(Ordering::Relaxed),
        t.errors.load(Ordering::Relaxed)
    );
    println!("corrupt reads: {corrupt}");
    println!("leaked reservations after TTL: {}", stats.active_reservations);
    println!("leaked leases after TTL: {}", stats.active_leases);
    println!("quarantined bytes after writers exited: {quarantined}");
    println!("hangs past {}s: {hangs}", HANG.as_secs());
    println!("server drain on SIGTERM: {:.1} s, {exit}", drained.as_secs_f64());
    println!("seed {seed}; {:.0} s", t0.elapsed().as_secs_f64());
    let ok = exit.success()
        && drained < Duration::from_secs(10)
        && corrupt == 0
        && stats.active_reservations == 0
        && stats.active_leases == 0
        && quarantined == 0
        && hangs == 0;
    if ok {
        let _ = std::fs::remove_dir_all(&run.dir);
    }
    Ok(ok)
}
