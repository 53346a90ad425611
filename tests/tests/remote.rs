//! The remote data path (active messages, what clients on other hosts use), forced over tcp.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use prefixd_client::{ChunkKey, Client, ClientOptions};
use prefixd_tests::*;
use std::time::{Duration, Instant};

const CHUNK: usize = 36 << 20; // one 256-token chunk of a Qwen3-4B-shaped model
const CHUNKS: usize = 64; // a 16k-token prompt

/// Chunk `i`: a byte pattern of its own with its index at both ends, so a swapped, truncated or
/// stale chunk shows (built with memset-speed writes: 2.3 GB of random bytes would dominate).
fn chunk_bytes(i: usize) -> Vec<u8> {
    let mut v = vec![(i * 7 + 1) as u8; CHUNK];
    v[..8].copy_from_slice(&(i as u64).to_le_bytes());
    v[CHUNK - 8..].copy_from_slice(&(!(i as u64)).to_le_bytes());
    v[CHUNK / 2] = 0xEE;
    v
}

/// 4e6c6e7's client pulled chunks only after every header had arrived while the server sent 8
/// at a time and waited for them: any get of more than 8 large chunks timed out. 64 x 36 MiB
/// over tcp must come back whole; and when the server dies in the middle of a get, the client
/// must fail at once, not after its 30 s timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_get_of_64_chunks_of_36_mib_over_tcp() {
    let mut server = Server::start(&[
        "--host-pool",
        "2600MiB",
        "--max-chunk-size",
        "64MiB",
        "--transports",
        "tcp",
        "--rma",
        "never",
        // One put and one lease of the whole prompt (2.3 GiB): more than the default shares of
        // half the pool.
        "--max-reserved-per-session",
        "2600MiB",
        "--max-leased-per-session",
        "2600MiB",
    ]);
    let opts = ClientOptions {
        transports: "tcp".into(),
        net_devices: Some("lo".into()),
        force_remote: true,
        timeout: Duration::from_secs(30),
        ..ClientOptions::default()
    };
    let client = Client::connect_with(&server.grpc, opts).await.unwrap();
    assert_eq!(client.data_path(), prefixd_client::DataPath::ActiveMessage);
    let keys: Vec<ChunkKey> = (0..CHUNKS).map(|i| ChunkKey([i as u8 ^ 0x5a; 32])).collect();
    let src = client.alloc(CHUNK * CHUNKS).unwrap();
    for i in 0..CHUNKS {
        src.write(i * CHUNK, &chunk_bytes(i)).unwrap();
    }
    let slices = |r: &std::sync::Arc<ucx_bindings::MemRegion>| -> Vec<_> {
        (0..CHUNKS).map(|i| r.slice(i * CHUNK, CHUNK).unwrap()).collect()
    };
    let t0 = Instant::now();
    let put = client.put_chunks("remote", &keys, None, &slices(&src)).await.unwrap();
    assert_eq!(put.stored, CHUNKS);
    let put_s = t0.elapsed().as_secs_f64();
    drop(src);

    let dst = client.alloc(CHUNK * CHUNKS).unwrap();
    let t0 = Instant::now();
    let got = client.get_chunks("remote", &keys, &slices(&dst)).await.unwrap();
    let get_s = t0.elapsed().as_secs_f64();
    assert_eq!(got, CHUNKS);
    for i in 0..CHUNKS {
        assert!(dst.to_vec(i * CHUNK, CHUNK).unwrap() == chunk_bytes(i), "chunk {i} differs");
    }
    let gb = (CHUNK * CHUNKS) as f64 / 1e9;
    eprintln!("64 x 36 MiB over tcp: put {:.2} GB/s, get {:.2} GB/s", gb / put_s, gb / get_s);

    // The server dies half-way through a get: the call fails, and the client stops waiting for
    // the chunks it will never get at once.
    let pending = tokio::spawn(async move {
        let r = client.get_chunks("remote", &keys, &slices(&dst)).await;
        (r.map(|_| ()).map_err(|e| e.to_string()), Instant::now())
    });
    tokio::time::sleep(Duration::from_millis((get_s * 1000.0 / 4.0) as u64)).await;
    server.signal(libc::SIGKILL);
    let killed = Instant::now();
    server.wait_exit(Duration::from_secs(10));
    let (r, ended) = tokio::time::timeout(Duration::from_secs(20), pending).await.expect("the get ends").unwrap();
    if r.is_ok() {
        // Finished before the kill: nothing to measure (the timing above aims at the middle).
        assert!(ended <= killed, "a get that ended after the kill cannot have succeeded");
    } else {
        let after = ended.saturating_duration_since(killed);
        assert!(after < Duration::from_secs(5), "the failed get took {after:?} after the kill: {r:?}");
    }
}

/// Many small remote gets back to back, as a decode engine makes them: each is one Fetch call
/// (the server looks the keys up), every byte checked, and a partial hit returns only the hits.
/// Returning before the reply must not reset HTTP/2 streams: a client that dropped its calls
/// was refused (ResourceExhausted) after about a thousand gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_small_remote_gets_in_a_row() {
    let server = Server::start(&["--host-pool", "64MiB", "--transports", "tcp", "--rma", "never"]);
    let opts = ClientOptions {
        transports: "tcp".into(),
        net_devices: Some("lo".into()),
        force_remote: true,
        ..ClientOptions::default()
    };
    let client = Client::connect_with(&server.grpc, opts).await.unwrap();
    let keys: Vec<ChunkKey> = (0..2).map(|i| ChunkKey([0x31 + i as u8; 32])).collect();
    let src = client.alloc(2 * 4096).unwrap();
    src.write(0, &[7u8; 4096]).unwrap();
    src.write(4096, &[9u8; 4096]).unwrap();
    let slices = |r: &std::sync::Arc<ucx_bindings::MemRegion>, n: usize| -> Vec<_> {
        (0..n).map(|i| r.slice(i * 4096, 4096).unwrap()).collect()
    };
    assert_eq!(client.put_chunks("small", &keys[..1], None, &slices(&src, 1)).await.unwrap().stored, 1);
    let dst = client.alloc(2 * 4096).unwrap();
    for n in 0..3000 {
        dst.write(0, &[0u8; 4096]).unwrap();
        let got = client.get_chunks("small", &keys[..1], &slices(&dst, 1)).await;
        assert_eq!(got.unwrap_or_else(|e| panic!("get {n}: {e}")), 1);
        assert_eq!(dst.to_vec(0, 4096).unwrap(), vec![7u8; 4096], "get {n}");
    }
    // Two keys, one stored: the prefix comes, the rest is left alone.
    dst.write(4096, &[1u8; 4096]).unwrap();
    assert_eq!(client.get_chunks("small", &keys, &slices(&dst, 2)).await.unwrap(), 1);
    assert_eq!(dst.to_vec(4096, 4096).unwrap(), vec![1u8; 4096], "the miss's buffer is untouched");
    // Nothing stored under these keys: a miss, at once.
    assert_eq!(client.get_chunks("nothing", &keys, &slices(&dst, 2)).await.unwrap(), 0);
}
