//! `prefixctl`: talk to a prefixd server from the shell. See `prefixctl --help`.

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use prefixd_client::{Access, Client, ClientOptions, KeyConfig, Secret, TlsOptions};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

const ABOUT: &str = "Talk to a prefixd server: store and fetch the KV bytes of token prompts, look \
up cached prefixes, print chunk keys, read stats and health.

A tokens file holds integer token ids separated by whitespace or commas, or a JSON array of them.
Only full chunks (--chunk-tokens tokens, default 256) are cached; a trailing partial chunk is not.
Keys follow vLLM's block hashing (sha256_cbor); producers and consumers must agree on
--hash-seed, --block-tokens and --chunk-tokens, and with vLLM the seed is its PYTHONHASHSEED.";

#[derive(Debug, Parser)]
#[command(name = "prefixctl", version, about = "Talk to a prefixd server", long_about = ABOUT)]
struct Cli {
    /// prefixd's gRPC endpoint.
    #[arg(long, global = true, env = "PREFIXD_ENDPOINT", default_value = "http://127.0.0.1:50051")]
    endpoint: String,

    /// UCX transports for the data path, as UCX_TLS.
    #[arg(long, global = true, env = "PREFIXCTL_TRANSPORTS", default_value = "sm,tcp")]
    transports: String,

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

fn read_tokens(path: &Path) -> anyhow::Result<Vec<u32>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    prefixd_client::parse_tokens(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
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
        transports: cli.transports.clone(),
        net_devices: cli.net_devices.clone(),
        force_remote: cli.force_remote,
        keys: keys.clone(),
        timeout: cli.timeout,
        worker_init: None,
        access: cli.access.access()?,
    };
    match &cli.cmd {
        Cmd::Keys { tokens } => {
            let tokens = read_tokens(tokens)?;
            for k in keys.chunk_keys(&tokens) {
                println!("{k}");
            }
        }
        Cmd::Health => {
            let ch = prefixd_client::channel_with(&cli.endpoint, cli.timeout, &opts.access).await?;
            return Ok(if prefixd_client::health_check(ch).await? {
                println!("SERVING");
                ExitCode::SUCCESS
            } else {
                println!("NOT_SERVING");
                ExitCode::from(1)
            });
        }
        Cmd::Stats => {
            let s = prefixd_client::stats_only(&cli.endpoint, cli.timeout, &opts.access).await?;
            println!("prefixd {}", s.version);
            println!(
                "entries: {}  sessions: {}  leases: {}  reservations: {}",
                s.entries, s.sessions, s.active_leases, s.active_reservations
            );
            println!("hit chunks: {}  miss chunks: {}  evictions: {}", s.hit_chunks, s.miss_chunks, s.evictions);
            for t in &s.tiers {
                println!("pool {}: {} / {} bytes used, {} entries", t.tier, t.used_bytes, t.capacity_bytes, t.entries);
            }
            println!("transports: {}", s.transports.join(","));
            let mut paths: Vec<_> = s.bytes_by_path.iter().collect();
            paths.sort();
            for (path, bytes) in paths {
                println!("bytes {path}: {bytes}");
            }
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
            println!(
                "stored {} chunks ({} already present) of {} full chunks, {} tokens, {} bytes each",
                out.stored,
                out.skipped,
                out.chunks,
                out.chunks * keys.chunk_tokens,
                bytes.len() / n
            );
            client.close().await.ok();
        }
        Cmd::Get { namespace, tokens, out } => {
            let tokens = read_tokens(tokens)?;
            let client = Client::connect_with(&cli.endpoint, opts).await?;
            let (hit, bytes) = client.get(namespace, &tokens).await?;
            std::fs::write(out, &bytes).with_context(|| format!("cannot write {}", out.display()))?;
            println!("hit {hit} of {} tokens; wrote {} bytes to {}", tokens.len(), bytes.len(), out.display());
            client.close().await.ok();
        }
        Cmd::Lookup { namespace, tokens } => {
            let tokens = read_tokens(tokens)?;
            let client = Client::connect_with(&cli.endpoint, opts).await?;
            let hit = client.lookup(namespace, &tokens).await?;
            println!("hit {hit} of {} tokens", tokens.len());
            client.close().await.ok();
        }
    }
    Ok(ExitCode::SUCCESS)
}
