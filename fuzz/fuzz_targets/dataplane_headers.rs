//! Data-plane headers as they arrive from any UCX peer: every decoder takes any bytes without
//! panicking, and what it accepts encodes back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prefixd_proto::dataplane::{token_from, FetchHeader, HelloAck, PutHeader};

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
    if let Some(t) = token_from(data) {
        assert_eq!(&t[..], data);
    }
});
