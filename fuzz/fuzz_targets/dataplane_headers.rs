//! Data-plane headers as they arrive from any UCX peer: every decoder takes any bytes without
//! panicking, and what it accepts encodes back to the same bytes. A fetch request's data (its
//! namespace and keys) is parsed from the bytes after its header: whatever parses rebuilds to
//! the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prefixd_proto::dataplane::{token_from, FetchAsk, FetchDone, FetchHeader, HelloAck, PutHeader};

fuzz_target!(|data: &[u8]| {
    if let Some(h) = PutHeader::decode(data) {
        assert_eq!(&h.encode()[..], data, "PutHeader round trip");
    }
    if let Some(h) = FetchHeader::decode(data) {
        assert_eq!(&h.encode()[..], data, "FetchHeader round trip");
    }
    if let Some(h) = HelloAck::decode(data) {
        assert_eq!(&h.encode()[..], data, "HelloAck round trip");
    }
    if let Some(h) = FetchDone::decode(data) {
        assert_eq!(&h.encode()[..], data, "FetchDone round trip");
    }
    if data.len() >= FetchAsk::SIZE {
        let (head, body) = data.split_at(FetchAsk::SIZE);
        if let Some(ask) = FetchAsk::decode(head) {
            assert_eq!(&ask.encode()[..], head, "FetchAsk round trip");
            if let Some((namespace, keys)) = ask.parse(body) {
                let (again, built) = FetchAsk::build(ask.tag, ask.chunk_tokens, namespace, &keys).expect("fits");
                assert_eq!((again, &built[..]), (ask, body), "FetchAsk data round trip");
            }
        }
    }
    if let Some(t) = token_from(data) {
        assert_eq!(&t[..], data);
    }
});
