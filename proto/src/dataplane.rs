//! Active-message formats of the data plane. Little-endian, fixed size; a header of any other
//! length is rejected.
//!
//! A client's data endpoint is bound to its session by [`AM_HELLO`] (carrying the session token)
//! right after it connects; the server then holds every other message to the session of the
//! endpoint it arrived on, so the headers below name no session at all.

/// Length of a session token (ConnectResponse.session_token).
pub const TOKEN_LEN: usize = 16;

/// A session's credential: 16 random bytes.
pub type SessionToken = [u8; TOKEN_LEN];

/// Client → server: one chunk of a put, data by rendezvous into the slot the server reserved.
pub const AM_PUT: u16 = 20;
/// Server → client: one chunk of a lease, sent while the client's `Fetch` call (or
/// [`AM_FETCH_ASK`]) is in flight; header = [`FetchHeader`]. After the chunks of an
/// AM_FETCH_ASK, one more with header = [`FetchDone`] (told apart by its length) and no chunk.
pub const AM_FETCH: u16 = 21;
/// Client → server, first message on a new data endpoint: header = the session token.
pub const AM_HELLO: u16 = 22;
/// Server → client: the endpoint is bound; header = [`HelloAck`].
pub const AM_HELLO_ACK: u16 = 23;
/// Client → server: a remote get, asked on the data endpoint instead of by a gRPC `Fetch`
/// (a gRPC call costs two more thread hand-offs and HTTP/2 framing on each side, which is most
/// of a small get's time). Header = [`FetchAsk`]; data = the namespace's bytes, then the keys.
/// The server sends the longest cached prefix of the keys as AM_FETCH chunks, then FetchDone.
pub const AM_FETCH_ASK: u16 = 24;

/// The largest AM_FETCH_ASK data a client sends (namespace and keys): small enough to travel
/// eagerly over every transport; a longer request goes by gRPC.
pub const MAX_FETCH_ASK_DATA: usize = 4096;

/// Reads a session token from bytes of exactly [`TOKEN_LEN`].
pub fn token_from(b: &[u8]) -> Option<SessionToken> {
    b.try_into().ok()
}

/// Header of [`AM_PUT`]: `put_id(8) | index(4)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutHeader {
    pub put_id: u64,
    /// Index of the chunk in its BeginPut's key list.
    pub index: u32,
}

impl PutHeader {
    pub const SIZE: usize = 12;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[..8].copy_from_slice(&self.put_id.to_le_bytes());
        b[8..].copy_from_slice(&self.index.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<PutHeader> {
        if b.len() != Self::SIZE {
            return None;
        }
        Some(PutHeader {
            put_id: u64::from_le_bytes(b[..8].try_into().ok()?),
            index: u32::from_le_bytes(b[8..].try_into().ok()?),
        })
    }
}

/// Header of [`AM_FETCH`]: `tag(8) | lease_id(8) | index(4)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchHeader {
    /// The tag of the `Fetch` call this answers.
    pub tag: u64,
    pub lease_id: u64,
    /// Index of the chunk in the lease.
    pub index: u32,
}

impl FetchHeader {
    pub const SIZE: usize = 20;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[..8].copy_from_slice(&self.tag.to_le_bytes());
        b[8..16].copy_from_slice(&self.lease_id.to_le_bytes());
        b[16..].copy_from_slice(&self.index.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<FetchHeader> {
        if b.len() != Self::SIZE {
            return None;
        }
        Some(FetchHeader {
            tag: u64::from_le_bytes(b[..8].try_into().ok()?),
            lease_id: u64::from_le_bytes(b[8..16].try_into().ok()?),
            index: u32::from_le_bytes(b[16..].try_into().ok()?),
        })
    }
}

/// Header of [`AM_FETCH_ASK`]: `tag(8) | chunk_tokens(4) | namespace_len(2) | keys(2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchAsk {
    /// Names the request in the chunks and the FetchDone that answer it.
    pub tag: u64,
    /// The client's chunk size in tokens (checked against the server's, as in `Fetch`).
    pub chunk_tokens: u32,
    pub namespace_len: u16,
    pub keys: u16,
}

impl FetchAsk {
    pub const SIZE: usize = 16;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[..8].copy_from_slice(&self.tag.to_le_bytes());
        b[8..12].copy_from_slice(&self.chunk_tokens.to_le_bytes());
        b[12..14].copy_from_slice(&self.namespace_len.to_le_bytes());
        b[14..].copy_from_slice(&self.keys.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<FetchAsk> {
        if b.len() != Self::SIZE {
            return None;
        }
        Some(FetchAsk {
            tag: u64::from_le_bytes(b[..8].try_into().ok()?),
            chunk_tokens: u32::from_le_bytes(b[8..12].try_into().ok()?),
            namespace_len: u16::from_le_bytes(b[12..14].try_into().ok()?),
            keys: u16::from_le_bytes(b[14..].try_into().ok()?),
        })
    }

    /// The request's data for `namespace` and `keys`, with its header; `None` when it does not
    /// fit [`MAX_FETCH_ASK_DATA`] (the caller then asks by gRPC).
    pub fn build(
        tag: u64,
        chunk_tokens: u32,
        namespace: &str,
        keys: &[crate::keys::ChunkKey],
    ) -> Option<(FetchAsk, Vec<u8>)> {
        let len = namespace.len() + keys.len() * crate::keys::KEY_LEN;
        if len > MAX_FETCH_ASK_DATA {
            return None;
        }
        let ask = FetchAsk {
            tag,
            chunk_tokens,
            namespace_len: u16::try_from(namespace.len()).ok()?,
            keys: u16::try_from(keys.len()).ok()?,
        };
        let mut data = Vec::with_capacity(len);
        data.extend_from_slice(namespace.as_bytes());
        for k in keys {
            data.extend_from_slice(&k.0);
        }
        Some((ask, data))
    }

    /// Splits the request's data into its namespace and keys: exactly the lengths the header
    /// announced, a UTF-8 namespace, within the limits; `None` otherwise.
    pub fn parse<'a>(&self, data: &'a [u8]) -> Option<(&'a str, Vec<crate::keys::ChunkKey>)> {
        let ns_len = self.namespace_len as usize;
        let n = self.keys as usize;
        if data.len() > MAX_FETCH_ASK_DATA
            || ns_len > crate::limits::MAX_NAMESPACE_LEN
            || n > crate::limits::MAX_KEYS_PER_REQUEST
            || data.len() != ns_len + n * crate::keys::KEY_LEN
        {
            return None;
        }
        let namespace = std::str::from_utf8(&data[..ns_len]).ok()?;
        let keys = data[ns_len..]
            .chunks_exact(crate::keys::KEY_LEN)
            .map(crate::keys::ChunkKey::from_slice)
            .collect::<Option<Vec<_>>>()?;
        Some((namespace, keys))
    }
}

/// Header of the AM_FETCH that ends an [`AM_FETCH_ASK`]: `tag(8) | hit_chunks(4) | code(4)`.
/// `code` is a gRPC status code (0: OK, `hit_chunks` chunks were sent); any other code comes
/// with its message as the data (UTF-8, at most [`MAX_FETCH_DONE_MESSAGE`] bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchDone {
    pub tag: u64,
    pub hit_chunks: u32,
    pub code: u32,
}

/// The longest error message a FetchDone carries (longer ones are cut at a char boundary).
pub const MAX_FETCH_DONE_MESSAGE: usize = 1024;

impl FetchDone {
    pub const SIZE: usize = 16;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[..8].copy_from_slice(&self.tag.to_le_bytes());
        b[8..12].copy_from_slice(&self.hit_chunks.to_le_bytes());
        b[12..].copy_from_slice(&self.code.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<FetchDone> {
        if b.len() != Self::SIZE {
            return None;
        }
        Some(FetchDone {
            tag: u64::from_le_bytes(b[..8].try_into().ok()?),
            hit_chunks: u32::from_le_bytes(b[8..12].try_into().ok()?),
            code: u32::from_le_bytes(b[12..].try_into().ok()?),
        })
    }
}

/// Header of [`AM_HELLO_ACK`]: `session_id(8)`, the session's log id, so both sides' logs agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloAck {
    pub session_id: u64,
}

impl HelloAck {
    pub const SIZE: usize = 8;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        self.session_id.to_le_bytes()
    }

    pub fn decode(b: &[u8]) -> Option<HelloAck> {
        Some(HelloAck { session_id: u64::from_le_bytes(b.try_into().ok()?) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_reject_bad_lengths() {
        let p = PutHeader { put_id: 7 << 40, index: 3 };
        assert_eq!(PutHeader::decode(&p.encode()), Some(p));
        let f = FetchHeader { tag: 9, lease_id: u64::MAX, index: u32::MAX };
        assert_eq!(FetchHeader::decode(&f.encode()), Some(f));
        let a = HelloAck { session_id: 0x1234_5678_9abc_def0 };
        assert_eq!(HelloAck::decode(&a.encode()), Some(a));
        assert_eq!(PutHeader::decode(&[0; 11]), None);
        assert_eq!(PutHeader::decode(&[0; 20]), None);
        assert_eq!(FetchHeader::decode(&[0; 21]), None);
        assert_eq!(HelloAck::decode(&[0; 9]), None);
        assert_eq!(token_from(&[1; 16]), Some([1; 16]));
        assert_eq!(token_from(&[1; 15]), None);
        let d = FetchDone { tag: 5, hit_chunks: 2, code: 14 };
        assert_eq!(FetchDone::decode(&d.encode()), Some(d));
        assert_eq!(FetchDone::decode(&[0; 20]), None);
    }

    #[test]
    fn fetch_asks_round_trip_and_refuse_what_does_not_add_up() {
        use crate::keys::ChunkKey;
        let keys = [ChunkKey([1; 32]), ChunkKey([2; 32])];
        let (ask, data) = FetchAsk::build(77, 256, "vllm|m", &keys).unwrap();
        assert_eq!(FetchAsk::decode(&ask.encode()), Some(ask));
        let (ns, got) = ask.parse(&data).unwrap();
        assert_eq!((ns, got.as_slice()), ("vllm|m", &keys[..]));
        // Lengths that disagree with the header, by one byte either way.
        assert!(ask.parse(&data[..data.len() - 1]).is_none());
        assert!(ask.parse(&[data.as_slice(), &[0]].concat()).is_none());
        assert!(FetchAsk { keys: 3, ..ask }.parse(&data).is_none());
        // A namespace that is not UTF-8, or longer than the limit.
        let mut bad = data.clone();
        bad[0] = 0xff;
        assert!(ask.parse(&bad).is_none());
        let long = "n".repeat(crate::limits::MAX_NAMESPACE_LEN + 1);
        let (a, d) = FetchAsk::build(1, 256, &long, &[]).unwrap();
        assert!(a.parse(&d).is_none());
        // Too many keys for one message: the caller asks by gRPC instead.
        assert!(FetchAsk::build(1, 256, "n", &vec![ChunkKey([0; 32]); 200]).is_none());
        assert_eq!(FetchAsk::decode(&[0; 15]), None);
    }
}
