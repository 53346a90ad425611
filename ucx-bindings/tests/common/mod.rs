//! Two-process harness: spawns `ucx-peer serve` (a real second process) and connects to it.
#![allow(dead_code)] // each test file uses part of this

use std::time::Duration;
use ucx_bindings::peer_protocol::{self as pp, Header, PeerProcess};
use ucx_bindings::{AmData, AmReceiver, Context, ContextBuilder, Endpoint, MemRegion, RemoteKey, Worker};

pub const OP_TIMEOUT: Duration = Duration::from_secs(30);
pub const SIZES: [usize; 4] = [1, 4 << 10, 1 << 20, 64 << 20];
/// The peer's region: the largest size plus room for offsets.
pub const PEER_REGION: usize = (64 << 20) + (1 << 20);

pub fn context(tls: &str) -> Context {
    ContextBuilder::new().transports(tls).expect("transport list").net_devices("lo").build().expect("UCX context")
}

/// A driver process side connected to a fresh peer.
pub struct Pair {
    pub ctx: Context,
    pub worker: Worker,
    pub ep: Endpoint,
    pub rkey: RemoteKey,
    pub replies: AmReceiver,
    pub peer: PeerProcess,
}

impl Pair {
    pub async fn connect(tls: &str) -> Pair {
        let ctx = context(tls);
        let worker = Worker::new(&ctx, "driver").expect("worker");
        let replies = worker.listen_am(pp::REPLY_AM).await.expect("listen");
        let exe = std::path::Path::new(env!("CARGO_BIN_EXE_ucx-peer"));
        let mut peer = PeerProcess::spawn(exe, tls, PEER_REGION).expect("start ucx-peer");
        peer.send_address(worker.address()).expect("send address");
        let ep = worker.connect(&peer.address).await.expect("connect");
        let rkey = ep.unpack_rkey(&peer.region).await.expect("unpack rkey");
        Pair { ctx, worker, ep, rkey, replies, peer }
    }

    /// Asks the peer for the hash of its region's bytes at `[offset, offset+len)`.
    pub async fn peer_hash(&mut self, offset: u64, len: u64) -> u64 {
        let tag = offset ^ (len << 1) ^ 0x5a5a;
        let h = Header { op: pp::OP_HASH, tag, offset, len, value: 0 };
        self.ep.am_send(pp::REQUEST_AM, &h.encode(), AmData::None, OP_TIMEOUT).await.expect("hash request");
        let reply = self.replies.recv().await.expect("hash reply");
        let r = Header::decode(reply.header()).expect("reply header");
        assert_eq!((r.op, r.tag), (pp::OP_HASH, tag), "reply matches request");
        r.value
    }
}

/// A host region filled with seeded random bytes.
pub fn random_region(ctx: &Context, len: usize, seed: u64) -> (std::sync::Arc<MemRegion>, Vec<u8>) {
    let mut data = vec![0u8; len];
    pp::fill_random(&mut data, seed);
    let region = MemRegion::alloc_host(ctx, len).expect("alloc");
    region.write(0, &data).expect("write");
    (region, data)
}
