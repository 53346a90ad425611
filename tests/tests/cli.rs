//! prefixctl as operators use it: `doctor` against a real server (and a missing one, and a
//! client forced onto tcp), `--json` on every command, `bench`, completions and man pages.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use prefixd_tests::*;
use serde_json::Value;
use std::process::{Command, Output};

fn ctl(endpoint: &str, args: &[&str]) -> Output {
    Command::new(bin("prefixctl"))
        .args(["--endpoint", endpoint, "--net-devices", "lo"])
        .args(args)
        .env("PYTHONHASHSEED", "0")
        .env_remove("UCX_TLS")
        .output()
        .expect("run prefixctl")
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn check<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["checks"].as_array().unwrap().iter().find(|c| c["id"] == id).unwrap_or_else(|| panic!("no check {id}"))
}

#[test]
fn doctor_passes_a_healthy_node_and_skips_what_does_not_apply() {
    let server = Server::start(&["--host-pool", "64MiB"]);
    let out = ctl(&server.grpc, &["--json", "doctor", "--bench-size", "8MiB"]);
    let r = json_of(&out);
    for id in ["server", "server.pools", "ucx.transports", "session", "env.PYTHONHASHSEED", "bandwidth"] {
        assert_eq!(check(&r, id)["status"], "ok", "{id}: {}", check(&r, id));
    }
    assert_eq!(check(&r, "session")["data"]["data_path"], "rma");
    assert_eq!(check(&r, "bandwidth")["data"]["verified"], true);
    assert!(check(&r, "bandwidth")["data"]["memcpy_gbps"].as_f64().unwrap() > 0.0, "the baseline ran");
    let latency = check(&r, "bandwidth")["data"]["get_latency_us"].as_f64().unwrap();
    assert!(latency > 0.0 && latency < 1e6, "a 64 KiB get's latency was measured: {latency} µs");
    if !std::path::Path::new("/dev/nvidia0").exists() {
        assert_eq!(check(&r, "gpu.peers")["status"], "skip", "no GPU: skipped, with the reason");
    }
    assert_eq!(r["worst"], "ok");
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(server.metric("prefixd_entries"), 0.0, "the bandwidth run deletes what it stored");
}

#[test]
fn doctor_flags_a_consumer_forced_onto_tcp_with_the_fix() {
    let server = Server::start(&["--host-pool", "64MiB"]);
    let out = ctl(&server.grpc, &["--transports", "tcp", "doctor", "--bench-size", "0"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "a warning exits 1:\n{text}");
    assert!(text.contains("WARN  session"), "{text}");
    assert!(text.contains("its bytes go over tcp"), "{text}");
    assert!(text.contains("fix: use shared memory"), "{text}");

    let out = ctl(&server.grpc, &["--force-remote", "--transports", "tcp", "--json", "doctor", "--bench-size", "0"]);
    let r = json_of(&out);
    assert_eq!(check(&r, "session")["status"], "warn");
    assert!(check(&r, "session")["fix"].as_str().unwrap().contains("--force-remote"));
}

#[test]
fn doctor_fails_without_a_server_and_says_how_to_start_one() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = ctl(&format!("http://127.0.0.1:{port}"), &["--json", "doctor"]);
    assert_eq!(out.status.code(), Some(2));
    let r = json_of(&out);
    assert_eq!(check(&r, "server")["status"], "fail");
    assert!(check(&r, "server")["fix"].as_str().unwrap().contains("start prefixd"));
    assert_eq!(check(&r, "session")["status"], "skip");
    assert_eq!(r["worst"], "fail");
}

#[test]
fn every_command_speaks_json() {
    let server = Server::start(&["--host-pool", "64MiB"]);
    let dir = TempDir::new("cli-json");
    let tokens = dir.path("t.txt");
    write_tokens(&tokens, &(0..512).collect::<Vec<u32>>());
    let data = dir.path("kv.bin");
    std::fs::write(&data, random_bytes(8192, 1)).unwrap();
    let (t, d, o) = (tokens.to_str().unwrap(), data.to_str().unwrap(), dir.path("out.bin"));
    let put = json_of(&ctl(&server.grpc, &["--json", "put", "--namespace", "n", "--tokens", t, "--data", d]));
    assert_eq!(put["stored"], 2);
    let get = json_of(&ctl(
        &server.grpc,
        &["--json", "get", "--namespace", "n", "--tokens", t, "--out", o.to_str().unwrap()],
    ));
    assert_eq!(get["hit_tokens"], 512);
    assert_eq!(
        json_of(&ctl(&server.grpc, &["--json", "lookup", "--namespace", "n", "--tokens", t]))["hit_tokens"],
        512
    );
    assert_eq!(json_of(&ctl(&server.grpc, &["--json", "keys", "--tokens", t]))["keys"].as_array().unwrap().len(), 2);
    assert_eq!(json_of(&ctl(&server.grpc, &["--json", "health"]))["status"], "SERVING");
    let stats = json_of(&ctl(&server.grpc, &["--json", "stats"]));
    assert_eq!(stats["entries"], 2);
    assert_eq!(stats["tiers"][0]["tier"], "host");
    // Errors come as JSON too, and fail.
    let bad = ctl("http://127.0.0.1:1", &["--json", "stats"]);
    assert!(!bad.status.success());
    assert!(json_of(&bad)["error"].as_str().unwrap().contains("cannot reach prefixd"));
}

#[test]
fn bench_measures_against_memcpy_and_completions_and_man_pages_generate() {
    let server = Server::start(&["--host-pool", "64MiB"]);
    let out = ctl(&server.grpc, &["--json", "bench", "--total", "16MiB", "--chunk-size", "1MiB"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let b = json_of(&out);
    assert_eq!(b["verified"], true);
    assert!(b["put_gbps"].as_f64().unwrap() > 0.0 && b["memcpy_gbps"].as_f64().unwrap() > 0.0);
    assert!(out.stderr.is_empty(), "no progress bar when not on a terminal");

    let comp = Command::new(bin("prefixctl")).args(["completions", "bash"]).output().unwrap();
    assert!(String::from_utf8_lossy(&comp.stdout).contains("doctor"));
    let dir = TempDir::new("man");
    let man = Command::new(bin("prefixctl")).arg("man").arg(dir.path("man1")).output().unwrap();
    assert!(man.status.success());
    let page = std::fs::read_to_string(dir.path("man1").join("prefixctl-doctor.1")).unwrap();
    assert!(page.contains(".TH"), "a roff man page");
}

/// A regression of the listener-based data endpoints: a client (or server) asked for shared
/// memory only could not wire up its endpoint ("Destination is unreachable"); tcp is now added
/// for the wire-up, and the data still takes shared memory.
#[test]
fn shared_memory_only_transports_still_connect() {
    let server = Server::start(&["--host-pool", "64MiB", "--transports", "sm"]);
    let dir = TempDir::new("sm-only");
    let tokens = dir.path("t.txt");
    write_tokens(&tokens, &(0..256).collect::<Vec<u32>>());
    let out = ctl(
        &server.grpc,
        &["--transports", "sm", "--json", "lookup", "--namespace", "n", "--tokens", tokens.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = json_of(&ctl(&server.grpc, &["--transports", "posix,cma", "--json", "doctor", "--bench-size", "4MiB"]));
    assert_eq!(check(&r, "session")["data"]["data_path"], "rma");
    assert_eq!(check(&r, "bandwidth")["data"]["verified"], true);
}

/// A sidecar running as another user than its same-host clients (the DaemonSet's uid 65532 and
/// a root engine): UCX refuses shared memory between them. The client falls back to tcp and
/// works; doctor says why and how to fix it. Needs root (to start the server as another user).
#[test]
fn a_server_of_another_user_still_serves_and_doctor_says_why() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("not root or no setpriv: cannot start a server as another user here");
        return;
    }
    // The other user must be able to read the binary and UCX's libraries.
    let dir = TempDir::new("other-user");
    let ucx = Command::new("python3")
        .args(["-c", "import libucx, os; print(os.path.join(os.path.dirname(libucx.__file__), 'lib'))"])
        .output()
        .unwrap();
    let ucx = String::from_utf8_lossy(&ucx.stdout).trim().to_owned();
    assert!(Command::new("cp").arg("-r").arg(&ucx).arg(dir.path("ucx")).status().unwrap().success());
    std::fs::copy(bin("prefixd"), dir.path("prefixd")).unwrap();
    assert!(Command::new("chmod").args(["-R", "a+rX"]).arg(&dir.0).status().unwrap().success());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server = Command::new("setpriv")
        .args(["--reuid", "65532", "--regid", "65532", "--clear-groups"])
        .arg(dir.path("prefixd"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--metrics-listen", "127.0.0.1:0", "--host-pool", "64MiB"])
        .env("LD_LIBRARY_PATH", dir.path("ucx"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    assert!(wait_until(std::time::Duration::from_secs(20), || ctl(&endpoint, &["health"]).status.success()));
    let tokens = dir.path("t.txt");
    write_tokens(&tokens, &(0..256).collect::<Vec<u32>>());
    let out = ctl(&endpoint, &["--json", "lookup", "--namespace", "n", "--tokens", tokens.to_str().unwrap()]);
    let r = json_of(&ctl(&endpoint, &["--json", "doctor", "--bench-size", "4MiB"]));
    let _ = server.kill();
    let _ = server.wait();
    assert!(out.status.success(), "the client falls back to tcp: {}", String::from_utf8_lossy(&out.stderr));
    let session = check(&r, "session");
    assert_eq!(session["status"], "warn", "{session}");
    assert!(session["summary"].as_str().unwrap().contains("different users"), "{session}");
    assert!(session["fix"].as_str().unwrap().contains("uid 65532"), "{session}");
    assert_eq!(check(&r, "bandwidth")["data"]["verified"], true);
}
