//! A best-fit allocator over one pool's byte range, with coalescing of freed neighbours.
//!
//! Offsets are aligned to [`ALIGN`]. Free space is indexed twice: by offset (to merge a freed
//! range with its neighbours) and by (length, offset) (to find the smallest range that fits in
//! O(log n)). The pool memory itself lives elsewhere; this only does the arithmetic.

use std::collections::{BTreeMap, BTreeSet};

/// Allocation granularity: keeps every chunk cache-line and DMA friendly.
pub const ALIGN: u64 = 256;

#[derive(Debug, Clone)]
pub struct Allocator {
    capacity: u64,
    used: u64,
    by_offset: BTreeMap<u64, u64>,
    by_size: BTreeSet<(u64, u64)>,
}

fn round_up(len: u64) -> Option<u64> {
    len.checked_add(ALIGN - 1).map(|v| v / ALIGN * ALIGN)
}

impl Allocator {
    /// An allocator over `[0, capacity)`; capacity is rounded down to [`ALIGN`].
    pub fn new(capacity: u64) -> Self {
        let capacity = capacity / ALIGN * ALIGN;
        let mut a = Allocator { capacity, used: 0, by_offset: BTreeMap::new(), by_size: BTreeSet::new() };
        if capacity > 0 {
            a.insert_free(0, capacity);
        }
        a
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes handed out, counting alignment padding.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// The bytes an allocation of `len` occupies.
    pub fn footprint(len: u64) -> u64 {
        round_up(len).unwrap_or(u64::MAX)
    }

    /// Whether an allocation of `len` bytes could ever fit (if everything else were freed).
    pub fn could_fit(&self, len: u64) -> bool {
        len > 0 && Self::footprint(len) <= self.capacity
    }

    fn insert_free(&mut self, off: u64, len: u64) {
        self.by_offset.insert(off, len);
        self.by_size.insert((len, off));
    }

    fn remove_free(&mut self, off: u64, len: u64) {
        self.by_offset.remove(&off);
        self.by_size.remove(&(len, off));
    }

    /// Allocates `len` bytes; `None` when no free range is large enough.
    pub fn alloc(&mut self, len: u64) -> Option<u64> {
        if len == 0 {
            return None;
        }
        let need = round_up(len)?;
        let &(free_len, off) = self.by_size.range((need, 0)..).next()?;
        self.remove_free(off, free_len);
        if free_len > need {
            self.insert_free(off + need, free_len - need);
        }
        self.used += need;
        Some(off)
    }

    /// Returns a range from [`Allocator::alloc`] (same `len`).
    pub fn free(&mut self, off: u64, len: u64) {
        let Some(mut size) = round_up(len) else {
            return;
        };
        let mut start = off;
        self.used = self.used.saturating_sub(size);
        if let Some((&prev_off, &prev_len)) = self.by_offset.range(..off).next_back() {
            if prev_off + prev_len == off {
                self.remove_free(prev_off, prev_len);
                start = prev_off;
                size += prev_len;
            }
        }
        if let Some(&next_len) = self.by_offset.get(&(off + round_up(len).unwrap_or(0))) {
            let next_off = off + round_up(len).unwrap_or(0);
            self.remove_free(next_off, next_len);
            size += next_len;
        }
        self.insert_free(start, size);
    }

    /// Free ranges, for invariant checks: (offset, length) in offset order.
    pub fn free_ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.by_offset.iter().map(|(&o, &l)| (o, l))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_frees_and_coalesces() {
        let mut a = Allocator::new(4096);
        let x = a.alloc(1000).unwrap();
        let y = a.alloc(1).unwrap();
        assert_eq!(a.used(), 1024 + 256);
        assert_ne!(x, y);
        assert!(a.alloc(4096).is_none());
        a.free(x, 1000);
        a.free(y, 1);
        assert_eq!(a.used(), 0);
        assert_eq!(a.free_ranges().collect::<Vec<_>>(), vec![(0, 4096)], "coalesced back to one range");
        assert_eq!(a.alloc(4096), Some(0));
    }

    #[test]
    fn best_fit_prefers_the_smallest_hole() {
        let mut a = Allocator::new(10 * 256);
        let r: Vec<u64> = (0..10).map(|_| a.alloc(256).unwrap()).collect();
        a.free(r[1], 256); // 1-block hole
        a.free(r[4], 256);
        a.free(r[5], 256); // 2-block hole
        assert_eq!(a.alloc(256), Some(r[1]));
        assert_eq!(a.alloc(512), Some(r[4]));
        assert_eq!(a.alloc(0), None);
        assert!(!a.could_fit(0));
        assert!(!a.could_fit(u64::MAX));
    }
}
