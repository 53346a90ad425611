//! Which network devices UCX may use when the operator named none: the device of the address
//! prefixd listens on. UCX's tcp transport otherwise listens on every interface, also when gRPC
//! answers on 127.0.0.1 only (found by the hardening review): the data path must not be reachable
//! from where the control path is not.

use std::ffi::CStr;
use std::net::IpAddr;

/// The UCX_NET_DEVICES value for a listen address: "lo" for loopback, the interface holding a
/// specific address, None (every device) for an unspecified one (0.0.0.0, ::).
pub fn devices_for(ip: IpAddr) -> Option<String> {
    if ip.is_unspecified() {
        return None;
    }
    if ip.is_loopback() {
        return Some("lo".into());
    }
    interface_of(ip)
}

fn interface_of(ip: IpAddr) -> Option<String> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: valid out-pointer; the list is freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() && !ifa.ifa_name.is_null() {
            // SAFETY: ifa_addr points at a sockaddr of the family it names.
            let addr = unsafe { sockaddr_ip(ifa.ifa_addr) };
            if addr == Some(ip) {
                // SAFETY: a NUL-terminated interface name owned by the list.
                found = Some(unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned());
                break;
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list from getifaddrs above, freed once.
    unsafe { libc::freeifaddrs(head) };
    found
}

/// # Safety
/// `sa` must point at a sockaddr whose family field is valid (and whose size fits that family).
unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    // SAFETY: per the contract, the family field is readable.
    match unsafe { (*sa).sa_family } as i32 {
        libc::AF_INET => {
            // SAFETY: an AF_INET sockaddr is a sockaddr_in.
            let sin = unsafe { &*(sa as *const libc::sockaddr_in) };
            Some(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()))
        }
        libc::AF_INET6 => {
            // SAFETY: an AF_INET6 sockaddr is a sockaddr_in6.
            let sin6 = unsafe { &*(sa as *const libc::sockaddr_in6) };
            Some(IpAddr::from(sin6.sin6_addr.s6_addr))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_lo_unspecified_is_everything() {
        assert_eq!(devices_for("127.0.0.1".parse().unwrap()).as_deref(), Some("lo"));
        assert_eq!(devices_for("::1".parse().unwrap()).as_deref(), Some("lo"));
        assert_eq!(devices_for("0.0.0.0".parse().unwrap()), None);
        // An address of no interface here: nothing found (the caller keeps every device).
        assert_eq!(devices_for("192.0.2.77".parse().unwrap()), None);
    }
}
