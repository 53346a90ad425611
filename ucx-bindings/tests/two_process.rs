//! Put, get and active-message round trips between two real processes over real UCX transports,
//! verified byte for byte, for 1 B, 4 KiB, 1 MiB and 64 MiB.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::*;
use ucx_bindings::peer_protocol::{self as pp, Header};
use ucx_bindings::{AmData, MemRegion};

async fn put_get_round_trip(tls: &str) {
    let mut pair = Pair::connect(tls).await;
    for (i, &size) in SIZES.iter().enumerate() {
        let (src, data) = random_region(&pair.ctx, size, 0x1000 + i as u64);
        // An odd offset for the small sizes, so alignment is not assumed.
        let offset = if size < (1 << 20) { 4099 } else { 0 };
        let remote = pair.rkey.base() + offset;
        pair.ep.put(&src.full(), &pair.rkey, remote, OP_TIMEOUT).await.expect("put");
        pair.ep.flush(OP_TIMEOUT).await.expect("flush");
        // The peer sees exactly our bytes...
        assert_eq!(
            pair.peer_hash(offset, size as u64).await,
            pp::hash(&data),
            "{tls}: peer hash after put of {size} B"
        );
        // ...and reading them back returns them.
        let dst = MemRegion::alloc_host(&pair.ctx, size).expect("alloc dst");
        pair.ep.get(&dst.full(), &pair.rkey, remote, OP_TIMEOUT).await.expect("get");
        assert!(dst.to_vec(0, size).expect("read") == data, "{tls}: get of {size} B returned other bytes");
    }
}

async fn am_round_trip(tls: &str) {
    let mut pair = Pair::connect(tls).await;
    for (i, &size) in SIZES.iter().enumerate() {
        let (src, data) = random_region(&pair.ctx, size, 0x2000 + i as u64);
        let tag = 77 + i as u64;
        let h = Header { op: pp::OP_ECHO, tag, offset: 0, len: size as u64, value: 0 };
        pair.ep.am_send(pp::REQUEST_AM, &h.encode(), AmData::Region(src.full()), OP_TIMEOUT).await.expect("am send");
        let reply = pair.replies.recv().await.expect("echo reply");
        let r = Header::decode(reply.header()).expect("reply header");
        assert_eq!((r.op, r.tag), (pp::OP_ECHO, tag));
        assert_eq!(reply.len(), size);
        if size >= (1 << 20) {
            assert!(reply.is_rendezvous(), "{tls}: {size} B should arrive by rendezvous");
        }
        // The receiver chooses the buffer: a slice in the middle of a larger region.
        let dst = MemRegion::alloc_host(&pair.ctx, size + 8192).expect("alloc dst");
        reply.recv_into(&dst.slice(4096, size).expect("slice"), OP_TIMEOUT).await.expect("recv");
        assert!(dst.to_vec(4096, size).expect("read") == data, "{tls}: echo of {size} B differs");
        assert_eq!(dst.to_vec(0, 4096).expect("read"), vec![0u8; 4096], "bytes before the slice untouched");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn put_get_tcp() {
    put_get_round_trip("tcp").await;
}

#[tokio::test(flavor = "current_thread")]
async fn put_get_shared_memory() {
    put_get_round_trip("sm").await;
}

#[tokio::test(flavor = "current_thread")]
async fn active_messages_tcp() {
    am_round_trip("tcp").await;
}

#[tokio::test(flavor = "current_thread")]
async fn active_messages_shared_memory() {
    am_round_trip("sm").await;
}

#[tokio::test(flavor = "current_thread")]
async fn endpoint_reports_its_transports() {
    let pair = Pair::connect("tcp").await;
    let t = pair.ep.transports().await.expect("transports");
    assert!(!t.is_empty());
    assert!(t.iter().all(|t| t.transport == "tcp"), "tcp-only context used {t:?}");
}
