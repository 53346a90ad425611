//! Shared pieces of the benchmarks: running `ucx_perftest` as a baseline, sizes, medians.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// `ucx_perftest` from the libucx-cu13 wheel.
pub fn find_perftest() -> BoxResult<PathBuf> {
    let out =
        Command::new("python3").args(["-c", "import libucx, os; print(os.path.dirname(libucx.__file__))"]).output()?;
    if !out.status.success() {
        return Err("ucx_perftest not found: pass --perftest PATH or pip install libucx-cu13".into());
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()).join("bin").join("ucx_perftest"))
}

/// Runs a `ucx_perftest` server and client pair on loopback; returns the client's overall GB/s
/// (10^9 bytes/s).
pub fn run_perftest(
    exe: &Path,
    tls: &str,
    test: &str,
    size: usize,
    iters: usize,
    window: usize,
    port: u16,
) -> BoxResult<f64> {
    let lib = exe.parent().and_then(Path::parent).map(|p| p.join("lib"));
    let ld = match &lib {
        Some(lib) => format!("{}:{}", lib.display(), std::env::var("LD_LIBRARY_PATH").unwrap_or_default()),
        None => std::env::var("LD_LIBRARY_PATH").unwrap_or_default(),
    };
    let cmd = || {
        let mut c = Command::new(exe);
        c.env("UCX_TLS", tls).env("UCX_NET_DEVICES", "lo").env("LD_LIBRARY_PATH", &ld);
        c
    };
    let mut server = cmd().args(["-p", &port.to_string()]).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let args = [
        "127.0.0.1".to_owned(),
        "-t".into(),
        test.into(),
        "-s".into(),
        size.to_string(),
        "-n".into(),
        iters.to_string(),
        "-w".into(),
        window.min(4).to_string(),
        "-O".into(),
        window.to_string(),
        "-p".into(),
        port.to_string(),
    ];
    let client = cmd().args(&args).output();
    let _ = server.kill();
    let _ = server.wait();
    let client = client?;
    let text = String::from_utf8_lossy(&client.stdout);
    // "Final: iters lat50 lat-avg lat-overall bw-avg bw-overall ...", bandwidth in MB/s of 2^20.
    let line = text
        .lines()
        .find(|l| l.starts_with("Final:"))
        .ok_or_else(|| format!("no Final line; stderr: {}", String::from_utf8_lossy(&client.stderr).trim()))?;
    let mbs: f64 = line.split_whitespace().nth(6).ok_or("short Final line")?.parse()?;
    Ok(mbs * 1_048_576.0 / 1e9)
}

/// "64K", "36M", "1G" or plain bytes.
pub fn parse_size(s: &str) -> BoxResult<usize> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1usize << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    Ok(num.parse::<usize>().map_err(|e| format!("size {s:?}: {e}"))? * mul)
}

pub fn human(n: usize) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n % (1 << 10) == 0 {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} B")
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The value at quantile `q` (0..=1) of `v`.
pub fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i.min(v.len() - 1)]
}
