//! `prefixctl`: talk to a prefixd server from the shell. See `prefixctl --help`.

mod bench;
mod doctor;
mod gpu;
mod report;

use anyhow::{bail, Context as _};
use clap::{Args, CommandFactory, Parser, Subcommand};
use prefixd_client::{Access, Client, ClientOptions, KeyConfig, Secret, TlsOptions};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

const ABOUT: &str = "Talk to a prefixd server: store and fetch the KV bytes of token prompts, look \
up cached prefixes, print chunk keys, read stats and health; check a node (doctor) and measure
it (bench).

A tokens file holds integer token ids separated by whitespace or commas, or a JSON array of them.
Only full chunks (--chunk-tokens tokens, default 256) are cached; a trailing partial chunk is not.
Keys follow vLLM's block hashing (sha256_cbor); producers and consumers must agree on
--hash-seed, --block-tokens and --chunk-tokens, and with vLLM the seed is its PYTHONHASHSEED.

Every command takes --json for output as data. Exit codes: 0 done; 1 a failure (or, for doctor, a
warning; for health, NOT_SERVING); 2 a doctor failure or a usage error.";

#[derive(Debug, Parser)]
#[command(name = "prefixctl", version, about = "Talk to a prefixd server", long_about = ABOUT)]
struct Cli {
    /// prefixd's gRPC endpoint.
    #[arg(long, global = true, env = "PREFIXD_ENDPOINT", default_value = "http://127.0.0.1:50051")]
    endpoint: String,

    /// UCX transports for the data path, as UCX_TLS [default: sm,tcp; doctor and bench add
    /// cuda_ipc,cuda_copy where there is a GPU].
    #[arg(long, global = true, env = "PREFIXCTL_TRANSPORTS")]
    transports: Option<String>,

    /// Print results as JSON (one object) instead of text.
    #[arg(long, global = true)]
    json: bool,

    /// UCX network devices, as UCX_NET_DEVICES (e.g. "lo").
    #[arg(long, global = true, env = "PREFIXCTL_NET_DEVICES")]
    net_devices: Option<String>,

    /// Move data by active messages even where the server allows RMA (the path of remote hosts).
    #[arg(long, global = true)]
    force_remote: bool,

    /// Deadline of each call and transfer, e.g. 30s.
    #[arg(long, global = true, default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,

    #[command(flatten)]
    keys: KeyArgs,

    #[command(flatten)]
    access: AccessArgs,

    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Args)]
struct KeyArgs {
    /// Seed of the key chain (vLLM: PYTHONHASHSEED).
    #[arg(long, global = true, default_value = "0")]
    hash_seed: String,
    /// Tokens per block (vLLM's block_size).
    #[arg(long, global = true, default_value_t = 16)]
    block_tokens: usize,
    /// Tokens per chunk; a multiple of --block-tokens.
    #[arg(long, global = true, default_value_t = 256)]
    chunk_tokens: usize,
}

/// For servers started with --auth-file or --tls-cert. Tokens come from a file or the
/// environment, never a flag (a flag would show in `ps`).
#[derive(Debug, Args)]
struct AccessArgs {
    /// File holding the bearer token (or set PREFIXD_TOKEN).
    #[arg(long, global = true, env = "PREFIXD_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// PEM CA that signed the server's certificate (https:// endpoints). Default: system roots.
    #[arg(long, global = true, env = "PREFIXD_TLS_CA", value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate, for servers that want one (--tls-client-ca).
    #[arg(long, global = true, env = "PREFIXD_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM key of --tls-cert.
    #[arg(long, global = true, env = "PREFIXD_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Name to check the server's certificate against. Default: the endpoint's host.
    #[arg(long, global = true, env = "PREFIXD_TLS_DOMAIN")]
    tls_domain: Option<String>,
}

impl AccessArgs {
    fn access(&self) -> anyhow::Result<Access> {
        let token = match (&self.token_file, std::env::var("PREFIXD_TOKEN").ok().filter(|t| !t.trim().is_empty())) {
            (Some(f), _) => Some(Secret::from_file(f)?),
            (None, Some(t)) => Some(Secret::new(t)),
            (None, None) => None,
        };
        Ok(Access {
            token,
            tls: TlsOptions {
                ca: self.tls_ca.clone(),
                cert: self.tls_cert.clone(),
                key: self.tls_key.clone(),
                domain: self.tls_domain.clone(),
            },
        })
    }
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Store the KV bytes of a prompt. The bytes of --data are split evenly over the prompt's
    /// full chunks (so the file size must be a multiple of their number).
    Put {
        #[arg(long)]
        namespace: String,
        #[arg(long, value_name = "FILE")]
        tokens: PathBuf,
        #[arg(long, value_name = "FILE")]
        data: PathBuf,
    },
    /// Fetch the bytes of the longest cached prefix of a prompt; prints how many tokens hit.
    Get {
        #[arg(long)]
        namespace: String,
        #[arg(long, value_name = "FILE")]
        tokens: PathBuf,
        /// Where to write the bytes of the hit prefix.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Print how many leading tokens of a prompt are cached, without fetching.
    Lookup {
        #[arg(long)]
        namespace: String,
        #[arg(long, value_name = "FILE")]
        tokens: PathBuf,
    },
    /// Print the chunk keys of a prompt, hex, one per line (no server needed). Compare two
    /// engines' keys when they get zero hits.
    Keys {
        #[arg(long, value_name = "FILE")]
        tokens: PathBuf,
    },
    /// Print the server's counters, pool usage and transports.
    Stats,
    /// Check the server's gRPC health; exit 0 when SERVING.
    Health,
    /// Will this node serve KV at full speed, and if not, why: the server, UCX on both sides
    /// and the transports they share, the lanes a real session gets, environment traps
    /// (UCX_TLS, UCX_MEMTYPE_CACHE, PYTHONHASHSEED), GPUs and their peer links, where the GPU
    /// pool is, and bandwidth through prefixd next to the physical copy. Each check prints OK,
    /// WARN, FAIL or SKIP with its fix; exit 0 (all OK), 1 (a WARN) or 2 (a FAIL).
    Doctor {
        /// The engine's GPU, for the check of where the server's GPU pool is [default: 0].
        #[arg(long)]
        device: Option<usize>,
        /// Bytes moved each way by the bandwidth checks; 0 skips them.
        #[arg(long, default_value = "64MiB", value_parser = parse_size)]
        bench_size: usize,
    },
    /// Measure puts and gets of this node against the physical copy (memcpy) in the same run.
    /// A progress bar shows on a terminal (none when piped).
    Bench {
        /// Bytes of each chunk.
        #[arg(long, default_value = "4MiB", value_parser = parse_size)]
        chunk_size: usize,
        /// Bytes each direction moves in all.
        #[arg(long, default_value = "512MiB", value_parser = parse_size)]
        total: usize,
        /// Chunks per call.
        #[arg(long, default_value_t = 8)]
        batch: usize,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages (prefixctl.1 and one per command) into DIR.
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, mul) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration like 30s or 500ms"))?;
    if !(v > 0.0 && v.is_finite()) {
        return Err(format!("{s:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(v * mul))
}

/// Sizes like 64MiB, 4KiB, 1GiB or plain bytes.
fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let units = [("GiB", 1usize << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("B", 1)];
    let (num, mul) = units.iter().find_map(|(u, m)| t.strip_suffix(u).map(|n| (n, *m))).unwrap_or((t, 1));
    let v: usize = num.trim().parse().map_err(|_| format!("{s:?} is not a size like 64MiB or 4096"))?;
    v.checked_mul(mul).ok_or_else(|| format!("{s:?} is too large"))
}

fn read_tokens(path: &Path) -> anyhow::Result<Vec<u32>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    prefixd_client::parse_tokens(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Prints `value` as JSON when asked, else `text`.
fn emit(json: bool, value: serde_json::Value, text: impl FnOnce() -> String) {
    if json {
        println!("{value}");
    } else {
        println!("{}", text());
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            if json {
                println!("{}", json!({"error": format!("{e:#}")}));
            }
            eprintln!("prefixctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let keys = KeyConfig {
        seed: cli.keys.hash_seed.clone(),
        block_tokens: cli.keys.block_tokens,
        chunk_tokens: cli.keys.chunk_tokens,
    };
    keys.validate().map_err(anyhow::Error::msg)?;
    let opts = ClientOptions {
        name: "prefixctl".into(),
        transports: cli.transports.clone().unwrap_or_else(|| "sm,tcp".into()),
        net_devices: cli.net_devices.clone(),
        force_remote: cli.force_remote,
        keys: keys.clone(),
        timeout: cli.timeout,
        worker_init: None,
        access: cli.access.access()?,
    };
    let json = cli.json;
    match &cli.cmd {
        Cmd::Keys { tokens } => {
            let tokens = read_tokens(tokens)?;
            let keys: Vec<String> = keys.chunk_keys(&tokens).iter().map(|k| k.to_string()).collect();
            emit(json, json!({"keys": keys}), || keys.join("\n"));
        }
        Cmd::Health => {
            let ch = prefixd_client::channel_with(&cli.endpoint, cli.timeout, &opts.access).await?;
            let serving = prefixd_client::health_check(ch).await?;
            let word = if serving { "SERVING" } else { "NOT_SERVING" };
            emit(json, json!({"status": word}), || word.to_owned());
            return Ok(if serving { ExitCode::SUCCESS } else { ExitCode::from(1) });
        }
        Cmd::Stats => {
            let s = prefixd_client::stats_only(&cli.endpoint, cli.timeout, &opts.access).await?;
            emit(json, stats_json(&s), || stats_text(&s));
        }
        Cmd::Put { namespace, tokens, data } => {
            let tokens = read_tokens(tokens)?;
            let bytes = std::fs::read(data).with_context(|| format!("cannot read {}", data.display()))?;
            let n = keys.chunk_keys(&tokens).len();
            if n == 0 {
                bail!("{} tokens make no full chunk of {} tokens: nothing to store", tokens.len(), keys.chunk_tokens);
            }
            let client = Client::connect_with(&cli.endpoint, opts).await?;
            let out = client.put(namespace, &tokens, &bytes).await?;
            let each = bytes.len() / n;
            emit(
                json,
                json!({"chunks": out.chunks, "stored": out.stored, "skipped": out.skipped,
                    "tokens": out.chunks * keys.chunk_tokens, "chunk_bytes": each}),
                || {
                    format!(
                        "stored {} chunks ({} already present) of {} full chunks, {} tokens, {} bytes each",
                        out.stored,
                        out.skipped,
                        out.chunks,
                        out.chunks * keys.chunk_tokens,
                        each
                    )
                },
            );
            client.close().await.ok();
        }
        Cmd::Get { namespace, tokens, out } => {
            let tokens = read_tokens(tokens)?;
            let client = Client::connect_with(&cli.endpoint, opts).await?;
            let (hit, bytes) = client.get(namespace, &tokens).await?;
            std::fs::write(out, &bytes).with_context(|| format!("cannot write {}", out.display()))?;
            emit(json, json!({"hit_tokens": hit, "tokens": tokens.len(), "bytes": bytes.len(), "out": out}), || {
                format!("hit {hit} of {} tokens; wrote {} bytes to {}", tokens.len(), bytes.len(), out.display())
            });
            client.close().await.ok();
        }
        Cmd::Lookup { namespace, tokens } => {
            let tokens = read_tokens(tokens)?;
            let client = Client::connect_with(&cli.endpoint, opts).await?;
            let hit = client.lookup(namespace, &tokens).await?;
            emit(json, json!({"hit_tokens": hit, "tokens": tokens.len()}), || {
                format!("hit {hit} of {} tokens", tokens.len())
            });
            client.close().await.ok();
        }
        Cmd::Doctor { device, bench_size } => {
            let report = doctor::run(doctor::DoctorArgs {
                endpoint: cli.endpoint.clone(),
                opts,
                transports: cli.transports.clone(),
                device: *device,
                bench_bytes: *bench_size,
            })
            .await;
            report.print(json);
            return Ok(report.exit_code());
        }
        Cmd::Bench { chunk_size, total, batch } => {
            let mut opts = opts;
            if cli.transports.is_none() && gpu::devices().is_ok_and(|d| !d.is_empty()) {
                opts.transports = "cuda_ipc,cuda_copy,sm,tcp".into();
            }
            let r = bench::run(&cli.endpoint, opts, *chunk_size, *total, *batch).await?;
            emit(json, r.to_json(), || r.to_text());
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "prefixctl", &mut std::io::stdout());
        }
        Cmd::Man { dir } => {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), dir)
                .with_context(|| format!("cannot write into {}", dir.display()))?;
            emit(json, json!({"dir": dir}), || format!("man pages written to {}", dir.display()));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn stats_json(s: &prefixd_client::Stats) -> serde_json::Value {
    json!({
        "version": s.version, "entries": s.entries, "sessions": s.sessions, "active_leases": s.active_leases,
        "active_reservations": s.active_reservations, "quarantined_bytes": s.quarantined_bytes,
        "hit_chunks": s.hit_chunks, "miss_chunks": s.miss_chunks, "evictions": s.evictions,
        "tiers": s.tiers.iter().map(|t| json!({"tier": t.tier, "used_bytes": t.used_bytes,
            "capacity_bytes": t.capacity_bytes, "entries": t.entries})).collect::<Vec<_>>(),
        "transports": s.transports, "bytes_by_path": s.bytes_by_path, "ucx_version": s.ucx_version,
        "gpu_pool_device": s.gpu_pool_device, "rma_policy": s.rma_policy, "auth_enabled": s.auth_enabled,
    })
}

fn stats_text(s: &prefixd_client::Stats) -> String {
    let mut out = format!("prefixd {} (UCX {}, RMA {})\n", s.version, s.ucx_version, s.rma_policy);
    out += &format!(
        "entries: {}  sessions: {}  leases: {}  reservations: {}  quarantined bytes: {}\n",
        s.entries, s.sessions, s.active_leases, s.active_reservations, s.quarantined_bytes
    );
    out += &format!("hit chunks: {}  miss chunks: {}  evictions: {}\n", s.hit_chunks, s.miss_chunks, s.evictions);
    for t in &s.tiers {
        out += &format!("pool {}: {} / {} bytes used, {} entries\n", t.tier, t.used_bytes, t.capacity_bytes, t.entries);
    }
    out += &format!("transports: {}", s.transports.join(","));
    let mut paths: Vec<_> = s.bytes_by_path.iter().collect();
    paths.sort();
    for (path, bytes) in paths {
        out += &format!("\nbytes {path}: {bytes}");
    }
    out
}
