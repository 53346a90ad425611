//! Two-process harness: spawns `ucx-peer serve` (a real second process) and connects to it.
#![allow(dead_code)] // each test file uses part of this

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use ucx_bindings::peer_protocol::{self as pp, Header};
use ucx_bindings::{
    hex, AmData, AmReceiver, Context, ContextBuilder, Endpoint, MemRegion, RemoteKey, RemoteRegion, Worker,
};

pub const OP_TIMEOUT: Duration = Duration::from_secs(30);
pub const SIZES: [usize; 4] = [1, 4 << 10, 1 << 20, 64 << 20];
/// The peer's region: the largest size plus room for offsets.
pub const PEER_REGION: usize = (64 << 20) + (1 << 20);

pub struct Peer {
    pub child: Child,
    stdin: Option<ChildStdin>,
    pub address: Vec<u8>,
    pub region: RemoteRegion,
}

impl Peer {
    pub fn spawn(tls: &str) -> Peer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ucx-peer"))
            .args(["serve", "--tls", tls, "--net-devices", "lo", "--region", &PEER_REGION.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ucx-peer");
        let stdout = child.stdout.take().expect("peer stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut address = None;
        let mut region = None;
        loop {
            let line = rx.recv_timeout(Duration::from_secs(20)).expect("peer start-up line within 20 s");
            if let Some(a) = line.strip_prefix("ADDR ") {
                address = Some(hex::decode(a).expect("hex address"));
            } else if let Some(r) = line.strip_prefix("REGION ") {
                region = Some(RemoteRegion::from_bytes(&hex::decode(r).expect("hex region")).expect("region"));
            } else if line == "READY" {
                break;
            }
        }
        let stdin = child.stdin.take();
        Peer { child, stdin, address: address.expect("ADDR line"), region: region.expect("REGION line") }
    }

    pub fn send_address(&mut self, addr: &[u8]) {
        let stdin = self.stdin.as_mut().expect("peer stdin");
        writeln!(stdin, "PEER {}", hex::encode(addr)).expect("write PEER line");
        stdin.flush().expect("flush");
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        drop(self.stdin.take()); // EOF asks the peer to stop
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }
}

pub fn context(tls: &str) -> Context {
    ContextBuilder::new()
        .transports(tls)
        .expect("transport list")
        .net_devices("lo")
        .build()
        .expect("UCX context")
}

/// A driver process side connected to a fresh peer.
pub struct Pair {
    pub ctx: Context,
    pub worker: Worker,
    pub ep: Endpoint,
    pub rkey: RemoteKey,
    pub replies: AmReceiver,
    pub peer: Peer,
}

impl Pair {
    pub async fn connect(tls: &str) -> Pair {
        let ctx = context(tls);
        let worker = Worker::new(&ctx, "driver").expect("worker");
        let replies = worker.listen_am(pp::REPLY_AM).await.expect("listen");
        let mut peer = Peer::spawn(tls);
        peer.send_address(worker.address());
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
