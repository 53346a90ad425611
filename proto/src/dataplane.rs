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
/// Server → client: one chunk of a lease, sent while the client's `Fetch` call is in flight.
pub const AM_FETCH: u16 = 21;
/// Client → server, first message on a new data endpoint: header = the session token.
pub const AM_HELLO: u16 = 22;
/// Server → client: the endpoint is bound; header = [`HelloAck`].
pub const AM_HELLO_ACK: u16 = 23;

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
    }
}
