//! Active-message formats of the data plane (the path for clients that get no remote key).
//! Little-endian, fixed size; a header of any other length is rejected.

/// Client → server: one chunk of a put, data by rendezvous into the slot the server reserved.
pub const AM_PUT: u16 = 20;
/// Server → client: one chunk of a lease, sent while the client's `Fetch` call is in flight.
pub const AM_FETCH: u16 = 21;

/// Header of [`AM_PUT`]: `session_id(8) | put_id(8) | index(4)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutHeader {
    pub session_id: u64,
    pub put_id: u64,
    /// Index of the chunk in its BeginPut's key list.
    pub index: u32,
}

impl PutHeader {
    pub const SIZE: usize = 20;

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[..8].copy_from_slice(&self.session_id.to_le_bytes());
        b[8..16].copy_from_slice(&self.put_id.to_le_bytes());
        b[16..].copy_from_slice(&self.index.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<PutHeader> {
        if b.len() != Self::SIZE {
            return None;
        }
        Some(PutHeader {
            session_id: u64::from_le_bytes(b[..8].try_into().ok()?),
            put_id: u64::from_le_bytes(b[8..16].try_into().ok()?),
            index: u32::from_le_bytes(b[16..].try_into().ok()?),
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
        PutHeader { session_id: self.tag, put_id: self.lease_id, index: self.index }.encode()
    }

    pub fn decode(b: &[u8]) -> Option<FetchHeader> {
        PutHeader::decode(b).map(|h| FetchHeader { tag: h.session_id, lease_id: h.put_id, index: h.index })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_reject_bad_lengths() {
        let p = PutHeader { session_id: 1 << 60, put_id: 7, index: 3 };
        assert_eq!(PutHeader::decode(&p.encode()), Some(p));
        let f = FetchHeader { tag: 9, lease_id: u64::MAX, index: u32::MAX };
        assert_eq!(FetchHeader::decode(&f.encode()), Some(f));
        assert_eq!(PutHeader::decode(&[0; 19]), None);
        assert_eq!(FetchHeader::decode(&[0; 21]), None);
    }
}
