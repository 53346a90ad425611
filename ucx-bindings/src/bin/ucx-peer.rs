//! `ucx-peer`: a UCX self-check and the second process of the two-process tests and benchmarks.
//!
//! `ucx-peer info [--tls LIST]` prints the UCX version, the transports and devices it can use,
//! and the memory types it can register.
//! `ucx-peer serve --tls LIST --region BYTES [--net-devices LIST]` registers a region, prints its
//! address and region (see `ucx_bindings::peer_protocol`), and serves echo and hash requests.

use std::error::Error as StdError;
use std::io::{BufRead, Write};
use std::time::Duration;
use ucx_bindings::peer_protocol::{self as pp, Header};
use ucx_bindings::{hex, AmData, ContextBuilder, ErrorMode, MemRegion, MemoryType, Worker};

type BoxResult<T> = Result<T, Box<dyn StdError>>;

const USAGE: &str = "usage: ucx-peer info [--tls LIST] [--net-devices LIST]\n       ucx-peer serve --tls LIST --region BYTES [--net-devices LIST] [--error-mode peer|none]";
const OP_TIMEOUT: Duration = Duration::from_secs(30);

struct Args {
    cmd: String,
    tls: Option<String>,
    net_devices: Option<String>,
    region: usize,
    peer_errors: bool,
}

fn parse_args() -> BoxResult<Args> {
    let mut it = std::env::args().skip(1);
    let cmd = it.next().ok_or(USAGE)?;
    let mut a = Args { cmd, tls: None, net_devices: None, region: 64 << 20, peer_errors: true };
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--tls" => a.tls = Some(value()?),
            "--net-devices" => a.net_devices = Some(value()?),
            "--error-mode" => {
                a.peer_errors = match value()?.as_str() {
                    "peer" => true,
                    "none" => false,
                    other => return Err(format!("--error-mode: {other:?} is not peer or none").into()),
                }
            }
            "--region" => a.region = value()?.parse().map_err(|e| format!("--region: {e}"))?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}").into()),
        }
    }
    Ok(a)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("ucx-peer: {e}");
        std::process::exit(1);
    }
}

fn run() -> BoxResult<()> {
    let args = parse_args()?;
    let mut b = ContextBuilder::new().name("ucx-peer");
    if let Some(t) = &args.tls {
        b = b.transports(t)?;
    }
    if let Some(d) = &args.net_devices {
        b = b.net_devices(d);
    }
    let ctx = b.build()?;
    match args.cmd.as_str() {
        "info" => {
            let info = ctx.info();
            println!("UCX {}", info.version);
            println!("requested transports: {}", info.requested);
            for r in &info.resources {
                println!("  {r}");
            }
            let mem: Vec<String> = info.memory_types.iter().map(|m| format!("{m:?}")).collect();
            println!("memory types: {}", mem.join(", "));
            if !ctx.supports(MemoryType::Cuda) {
                println!("(no CUDA memory: the cuda transports need a GPU and libcuda)");
            }
            Ok(())
        }
        "serve" => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            // A LocalSet lets sinks run as local tasks on this one thread.
            tokio::task::LocalSet::new().block_on(&rt, serve(ctx, args.region, args.peer_errors))
        }
        other => Err(format!("unknown command {other:?}\n{USAGE}").into()),
    }
}

async fn serve(ctx: ucx_bindings::Context, region_len: usize, peer_errors: bool) -> BoxResult<()> {
    let worker = Worker::new(&ctx, "peer")?;
    let region = MemRegion::alloc_host(&ctx, region_len)?;
    let mut requests = worker.listen_am(pp::REQUEST_AM).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ADDR {}", hex::encode(worker.address()))?;
        writeln!(out, "REGION {}", hex::encode(&region.remote().to_bytes()))?;
        writeln!(out, "READY")?;
        out.flush()?;
    }
    // Read the driver's address, then watch stdin: EOF means stop.
    let (peer_tx, peer_rx) = tokio::sync::oneshot::channel::<String>();
    let (eof_tx, mut eof_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut lines = stdin.lock().lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = peer_tx.send(line);
        }
        for _ in lines {}
        let _ = eof_tx.send(());
    });
    let line = peer_rx.await.map_err(|_| "stdin closed before PEER line")?;
    let addr = line.strip_prefix("PEER ").ok_or("expected `PEER <hex>`")?;
    let mode = if peer_errors { ErrorMode::Peer } else { ErrorMode::None };
    let ep = worker.connect_with(&hex::decode(addr)?, mode).await?;

    // Sinks land concurrently; a hash request waits for all of them first.
    let mut sinks = tokio::task::JoinSet::new();
    loop {
        let msg = tokio::select! {
            m = requests.recv() => match m { Some(m) => m, None => break },
            _ = &mut eof_rx => break,
        };
        let Some(h) = Header::decode(msg.header()) else {
            eprintln!("ucx-peer: ignoring a request with a malformed header");
            continue;
        };
        match h.op {
            pp::OP_ECHO => {
                let dest = region.slice(h.offset as usize, msg.len())?;
                msg.recv_into(&dest, OP_TIMEOUT).await?;
                let reply = Header { op: pp::OP_ECHO, ..h }.encode();
                ep.am_send(pp::REPLY_AM, &reply, AmData::Region(dest), OP_TIMEOUT).await?;
            }
            pp::OP_SINK => {
                let dest = region.slice(h.offset as usize, msg.len())?;
                sinks.spawn_local(async move { msg.recv_into(&dest, OP_TIMEOUT).await });
            }
            pp::OP_HASH => {
                while let Some(r) = sinks.join_next().await {
                    r??;
                }
                let bytes = region.to_vec(h.offset as usize, h.len as usize)?;
                let reply = Header { op: pp::OP_HASH, value: pp::hash(&bytes), ..h }.encode();
                ep.am_send(pp::REPLY_AM, &reply, AmData::None, OP_TIMEOUT).await?;
            }
            op => eprintln!("ucx-peer: ignoring unknown op {op}"),
        }
    }
    ep.flush(OP_TIMEOUT).await.ok();
    Ok(())
}
