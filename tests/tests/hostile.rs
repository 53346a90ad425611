//! Malformed and hostile requests against a real server: each gets a clear status, changes
//! nothing, and the server keeps serving.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use prefixd_proto::dataplane::{FetchAsk, FetchDone, FetchHeader, PutHeader, AM_FETCH, AM_FETCH_ASK, AM_PUT};
use prefixd_proto::keys::ChunkKey;
use prefixd_proto::v1::prefixd_client::PrefixdClient;
use prefixd_proto::v1::*;
use prefixd_tests::*;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;
use ucx_bindings::{AmData, MemRegion};

type Grpc = PrefixdClient<Channel>;

/// (entries, reservations, leases, used bytes)
async fn snapshot(grpc: &mut Grpc) -> (u64, u64, u64, u64) {
    let s = grpc.stats(StatsRequest {}).await.expect("stats").into_inner();
    (s.entries, s.active_reservations, s.active_leases, s.tiers[0].used_bytes)
}

fn key(b: u8) -> Vec<u8> {
    vec![b; 32]
}

fn begin(s: &[u8], keys: Vec<Vec<u8>>, sizes: Vec<u64>) -> BeginPutRequest {
    BeginPutRequest { session_token: s.to_vec(), namespace: "ns".into(), keys, sizes, parent_key: vec![] }
}

fn lookup(s: &[u8], keys: Vec<Vec<u8>>, lease: bool) -> LookupRequest {
    LookupRequest { session_token: s.to_vec(), namespace: "ns".into(), keys, lease, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_clear_errors_and_change_nothing() {
    let server = Server::start(&["--host-pool", "8MiB", "--max-chunk-size", "1MiB"]);
    let channel = Channel::from_shared(server.grpc.clone()).unwrap().connect().await.unwrap();
    let mut g = PrefixdClient::new(channel);
    let a = RawSession::open(&server.grpc, true, true).await.unwrap();
    let b = RawSession::open(&server.grpc, true, true).await.unwrap();
    let (sa, sb) = (a.token(), b.token());

    // Legitimate state to attack: one committed chunk (AM path), one lease on it by session A.
    let data = MemRegion::alloc_host(&a.ctx, 4096).unwrap();
    data.write(0, &random_bytes(4096, 9)).unwrap();
    let put = g.begin_put(begin(&sa, vec![key(1)], vec![4096])).await.unwrap().into_inner();
    let h = PutHeader { put_id: put.put_id, index: 0 }.encode();
    a.ep().am_send(AM_PUT, &h, AmData::Region(data.full()), Duration::from_secs(10)).await.unwrap();
    g.commit_put(CommitPutRequest { session_token: sa.clone(), put_id: put.put_id }).await.unwrap();
    let lease = g.lookup(lookup(&sa, vec![key(1)], true)).await.unwrap().into_inner();
    assert_eq!(lease.hit_chunks, 1);
    let before = snapshot(&mut g).await;

    let mut results: Vec<(&str, Code, Result<(), tonic::Status>)> = Vec::new();
    macro_rules! case {
        ($name:expr, $code:expr, $call:expr) => {
            results.push(($name, $code, $call.await.map(|_| ())));
        };
    }
    let conn = |name: String, transports: Vec<String>| ConnectRequest {
        host_id: String::new(),
        transports,
        force_remote: true,
        client_name: name,
    };
    let (unknown, short) = (vec![7u8; 16], vec![1u8; 8]);
    case!("connect: long name", Code::InvalidArgument, g.connect(conn("n".repeat(200), vec![])));
    case!("connect: 100 transports", Code::InvalidArgument, g.connect(conn("x".into(), vec!["tcp".into(); 100])));
    case!("begin_put: unknown session", Code::NotFound, g.begin_put(begin(&unknown, vec![key(2)], vec![10])));
    case!("begin_put: 8-byte token", Code::InvalidArgument, g.begin_put(begin(&short, vec![key(2)], vec![10])));
    case!("begin_put: no token", Code::InvalidArgument, g.begin_put(begin(&[], vec![key(2)], vec![10])));
    case!("begin_put: 31-byte key", Code::InvalidArgument, g.begin_put(begin(&sa, vec![vec![0; 31]], vec![10])));
    case!("begin_put: 33-byte key", Code::InvalidArgument, g.begin_put(begin(&sa, vec![vec![0; 33]], vec![10])));
    case!("begin_put: no keys", Code::InvalidArgument, g.begin_put(begin(&sa, vec![], vec![])));
    case!("begin_put: sizes mismatch", Code::InvalidArgument, g.begin_put(begin(&sa, vec![key(2)], vec![1, 2])));
    case!("begin_put: zero size", Code::InvalidArgument, g.begin_put(begin(&sa, vec![key(2)], vec![0])));
    case!(
        "begin_put: over max chunk",
        Code::InvalidArgument,
        g.begin_put(begin(&sa, vec![key(2)], vec![(1 << 20) + 1]))
    );
    case!("begin_put: u64::MAX size", Code::InvalidArgument, g.begin_put(begin(&sa, vec![key(2)], vec![u64::MAX])));
    case!(
        "begin_put: 5000 keys",
        Code::InvalidArgument,
        g.begin_put(begin(&sa, (0..5000).map(|i| vec![(i % 251) as u8; 32]).collect(), vec![1; 5000]))
    );
    case!(
        "begin_put: more than the pool",
        Code::ResourceExhausted,
        g.begin_put(begin(&sa, (10..19).map(key).collect(), vec![1 << 20; 9]))
    );
    case!(
        "begin_put: empty namespace",
        Code::InvalidArgument,
        g.begin_put(BeginPutRequest { namespace: String::new(), ..begin(&sa, vec![key(2)], vec![1]) })
    );
    case!(
        "begin_put: 300-byte namespace",
        Code::InvalidArgument,
        g.begin_put(BeginPutRequest { namespace: "n".repeat(300), ..begin(&sa, vec![key(2)], vec![1]) })
    );
    case!(
        "begin_put: 5-byte parent",
        Code::InvalidArgument,
        g.begin_put(BeginPutRequest { parent_key: vec![1; 5], ..begin(&sa, vec![key(2)], vec![1]) })
    );
    let commit = |s: &[u8], put_id: u64| CommitPutRequest { session_token: s.to_vec(), put_id };
    let abort = |s: &[u8], put_id: u64| AbortPutRequest { session_token: s.to_vec(), put_id };
    case!("commit: unknown put", Code::NotFound, g.commit_put(commit(&sa, 999_999)));
    case!("commit: double commit", Code::NotFound, g.commit_put(commit(&sa, put.put_id)));
    case!("commit: unknown session", Code::NotFound, g.commit_put(commit(&unknown, put.put_id)));
    case!("commit: another session's put", Code::NotFound, g.commit_put(commit(&sb, put.put_id)));
    case!("abort: unknown put", Code::NotFound, g.abort_put(abort(&sa, 424_242)));
    case!("abort: committed put", Code::NotFound, g.abort_put(abort(&sa, put.put_id)));
    case!("lookup: lease, unknown session", Code::NotFound, g.lookup(lookup(&unknown, vec![key(1)], true)));
    case!("lookup: lease, no session", Code::InvalidArgument, g.lookup(lookup(&[], vec![key(1)], true)));
    case!("lookup: 16-byte key", Code::InvalidArgument, g.lookup(lookup(&sa, vec![vec![1; 16]], false)));
    case!("lookup: 5000 keys", Code::InvalidArgument, g.lookup(lookup(&sa, vec![key(1); 5000], false)));
    case!("lookup: no keys", Code::InvalidArgument, g.lookup(lookup(&sa, vec![], false)));
    case!(
        "lookup: empty namespace",
        Code::InvalidArgument,
        g.lookup(LookupRequest { namespace: String::new(), ..lookup(&sa, vec![key(1)], false) })
    );
    let release = |s: &[u8], lease_id: u64| ReleaseRequest { session_token: s.to_vec(), lease_id };
    let fetch = |s: &[u8], lease_id: u64, indices: Vec<u32>| FetchRequest {
        session_token: s.to_vec(),
        lease_id,
        indices,
        tag: 1,
        ..Default::default()
    };
    let delete =
        |s: &[u8], keys: Vec<Vec<u8>>| DeleteRequest { namespace: "ns".into(), keys, session_token: s.to_vec() };
    case!("release: unknown lease", Code::NotFound, g.release(release(&sa, 31337)));
    case!("release: another session's lease", Code::PermissionDenied, g.release(release(&sb, lease.lease_id)));
    case!("release: unknown session", Code::NotFound, g.release(release(&unknown, lease.lease_id)));
    case!("fetch: unknown lease", Code::NotFound, g.fetch(fetch(&sa, 77, vec![])));
    case!("fetch: index out of range", Code::InvalidArgument, g.fetch(fetch(&sa, lease.lease_id, vec![5])));
    case!("fetch: another session's lease", Code::PermissionDenied, g.fetch(fetch(&sb, lease.lease_id, vec![])));
    let by_keys = |s: &[u8], keys: Vec<Vec<u8>>| FetchRequest { namespace: "ns".into(), keys, ..fetch(s, 0, vec![]) };
    case!("fetch by keys: 16-byte key", Code::InvalidArgument, g.fetch(by_keys(&sa, vec![vec![1; 16]])));
    case!("fetch by keys: 5000 keys", Code::InvalidArgument, g.fetch(by_keys(&sa, vec![key(1); 5000])));
    case!("fetch by keys: unknown session", Code::NotFound, g.fetch(by_keys(&unknown, vec![key(1)])));
    case!(
        "fetch by keys: empty namespace",
        Code::InvalidArgument,
        g.fetch(FetchRequest { namespace: String::new(), ..by_keys(&sa, vec![key(1)]) })
    );
    case!("delete: 8-byte key", Code::InvalidArgument, g.delete(delete(&sa, vec![vec![0; 8]])));
    case!("delete: no keys", Code::InvalidArgument, g.delete(delete(&sa, vec![])));
    case!("delete: no session", Code::InvalidArgument, g.delete(delete(&[], vec![key(1)])));
    case!("delete: unknown session", Code::NotFound, g.delete(delete(&unknown, vec![key(1)])));
    case!(
        "disconnect: unknown session",
        Code::NotFound,
        g.disconnect(DisconnectRequest { session_token: unknown.clone() })
    );

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
    let huge = g.lookup(lookup(&sa, vec![vec![0; 32]; 200_000], false)).await;
    assert!(huge.is_err(), "a 6 MB request must be refused");

    // Data-plane garbage: bad header, unknown put, wrong size. Dropped and counted, never written.
    let t = Duration::from_secs(5);
    let ep = a.ep();
    ep.am_send(AM_PUT, b"garbage", AmData::Region(data.full()), t).await.ok();
    let bad_put = PutHeader { put_id: 999, index: 0 }.encode();
    ep.am_send(AM_PUT, &bad_put, AmData::Region(data.full()), t).await.ok();
    let p2 = g.begin_put(begin(&sa, vec![key(3)], vec![100])).await.unwrap().into_inner();
    let wrong = PutHeader { put_id: p2.put_id, index: 0 }.encode();
    ep.am_send(AM_PUT, &wrong, AmData::Region(data.full()), t).await.ok(); // 4096 bytes, not 100
                                                                           // Session B sends into A's put over its own endpoint: held to B, so there is no such put.
    let forged = PutHeader { put_id: p2.put_id, index: 0 }.encode();
    let b_data = MemRegion::alloc_host(&b.ctx, 100).unwrap();
    b.ep().am_send(AM_PUT, &forged, AmData::Region(b_data.full()), t).await.ok();
    assert!(wait_until(Duration::from_secs(5), || {
        server.metric("prefixd_rejected_messages_total{reason=\"bad_header\"}") >= 1.0
            && server.metric("prefixd_rejected_messages_total{reason=\"no_reservation\"}") >= 2.0
            && server.metric("prefixd_rejected_messages_total{reason=\"wrong_size\"}") >= 1.0
    }));
    g.abort_put(abort(&sa, p2.put_id)).await.unwrap();

    // Nothing changed, and the server still serves: the leased chunk reads back intact.
    assert_eq!(snapshot(&mut g).await, before);
    g.release(release(&sa, lease.lease_id)).await.unwrap();
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

/// The ConnectRequest of 4e6c6e7 carried the client's packed UCX worker address (field 1), and
/// the server built an endpoint from it: one byte 0xff aborted the process in UCX's address
/// parser. Field 1 is now reserved and no endpoint is ever made from client bytes, so such
/// requests are answered normally and the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_worker_addresses_cannot_crash_the_server() {
    #[derive(Clone, PartialEq, prost::Message)]
    struct LegacyConnectRequest {
        #[prost(bytes = "vec", tag = "1")]
        worker_address: Vec<u8>,
        #[prost(string, tag = "5")]
        client_name: String,
    }
    let server = Server::start(&[]);
    let channel = Channel::from_shared(server.grpc.clone()).unwrap().connect().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/prefixd.v1.Prefixd/Connect");
    for garbage in [vec![0xff], random_bytes(64, 1), random_bytes(4096, 2), vec![0; 300]] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let req = LegacyConnectRequest { worker_address: garbage, client_name: "legacy".into() };
        let codec = tonic_prost::ProstCodec::<LegacyConnectRequest, ConnectResponse>::default();
        let r = grpc.unary(tonic::Request::new(req), path.clone(), codec).await;
        let resp = r.expect("answered like any Connect").into_inner();
        assert_eq!(resp.session_token.len(), 16, "a session is opened; the address is ignored");
    }
    assert_eq!(server.http_get("/healthz").0, 200, "the server is alive");
    let client = ::prefixd_client::Client::connect_with(
        &server.grpc,
        ::prefixd_client::ClientOptions { net_devices: Some("lo".into()), ..Default::default() },
    )
    .await
    .expect("and serves new clients");
    assert!(client.health().await.unwrap());
}

/// Active-message injection (4e6c6e7): a header named a session id, guessable from a counter,
/// so one client's chunk could replace another's. Now every data-plane message is held to the
/// session bound to the endpoint it arrived on; a forged put is dropped and the victim's own
/// bytes are what get committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_plane_messages_are_bound_to_their_endpoint() {
    let server = Server::start(&["--host-pool", "8MiB"]);
    let channel = Channel::from_shared(server.grpc.clone()).unwrap().connect().await.unwrap();
    let mut g = PrefixdClient::new(channel);
    let victim = RawSession::open(&server.grpc, true, true).await.unwrap();
    let attacker = RawSession::open(&server.grpc, true, true).await.unwrap();
    let t = Duration::from_secs(10);
    let good = MemRegion::alloc_host(&victim.ctx, 4096).unwrap();
    good.write(0, &random_bytes(4096, 1)).unwrap();
    let evil = MemRegion::alloc_host(&attacker.ctx, 4096).unwrap();
    evil.write(0, &random_bytes(4096, 666)).unwrap();

    let put = g.begin_put(begin(&victim.token(), vec![key(9)], vec![4096])).await.unwrap().into_inner();
    let h = PutHeader { put_id: put.put_id, index: 0 }.encode();
    // The attacker knows the put id (say it guessed it) and sends first, over its own endpoint.
    attacker.ep().am_send(AM_PUT, &h, AmData::Region(evil.full()), t).await.ok();
    assert!(wait_until(Duration::from_secs(5), || {
        server.metric("prefixd_rejected_messages_total{reason=\"no_reservation\"}") >= 1.0
    }));
    victim.ep().am_send(AM_PUT, &h, AmData::Region(good.full()), t).await.unwrap();
    let commit = CommitPutRequest { session_token: victim.token(), put_id: put.put_id };
    assert_eq!(g.commit_put(commit).await.unwrap().into_inner().committed, 1);

    // A connection that never said hello carries nothing either.
    let stranger = RawSession::open(&server.grpc, true, false).await.unwrap();
    let sep = stranger.worker.connect_addr(stranger.data_addr(), ucx_bindings::ErrorMode::Peer).await.unwrap();
    let p2 = g.begin_put(begin(&stranger.token(), vec![key(10)], vec![4096])).await.unwrap().into_inner();
    let h2 = PutHeader { put_id: p2.put_id, index: 0 }.encode();
    let stranger_data = MemRegion::alloc_host(&stranger.ctx, 4096).unwrap();
    sep.am_send(AM_PUT, &h2, AmData::Region(stranger_data.full()), t).await.ok();
    assert!(wait_until(Duration::from_secs(5), || {
        server.metric("prefixd_rejected_messages_total{reason=\"unbound_endpoint\"}") >= 1.0
    }));

    // Hellos that must not bind: an unknown token, and a second endpoint for a bound session.
    let wrong = ::prefixd_client::bind_data_endpoint(
        &attacker.worker,
        attacker.data_addr(),
        prefixd_proto::v1::DataPath::ActiveMessage,
        &[0x42; 16],
        Duration::from_secs(2),
    )
    .await;
    assert!(wrong.is_err(), "an unknown token binds nothing");
    let steal = RawSession::open(&server.grpc, true, false).await.unwrap();
    let stolen = ::prefixd_client::bind_data_endpoint(
        &steal.worker,
        steal.data_addr(),
        prefixd_proto::v1::DataPath::ActiveMessage,
        &victim.token(),
        Duration::from_secs(2),
    )
    .await;
    assert!(stolen.is_err(), "a session's endpoint is bound once");
    assert!(server.metric("prefixd_rejected_messages_total{reason=\"hello_unknown_session\"}") >= 1.0);
    assert!(server.metric("prefixd_rejected_messages_total{reason=\"hello_already_bound\"}") >= 1.0);

    // The victim reads its own bytes.
    let client = ::prefixd_client::Client::connect_with(
        &server.grpc,
        ::prefixd_client::ClientOptions { net_devices: Some("lo".into()), force_remote: true, ..Default::default() },
    )
    .await
    .unwrap();
    let dest = client.alloc(4096).unwrap();
    let k = ::prefixd_client::ChunkKey::from_slice(&key(9)).unwrap();
    assert_eq!(client.get_chunks("ns", &[k], &[dest.full()]).await.unwrap(), 1);
    assert_eq!(dest.to_vec(0, 4096).unwrap(), random_bytes(4096, 1), "the victim's bytes, not the attacker's");
}

/// Messages that answer one fetch ask (`tag`): the chunks' (index, bytes), and its FetchDone
/// with the error message it carries.
async fn answer_of(rx: &mut ucx_bindings::AmReceiver, tag: u64) -> (Vec<(u32, Vec<u8>)>, FetchDone, String) {
    let mut chunks = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("an answer").unwrap();
        if let Some(d) = FetchDone::decode(msg.header()) {
            assert_eq!(d.tag, tag);
            let text = String::from_utf8(msg.into_eager_bytes().unwrap()).unwrap();
            return (chunks, d, text);
        }
        let h = FetchHeader::decode(msg.header()).expect("a chunk or a FetchDone");
        assert_eq!(h.tag, tag);
        chunks.push((h.index, msg.into_eager_bytes().unwrap()));
    }
}

/// Remote gets asked on the data endpoint (AM_FETCH_ASK) are held to the session of the
/// endpoint they arrive on and checked like a `Fetch`: a well-formed one gets its chunks and a
/// count; a malformed one an INVALID_ARGUMENT answer; a header of the wrong length, or an
/// endpoint that never said hello, nothing at all (dropped and counted). None of them changes
/// the index or stops the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_asks_are_checked_and_held_to_their_endpoint() {
    let server = Server::start(&["--host-pool", "8MiB"]);
    let channel = Channel::from_shared(server.grpc.clone()).unwrap().connect().await.unwrap();
    let mut g = PrefixdClient::new(channel);
    let s = RawSession::open(&server.grpc, true, true).await.unwrap();
    let t = Duration::from_secs(10);
    let mut answers = s.worker.listen_am(AM_FETCH).await.unwrap();
    let bytes = random_bytes(4096, 40);
    let data = MemRegion::alloc_host(&s.ctx, 4096).unwrap();
    data.write(0, &bytes).unwrap();
    let put = g.begin_put(begin(&s.token(), vec![key(40)], vec![4096])).await.unwrap().into_inner();
    let h = PutHeader { put_id: put.put_id, index: 0 }.encode();
    s.ep().am_send(AM_PUT, &h, AmData::Region(data.full()), t).await.unwrap();
    g.commit_put(CommitPutRequest { session_token: s.token(), put_id: put.put_id }).await.unwrap();
    let before = snapshot(&mut g).await;

    // Well formed: the cached prefix (one chunk of two keys), then the count.
    let keys = [ChunkKey::from_slice(&key(40)).unwrap(), ChunkKey::from_slice(&key(41)).unwrap()];
    let (ask, body) = FetchAsk::build(7, 0, "ns", &keys).unwrap();
    s.ep().am_send(AM_FETCH_ASK, &ask.encode(), AmData::Bytes(body.clone()), t).await.unwrap();
    let (chunks, done, _) = answer_of(&mut answers, 7).await;
    assert_eq!((done.code, done.hit_chunks), (0, 1));
    assert_eq!(chunks, vec![(0, bytes.clone())]);
    // This server has no GPU pool: its UCX thread answered it itself.
    assert_eq!(server.metric("prefixd_fetch_asks_total{answered=\"inline\"}"), 1.0);
    assert_eq!(server.metric("prefixd_fetch_asks_total{answered=\"async\"}"), 0.0);

    // Data one byte short of what the header announces: a clear error, nothing sent.
    let short = FetchAsk { tag: 8, ..ask }.encode();
    s.ep().am_send(AM_FETCH_ASK, &short, AmData::Bytes(body[..body.len() - 1].to_vec()), t).await.unwrap();
    let (chunks, done, text) = answer_of(&mut answers, 8).await;
    assert!(chunks.is_empty());
    assert_eq!(done.code, Code::InvalidArgument as u32, "{text}");
    assert!(text.contains("malformed fetch request"), "{text}");
    assert_eq!(server.metric("prefixd_fetch_asks_total{answered=\"async\"}"), 1.0, "errors are answered by a task");

    // A header of the wrong length, and an ask from an endpoint that never said hello: no answer.
    let bad = server.metric("prefixd_rejected_messages_total{reason=\"bad_header\"}");
    s.ep().am_send(AM_FETCH_ASK, &ask.encode()[..15], AmData::Bytes(body.clone()), t).await.unwrap();
    assert!(wait_until(Duration::from_secs(5), || {
        server.metric("prefixd_rejected_messages_total{reason=\"bad_header\"}") > bad
    }));
    let unbound = server.metric("prefixd_rejected_messages_total{reason=\"unbound_endpoint\"}");
    let stranger = RawSession::open(&server.grpc, true, false).await.unwrap();
    let sep = stranger.worker.connect_addr(stranger.data_addr(), ucx_bindings::ErrorMode::Peer).await.unwrap();
    let mut stranger_answers = stranger.worker.listen_am(AM_FETCH).await.unwrap();
    sep.am_send(AM_FETCH_ASK, &FetchAsk { tag: 9, ..ask }.encode(), AmData::Bytes(body.clone()), t).await.ok();
    assert!(wait_until(Duration::from_secs(5), || {
        server.metric("prefixd_rejected_messages_total{reason=\"unbound_endpoint\"}") > unbound
    }));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stranger_answers.recv()).await.is_err(),
        "an endpoint of no session is sent nothing"
    );

    // Nothing changed, nothing is left leased, and the server still answers.
    assert!(wait_until(Duration::from_secs(5), || server.metric("prefixd_active_leases") == 0.0));
    assert_eq!(snapshot(&mut g).await, before);
    s.ep().am_send(AM_FETCH_ASK, &FetchAsk { tag: 10, ..ask }.encode(), AmData::Bytes(body), t).await.unwrap();
    assert_eq!(answer_of(&mut answers, 10).await.1.hit_chunks, 1);
}

/// A `Fetch` the client gives up on (4e6c6e7 leaked its lease forever: the unpin ran after an
/// await that never returned once tonic dropped the call). The lease now ends at its TTL and
/// the chunk can be deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_fetch_does_not_leak_its_lease() {
    let server = Server::start(&["--host-pool", "64MiB", "--lease-ttl", "1s", "--transfer-timeout", "2s"]);
    let channel = Channel::from_shared(server.grpc.clone()).unwrap().connect().await.unwrap();
    let mut g = PrefixdClient::new(channel);
    let s = RawSession::open(&server.grpc, true, true).await.unwrap();
    // Hold every incoming chunk without receiving it: the server's sends wait on us.
    let mut held = s.worker.listen_am(prefixd_proto::dataplane::AM_FETCH).await.unwrap();
    let data = MemRegion::alloc_host(&s.ctx, 1 << 20).unwrap();
    let keys: Vec<Vec<u8>> = (20..36).map(key).collect();
    let put = g.begin_put(begin(&s.token(), keys.clone(), vec![1 << 20; 16])).await.unwrap().into_inner();
    for i in 0..16 {
        let h = PutHeader { put_id: put.put_id, index: i }.encode();
        s.ep().am_send(AM_PUT, &h, AmData::Region(data.full()), Duration::from_secs(10)).await.unwrap();
    }
    g.commit_put(CommitPutRequest { session_token: s.token(), put_id: put.put_id }).await.unwrap();
    let lease = g.lookup(lookup(&s.token(), keys.clone(), true)).await.unwrap().into_inner();
    assert_eq!(lease.hit_chunks, 16);
    let mut req = tonic::Request::new(FetchRequest {
        session_token: s.token(),
        lease_id: lease.lease_id,
        indices: vec![],
        tag: 5,
        ..Default::default()
    });
    req.set_timeout(Duration::from_millis(300));
    assert!(g.fetch(req).await.is_err(), "the client gives up on the call");
    assert!(held.recv().await.is_some(), "a chunk had been announced");
    drop(held);
    // TTL (1 s) + grace + the transfer timeout of the abandoned sends (2 s).
    assert!(
        wait_until(Duration::from_secs(8), || {
            let s = server.metric("prefixd_active_leases");
            s == 0.0
        }),
        "the lease is gone"
    );
    let del = DeleteRequest { namespace: "ns".into(), keys, session_token: s.token() };
    let r = g.delete(del).await.unwrap().into_inner();
    assert_eq!((r.deleted, r.leased), (16, 0), "nothing pins the chunks any more");
}

/// Session flood (4e6c6e7: no cap; at ~32.7k sessions every Connect failed for everyone, as an
/// unretryable INVALID_ARGUMENT, unlogged). Sessions are now capped per peer and in all, the
/// refusal is RESOURCE_EXHAUSTED naming the limit, counted and logged, and a closed session
/// makes room again. One put may not reserve more than the session's share of the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_meet_limits_with_clear_errors() {
    let server =
        Server::start(&["--host-pool", "8MiB", "--max-sessions-per-peer", "4", "--max-reserved-per-session", "2MiB"]);
    let channel = Channel::from_shared(server.grpc.clone()).unwrap().connect().await.unwrap();
    let mut g = PrefixdClient::new(channel);
    let conn = || ConnectRequest {
        host_id: String::new(),
        transports: vec![],
        force_remote: true,
        client_name: "flood".into(),
    };
    let mut tokens = Vec::new();
    for _ in 0..4 {
        tokens.push(g.connect(conn()).await.unwrap().into_inner().session_token);
    }
    let e = g.connect(conn()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_sessions_per_peer"), "{}", e.message());
    assert_eq!(server.metric("prefixd_limit_rejections_total{limit=\"max_sessions_per_peer\"}"), 1.0);
    assert!(server.log_text().contains("max_sessions_per_peer"), "the refusal is logged");
    g.disconnect(DisconnectRequest { session_token: tokens.pop().unwrap() }).await.unwrap();
    let t = g.connect(conn()).await.unwrap().into_inner().session_token;

    // Reservation share: 3 MiB in one put is over the 2 MiB share and changes nothing.
    let keys: Vec<Vec<u8>> = (40..43).map(key).collect();
    let e = g.begin_put(begin(&t, keys.clone(), vec![1 << 20; 3])).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("max_reserved_bytes_per_session"), "{}", e.message());
    assert_eq!(snapshot(&mut g).await.1, 0, "no reservation made");
    g.begin_put(begin(&t, keys[..2].to_vec(), vec![1 << 20; 2])).await.unwrap();
    assert_eq!(server.metric("prefixd_limit_rejections_total{limit=\"max_reserved_bytes_per_session\"}"), 1.0);
}

/// Exposure (4e6c6e7): with gRPC on 127.0.0.1, UCX's tcp transport still listened on every
/// interface unless --net-devices lo was given. Started here without --net-devices: every
/// socket the server listens on is a loopback one.
#[test]
fn a_loopback_server_listens_on_loopback_only() {
    let dir = TempDir::new("exposure");
    let mut child = std::process::Command::new(bin("prefixd"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(dir.path("log")).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    assert!(line.contains("grpc="), "prefixd did not start: {line}");
    let pid = child.id();
    // Socket inodes of the process, then the listening TCP sockets among them.
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_owned))
        .collect();
    let mut listening = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for row in std::fs::read_to_string(table).unwrap_or_default().lines().skip(1) {
            let f: Vec<&str> = row.split_whitespace().collect();
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                listening.push(f[1].to_owned());
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(listening.len() >= 3, "grpc, metrics, data listener and UCX's own: {listening:?}");
    for addr in &listening {
        let ip = addr.split(':').next().unwrap();
        let loopback = ip == "0100007F" || ip == "00000000000000000000000001000000";
        assert!(loopback, "a socket listens on {addr} (not loopback): {listening:?}");
    }
}

/// Exposure (4e6c6e7): the host pool's abstract socket (listed in /proc/net/unix) handed the
/// pool, read-write, to any local process that connected. Now only a live same-host RMA
/// session's token gets it; a guess, or an active-message session's token, gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_socket_hands_the_pool_only_to_rma_sessions() {
    use ucx_bindings::shm::{receive_fd, PROOF_LEN};
    let server = Server::start(&["--host-pool", "8MiB"]);
    let local = RawSession::open(&server.grpc, false, true).await.unwrap();
    assert_eq!(local.resp.data_path, DataPath::Rma as i32);
    let socket = local.resp.host_pool_socket.trim_start_matches('@').to_owned();
    assert!(!socket.is_empty(), "the server shares its host pool");
    let listed = std::fs::read_to_string("/proc/net/unix").unwrap();
    assert!(listed.contains(&socket), "the name is public: anyone local can find it");

    let err = receive_fd(&socket, &[0u8; PROOF_LEN]).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    let remote = RawSession::open(&server.grpc, true, true).await.unwrap();
    let err = receive_fd(&socket, remote.token().as_slice().try_into().unwrap()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "an AM session gets no pool: {err}");

    let (_fd, len, _alive) = receive_fd(&socket, local.token().as_slice().try_into().unwrap()).unwrap();
    assert_eq!(len, 8 << 20);
    // A closed session's token is worth nothing.
    let mut g = PrefixdClient::new(Channel::from_shared(server.grpc.clone()).unwrap().connect().await.unwrap());
    g.disconnect(DisconnectRequest { session_token: local.token() }).await.unwrap();
    assert!(receive_fd(&socket, local.token().as_slice().try_into().unwrap()).is_err());
}

/// Defect 2 (4e6c6e7): a same-host producer stalled past its reservation's deadline, another
/// namespace's chunk took the reused slot, and the producer's late writes landed in it (the
/// reader got wrong bytes and no error). Now the expired slot stays out of use while the
/// producer's process holds the pool, and is freed once it lets go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_rma_writes_cannot_reach_another_tenants_chunk() {
    use ucx_bindings::shm::{receive_fd, SharedMemory, PROOF_LEN};
    const LEN: usize = 1 << 20;
    let server = Server::start(&["--host-pool", "8MiB", "--lease-ttl", "1s"]);
    let mut g = PrefixdClient::new(Channel::from_shared(server.grpc.clone()).unwrap().connect().await.unwrap());

    // The stalled producer: a same-host RMA session holding the mapped pool.
    let a = RawSession::open(&server.grpc, false, true).await.unwrap();
    assert_eq!(a.resp.data_path, DataPath::Rma as i32);
    let proof: &[u8; PROOF_LEN] = a.resp.session_token.as_slice().try_into().unwrap();
    let (fd, len, alive) = receive_fd(a.resp.host_pool_socket.trim_start_matches('@'), proof).unwrap();
    let pool = SharedMemory::map(fd, len as usize).unwrap();
    let base = a.resp.pools.iter().find(|p| p.tier == "host").unwrap().base;
    let mut put = begin(&a.token(), vec![key(0xa1)], vec![LEN as u64]);
    put.namespace = "tenant-a".into();
    let slot = g.begin_put(put).await.unwrap().into_inner().slots[0].address;
    assert!(wait_until(Duration::from_secs(10), || server.metric("prefixd_active_reservations") == 0.0));

    // Another tenant stores a chunk; then the producer wakes up and writes its slot.
    let b = ::prefixd_client::Client::connect_with(
        &server.grpc,
        ::prefixd_client::ClientOptions { net_devices: Some("lo".into()), force_remote: true, ..Default::default() },
    )
    .await
    .unwrap();
    let tokens: Vec<u32> = (0..256).collect();
    let bytes = random_bytes(LEN, 77);
    assert_eq!(b.put("tenant-b", &tokens, &bytes).await.unwrap().stored, 1);
    // SAFETY: [slot - base, +LEN) lies inside the 8 MiB mapping (the server placed it there).
    unsafe { std::ptr::write_bytes(pool.as_ptr().add((slot - base) as usize), 0xEE, LEN) };
    let got = b.get("tenant-b", &tokens).await.unwrap();
    assert!(got == (256, bytes), "the late write reached B's chunk (hit {} tokens)", got.0);
    assert_eq!(server.metric("prefixd_quarantined_bytes"), LEN as f64, "the expired slot is held back");

    // The producer's process lets go of the pool: the slot is free again.
    drop(pool);
    drop(alive);
    assert!(wait_until(Duration::from_secs(10), || server.metric("prefixd_quarantined_bytes") == 0.0));
}

/// Defect 9 (4e6c6e7): an RMA CommitPut of a slot nobody wrote published whatever the slot held
/// before, in one demo another namespace's deleted chunk. Reserved RMA slots are now cleared
/// before their addresses go out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_without_data_publishes_no_stale_bytes() {
    const LEN: usize = 1 << 20;
    let server = Server::start(&["--host-pool", "4MiB", "--max-chunk-size", "1MiB"]);
    let opts = ::prefixd_client::ClientOptions { net_devices: Some("lo".into()), ..Default::default() };
    let c = ::prefixd_client::Client::connect_with(&server.grpc, opts).await.unwrap();
    assert_eq!(c.data_path(), ::prefixd_client::DataPath::Rma);
    let secret: Vec<u32> = (0..256).collect();
    assert_eq!(c.put("victim", &secret, &random_bytes(LEN, 1)).await.unwrap().stored, 1);
    let mut g = PrefixdClient::new(Channel::from_shared(server.grpc.clone()).unwrap().connect().await.unwrap());
    let s = RawSession::open(&server.grpc, false, true).await.unwrap();
    let victim_keys: Vec<Vec<u8>> = c.keys(&secret).into_iter().map(|k| k.0.to_vec()).collect();
    let del = DeleteRequest { session_token: s.token(), namespace: "victim".into(), keys: victim_keys };
    assert_eq!(g.delete(del).await.unwrap().into_inner().deleted, 1);

    // The attacker reserves the freed slot and commits without writing a byte.
    let other: Vec<u32> = (1000..1256).collect();
    let keys: Vec<Vec<u8>> = c.keys(&other).into_iter().map(|k| k.0.to_vec()).collect();
    let mut put = begin(&s.token(), keys, vec![LEN as u64]);
    put.namespace = "attacker".into();
    let p = g.begin_put(put).await.unwrap().into_inner();
    g.commit_put(CommitPutRequest { session_token: s.token(), put_id: p.put_id }).await.unwrap();
    let (hit, bytes) = c.get("attacker", &other).await.unwrap();
    assert_eq!(hit, 256);
    assert!(bytes.iter().all(|b| *b == 0), "the committed chunk holds the victim's old bytes");
}

/// A same-host producer whose process let go of the pool before its put expired: nothing of it
/// can write any more, so the expired slots are freed at once, not held until the session is
/// reaped (the 10,000-fault run found 24 MiB still quarantined 9 s after every writer died).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_of_a_gone_writer_are_not_quarantined() {
    use ucx_bindings::shm::{receive_fd, PROOF_LEN};
    let server = Server::start(&["--host-pool", "8MiB", "--lease-ttl", "1s"]);
    let mut g = PrefixdClient::new(Channel::from_shared(server.grpc.clone()).unwrap().connect().await.unwrap());
    let a = RawSession::open(&server.grpc, false, true).await.unwrap();
    let proof: &[u8; PROOF_LEN] = a.resp.session_token.as_slice().try_into().unwrap();
    let (_fd, _len, alive) = receive_fd(a.resp.host_pool_socket.trim_start_matches('@'), proof).unwrap();
    g.begin_put(begin(&a.token(), vec![key(0xb1)], vec![1 << 20])).await.unwrap();
    drop(alive); // the process lets go of the pool
    let t0 = std::time::Instant::now();
    assert!(wait_until(Duration::from_secs(10), || server.metric("prefixd_active_reservations") == 0.0));
    assert!(wait_until(Duration::from_secs(2), || server.metric("prefixd_quarantined_bytes") == 0.0));
    assert!(t0.elapsed() < Duration::from_secs(8), "freed at expiry, not at the session's reaping");
    assert_eq!(server.metric("prefixd_sessions"), 1.0, "the session itself is still there");
}
