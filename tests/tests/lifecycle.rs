//! Clients that die, and a server that is asked to stop: nothing stays visible or leaks past the
//! TTL, and SIGTERM lets open work finish before exiting 0.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use prefixd_tests::*;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts the chaos client and waits for its first line.
fn chaos(args: &[&str]) -> (Child, String, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(chaos_client())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start chaos-client");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("chaos-client line");
    (child, line.trim().to_owned(), out)
}

fn stats(server: &Server) -> String {
    String::from_utf8_lossy(&prefixctl(&server.grpc, &["stats"]).stdout).into_owned()
}

#[test]
fn killed_producer_leaves_nothing_and_space_returns_within_ttl() {
    let server = Server::start(&["--host-pool", "16MiB", "--lease-ttl", "1s"]);
    let (mut child, line, _) = chaos(&["hold-put", &server.grpc, "ns"]);
    assert_eq!(line, "RESERVED");
    assert!(stats(&server).contains("reservations: 1"), "{}", stats(&server));
    assert!(stats(&server).contains("pool host: 2097152 /"), "two 1 MiB slots reserved");
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    // Nothing of it is visible, and within TTL + grace (1 s + 0.5 s) plus a reaper tick the
    // reservation and its space are gone.
    assert!(wait_until(Duration::from_secs(4), || stats(&server).contains("reservations: 0")));
    let took = killed.elapsed();
    assert!(took < Duration::from_millis(2500), "reclaimed after {took:?}");
    let s = stats(&server);
    assert!(s.contains("pool host: 0 /") && s.contains("entries: 0"), "{s}");
    assert!(server.metric("prefixd_expired_total{what=\"put\"}") >= 1.0);
}

#[test]
fn killed_consumer_loses_its_lease_within_ttl() {
    let server = Server::start(&["--host-pool", "16MiB", "--lease-ttl", "1s"]);
    let dir = TempDir::new("lease");
    let tokens: Vec<u32> = (0..512).collect();
    write_tokens(&dir.path("t"), &tokens);
    std::fs::write(dir.path("kv"), random_bytes(2 << 20, 5)).unwrap();
    let t = dir.path("t").to_str().unwrap().to_owned();
    let o = prefixctl(
        &server.grpc,
        &["put", "--namespace", "ns", "--tokens", &t, "--data", dir.path("kv").to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (mut child, line, _) = chaos(&["hold-lease", &server.grpc, "ns", &t]);
    assert_eq!(line, "LEASED 2");
    assert!(stats(&server).contains("leases: 1"));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(wait_until(Duration::from_secs(4), || stats(&server).contains("leases: 0")), "{}", stats(&server));
    // The data stays cached (leases pin, they do not own).
    let o = prefixctl(&server.grpc, &["lookup", "--namespace", "ns", "--tokens", &t]);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("hit 512 of 512"));
}

#[test]
fn sigterm_drains_open_work_then_exits_zero() {
    let mut server = Server::start(&["--host-pool", "16MiB", "--drain-timeout", "20s"]);
    let dir = TempDir::new("drain");
    write_tokens(&dir.path("t"), &(0..512).collect::<Vec<u32>>());
    let t = dir.path("t").to_str().unwrap().to_owned();
    let (mut child, line, mut out) = chaos(&["slow-put", &server.grpc, "ns", &t]);
    assert_eq!(line, "BEGUN");

    server.signal(libc::SIGTERM);
    // Draining: not ready, new work refused, but the process waits for the open put.
    assert!(wait_until(Duration::from_secs(5), || server.http_get("/readyz").0 == 503));
    let o = prefixctl(&server.grpc, &["put", "--namespace", "ns", "--tokens", &t, "--data", &t]);
    assert!(!o.status.success(), "new work must be refused while draining");
    assert!(String::from_utf8_lossy(&o.stderr).contains("shutting down"), "{}", String::from_utf8_lossy(&o.stderr));
    std::thread::sleep(Duration::from_millis(300));
    assert!(server.child.try_wait().unwrap().is_none(), "exited with a put still open");

    // The in-flight put finishes, then the server exits 0.
    writeln!(child.stdin.as_mut().unwrap(), "go").unwrap();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "COMMITTED 2", "the open put must complete during the drain");
    child.wait().unwrap();
    assert_eq!(server.wait_exit(Duration::from_secs(15)), Some(0), "log:\n{}", server.log_text());
    assert!(server.log_text().contains("drained"));
}

#[test]
fn sigint_exits_at_once() {
    let mut server = Server::start(&["--host-pool", "16MiB"]);
    server.signal(libc::SIGINT);
    assert_eq!(server.wait_exit(Duration::from_secs(5)), Some(130));
}

#[test]
fn bad_configuration_fails_clearly() {
    let o = Command::new(bin("prefixd")).args(["--host-pool", "lots"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("lots"));
    let o = Command::new(bin("prefixd")).args(["--transports", "tcp,cuda-ipc"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cuda-ipc"), "{}", String::from_utf8_lossy(&o.stderr));
    // A GPU tier where there is no CUDA: a clear refusal, not a crash.
    if !std::path::Path::new("/dev/nvidiactl").exists() {
        let o = Command::new(bin("prefixd"))
            .args([
                "--gpu-pool",
                "64MiB",
                "--host-pool",
                "16MiB",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("--gpu-pool") && err.contains("CUDA"), "{err}");
    }
    // A port that is taken: one clear line, exit 1.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let o = Command::new(bin("prefixd"))
        .args(["--listen", &addr, "--metrics-listen", "127.0.0.1:0", "--host-pool", "16MiB"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains(&format!("cannot listen on {addr}")));
}

/// The server closes a session that makes no call for its idle window (4 x `--lease-ttl`, at
/// least 10 s): that is how it forgets clients that died. A live client that is merely quiet
/// (a decode worker whose loads are all device copies; an engine between bursts) keeps its
/// session with KeepAlive: in the sixth GPU run, every decode worker's session was closed two
/// minutes in. A raw session that sends nothing is still closed on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_clients_keep_their_sessions_and_silent_ones_lose_them() {
    use prefixd_proto::v1::{prefixd_client::PrefixdClient, KeepAliveRequest};
    let server = Server::start(&["--host-pool", "16MiB", "--lease-ttl", "1s"]);
    let opts =
        prefixd_client::ClientOptions { name: "quiet".into(), net_devices: Some("lo".into()), ..Default::default() };
    let client = prefixd_client::Client::connect_with(&server.grpc, opts).await.unwrap();
    let silent = RawSession::open(&server.grpc, false, true).await.unwrap();
    assert_eq!(silent.resp.session_idle_ms, 10_000, "the window is announced");

    tokio::time::sleep(Duration::from_secs(12)).await;

    // The silent one is gone, and the log says why.
    let mut grpc =
        PrefixdClient::new(tonic::transport::Channel::from_shared(server.grpc.clone()).unwrap().connect_lazy());
    let gone = grpc.keep_alive(KeepAliveRequest { session_token: silent.token() }).await.unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound, "{gone}");
    let log = server.log_text();
    assert!(
        log.lines().any(|l| l.contains("session closed") && l.contains("client=raw") && l.contains("idle too long")),
        "{log}"
    );
    // The quiet one made no call of its own for 12 s and still has its session: a call that
    // needs it works on this plain (non-reconnecting) client.
    assert!(!log.lines().any(|l| l.contains("session closed") && l.contains("client=quiet")), "closed:\n{log}");
    let key = prefixd_client::ChunkKey::from_slice(&[7; 32]).unwrap();
    let dest = client.alloc(4096).unwrap();
    assert_eq!(client.get_chunks("ns", &[key], &[dest.full()]).await.unwrap(), 0, "a miss, not a lost session");
    assert!(server.metric("prefixd_requests_total{code=\"Ok\",op=\"keep_alive\"}") >= 4.0);
}
