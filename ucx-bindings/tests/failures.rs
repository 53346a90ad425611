//! Failure behaviour with a real second process: a killed peer, a dropped future, bad arguments.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::*;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ucx_bindings::{AmData, ContextBuilder, Error, MemRegion, MemoryType, RemoteRegion, Worker};

/// Gets 64 MiB from the peer in a loop, kills the peer after the first one, and expects an error
/// (not a hang) within the operation deadline.
async fn killed_peer_fails_within_deadline(tls: &str) {
    let mut pair = Pair::connect(tls).await;
    let size = 64 << 20;
    let dst = MemRegion::alloc_host(&pair.ctx, size).expect("alloc");
    let deadline = Duration::from_secs(5);
    pair.ep.get(&dst.full(), &pair.rkey, pair.rkey.base(), deadline).await.expect("first get");

    let killed_at = Instant::now();
    pair.peer.kill();
    let err = loop {
        match pair.ep.get(&dst.full(), &pair.rkey, pair.rkey.base(), deadline).await {
            Ok(()) => assert!(killed_at.elapsed() < deadline * 2, "{tls}: gets keep succeeding after the kill"),
            Err(e) => break e,
        }
    };
    let took = killed_at.elapsed();
    assert!(took < deadline + Duration::from_secs(2), "{tls}: error came after {took:?}");
    assert!(
        matches!(err, Error::EndpointClosed { .. } | Error::TimedOut { .. } | Error::Ucx { .. }),
        "{tls}: unexpected error {err:?}"
    );
    assert!(err.is_retryable(), "a dead peer is worth a retry on a new endpoint: {err:?}");
    // The endpoint stays failed: the next operation errors at once instead of hanging.
    let again = Instant::now();
    assert!(pair.ep.get(&dst.full(), &pair.rkey, pair.rkey.base(), deadline).await.is_err());
    assert!(again.elapsed() < deadline, "a failed endpoint must fail fast");
}

#[tokio::test(flavor = "current_thread")]
async fn killed_peer_tcp() {
    killed_peer_fails_within_deadline("tcp").await;
}

#[tokio::test(flavor = "current_thread")]
async fn killed_peer_shared_memory() {
    killed_peer_fails_within_deadline("sm").await;
}

/// A get whose future is dropped mid-flight keeps its destination alive and writes only inside
/// it: canaries around the target survive, and the region is freed only after UCX completes.
#[tokio::test(flavor = "current_thread")]
async fn dropped_future_never_writes_outside_or_into_freed_memory() {
    let mut pair = Pair::connect("tcp").await;
    let size = 64 << 20;
    let canary = 64 << 10;
    // Put known bytes at the peer.
    let (src, data) = random_region(&pair.ctx, size, 0xdead);
    pair.ep.put(&src.full(), &pair.rkey, pair.rkey.base(), OP_TIMEOUT).await.expect("put");
    pair.ep.flush(OP_TIMEOUT).await.expect("flush");
    assert_eq!(pair.peer_hash(0, size as u64).await, ucx_bindings::peer_protocol::hash(&data));

    let dst = MemRegion::alloc_host(&pair.ctx, size + 2 * canary).expect("alloc");
    dst.write(0, &vec![0xA5; canary]).expect("canary");
    dst.write(canary + size, &vec![0x5A; canary]).expect("canary");
    let target = dst.slice(canary, size).expect("slice");
    let weak = Arc::downgrade(&dst);

    // Poll the get once (the command is sent) and drop it.
    let fut = pair.ep.get(&target, &pair.rkey, pair.rkey.base(), OP_TIMEOUT);
    let _ = tokio::time::timeout(Duration::ZERO, fut).await;
    drop(target);
    let held_by_op = Arc::strong_count(&dst) > 1;

    assert!(pair.worker.wait_idle(OP_TIMEOUT).await.expect("idle"), "the dropped get never completed");
    assert_eq!(Arc::strong_count(&dst), 1, "the op released the region once UCX was done");
    assert_eq!(dst.to_vec(0, canary).expect("read"), vec![0xA5; canary], "canary before target intact");
    assert_eq!(dst.to_vec(canary + size, canary).expect("read"), vec![0x5A; canary], "canary after target intact");
    assert!(dst.to_vec(canary, size).expect("read") == data, "the get completed into the target");

    // Dropping the caller's last handle mid-flight: the op keeps the region alive until done.
    let dst2 = MemRegion::alloc_host(&pair.ctx, size).expect("alloc");
    let weak2 = Arc::downgrade(&dst2);
    let whole = dst2.full();
    let fut = pair.ep.get(&whole, &pair.rkey, pair.rkey.base(), OP_TIMEOUT);
    let _ = tokio::time::timeout(Duration::ZERO, fut).await;
    drop((whole, dst2));
    let alive_while_in_flight = weak2.upgrade().is_some();
    assert!(pair.worker.wait_idle(OP_TIMEOUT).await.expect("idle"));
    assert!(weak2.upgrade().is_none(), "region freed after completion");
    drop(dst);
    assert!(weak.upgrade().is_none());
    // 64 MiB over loopback tcp takes milliseconds; the sends above return in microseconds.
    assert!(held_by_op || alive_while_in_flight, "in-flight ops did not hold their regions");
}

#[tokio::test(flavor = "current_thread")]
async fn bad_arguments_are_rejected() {
    // Unknown transports are refused before UCX sees them.
    for bad in ["tcp,foo", "cuda-ipc", "", "tcp,,sm"] {
        let err = ContextBuilder::new().transports(bad).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{bad:?}: {err:?}");
    }
    let mut pair = Pair::connect("tcp").await;
    let ctx = pair.ctx.clone();
    let region = MemRegion::alloc_host(&ctx, 4096).expect("alloc");
    let invalid = |e: Error| assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");

    // Zero length, out-of-range local slices, zero-length allocations and registrations.
    invalid(region.slice(0, 0).unwrap_err());
    invalid(region.slice(4000, 200).unwrap_err());
    invalid(region.slice(usize::MAX, 2).unwrap_err());
    invalid(MemRegion::alloc_host(&ctx, 0).unwrap_err());
    // SAFETY: a null pointer is rejected before anything dereferences it.
    invalid(unsafe { MemRegion::register(&ctx, std::ptr::null_mut(), 16, MemoryType::Host) }.unwrap_err());
    let mut buf = [0u8; 16];
    // SAFETY: zero length is rejected before registration.
    invalid(unsafe { MemRegion::register(&ctx, buf.as_mut_ptr(), 0, MemoryType::Host) }.unwrap_err());
    if !ctx.supports(MemoryType::Cuda) {
        // SAFETY: rejected because this context has no CUDA support; nothing is registered.
        invalid(unsafe { MemRegion::register(&ctx, buf.as_mut_ptr(), 16, MemoryType::Cuda) }.unwrap_err());
    }
    invalid(region.write(4090, &[0; 10]).unwrap_err());

    // Remote ranges outside the peer's registered region (memory it never registered).
    let s = region.slice(0, 4096).expect("slice");
    let end = pair.rkey.base() + pair.rkey.len();
    invalid(pair.ep.put(&s, &pair.rkey, end - 100, OP_TIMEOUT).await.unwrap_err());
    invalid(pair.ep.get(&s, &pair.rkey, pair.rkey.base() - 1, OP_TIMEOUT).await.unwrap_err());
    invalid(pair.ep.get(&s, &pair.rkey, u64::MAX - 10, OP_TIMEOUT).await.unwrap_err());
    invalid(pair.ep.put(&s, &pair.rkey, pair.rkey.base(), Duration::ZERO).await.unwrap_err());
    invalid(pair.ep.unpack_rkey(&RemoteRegion { base: 1, len: 0, rkey: vec![1] }).await.unwrap_err());
    invalid(RemoteRegion::from_bytes(&[0; 10]).unwrap_err());

    // A region of another context cannot be used on this worker.
    let other = ContextBuilder::new().transports("tcp").expect("tls").net_devices("lo").build().expect("ctx");
    let foreign = MemRegion::alloc_host(&other, 4096).expect("alloc");
    invalid(pair.ep.put(&foreign.full(), &pair.rkey, pair.rkey.base(), OP_TIMEOUT).await.unwrap_err());

    // Headers over the limit; a second listener on one id.
    let big = vec![0u8; pair.worker.max_am_header() + 1];
    invalid(pair.ep.am_send(10, &big, AmData::None, OP_TIMEOUT).await.unwrap_err());
    invalid(pair.worker.listen_am(ucx_bindings::peer_protocol::REPLY_AM).await.unwrap_err());
    // Implausible worker addresses.
    invalid(pair.worker.connect(&[]).await.unwrap_err());

    // After all that, the endpoint still works.
    let (src, data) = random_region(&ctx, 4096, 7);
    pair.ep.put(&src.full(), &pair.rkey, pair.rkey.base(), OP_TIMEOUT).await.expect("put");
    pair.ep.flush(OP_TIMEOUT).await.expect("flush");
    assert_eq!(pair.peer_hash(0, 4096).await, ucx_bindings::peer_protocol::hash(&data));
}

#[test]
fn worker_stops_cleanly_with_endpoints_alive() {
    let ctx = context("tcp");
    let w = Worker::new(&ctx, "short").expect("worker");
    assert!(!w.address().is_empty());
    drop(w); // joins the progress thread; must not hang or crash
}
