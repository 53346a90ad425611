//! Memory shared between processes of one host: a memfd mapped `MAP_SHARED`, and the hand-over of
//! its file descriptor over an abstract Unix socket (`SCM_RIGHTS`).
//!
//! prefixd allocates its host pool this way so that same-host clients, which may already read and
//! write the pool through a UCX remote key, can also map it and copy with `memcpy` or `cuMemcpy`
//! (DMA from GPU memory at PCIe speed, where UCX's path for CUDA memory to a remote host key is
//! ~200x slower). The socket's name is abstract (no file) and random; only clients told the name
//! can connect, and the fd grants exactly what the remote key already grants.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::ptr::NonNull;

/// A shared mapping of a memfd, unmapped on drop.
#[derive(Debug)]
pub struct SharedMemory {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; this type only hands out its address and length,
// and every access goes through raw pointers by the caller (as for MemRegion).
unsafe impl Send for SharedMemory {}
// SAFETY: as above.
unsafe impl Sync for SharedMemory {}

fn map_fd(fd: RawFd, len: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: maps `len` bytes of an open fd; checked for MAP_FAILED.
    let p =
        unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0) };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))
}

impl SharedMemory {
    /// A new zeroed memfd of `len` bytes, mapped shared.
    pub fn create(name: &str, len: usize) -> io::Result<SharedMemory> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "zero-length shared memory"));
        }
        let cname = std::ffi::CString::new(name).map_err(|_| io::Error::other("NUL in name"))?;
        // SAFETY: valid NUL-terminated name; the returned fd is checked and owned below.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: fd is open; ftruncate sets its size.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let ptr = map_fd(fd.as_raw_fd(), len)?;
        Ok(SharedMemory { fd, ptr, len })
    }

    /// Maps memory another process shared with us.
    pub fn map(fd: OwnedFd, len: usize) -> io::Result<SharedMemory> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "zero-length shared memory"));
        }
        // The size must match the file: mapping past its end would fault on access.
        // SAFETY: fstat on an open fd into a zeroed stat struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if (st.st_size as u64) < len as u64 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "shared memory is smaller than announced"));
        }
        let ptr = map_fd(fd.as_raw_fd(), len)?;
        Ok(SharedMemory { fd, ptr, len })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in create/map with this length and is unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Room for one control message carrying one file descriptor.
fn fd_control_buffer() -> Vec<u8> {
    // SAFETY: CMSG_SPACE is a pure size computation.
    vec![0u8; unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize]
}

/// A message of one data buffer and room for one fd; both buffers must outlive its use.
fn one_fd_message(iov: &mut libc::iovec, control: &mut [u8]) -> libc::msghdr {
    // SAFETY: plain C struct; zeroes are valid, and every pointer field is set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len();
    msg
}

/// Sends `len` (8 bytes, little-endian) and `fd` (as SCM_RIGHTS) on a connected stream.
fn send_fd(stream: &UnixStream, fd: RawFd, len: u64) -> io::Result<()> {
    let mut payload = len.to_le_bytes();
    let mut iov = libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: payload.len() };
    let mut control = fd_control_buffer();
    let msg = one_fd_message(&mut iov, &mut control);
    // SAFETY: msg_control points to a buffer sized for one header with one fd.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
    }
    // SAFETY: a connected socket and a fully initialised message.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Serves `fd` (with its length) to every process that connects to the abstract socket `name`,
/// from a background thread, for the life of the process.
pub fn serve_fd(name: &str, fd: RawFd, len: u64) -> io::Result<()> {
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = UnixListener::bind_addr(&addr)?;
    std::thread::Builder::new().name("shm-serve".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            if let Err(e) = send_fd(&stream, fd, len) {
                tracing::debug!(error = %e, "could not hand out the shared pool");
            }
        }
    })?;
    Ok(())
}

/// Connects to the abstract socket `name` and receives (fd, length).
pub fn receive_fd(name: &str) -> io::Result<(OwnedFd, u64)> {
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    let stream = UnixStream::connect_addr(&addr)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let mut payload = [0u8; 8];
    let mut iov = libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: payload.len() };
    let mut control = fd_control_buffer();
    let mut msg = one_fd_message(&mut iov, &mut control);
    // SAFETY: a connected socket; buffers as declared in msg.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n != payload.len() as isize {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "short message from the pool socket"));
    }
    // SAFETY: msg was filled by recvmsg; CMSG_FIRSTHDR checks controllen.
    let c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    // SAFETY: c is null or points into `control`.
    if c.is_null() || unsafe { (*c).cmsg_type } != libc::SCM_RIGHTS {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "no file descriptor from the pool socket"));
    }
    // SAFETY: an SCM_RIGHTS header carries one fd in its data.
    let raw = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<RawFd>()) };
    // SAFETY: the kernel installed this fd for us; we own it now.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    Ok((fd, u64::from_le_bytes(payload)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_memory_through_an_abstract_socket() {
        let shm = SharedMemory::create("test", 1 << 20).unwrap();
        let name = format!("prefixd-test-{}", std::process::id());
        serve_fd(&name, shm.fd(), shm.len() as u64).unwrap();
        let (fd, len) = receive_fd(&name).unwrap();
        assert_eq!(len, 1 << 20);
        let other = SharedMemory::map(fd, len as usize).unwrap();
        // SAFETY: both mappings are 1 MiB; single-threaded test.
        unsafe {
            *shm.as_ptr().add(12345) = 0xAB;
            assert_eq!(*other.as_ptr().add(12345), 0xAB, "same pages");
        }
        assert!(SharedMemory::map(receive_fd(&name).unwrap().0, 2 << 20).is_err(), "oversized map refused");
        assert!(receive_fd("prefixd-nobody-listens-here").is_err());
    }
}
