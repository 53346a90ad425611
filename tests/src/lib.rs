//! Harness for the end-to-end tests: starts real `prefixd` processes on ephemeral loopback
//! ports and runs real `prefixctl` and `chaos-client` processes against them.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Once};
use std::time::{Duration, Instant};

/// `target/<profile>`, from the test executable's own path (`target/<profile>/deps/NAME`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_path_buf()
}

/// Path of a workspace binary. `cargo test --workspace` builds `prefixd` and `prefixctl` beside
/// the tests; when they are missing (`cargo test -p prefixd-tests` alone), they are built once.
/// (A stale binary is not rebuilt: run the tests with `--workspace` after changing the server.)
pub fn bin(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    let missing = ["prefixd", "prefixctl"].iter().any(|b| !bin_dir().join(b).exists());
    BUILD.call_once(|| {
        if !missing {
            return;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let release = bin_dir().ends_with("release");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "prefixd-server", "-p", "prefixd-client", "--bins"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building prefixd and prefixctl failed");
    });
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} not found", p.display());
    p
}

/// This crate's own test client (cargo builds a package's binaries for its integration tests).
pub fn chaos_client() -> PathBuf {
    bin_dir().join("chaos-client")
}

/// A scratch directory removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("prefixd-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running prefixd.
#[derive(Debug)]
pub struct Server {
    pub child: Child,
    pub grpc: String,
    pub metrics: String,
    pub log: PathBuf,
    _dir: TempDir,
}

impl Server {
    /// Starts prefixd on ephemeral loopback ports with `args` added.
    pub fn start(args: &[&str]) -> Server {
        let dir = TempDir::new("server");
        let log = dir.path("prefixd.log");
        let mut child = Command::new(bin("prefixd"))
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--net-devices", "lo"])
            .args(args)
            .env("PREFIXD_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start prefixd");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("prefixd did not start; log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
            }
        };
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or_else(|| panic!("no {k} in {line:?}"))
                .to_owned()
        };
        let (grpc, metrics) = (format!("http://{}", field("grpc=")), field("metrics="));
        Server { child, grpc, metrics, log, _dir: dir }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits for the process to exit; returns its exit code (None if killed by a signal).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("prefixd did not exit within {limit:?}; log:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Resident memory of the server process, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// GET on the operations port: (status code, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.metrics).expect("connect metrics port");
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("send");
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        let code = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        (code, body)
    }

    /// The value of one metric line (exact name with labels), 0 when absent.
    pub fn metric(&self, name: &str) -> f64 {
        let (_, body) = self.http_get("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs prefixctl against `endpoint` with `args`.
pub fn prefixctl(endpoint: &str, args: &[&str]) -> Output {
    Command::new(bin("prefixctl"))
        .args(["--endpoint", endpoint, "--net-devices", "lo"])
        .args(args)
        .output()
        .expect("run prefixctl")
}

/// Writes a tokens file of `tokens` separated by spaces.
pub fn write_tokens(path: &Path, tokens: &[u32]) {
    let text: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
    std::fs::write(path, text.join(" ")).expect("write tokens");
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    ucx_bindings::peer_protocol::fill_random(&mut v, seed);
    v
}

/// Polls `f` until it returns true or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// A session opened by hand, for tests that speak the protocol directly (hostile clients,
/// clients that die half-way).
pub struct RawSession {
    pub resp: prefixd_proto::v1::ConnectResponse,
    pub ctx: ucx_bindings::Context,
    pub worker: ucx_bindings::Worker,
    /// The bound data endpoint (None when opened with `bind = false`).
    pub ep: Option<ucx_bindings::Endpoint>,
}

impl std::fmt::Debug for RawSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawSession").field("session", &self.resp.session_id).finish()
    }
}

impl RawSession {
    /// Connects over gRPC to `url` and, with `bind`, binds a data endpoint (AM_HELLO). With
    /// `remote`, the session uses the active-message path.
    pub async fn open(url: &str, remote: bool, bind: bool) -> anyhow::Result<RawSession> {
        use prefixd_proto::v1::{prefixd_client::PrefixdClient, ConnectRequest, DataPath};
        let channel = tonic::transport::Channel::from_shared(url.to_owned())?.connect().await?;
        let resp = PrefixdClient::new(channel)
            .connect(ConnectRequest {
                host_id: if remote {
                    "elsewhere".into()
                } else {
                    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?.trim().into()
                },
                transports: vec!["tcp".into(), "posix".into(), "cma".into()],
                force_remote: remote,
                client_name: "raw".into(),
            })
            .await?
            .into_inner();
        let path = DataPath::try_from(resp.data_path).unwrap_or(DataPath::ActiveMessage);
        let ctx = ucx_bindings::ContextBuilder::new().transports("sm,tcp")?.net_devices("lo").build()?;
        let worker = ucx_bindings::Worker::with_options(&ctx, "raw", Some(prefixd_client::client_id(path)), || {})?;
        let ep = if bind {
            let addr = std::net::SocketAddr::new([127, 0, 0, 1].into(), resp.data_port as u16);
            Some(
                prefixd_client::bind_data_endpoint(&worker, addr, path, &resp.session_token, Duration::from_secs(10))
                    .await?,
            )
        } else {
            None
        };
        Ok(RawSession { resp, ctx, worker, ep })
    }

    pub fn token(&self) -> Vec<u8> {
        self.resp.session_token.clone()
    }

    pub fn data_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new([127, 0, 0, 1].into(), self.resp.data_port as u16)
    }

    pub fn ep(&self) -> &ucx_bindings::Endpoint {
        self.ep.as_ref().expect("a bound data endpoint")
    }
}
