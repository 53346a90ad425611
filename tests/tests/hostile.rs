//! Malformed and hostile requests against a real server: each gets a clear status, changes
//! nothing, and the server keeps serving.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use prefixd_proto::dataplane::{PutHeader, AM_PUT};
use prefixd_proto::v1::prefixd_client::PrefixdClient;
use prefixd_proto::v1::*;
use prefixd_tests::*;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;
use ucx_bindings::{AmData, ContextBuilder, MemRegion, Worker};

type Grpc = PrefixdClient<Channel>;

async fn session(grpc: &mut Grpc, worker: &Worker, force_remote: bool) -> ConnectResponse {
    grpc.connect(ConnectRequest {
        worker_address: worker.address().to_vec(),
        host_id: if force_remote { "elsewhere".into() } else { String::new() },
        transports: vec!["tcp".into()],
        force_remote,
        client_name: "hostile".into(),
    })
    .await
    .expect("connect")
    .into_inner()
}

/// (entries, reservations, leases, used bytes)
async fn snapshot(grpc: &mut Grpc) -> (u64, u64, u64, u64) {
    let s = grpc.stats(StatsRequest {}).await.expect("stats").into_inner();
    (s.entries, s.active_reservations, s.active_leases, s.tiers[0].used_bytes)
}

fn key(b: u8) -> Vec<u8> {
    vec![b; 32]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_clear_errors_and_change_nothing() {
    let server = Server::start(&["--host-pool", "8MiB", "--max-chunk-size", "1MiB"]);
    let channel = Channel::from_shared(server.grpc.clone()).unwrap().connect().await.unwrap();
    let mut g = PrefixdClient::new(channel);
    let ctx = ContextBuilder::new().transports("sm,tcp").unwrap().net_devices("lo").build().unwrap();
    let worker = Worker::new(&ctx, "hostile").unwrap();
    let a = session(&mut g, &worker, true).await;
    let b = session(&mut g, &worker, true).await;

    // Legitimate state to attack: one committed chunk (AM path), one lease on it by session A.
    let ep = worker.connect(&a.worker_address).await.unwrap();
    let data = MemRegion::alloc_host(&ctx, 4096).unwrap();
    data.write(0, &random_bytes(4096, 9)).unwrap();
    let begin = |s: u64, keys: Vec<Vec<u8>>, sizes: Vec<u64>| BeginPutRequest {
        session_id: s,
        namespace: "ns".into(),
        keys,
        sizes,
        parent_key: vec![],
    };
    let put = g.begin_put(begin(a.session_id, vec![key(1)], vec![4096])).await.unwrap().into_inner();
    let h = PutHeader { session_id: a.session_id, put_id: put.put_id, index: 0 }.encode();
    ep.am_send(AM_PUT, &h, AmData::Region(data.full()), Duration::from_secs(10)).await.unwrap();
    g.commit_put(CommitPutRequest { session_id: a.session_id, put_id: put.put_id }).await.unwrap();
    let lookup = |s: u64, keys: Vec<Vec<u8>>, lease: bool| LookupRequest {
        session_id: s,
        namespace: "ns".into(),
        keys,
        lease,
        lease_ttl_ms: 0,
        chunk_tokens: 0,
    };
    let lease = g.lookup(lookup(a.session_id, vec![key(1)], true)).await.unwrap().into_inner();
    assert_eq!(lease.hit_chunks, 1);
    let before = snapshot(&mut g).await;

    let mut results: Vec<(&str, Code, Result<(), tonic::Status>)> = Vec::new();
    macro_rules! case {
        ($name:expr, $code:expr, $call:expr) => {
            results.push(($name, $code, $call.await.map(|_| ())));
        };
    }
    let (sa, sb) = (a.session_id, b.session_id);
    let addr = worker.address().to_vec();
    let conn = |worker_address: Vec<u8>, name: String, transports: Vec<String>| ConnectRequest {
        worker_address,
        host_id: String::new(),
        transports,
        force_remote: true,
        client_name: name,
    };
    case!("connect: empty address", Code::InvalidArgument, g.connect(conn(vec![], "x".into(), vec![])));
    case!("connect: 70 KB address", Code::InvalidArgument, g.connect(conn(vec![1; 70_000], "x".into(), vec![])));
    case!("connect: long name", Code::InvalidArgument, g.connect(conn(addr.clone(), "n".repeat(200), vec![])));
    case!(
        "connect: 100 transports",
        Code::InvalidArgument,
        g.connect(conn(addr.clone(), "x".into(), vec!["tcp".into(); 100]))
    );
    case!("begin_put: unknown session", Code::NotFound, g.begin_put(begin(12345, vec![key(2)], vec![10])));
    case!("begin_put: 31-byte key", Code::InvalidArgument, g.begin_put(begin(sa, vec![vec![0; 31]], vec![10])));
    case!("begin_put: 33-byte key", Code::InvalidArgument, g.begin_put(begin(sa, vec![vec![0; 33]], vec![10])));
    case!("begin_put: no keys", Code::InvalidArgument, g.begin_put(begin(sa, vec![], vec![])));
    case!("begin_put: sizes mismatch", Code::InvalidArgument, g.begin_put(begin(sa, vec![key(2)], vec![1, 2])));
    case!("begin_put: zero size", Code::InvalidArgument, g.begin_put(begin(sa, vec![key(2)], vec![0])));
    case!(
        "begin_put: over max chunk",
        Code::InvalidArgument,
        g.begin_put(begin(sa, vec![key(2)], vec![(1 << 20) + 1]))
    );
    case!("begin_put: u64::MAX size", Code::InvalidArgument, g.begin_put(begin(sa, vec![key(2)], vec![u64::MAX])));
    case!(
        "begin_put: 5000 keys",
        Code::InvalidArgument,
        g.begin_put(begin(sa, (0..5000).map(|i| vec![(i % 251) as u8; 32]).collect(), vec![1; 5000]))
    );
    case!(
        "begin_put: more than the pool",
        Code::ResourceExhausted,
        g.begin_put(begin(sa, (10..19).map(key).collect(), vec![1 << 20; 9]))
    );
    case!(
        "begin_put: empty namespace",
        Code::InvalidArgument,
        g.begin_put(BeginPutRequest { namespace: String::new(), ..begin(sa, vec![key(2)], vec![1]) })
    );
    case!(
        "begin_put: 300-byte namespace",
        Code::InvalidArgument,
        g.begin_put(BeginPutRequest { namespace: "n".repeat(300), ..begin(sa, vec![key(2)], vec![1]) })
    );
    case!(
        "begin_put: 5-byte parent",
        Code::InvalidArgument,
        g.begin_put(BeginPutRequest { parent_key: vec![1; 5], ..begin(sa, vec![key(2)], vec![1]) })
    );
    case!("commit: unknown put", Code::NotFound, g.commit_put(CommitPutRequest { session_id: sa, put_id: 999_999 }));
    case!(
        "commit: double commit",
        Code::NotFound,
        g.commit_put(CommitPutRequest { session_id: sa, put_id: put.put_id })
    );
    case!(
        "commit: unknown session",
        Code::NotFound,
        g.commit_put(CommitPutRequest { session_id: 7, put_id: put.put_id })
    );
    case!("abort: unknown put", Code::NotFound, g.abort_put(AbortPutRequest { session_id: sa, put_id: 424_242 }));
    case!("abort: committed put", Code::NotFound, g.abort_put(AbortPutRequest { session_id: sa, put_id: put.put_id }));
    case!("lookup: lease, unknown session", Code::NotFound, g.lookup(lookup(999, vec![key(1)], true)));
    case!("lookup: 16-byte key", Code::InvalidArgument, g.lookup(lookup(sa, vec![vec![1; 16]], false)));
    case!("lookup: 5000 keys", Code::InvalidArgument, g.lookup(lookup(sa, vec![key(1); 5000], false)));
    case!("lookup: no keys", Code::InvalidArgument, g.lookup(lookup(sa, vec![], false)));
    case!(
        "lookup: empty namespace",
        Code::InvalidArgument,
        g.lookup(LookupRequest { namespace: String::new(), ..lookup(sa, vec![key(1)], false) })
    );
    case!("release: unknown lease", Code::NotFound, g.release(ReleaseRequest { session_id: sa, lease_id: 31337 }));
    case!(
        "release: another session's lease",
        Code::PermissionDenied,
        g.release(ReleaseRequest { session_id: sb, lease_id: lease.lease_id })
    );
    case!(
        "release: unknown session",
        Code::NotFound,
        g.release(ReleaseRequest { session_id: 5, lease_id: lease.lease_id })
    );
    case!(
        "fetch: unknown lease",
        Code::NotFound,
        g.fetch(FetchRequest { session_id: sa, lease_id: 77, indices: vec![], tag: 1 })
    );
    case!(
        "fetch: index out of range",
        Code::InvalidArgument,
        g.fetch(FetchRequest { session_id: sa, lease_id: lease.lease_id, indices: vec![5], tag: 1 })
    );
    case!(
        "fetch: another session's lease",
        Code::PermissionDenied,
        g.fetch(FetchRequest { session_id: sb, lease_id: lease.lease_id, indices: vec![], tag: 1 })
    );
    case!(
        "delete: 8-byte key",
        Code::InvalidArgument,
        g.delete(DeleteRequest { namespace: "ns".into(), keys: vec![vec![0; 8]] })
    );
    case!("delete: no keys", Code::InvalidArgument, g.delete(DeleteRequest { namespace: "ns".into(), keys: vec![] }));
    case!("disconnect: unknown session", Code::NotFound, g.disconnect(DisconnectRequest { session_id: 31 }));

    let mut failures = Vec::new();
    for (name, want, got) in &results {
        match got {
            Ok(()) => failures.push(format!("{name}: succeeded, expected {want:?}")),
            Err(s) if s.code() != *want => {
                failures.push(format!("{name}: {:?} ({}), expected {want:?}", s.code(), s.message()))
            }
            Err(s) => assert!(!s.message().is_empty(), "{name}: empty message"),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(results.len() >= 30, "only {} cases", results.len());

    // An oversized message is refused by the transport limits.
    let huge = g.lookup(lookup(sa, vec![vec![0; 32]; 200_000], false)).await;
    assert!(huge.is_err(), "a 6 MB request must be refused");

    // Data-plane garbage: bad header, unknown put, wrong size. Dropped and counted, never written.
    let t = Duration::from_secs(5);
    ep.am_send(AM_PUT, b"garbage", AmData::Region(data.full()), t).await.ok();
    let bad_put = PutHeader { session_id: sa, put_id: 999, index: 0 }.encode();
    ep.am_send(AM_PUT, &bad_put, AmData::Region(data.full()), t).await.ok();
    let p2 = g.begin_put(begin(sa, vec![key(3)], vec![100])).await.unwrap().into_inner();
    let wrong = PutHeader { session_id: sa, put_id: p2.put_id, index: 0 }.encode();
    ep.am_send(AM_PUT, &wrong, AmData::Region(data.full()), t).await.ok(); // 4096 bytes, not 100
    let forged = PutHeader { session_id: sb, put_id: p2.put_id, index: 0 }.encode();
    ep.am_send(AM_PUT, &forged, AmData::Region(data.slice(0, 100).unwrap()), t).await.ok();
    assert!(wait_until(Duration::from_secs(5), || {
        server.metric("prefixd_rejected_messages_total{reason=\"bad_header\"}") >= 1.0
            && server.metric("prefixd_rejected_messages_total{reason=\"no_reservation\"}") >= 2.0
            && server.metric("prefixd_rejected_messages_total{reason=\"wrong_size\"}") >= 1.0
    }));
    g.abort_put(AbortPutRequest { session_id: sa, put_id: p2.put_id }).await.unwrap();

    // Nothing changed, and the server still serves: the leased chunk reads back intact.
    assert_eq!(snapshot(&mut g).await, before);
    g.release(ReleaseRequest { session_id: sa, lease_id: lease.lease_id }).await.unwrap();
    let client = ::prefixd_client::Client::connect_with(
        &server.grpc,
        ::prefixd_client::ClientOptions { net_devices: Some("lo".into()), ..Default::default() },
    )
    .await
    .unwrap();
    let dest = client.alloc(4096).unwrap();
    let k = ::prefixd_client::ChunkKey::from_slice(&key(1)).unwrap();
    assert_eq!(client.get_chunks("ns", &[k], &[dest.full()]).await.unwrap(), 1);
    assert_eq!(dest.to_vec(0, 4096).unwrap(), random_bytes(4096, 9));
    assert_eq!(server.http_get("/healthz").0, 200);
}
