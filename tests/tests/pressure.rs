//! Pool pressure: writing ten times the pool's capacity through a real server keeps serving,
//! evicts least-recent prefixes, and keeps the server's resident memory near pool + overhead.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use prefixd_client::{Client, ClientOptions};
use prefixd_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_times_capacity_keeps_serving_with_bounded_memory() {
    let pool: u64 = 16 << 20;
    let server = Server::start(&["--host-pool", "16MiB", "--max-chunk-size", "1MiB"]);
    let base_rss = server.rss_bytes();
    for force_remote in [false, true] {
        let opts = ClientOptions { net_devices: Some("lo".into()), force_remote, ..ClientOptions::default() };
        let client = Client::connect_with(&server.grpc, opts).await.expect("connect");
        // Same host and allowed: host-tier chunks move by direct copies through the mapped pool.
        assert_eq!(client.direct_host_pool(), !force_remote);
        let chunk = 1 << 20;
        // 80 prompts of 2 chunks of 1 MiB: 160 MiB, ten times the pool.
        let mut last = Vec::new();
        for p in 0..80u32 {
            let tokens: Vec<u32> = (0..512).map(|i| p * 1_000_000 + i).collect();
            let kv = random_bytes(2 * chunk, p as u64 + if force_remote { 1000 } else { 0 });
            let out = client.put("pressure", &tokens, &kv).await;
            let out = out.unwrap_or_else(|e| panic!("put {p} (force_remote={force_remote}): {e}"));
            assert_eq!(out.chunks, 2);
            last = vec![(tokens, kv)];
        }
        // The newest prompt is intact; the oldest was evicted, not corrupted.
        let (tokens, kv) = &last[0];
        let (hit, bytes) = client.get("pressure", tokens).await.expect("get newest");
        assert_eq!(hit, 512);
        assert!(&bytes == kv, "newest prompt corrupted under pressure");
        let first: Vec<u32> = (0..512).collect();
        assert_eq!(client.lookup("pressure", &first).await.unwrap(), 0, "oldest prompt should be gone");
        let s = client.stats().await.unwrap();
        assert!(s.evictions > 0);
        assert!(s.tiers[0].used_bytes <= s.tiers[0].capacity_bytes);
        // Paged chunks need a same-host session and CUDA: a clear error here, never a panic.
        let frag = vec![vec![::prefixd_client::Fragment { ptr: 0x1000, len: 4096 }]];
        let k = client.keys(&(0..256).collect::<Vec<u32>>());
        let e = client.put_paged("pressure", &k, None, &frag).await.unwrap_err();
        assert!(matches!(e, ::prefixd_client::Error::InvalidArgument(_)), "{e:?}");
        client.close().await.ok();
    }
    let rss = server.rss_bytes();
    // The pool is touched at most once; the rest is bounded overhead (UCX, gRPC buffers).
    let limit = base_rss + pool + (64 << 20);
    assert!(rss <= limit, "server RSS {} MiB > limit {} MiB (base {} MiB)", rss >> 20, limit >> 20, base_rss >> 20);
    assert_eq!(server.http_get("/healthz").0, 200);
}
