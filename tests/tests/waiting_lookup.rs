//! Lookups that wait for chunks (`want_chunks`, `wait_ms`): how a decode instance waits for what
//! a prefill announced without polling. Answered the moment the chunks commit, at the end of the
//! wait otherwise, at once when the server starts draining; a hostile wait is capped.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use prefixd_proto::dataplane::{PutHeader, AM_PUT};
use prefixd_proto::v1::prefixd_client::PrefixdClient;
use prefixd_proto::v1::*;
use prefixd_tests::*;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use ucx_bindings::{AmData, MemRegion};

fn waiting(keys: Vec<Vec<u8>>, want: u32, wait_ms: u32) -> LookupRequest {
    LookupRequest { namespace: "ns".into(), keys, want_chunks: want, wait_ms, ..Default::default() }
}

async fn grpc(server: &Server) -> PrefixdClient<Channel> {
    PrefixdClient::new(Channel::from_shared(server.grpc.clone()).unwrap().connect().await.unwrap())
}

/// Sends one 4 KiB chunk `key` on a new session, ready to commit: (the session, its put id).
async fn send_chunk(server: &Server, g: &mut PrefixdClient<Channel>, key: &[u8]) -> (RawSession, u64) {
    let s = RawSession::open(&server.grpc, true, true).await.unwrap();
    let data = MemRegion::alloc_host(&s.ctx, 4096).unwrap();
    data.write(0, &random_bytes(4096, 3)).unwrap();
    let put = g
        .begin_put(BeginPutRequest {
            session_token: s.token(),
            namespace: "ns".into(),
            keys: vec![key.to_vec()],
            sizes: vec![4096],
            parent_key: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let h = PutHeader { put_id: put.put_id, index: 0 }.encode();
    s.ep().am_send(AM_PUT, &h, AmData::Region(data.full()), Duration::from_secs(10)).await.unwrap();
    (s, put.put_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_lookup_is_answered_when_the_chunk_commits() {
    let server = Server::start(&["--host-pool", "8MiB"]);
    let mut g = grpc(&server).await;
    let key = vec![7u8; 32];

    // Nothing there: answered when the wait runs out, with what is there (nothing).
    let t0 = Instant::now();
    let r = g.lookup(waiting(vec![key.clone()], 1, 300)).await.unwrap().into_inner();
    let took = t0.elapsed();
    assert_eq!(r.hit_chunks, 0);
    assert!(took >= Duration::from_millis(290) && took < Duration::from_secs(3), "answered after {took:?}");

    // A lookup waiting up to 20 s is answered right after another session commits the chunk.
    let mut waiter = grpc(&server).await;
    let k = key.clone();
    let pending = tokio::spawn(async move {
        let t0 = Instant::now();
        let r = waiter.lookup(waiting(vec![k], 1, 20_000)).await.unwrap().into_inner();
        (r.hit_chunks, t0.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (s, put_id) = send_chunk(&server, &mut g, &key).await;
    let committed = Instant::now();
    g.commit_put(CommitPutRequest { session_token: s.token(), put_id }).await.unwrap();
    let (hits, took) = pending.await.unwrap();
    assert_eq!(hits, 1);
    assert!(took < Duration::from_secs(5), "the waiter slept on for {took:?}");
    assert!(committed.elapsed() < Duration::from_secs(2));

    // Already there: no wait at all.
    let t0 = Instant::now();
    let r = g.lookup(waiting(vec![key], 1, 20_000)).await.unwrap().into_inner();
    assert_eq!(r.hit_chunks, 1);
    assert!(t0.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_wait_is_capped_and_does_not_hold_a_draining_server() {
    let mut server = Server::start(&["--host-pool", "8MiB", "--drain-timeout", "20s"]);
    let mut waiter = grpc(&server).await;
    // u32::MAX ms (49 days) asked; the server caps it, and SIGTERM wakes it.
    let pending = tokio::spawn(async move {
        waiter.lookup(waiting(vec![vec![9u8; 32]], 1, u32::MAX)).await.map(|r| r.into_inner().hit_chunks)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "the lookup waits");
    let t0 = Instant::now();
    server.signal(libc::SIGTERM);
    let code = server.wait_exit(Duration::from_secs(10));
    assert_eq!(code, Some(0));
    assert!(t0.elapsed() < Duration::from_secs(5), "drain waited {:?} for a parked lookup", t0.elapsed());
    // It was answered (nothing hit) or cut off with the server, but did not hang.
    let answer = tokio::time::timeout(Duration::from_secs(5), pending).await.expect("the waiting call ended").unwrap();
    assert!(matches!(answer, Ok(0) | Err(_)), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leasing_wait_ended_by_sigterm_takes_no_lease_that_would_hold_the_drain() {
    // The waiter wants two chunks, one of which is cached. When the drain wakes it, it gets no
    // lease on that one: granted after the drain began, a lease either holds the drain until its
    // TTL (60 s here, past the 20 s drain timeout) or, when the drain had already counted none,
    // goes out with a server that is exiting (what an unchecked server did here).
    let mut server = Server::start(&["--host-pool", "8MiB", "--drain-timeout", "20s", "--lease-ttl", "60s"]);
    let mut g = grpc(&server).await;
    let (cached, missing) = (vec![3u8; 32], vec![4u8; 32]);
    let (s, put_id) = send_chunk(&server, &mut g, &cached).await;
    g.commit_put(CommitPutRequest { session_token: s.token(), put_id }).await.unwrap();
    let waiter = RawSession::open(&server.grpc, true, true).await.unwrap();
    let request =
        LookupRequest { session_token: waiter.token(), lease: true, ..waiting(vec![cached, missing], 2, 30_000) };
    let pending = tokio::spawn(async move { g.lookup(request).await.map(|r| r.into_inner().lease_id) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "the lookup waits for the missing chunk");
    let t0 = Instant::now();
    server.signal(libc::SIGTERM);
    let code = server.wait_exit(Duration::from_secs(25));
    assert_eq!(code, Some(0));
    assert!(t0.elapsed() < Duration::from_secs(5), "the drain waited {:?}", t0.elapsed());
    let answer = tokio::time::timeout(Duration::from_secs(5), pending).await.expect("the waiting call ended").unwrap();
    assert!(answer.is_err(), "no lease while draining: {answer:?}");
    drop((s, waiter));
}
