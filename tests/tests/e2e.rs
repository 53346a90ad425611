//! Producer and consumer as separate processes (prefixctl) against a real prefixd: puts of a
//! 1000-token prompt come back byte-identical, a prompt sharing 512 tokens hits exactly 512,
//! over the same-host RMA path and the active-message path that remote hosts use.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use prefixd_tests::*;

fn producer_consumer(extra: &[&str]) {
    let server = Server::start(&["--host-pool", "64MiB"]);
    let dir = TempDir::new("e2e");
    let (prompt, shared, data, out, out2) =
        (dir.path("prompt"), dir.path("shared"), dir.path("kv"), dir.path("out"), dir.path("out2"));
    let tokens: Vec<u32> = (0..1000).map(|i| (i * 7919 % 151_000) as u32).collect();
    write_tokens(&prompt, &tokens);
    let mut other = tokens[..512].to_vec();
    other.extend((0..488).map(|i| 200_000 + i));
    write_tokens(&shared, &other);
    // 1000 tokens = 3 full chunks of 256; 1 MiB + 3 bytes each (odd sizes on purpose).
    let chunk = (1 << 20) + 3;
    let kv = random_bytes(3 * chunk, 42);
    std::fs::write(&data, &kv).unwrap();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();

    let mut args = extra.to_vec();
    let (prompt_s, data_s, out_s) = (s(&prompt), s(&data), s(&out));
    args.extend(["put", "--namespace", "qwen3-4b/bf16/tp1", "--tokens", &prompt_s, "--data", &data_s]);
    let o = prefixctl(&server.grpc, &args);
    assert!(o.status.success(), "put failed: {}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("stored 3 chunks"), "{}", String::from_utf8_lossy(&o.stdout));

    let mut args = extra.to_vec();
    args.extend(["get", "--namespace", "qwen3-4b/bf16/tp1", "--tokens", &prompt_s, "--out", &out_s]);
    let o = prefixctl(&server.grpc, &args);
    assert!(o.status.success(), "get failed: {}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("hit 768 of 1000 tokens"));
    assert!(std::fs::read(&out).unwrap() == kv, "consumer got other bytes");

    // A prompt sharing the first 512 tokens hits exactly 512 (two chunks) and gets their bytes.
    let (shared_s, out2_s) = (s(&shared), s(&out2));
    let mut args = extra.to_vec();
    args.extend(["get", "--namespace", "qwen3-4b/bf16/tp1", "--tokens", &shared_s, "--out", &out2_s]);
    let o = prefixctl(&server.grpc, &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("hit 512 of 1000 tokens"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(std::fs::read(&out2).unwrap() == kv[..2 * chunk], "shared prefix bytes differ");

    // Lookup alone, and another namespace never matches.
    let o = prefixctl(&server.grpc, &["lookup", "--namespace", "qwen3-4b/bf16/tp1", "--tokens", &shared_s]);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("hit 512 of 1000"));
    let o = prefixctl(&server.grpc, &["lookup", "--namespace", "other-model", "--tokens", &prompt_s]);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("hit 0 of 1000"));

    // Putting the same prompt again stores nothing new.
    let mut args = extra.to_vec();
    args.extend(["put", "--namespace", "qwen3-4b/bf16/tp1", "--tokens", &prompt_s, "--data", &data_s]);
    let o = prefixctl(&server.grpc, &args);
    assert!(String::from_utf8_lossy(&o.stdout).contains("stored 0 chunks (3 already present)"));

    // The metrics saw it, by path.
    let path = if extra.contains(&"--force-remote") { "am" } else { "rma" };
    let (code, body) = server.http_get("/metrics");
    assert_eq!(code, 200);
    assert!(body.contains(&format!("direction=\"in\",path=\"{path}\"")), "no {path} bytes in metrics:\n{body}");
    assert!(server.metric("prefixd_hit_tokens_total") >= 768.0 + 512.0);
}

#[test]
fn producer_consumer_same_host_rma() {
    producer_consumer(&[]);
}

#[test]
fn producer_consumer_active_messages() {
    producer_consumer(&["--force-remote"]);
}

#[test]
fn health_readiness_stats_and_keys() {
    let server = Server::start(&["--host-pool", "16MiB"]);
    assert_eq!(server.http_get("/healthz").0, 200);
    assert_eq!(server.http_get("/readyz").0, 200);
    assert_eq!(server.http_get("/nope").0, 404);
    let o = prefixctl(&server.grpc, &["health"]);
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "SERVING");
    let o = prefixctl(&server.grpc, &["stats"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("pool host: 0 / 16777216 bytes used"), "{text}");
    // `keys` needs no server and matches the Python vectors' recipe (first vector: 0..999).
    let dir = TempDir::new("keys");
    write_tokens(&dir.path("t"), &(0..1000).collect::<Vec<u32>>());
    let o = prefixctl("http://127.0.0.1:1", &["keys", "--tokens", dir.path("t").to_str().unwrap()]);
    let keys: Vec<String> = String::from_utf8_lossy(&o.stdout).lines().map(str::to_owned).collect();
    let vectors = include_str!("../../proto/testdata/key_vectors.txt");
    let first = vectors.lines().find(|l| l.starts_with("0|16|256|0,1,2")).unwrap();
    let want: Vec<&str> = first.rsplit('|').next().unwrap().split(',').collect();
    assert_eq!(keys, want);
    // A server that is not there: a clear error, not a hang.
    let o = prefixctl("http://127.0.0.1:1", &["--timeout", "3s", "stats"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot reach prefixd"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
