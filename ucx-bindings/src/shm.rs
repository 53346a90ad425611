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

/// Bytes of the proof a process sends before it is handed the fd (a session token).
pub const PROOF_LEN: usize = 16;

/// Connections being answered at once; more are closed at once (a local flood costs nothing).
const MAX_PENDING: usize = 64;

/// Serves `fd` (with its length) to processes that connect to the abstract socket `name` and
/// send a proof (`PROOF_LEN` bytes) that `authorize` accepts, from background threads, for the
/// life of the process. Abstract sockets are visible to every process of the network namespace
/// (/proc/net/unix): the name is no secret, the proof is.
///
/// A process keeps its connection open while it may write the memory; the kernel closes it
/// when the process exits, however it exits. Then `gone` runs with the proof it sent.
pub fn serve_fd<F, G>(name: &str, fd: RawFd, len: u64, authorize: F, gone: G) -> io::Result<()>
where
    F: Fn(&[u8; PROOF_LEN]) -> bool + Send + Sync + 'static,
    G: Fn(&[u8; PROOF_LEN]) + Send + Sync + 'static,
{
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = UnixListener::bind_addr(&addr)?;
    let hooks = std::sync::Arc::new((authorize, gone));
    let pending = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::Builder::new().name("shm-serve".into()).spawn(move || {
        use std::sync::atomic::Ordering;
        for stream in listener.incoming().flatten() {
            if pending.fetch_add(1, Ordering::AcqRel) >= MAX_PENDING {
                pending.fetch_sub(1, Ordering::AcqRel);
                continue; // dropped: closed
            }
            let (hooks, pending) = (hooks.clone(), pending.clone());
            let answer = move || {
                let handed = answer_one(&stream, fd, len, &hooks.0);
                pending.fetch_sub(1, Ordering::AcqRel);
                match handed {
                    Ok(proof) => {
                        wait_for_close(&stream);
                        (hooks.1)(&proof);
                    }
                    Err(e) => tracing::debug!(error = %e, "did not hand out the shared pool"),
                }
            };
            // Small stacks: one thread per process holding the pool, blocked in read.
            let spawned = std::thread::Builder::new().name("shm-answer".into()).stack_size(64 << 10).spawn(answer);
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot answer a pool socket connection");
            }
        }
    })?;
    Ok(())
}

/// Blocks until the peer closes its end (or its process exits).
fn wait_for_close(stream: &UnixStream) {
    use std::io::Read;
    let _ = stream.set_read_timeout(None);
    let mut buf = [0u8; 64];
    loop {
        match (&*stream).read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {} // nothing is expected; ignored
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Reads one proof (within a second) and sends the fd if it is accepted; closes otherwise.
fn answer_one(
    stream: &UnixStream,
    fd: RawFd,
    len: u64,
    authorize: &dyn Fn(&[u8; PROOF_LEN]) -> bool,
) -> io::Result<[u8; PROOF_LEN]> {
    use std::io::Read;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
    let mut proof = [0u8; PROOF_LEN];
    (&*stream).read_exact(&mut proof)?;
    if !authorize(&proof) {
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, "proof refused"));
    }
    send_fd(stream, fd, len)?;
    Ok(proof)
}

/// Connects to the abstract socket `name`, sends `proof` and receives (fd, length) and the
/// connection: keep it open while this process may write the memory.
pub fn receive_fd(name: &str, proof: &[u8; PROOF_LEN]) -> io::Result<(OwnedFd, u64, UnixStream)> {
    use std::io::Write;
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    let stream = UnixStream::connect_addr(&addr)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    (&stream).write_all(proof)?;
    let mut payload = [0u8; 8];
    let mut iov = libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: payload.len() };
    let mut control = fd_control_buffer();
    let mut msg = one_fd_message(&mut iov, &mut control);
    // SAFETY: a connected socket; buffers as declared in msg.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n == 0 {
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, "the pool socket refused this session"));
    }
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
    Ok((fd, u64::from_le_bytes(payload), stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_memory_through_an_abstract_socket() {
        let shm = SharedMemory::create("test", 1 << 20).unwrap();
        let name = format!("prefixd-test-{}", std::process::id());
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let gone = move |p: &[u8; PROOF_LEN]| {
            let _ = tx.lock().unwrap().send(p[0]);
        };
        serve_fd(&name, shm.fd(), shm.len() as u64, |p| p[0] == 7, gone).unwrap();
        let err = receive_fd(&name, &[8u8; PROOF_LEN]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "a wrong proof gets nothing: {err}");
        let (fd, len, alive) = receive_fd(&name, &[7u8; PROOF_LEN]).unwrap();
        let timeout = std::time::Duration::from_millis(200);
        assert!(rx.recv_timeout(timeout).is_err(), "not gone while the connection is open");
        drop(alive);
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap(), 7, "gone once closed");
        assert_eq!(len, 1 << 20);
        let other = SharedMemory::map(fd, len as usize).unwrap();
        // SAFETY: both mappings are 1 MiB; single-threaded test.
        unsafe {
            *shm.as_ptr().add(12345) = 0xAB;
            assert_eq!(*other.as_ptr().add(12345), 0xAB, "same pages");
        }
        assert!(
            SharedMemory::map(receive_fd(&name, &[7; PROOF_LEN]).unwrap().0, 2 << 20).is_err(),
            "oversized map refused"
        );
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap(), 7);
        assert!(receive_fd("prefixd-nobody-listens-here", &[7; PROOF_LEN]).is_err());
    }
}
