//! Client-server connections: a listener hands each request to its owner, who accepts it with the
//! client's error mode or rejects it; active messages name the endpoint they came in on.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use common::*;
use std::time::Duration;
use ucx_bindings::{AmData, ErrorMode, Worker};

const HELLO: u16 = 7;
const REPLY: u16 = 8;

async fn connect_and_exchange(tls: &str, mode: ErrorMode) {
    let ctx = context(tls);
    let server = Worker::new(&ctx, "server").unwrap();
    let mut listener = server.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr();
    assert_ne!(addr.port(), 0, "the bound port is reported");
    let mut hellos = server.listen_am(HELLO).await.unwrap();

    let client_ctx = context(tls);
    let client = Worker::with_options(&client_ctx, "client", Some(0x5eed), || {}).unwrap();
    let mut replies = client.listen_am(REPLY).await.unwrap();
    let ep = client.connect_addr(addr, mode).await.unwrap();
    // The send may start before the server accepts: it waits for the connection.
    let send = ep.am_send(HELLO, b"hello", AmData::Bytes(vec![1, 2, 3]), OP_TIMEOUT);

    let req = tokio::time::timeout(OP_TIMEOUT, listener.next()).await.unwrap().unwrap();
    assert_eq!(req.client_id(), 0x5eed, "{tls}: the client's id comes with its request");
    assert!(req.peer().is_some_and(|p| p.ip().is_loopback()), "{tls}: peer {:?}", req.peer());
    let server_ep = req.accept(mode).await.unwrap();
    send.await.unwrap();

    let msg = tokio::time::timeout(OP_TIMEOUT, hellos.recv()).await.unwrap().unwrap();
    assert_eq!(msg.header(), b"hello");
    assert_eq!(msg.sender(), Some(server_ep.id()), "{tls}: the message names the endpoint it came in on");
    assert_eq!(msg.into_eager_bytes().unwrap(), vec![1, 2, 3]);

    // And back over the accepted endpoint.
    server_ep.am_send(REPLY, b"ack", AmData::None, OP_TIMEOUT).await.unwrap();
    let back = tokio::time::timeout(OP_TIMEOUT, replies.recv()).await.unwrap().unwrap();
    assert_eq!(back.header(), b"ack");
    assert_eq!(back.sender(), Some(ep.id()));
}

#[tokio::test(flavor = "current_thread")]
async fn listener_tcp_peer_mode() {
    connect_and_exchange("tcp", ErrorMode::Peer).await;
}

#[tokio::test(flavor = "current_thread")]
async fn listener_shared_memory_no_error_mode() {
    connect_and_exchange("sm,tcp", ErrorMode::None).await;
}

/// A rejected client's operations fail promptly; the listener keeps serving others.
#[tokio::test(flavor = "current_thread")]
async fn rejected_request_fails_the_client_not_the_listener() {
    let ctx = context("tcp");
    let server = Worker::new(&ctx, "server").unwrap();
    let mut listener = server.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr();
    let mut hellos = server.listen_am(HELLO).await.unwrap();

    let client = Worker::new(&context("tcp"), "rejected").unwrap();
    let ep = client.connect_addr(addr, ErrorMode::Peer).await.unwrap();
    let send = ep.am_send(HELLO, b"x", AmData::None, Duration::from_secs(10));
    listener.next().await.unwrap().reject();
    let t0 = std::time::Instant::now();
    assert!(send.await.is_err(), "a send on a rejected connection fails");
    assert!(t0.elapsed() < Duration::from_secs(10), "and before its deadline: {:?}", t0.elapsed());

    let other = Worker::new(&context("tcp"), "accepted").unwrap();
    let ep2 = other.connect_addr(addr, ErrorMode::Peer).await.unwrap();
    let send2 = ep2.am_send(HELLO, b"y", AmData::None, OP_TIMEOUT);
    let ok = listener.next().await.unwrap().accept(ErrorMode::Peer).await.unwrap();
    send2.await.unwrap();
    let msg = hellos.recv().await.unwrap();
    assert_eq!((msg.header(), msg.sender()), (&b"y"[..], Some(ok.id())));
}
