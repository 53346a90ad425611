//! `SocketAddr` <-> C `sockaddr_storage`, for UCX's listener and client-server endpoints.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// A socket address laid out as C expects, kept with its length.
pub(crate) struct CSockAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl CSockAddr {
    pub(crate) fn new(addr: SocketAddr) -> CSockAddr {
        // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid (unspecified) value.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
                unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
                unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        CSockAddr { storage, len: len as libc::socklen_t }
    }

    pub(crate) fn as_ptr<T>(&self) -> *const T {
        (&self.storage as *const libc::sockaddr_storage).cast()
    }

    pub(crate) fn len(&self) -> libc::socklen_t {
        self.len
    }
}

/// Reads an IPv4 or IPv6 address from a `sockaddr_storage` UCX filled in; None for other families.
///
/// # Safety
/// `storage` must point to a readable `sockaddr_storage`-sized buffer.
pub(crate) unsafe fn from_storage<T>(storage: *const T) -> Option<SocketAddr> {
    let storage = storage.cast::<libc::sockaddr_storage>();
    // SAFETY: the caller vouches for a readable sockaddr_storage; ss_family is its first field.
    let family = unsafe { (*storage).ss_family } as libc::c_int;
    match family {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which fits inside it.
            let sin = unsafe { std::ptr::read(storage.cast::<libc::sockaddr_in>()) };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6, which fits inside it.
            let sin6 = unsafe { std::ptr::read(storage.cast::<libc::sockaddr_in6>()) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_v4_and_v6() {
        for a in ["127.0.0.1:50052", "[::1]:7", "0.0.0.0:0", "[fe80::1%2]:9"] {
            let addr: SocketAddr = a.parse().unwrap_or_else(|e| panic!("{a}: {e}"));
            let c = CSockAddr::new(addr);
            // SAFETY: c holds a full sockaddr_storage.
            let back = unsafe { from_storage(c.as_ptr::<libc::sockaddr_storage>()) };
            assert_eq!(back, Some(addr), "{a}");
        }
    }
}
