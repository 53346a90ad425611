//! `ucx-bench`: our put, get and active-message throughput against `ucx_perftest` on the same
//! transport, sizes and window, in one run, with the ratio.
//!
//! `ucx-bench [--tls tcp,sm] [--sizes 64K,256K,1M,4M,16M,64M] [--window 8] [--bytes 512M]
//!            [--reps 3] [--perftest PATH]`
//!
//! Each transport gets its own `ucx-peer serve` process (found beside this binary) and its own
//! `ucx_perftest` server/client pair (found in the `libucx-cu13` wheel unless `--perftest` says).
//! Bandwidth is in GB/s (10^9 bytes per second) for both.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use ucx_bindings::peer_protocol::{self as pp, Header, PeerProcess};
use ucx_bindings::{AmData, ContextBuilder, Endpoint, ErrorMode, MemRegion, RemoteKey, Worker};

use prefixd_bench::{find_perftest, human, median, parse_size, run_perftest, BoxResult};

const USAGE: &str = "usage: ucx-bench [--tls tcp,sm] [--sizes 64K,256K,1M,4M,16M,64M] [--window 8] [--bytes 512M] [--reps 3] [--perftest PATH]";
const OP_TIMEOUT: Duration = Duration::from_secs(60);

struct Args {
    transports: Vec<String>,
    sizes: Vec<usize>,
    window: usize,
    bytes: usize,
    reps: usize,
    perftest: Option<PathBuf>,
}

fn parse_args() -> BoxResult<Args> {
    let mut a = Args {
        transports: vec!["tcp".into(), "sm".into()],
        sizes: ["64K", "256K", "1M", "4M", "16M", "64M"].iter().map(|s| parse_size(s)).collect::<BoxResult<_>>()?,
        window: 8,
        bytes: 512 << 20,
        reps: 3,
        perftest: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--tls" => a.transports = value()?.split(',').map(str::to_owned).collect(),
            "--sizes" => a.sizes = value()?.split(',').map(parse_size).collect::<BoxResult<_>>()?,
            "--window" => a.window = value()?.parse()?,
            "--reps" => a.reps = value()?.parse()?,
            "--bytes" => a.bytes = parse_size(&value()?)?,
            "--perftest" => a.perftest = Some(PathBuf::from(value()?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}").into()),
        }
    }
    if a.window == 0 || a.reps == 0 || a.sizes.is_empty() || a.sizes.contains(&0) {
        return Err("window and sizes must be positive".into());
    }
    Ok(a)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("ucx-bench: {e}");
        std::process::exit(1);
    }
}

struct Row {
    tls: String,
    op: &'static str,
    size: usize,
    /// Ours with the same endpoint error mode as ucx_perftest (none).
    ours_same: f64,
    /// Ours in peer error mode, as prefixd runs.
    ours_peer: f64,
    perftest: Option<f64>,
}

fn run() -> BoxResult<()> {
    let args = parse_args()?;
    let perftest = match &args.perftest {
        Some(p) => p.clone(),
        None => find_perftest()?,
    };
    let peer_exe = std::env::current_exe()?.with_file_name("ucx-peer");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut rows = Vec::new();
    let mut port = 13400u16 + (std::process::id() % 500) as u16;
    for tls in &args.transports {
        // Each repetition runs ours (both error modes) and then ucx_perftest over every size, so
        // drift on a shared machine hits both sides; the table shows the median of each.
        let mut reps: Vec<Vec<(f64, f64, Option<f64>)>> = Vec::new();
        let mut labels = Vec::new();
        for rep in 0..args.reps {
            eprintln!("[rep {}/{}] {tls}", rep + 1, args.reps);
            let same = rt.block_on(bench_ours(&peer_exe, tls, &args, ErrorMode::None))?;
            let peer = rt.block_on(bench_ours(&peer_exe, tls, &args, ErrorMode::Peer))?;
            let mut this = Vec::new();
            labels.clear();
            for ((op, size, gbs), (_, _, peer_gbs)) in same.into_iter().zip(peer) {
                let test = match op {
                    "put" => "ucp_put_bw",
                    "get" => "ucp_get",
                    _ => "ucp_am_bw",
                };
                let iters = iterations(args.bytes, size);
                port += 1;
                eprintln!("[perftest] {tls} {test} {} x{iters}", human(size));
                let pf = run_perftest(&perftest, tls, test, size, iters, args.window, port)
                    .map_err(|e| eprintln!("  perftest failed: {e}"))
                    .ok();
                this.push((gbs, peer_gbs, pf));
                labels.push((op, size));
            }
            reps.push(this);
        }
        for (i, &(op, size)) in labels.iter().enumerate() {
            let ours_same = median(reps.iter().map(|r| r[i].0).collect());
            let ours_peer = median(reps.iter().map(|r| r[i].1).collect());
            let pf: Vec<f64> = reps.iter().filter_map(|r| r[i].2).collect();
            let perftest = (!pf.is_empty()).then(|| median(pf));
            rows.push(Row { tls: tls.clone(), op, size, ours_same, ours_peer, perftest });
        }
    }
    println!();
    println!("| transport | op | size | ours, err mode none GB/s | ucx_perftest GB/s | ratio | ours, peer err mode GB/s | ratio |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let (pf, ratio, ratio_peer) = match r.perftest {
            Some(p) if p > 0.0 => {
                (format!("{p:.2}"), format!("{:.2}", r.ours_same / p), format!("{:.2}", r.ours_peer / p))
            }
            _ => ("n/a".into(), "n/a".into(), "n/a".into()),
        };
        println!(
            "| {} | {} | {} | {:.2} | {} | {} | {:.2} | {} |",
            r.tls,
            r.op,
            human(r.size),
            r.ours_same,
            pf,
            ratio,
            r.ours_peer,
            ratio_peer
        );
    }
    Ok(())
}

fn iterations(total: usize, size: usize) -> usize {
    (total / size).clamp(20, 200_000)
}

async fn bench_ours(
    peer_exe: &Path,
    tls: &str,
    args: &Args,
    mode: ErrorMode,
) -> BoxResult<Vec<(&'static str, usize, f64)>> {
    let max = *args.sizes.iter().max().ok_or("no sizes")?;
    let ctx = ContextBuilder::new().transports(tls)?.net_devices("lo").name("ucx-bench").build()?;
    let worker = Worker::new(&ctx, "bench")?;
    let mut replies = worker.listen_am(pp::REPLY_AM).await?;
    let mut peer = PeerProcess::spawn_with(peer_exe, tls, max, mode)?;
    peer.send_address(worker.address())?;
    let ep = worker.connect_with(&peer.address, mode).await?;
    let rkey = Arc::new(ep.unpack_rkey(&peer.region).await?);
    let src = MemRegion::alloc_host(&ctx, max)?;
    let mut fill = vec![0u8; max];
    pp::fill_random(&mut fill, 42);
    src.write(0, &fill)?;
    let mut out = Vec::new();
    for &size in &args.sizes {
        let iters = iterations(args.bytes, size);
        let local = src.slice(0, size)?;
        for op in ["put", "get", "am"] {
            eprintln!("[ours, err mode {mode:?}] {tls} {op} {} x{iters}", human(size));
            // Warm-up: a few operations to wire up lanes and rendezvous paths.
            windowed(&ep, &rkey, &local, op, args.window.min(4), args.window).await?;
            barrier(&ep, &mut replies, op).await?;
            let t0 = Instant::now();
            windowed(&ep, &rkey, &local, op, iters, args.window).await?;
            barrier(&ep, &mut replies, op).await?;
            let secs = t0.elapsed().as_secs_f64();
            out.push((op, size, (size * iters) as f64 / secs / 1e9));
        }
    }
    Ok(out)
}

/// Runs `iters` operations with at most `window` in flight.
async fn windowed(
    ep: &Endpoint,
    rkey: &Arc<RemoteKey>,
    local: &ucx_bindings::RegionSlice,
    op: &'static str,
    iters: usize,
    window: usize,
) -> BoxResult<()> {
    let mut set = tokio::task::JoinSet::new();
    let header = Header { op: pp::OP_SINK, tag: 0, offset: 0, len: local.len() as u64, value: 0 }.encode();
    for _ in 0..iters {
        if set.len() >= window {
            if let Some(r) = set.join_next().await {
                r??;
            }
        }
        let (ep, rkey, local, header) = (ep.clone(), rkey.clone(), local.clone(), header.clone());
        set.spawn(async move {
            match op {
                "put" => ep.put(&local, &rkey, rkey.base(), OP_TIMEOUT).await,
                "get" => ep.get(&local, &rkey, rkey.base(), OP_TIMEOUT).await,
                _ => ep.am_send(pp::REQUEST_AM, &header, AmData::Region(local), OP_TIMEOUT).await,
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

/// Puts are complete at the peer after a flush; sinks after a hash round trip (the peer answers
/// only once every earlier sink has landed).
async fn barrier(ep: &Endpoint, replies: &mut ucx_bindings::AmReceiver, op: &str) -> BoxResult<()> {
    match op {
        "put" => ep.flush(OP_TIMEOUT).await?,
        "am" => {
            let h = Header { op: pp::OP_HASH, tag: 1, offset: 0, len: 1, value: 0 };
            ep.am_send(pp::REQUEST_AM, &h.encode(), AmData::None, OP_TIMEOUT).await?;
            tokio::time::timeout(OP_TIMEOUT, replies.recv())
                .await
                .map_err(|_| "no barrier reply from the peer")?
                .ok_or("peer went away")?;
        }
        _ => {}
    }
    Ok(())
}
