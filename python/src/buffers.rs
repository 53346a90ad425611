//! Caller memory as the Rust client wants it: registered regions for whole-chunk calls, checked
//! fragment lists for paged calls, and the host-memory path of paged calls (the client's own
//! paged calls are CUDA copies; host fragments are gathered into a registered staging buffer).

use prefixd_client::ucx_bindings::{MemRegion, MemoryType, RegionSlice};
use prefixd_client::{ChunkKey, Client, Error, Fragment, PutOutcome};
use pyo3::exceptions::PyValueError;
use pyo3::PyResult;
use std::sync::Arc;

/// `len` bytes at `ptr` on CUDA device `device`, or host memory when `device` is -1.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Buffer {
    ptr: u64,
    len: usize,
    device: i32,
}

impl Buffer {
    fn parse(i: usize, &(ptr, len, device): &(u64, usize, i32)) -> PyResult<Buffer> {
        if ptr == 0 || len == 0 {
            return Err(PyValueError::new_err(format!("buffer {i} is empty (address {ptr:#x}, {len} bytes)")));
        }
        if device < -1 {
            return Err(PyValueError::new_err(format!("buffer {i}: device {device} (use -1 for host memory)")));
        }
        ptr.checked_add(len as u64)
            .ok_or_else(|| PyValueError::new_err(format!("buffer {i}: {ptr:#x} + {len} overflows")))?;
        Ok(Buffer { ptr, len, device })
    }

    pub(crate) fn parse_all(raw: &[(u64, usize, i32)]) -> PyResult<Vec<Buffer>> {
        raw.iter().enumerate().map(|(i, b)| Buffer::parse(i, b)).collect()
    }
}

/// Registers each buffer with the client's UCX context (host or CUDA memory).
pub(crate) fn register(c: &Client, buffers: &[Buffer]) -> prefixd_client::Result<Vec<RegionSlice>> {
    buffers
        .iter()
        .map(|b| {
            let region = if b.device < 0 {
                // SAFETY: the Python layer took (ptr, len) from a live, contiguous host array or
                // tensor that it keeps referenced until this call returns; regions and transfers
                // made here end within the call.
                unsafe { MemRegion::register(c.worker().context(), b.ptr as *mut u8, b.len, MemoryType::Host) }?
            } else {
                // SAFETY: as above, for a CUDA tensor's device memory.
                unsafe { c.register_cuda(b.ptr, b.len) }?
            };
            Ok(region.full())
        })
        .collect()
}

/// The memory a paged call's fragments must lie in: the tensors the Python caller passed.
#[derive(Debug)]
pub(crate) struct Bounds {
    /// (start, end) ranges, sorted by start.
    ranges: Vec<(u64, u64)>,
    device: i32,
}

impl Bounds {
    pub(crate) fn new(raw: &[(u64, usize, i32)]) -> PyResult<Bounds> {
        let buffers = Buffer::parse_all(raw)?;
        let first = buffers.first().ok_or_else(|| PyValueError::new_err("paged call without tensors"))?;
        if let Some(b) = buffers.iter().find(|b| b.device != first.device) {
            return Err(PyValueError::new_err(format!(
                "fragments on devices {} and {}: one paged call moves memory of one device",
                first.device, b.device
            )));
        }
        let mut ranges: Vec<(u64, u64)> = buffers.iter().map(|b| (b.ptr, b.ptr + b.len as u64)).collect();
        ranges.sort_unstable();
        Ok(Bounds { ranges, device: first.device })
    }

    pub(crate) fn on_device(&self) -> bool {
        self.device >= 0
    }

    fn contains(&self, addr: u64, len: usize) -> bool {
        let Some(end) = addr.checked_add(len as u64) else { return false };
        // The last range starting at or before addr is the only one that can hold it.
        let i = self.ranges.partition_point(|r| r.0 <= addr);
        i > 0 && end <= self.ranges[i - 1].1
    }

    /// Splits `addrs` (little-endian u64s) into per-chunk fragment lists, each fragment checked
    /// to lie inside one range: `counts[i]` fragments for chunk i, or (no counts) `chunks`
    /// chunks of equal count.
    pub(crate) fn fragments(
        &self,
        addrs: &[u8],
        chunks: usize,
        fragment_bytes: usize,
        counts: Option<&[usize]>,
    ) -> PyResult<Vec<Vec<Fragment>>> {
        if fragment_bytes == 0 {
            return Err(PyValueError::new_err("fragment_bytes must be positive"));
        }
        if chunks == 0 {
            return Err(PyValueError::new_err("no keys"));
        }
        let n = addrs.len() / 8;
        if addrs.len() % 8 != 0 || n == 0 {
            return Err(PyValueError::new_err(format!("{} bytes of addresses: not whole u64s", addrs.len())));
        }
        let counts: Vec<usize> = match counts {
            Some(c) => {
                if c.len() != chunks || c.iter().sum::<usize>() != n || c.contains(&0) {
                    return Err(PyValueError::new_err(format!(
                        "fragment counts {c:?} do not describe {chunks} chunks of {n} addresses"
                    )));
                }
                c.to_vec()
            }
            None if n % chunks == 0 => vec![n / chunks; chunks],
            None => {
                return Err(PyValueError::new_err(format!(
                    "{n} fragment addresses do not split evenly over {chunks} chunks"
                )))
            }
        };
        let mut out = Vec::with_capacity(chunks);
        let mut words = addrs.chunks_exact(8);
        for (c, &count) in counts.iter().enumerate() {
            let mut frags = Vec::with_capacity(count);
            for (j, a) in words.by_ref().take(count).enumerate() {
                let mut b = [0u8; 8];
                b.copy_from_slice(a);
                let ptr = u64::from_le_bytes(b);
                if !self.contains(ptr, fragment_bytes) {
                    return Err(PyValueError::new_err(format!(
                        "chunk {c} fragment {j}: {fragment_bytes} bytes at {ptr:#x} lie outside the given tensors"
                    )));
                }
                frags.push(Fragment { ptr, len: fragment_bytes });
            }
            out.push(frags);
        }
        Ok(out)
    }
}

/// A registered host buffer holding `chunks` back to back, and one slice per chunk.
fn staging(c: &Client, chunks: &[Vec<Fragment>]) -> prefixd_client::Result<(Arc<MemRegion>, Vec<RegionSlice>)> {
    let sizes: Vec<usize> = chunks.iter().map(|f| f.iter().map(|x| x.len).sum()).collect();
    let total: usize = sizes.iter().sum();
    let region = c.alloc(total)?;
    let mut slices = Vec::with_capacity(sizes.len());
    let mut off = 0;
    for s in sizes {
        slices.push(region.slice(off, s)?);
        off += s;
    }
    Ok((region, slices))
}

fn ucx(e: prefixd_client::ucx_bindings::Error) -> Error {
    Error::Transfer(e)
}

/// Paged put from host memory: gathers the fragments into a staging buffer, then a whole-chunk put.
pub(crate) async fn put_host_fragments(
    c: &Client,
    namespace: &str,
    keys: &[ChunkKey],
    parent: Option<ChunkKey>,
    chunks: &[Vec<Fragment>],
) -> prefixd_client::Result<(usize, usize, usize)> {
    let (region, slices) = staging(c, chunks)?;
    let mut off = 0;
    for f in chunks.iter().flatten() {
        // SAFETY: Bounds::fragments checked the range lies inside a host tensor the Python
        // caller keeps alive for the call.
        let src = unsafe { std::slice::from_raw_parts(f.ptr as *const u8, f.len) };
        region.write(off, src).map_err(ucx)?;
        off += f.len;
    }
    let o: PutOutcome = c.put_chunks(namespace, keys, parent, &slices).await?;
    Ok((o.chunks, o.stored, o.skipped))
}

/// Paged get into host memory: a whole-chunk get into a staging buffer, then a scatter of the
/// chunks that hit.
pub(crate) async fn get_host_fragments(
    c: &Client,
    namespace: &str,
    keys: &[ChunkKey],
    chunks: &[Vec<Fragment>],
) -> prefixd_client::Result<usize> {
    let (region, slices) = staging(c, chunks)?;
    let hits = c.get_chunks(namespace, keys, &slices).await?;
    let mut off = 0;
    for f in chunks[..hits].iter().flatten() {
        // SAFETY: as in put_host_fragments; the Python layer checked the tensors are writable.
        let dst = unsafe { std::slice::from_raw_parts_mut(f.ptr as *mut u8, f.len) };
        region.read(off, dst).map_err(ucx)?;
        off += f.len;
    }
    Ok(hits)
}
