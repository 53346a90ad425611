//! `prefixctl bench`: puts and gets of host memory through this client's data path, each round
//! a put of `batch` fresh chunks then a get of them, next to the physical copy (memcpy of the
//! same bytes) measured in the same run. Progress on stderr when it is a terminal.

use prefixd_client::{ChunkKey, Client, ClientOptions, DataPath};
use serde_json::json;
use std::io::{IsTerminal, Write};
use std::time::Instant;

const NAMESPACE: &str = "prefixctl-bench";

#[derive(Debug)]
pub struct BenchResult {
    path: String,
    lanes: Vec<String>,
    chunk: usize,
    batch: usize,
    rounds: usize,
    put_gbps: f64,
    get_gbps: f64,
    put_ms: (f64, f64),
    get_ms: (f64, f64),
    memcpy_gbps: f64,
    verified: bool,
}

/// p50 and p99 of `v` (sorted in place).
fn percentiles(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v.get(((v.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0);
    (at(0.5), at(0.99))
}

struct Progress {
    on: bool,
    total: usize,
}

impl Progress {
    fn new(total: usize) -> Progress {
        Progress { on: std::io::stderr().is_terminal(), total }
    }
    fn show(&self, done: usize, bytes: usize, secs: f64) {
        if !self.on {
            return;
        }
        let width = 30;
        let filled = width * done / self.total.max(1);
        let rate = if secs > 0.0 { bytes as f64 / secs / 1e9 } else { 0.0 };
        let bar: String = "#".repeat(filled) + &"-".repeat(width - filled);
        eprint!("\r[{bar}] {done}/{} rounds, {rate:.2} GB/s both ways ", self.total);
        let _ = std::io::stderr().flush();
    }
    fn done(&self) {
        if self.on {
            eprintln!();
        }
    }
}

/// The best memcpy rate of `bytes` in this process: the host's physical copy, the baseline of
/// `bench` and of doctor's bandwidth check.
pub fn memcpy_gbps(bytes: usize) -> f64 {
    let best = memcpy_seconds(bytes, 5).into_iter().fold(f64::MAX, f64::min);
    bytes as f64 / best / 1e9
}

/// The seconds each of `reps` memcpys of `bytes` took.
pub fn memcpy_seconds(bytes: usize, reps: usize) -> Vec<f64> {
    let src = vec![3u8; bytes];
    let mut dst = vec![0u8; bytes];
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(&src);
            std::hint::black_box(&dst);
            t.elapsed().as_secs_f64()
        })
        .collect()
}

pub async fn run(
    endpoint: &str,
    opts: ClientOptions,
    chunk: usize,
    total: usize,
    batch: usize,
) -> anyhow::Result<BenchResult> {
    anyhow::ensure!(chunk > 0 && batch > 0, "--chunk-size and --batch must be positive");
    let per_round = chunk * batch;
    let rounds = (total / per_round).max(1);
    let client = Client::connect_with(endpoint, opts).await?;
    let lanes = client.endpoint_transports().await.unwrap_or_default();
    let src = client.alloc(per_round)?;
    let pattern: Vec<u8> = (0..per_round).map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[1]).collect();
    src.write(0, &pattern)?;
    let dst = client.alloc(per_round)?;
    let src_slices = (0..batch).map(|i| src.slice(i * chunk, chunk)).collect::<Result<Vec<_>, _>>()?;
    let dst_slices = (0..batch).map(|i| dst.slice(i * chunk, chunk)).collect::<Result<Vec<_>, _>>()?;
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
    let progress = Progress::new(rounds);
    let (mut put_times, mut get_times) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    let mut verified = true;
    let started = Instant::now();
    for r in 0..rounds {
        let keys: Vec<ChunkKey> = (0..batch)
            .map(|i| {
                let mut k = [0u8; 32];
                k[..16].copy_from_slice(&stamp.to_le_bytes());
                k[16..24].copy_from_slice(&(r as u64).to_le_bytes());
                k[24..].copy_from_slice(&(i as u64).to_le_bytes());
                ChunkKey(k)
            })
            .collect();
        let t = Instant::now();
        let put = client.put_chunks(NAMESPACE, &keys, None, &src_slices).await?;
        put_times.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(put.stored == batch, "only {} of {batch} chunks stored: is the pool big enough?", put.stored);
        let t = Instant::now();
        let hits = client.get_chunks(NAMESPACE, &keys, &dst_slices).await?;
        get_times.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(hits == batch, "only {hits} of {batch} chunks came back");
        if r == 0 || r + 1 == rounds {
            verified &= dst.to_vec(0, per_round)? == pattern;
        }
        let _ = client.delete(NAMESPACE, &keys).await;
        progress.show(r + 1, 2 * per_round * (r + 1), started.elapsed().as_secs_f64());
    }
    progress.done();
    let path = if client.data_path() == DataPath::Rma { "rma" } else { "active_message" }.to_owned();
    let _ = client.close().await;
    let sum = |v: &[f64]| v.iter().sum::<f64>();
    let bytes = (per_round * rounds) as f64;
    let (put_gbps, get_gbps) = (bytes / sum(&put_times) / 1e9, bytes / sum(&get_times) / 1e9);
    let ms = |v: &mut Vec<f64>| {
        let (a, b) = percentiles(v);
        (a * 1e3, b * 1e3)
    };
    Ok(BenchResult {
        path,
        lanes,
        chunk,
        batch,
        rounds,
        put_gbps,
        get_gbps,
        put_ms: ms(&mut put_times),
        get_ms: ms(&mut get_times),
        memcpy_gbps: memcpy_gbps(per_round),
        verified,
    })
}

impl BenchResult {
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "data_path": self.path, "lanes": self.lanes, "chunk_bytes": self.chunk, "batch": self.batch,
            "rounds": self.rounds, "put_gbps": self.put_gbps, "get_gbps": self.get_gbps,
            "put_ms_p50": self.put_ms.0, "put_ms_p99": self.put_ms.1,
            "get_ms_p50": self.get_ms.0, "get_ms_p99": self.get_ms.1,
            "memcpy_gbps": self.memcpy_gbps, "put_ratio": self.put_gbps / self.memcpy_gbps,
            "get_ratio": self.get_gbps / self.memcpy_gbps, "verified": self.verified,
        })
    }

    pub fn to_text(&self) -> String {
        let m = self.memcpy_gbps;
        format!(
            "{} rounds of {} x {} KiB, {} path over {}\n\
             {:<6}{:>10}{:>12}{:>12}{:>8}\n\
             {:<6}{:>10.2}{:>12.2}{:>12.2}{:>8.2}\n\
             {:<6}{:>10.2}{:>12.2}{:>12.2}{:>8.2}\n\
             baseline: memcpy of {} MiB in this process, {:.2} GB/s; bytes read back {}",
            self.rounds,
            self.batch,
            self.chunk >> 10,
            self.path,
            self.lanes.join(", "),
            "",
            "GB/s",
            "p50 ms",
            "p99 ms",
            "ratio",
            "put",
            self.put_gbps,
            self.put_ms.0,
            self.put_ms.1,
            self.put_gbps / m,
            "get",
            self.get_gbps,
            self.get_ms.0,
            self.get_ms.1,
            self.get_gbps / m,
            (self.chunk * self.batch) >> 20,
            m,
            if self.verified { "verified" } else { "DIFFER" }
        )
    }
}
