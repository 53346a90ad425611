//! The wire protocol of `ucx-peer serve`, the second process of the two-process tests and of the
//! throughput benchmark. Not part of prefixd's protocol.
//!
//! Start-up, on the peer's stdout, one line each: `ADDR <hex worker address>`,
//! `REGION <hex RemoteRegion>`, `READY`. The driver then writes `PEER <hex worker address>` to
//! the peer's stdin. Closing stdin stops the peer.
//!
//! Requests are active messages with id [`REQUEST_AM`]; replies come back with id [`REPLY_AM`].
//! Both headers are [`Header`].

/// Active-message id of requests (driver → peer).
pub const REQUEST_AM: u16 = 10;
/// Active-message id of replies (peer → driver).
pub const REPLY_AM: u16 = 11;

/// Echo: the peer receives the data into its region at `offset` and sends the same bytes back.
pub const OP_ECHO: u8 = 1;
/// Hash: the peer replies with [`hash`] of its region's `[offset, offset+len)` in `value`,
/// after every earlier sink has landed (so it doubles as a barrier).
pub const OP_HASH: u8 = 2;
/// Sink: the peer receives the data into its region at `offset` and does not reply (many may
/// be in flight at once); for throughput runs.
pub const OP_SINK: u8 = 3;

/// `op(1) | tag(8) | offset(8) | len(8) | value(8)`, little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub op: u8,
    pub tag: u64,
    pub offset: u64,
    pub len: u64,
    pub value: u64,
}

impl Header {
    pub const SIZE: usize = 33;

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        v.push(self.op);
        for x in [self.tag, self.offset, self.len, self.value] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }

    pub fn decode(b: &[u8]) -> Option<Header> {
        if b.len() != Self::SIZE {
            return None;
        }
        let word = |i: usize| b.get(1 + 8 * i..9 + 8 * i).and_then(|s| s.try_into().ok()).map(u64::from_le_bytes);
        Some(Header { op: b[0], tag: word(0)?, offset: word(1)?, len: word(2)?, value: word(3)? })
    }
}

/// A fast non-cryptographic hash over 8-byte words (tail bytes included), enough to tell the
/// peer's bytes from the driver's.
pub fn hash(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ data.len() as u64;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(23);
    }
    for &b in chunks.remainder() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Deterministic pseudo-random bytes (xorshift64*), so failures reproduce from the seed.
pub fn fill_random(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// A running `ucx-peer serve` process, with its address and region read from its start-up lines.
/// Dropping it closes its stdin (asking it to stop) and kills it if it lingers.
#[derive(Debug)]
pub struct PeerProcess {
    pub child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    pub address: Vec<u8>,
    pub region: crate::RemoteRegion,
}

impl PeerProcess {
    /// Starts `exe serve --tls TLS --net-devices lo --region REGION` and waits (up to 20 s) for
    /// its start-up lines.
    pub fn spawn(exe: &std::path::Path, tls: &str, region: usize) -> Result<PeerProcess, String> {
        Self::spawn_with(exe, tls, region, crate::ErrorMode::Peer)
    }

    /// As [`PeerProcess::spawn`], with the error mode of the peer's endpoint back to the driver
    /// (use the driver's own: UCX misbehaves when the two sides of a pair differ).
    pub fn spawn_with(
        exe: &std::path::Path,
        tls: &str,
        region: usize,
        mode: crate::ErrorMode,
    ) -> Result<PeerProcess, String> {
        let mode = match mode {
            crate::ErrorMode::Peer => "peer",
            crate::ErrorMode::None => "none",
        };
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let mut child = Command::new(exe)
            .args(["serve", "--tls", tls, "--net-devices", "lo", "--region", &region.to_string()])
            .args(["--error-mode", mode])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
        let stdout = child.stdout.take().ok_or("peer has no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut address, mut remote) = (None, None);
        loop {
            let line =
                rx.recv_timeout(std::time::Duration::from_secs(20)).map_err(|e| format!("peer start-up: {e}"))?;
            if let Some(a) = line.strip_prefix("ADDR ") {
                address = Some(crate::hex::decode(a).map_err(|e| e.to_string())?);
            } else if let Some(r) = line.strip_prefix("REGION ") {
                let bytes = crate::hex::decode(r).map_err(|e| e.to_string())?;
                remote = Some(crate::RemoteRegion::from_bytes(&bytes).map_err(|e| e.to_string())?);
            } else if line == "READY" {
                break;
            }
        }
        let stdin = child.stdin.take();
        Ok(PeerProcess {
            child,
            stdin,
            address: address.ok_or("no ADDR line")?,
            region: remote.ok_or("no REGION line")?,
        })
    }

    /// Tells the peer the driver's worker address (the `PEER` line).
    pub fn send_address(&mut self, addr: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let stdin = self.stdin.as_mut().ok_or_else(|| std::io::Error::other("stdin closed"))?;
        writeln!(stdin, "PEER {}", crate::hex::encode(addr))?;
        stdin.flush()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        drop(self.stdin.take());
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        self.kill();
    }
}
