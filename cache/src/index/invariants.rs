//! Every structural invariant, checked by the randomized tests after each step.

use super::*;

impl Index {
    /// Checks every structural invariant; for tests. Returns the first violation found.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        for (i, (tier, _)) in self.pools.iter().enumerate() {
            let n = self.entries.values().filter(|e| e.tier == *tier).count() as u64;
            if n != self.orders[i].entries {
                return Err(format!("{tier} counts {} entries, has {n}", self.orders[i].entries));
            }
        }
        for (tier, a) in &self.pools {
            let zombies = self.puts.values().flat_map(|p| p.zombies.iter()).filter(|z| z.0 == *tier);
            let mut spans: Vec<(u64, u64)> = self
                .entries
                .values()
                .filter(|e| e.tier == *tier)
                .map(|e| (e.offset, Allocator::footprint(e.len)))
                .chain(zombies.map(|z| (z.1, Allocator::footprint(z.2))))
                .collect();
            let used: u64 = spans.iter().map(|s| s.1).sum();
            if used != a.used() {
                return Err(format!("{tier}: entries occupy {used} bytes, allocator says {}", a.used()));
            }
            if a.used() > a.capacity() {
                return Err(format!("{tier}: used {} > capacity {}", a.used(), a.capacity()));
            }
            spans.extend(a.free_ranges());
            spans.sort();
            let mut end = 0;
            for (off, len) in spans {
                if off < end {
                    return Err(format!("{tier}: overlapping ranges at {off}"));
                }
                end = off + len;
            }
            if end > a.capacity() {
                return Err(format!("{tier}: a range ends at {end}, past capacity"));
            }
        }
        for (k, e) in &self.entries {
            let Some(i) = self.tier_index(e.tier) else {
                return Err(format!("{:?} in a tier without a pool", k.1));
            };
            if Self::is_evictable(e) != self.orders[i].evictable.contains(&(e.tick, *k)) {
                return Err(format!("evictable set disagrees for {:?}", k.1));
            }
            if Self::is_demotable(e) != self.orders[i].demotable.contains(&(e.tick, *k)) {
                return Err(format!("demotable set disagrees for {:?}", k.1));
            }
            let mut children: Vec<ChunkKey> = self
                .entries
                .iter()
                .filter(|(ck, c)| ck.0 == k.0 && c.parent == Some(k.1))
                .map(|(ck, _)| ck.1)
                .collect();
            let mut listed = e.children.clone();
            children.sort_unstable();
            listed.sort_unstable();
            if children != listed {
                return Err(format!("{:?} lists {} children, has {}", k.1, listed.len(), children.len()));
            }
            let leases: u32 = self
                .leases
                .values()
                .filter(|l| l.ns == k.0)
                .map(|l| l.keys.iter().filter(|x| **x == k.1).count() as u32)
                .sum();
            if leases != e.leases {
                return Err(format!("{:?} counts {} leases, has {leases}", k.1, e.leases));
            }
            if let State::Reserved(p) = e.state {
                if !self.puts.contains_key(&p) {
                    return Err(format!("{:?} reserved by a put that no longer exists", k.1));
                }
            }
        }
        // Namespace references: one per entry, put and lease.
        let mut refs: HashMap<NsId, u32> = HashMap::new();
        for k in self.entries.keys() {
            *refs.entry(k.0).or_default() += 1;
        }
        for p in self.puts.values() {
            *refs.entry(p.ns).or_default() += 1;
        }
        for l in self.leases.values() {
            *refs.entry(l.ns).or_default() += 1;
        }
        for (id, n) in self.namespaces.references() {
            if refs.get(&id).copied().unwrap_or(0) != n {
                return Err(format!("namespace {id} counts {n} references, has {:?}", refs.get(&id)));
            }
        }
        if refs.len() != self.namespaces.len() {
            return Err(format!("{} namespaces referenced, {} alive", refs.len(), self.namespaces.len()));
        }
        // Per-session usage: reserved bytes of live and quarantined puts, leases and their bytes.
        let mut usage: HashMap<SessionId, SessionUsage> = HashMap::new();
        for p in self.puts.values().filter(|p| !p.doomed || p.quarantined) {
            usage.entry(p.session).or_default().reserved_bytes += p.reserved_bytes;
        }
        for l in self.leases.values() {
            let u = usage.entry(l.session).or_default();
            u.leases += 1;
            u.leased_bytes += l.bytes;
        }
        for (s, u) in &usage {
            let have = self.usage.get(s).copied().unwrap_or_default();
            if (have.reserved_bytes, have.leases, have.leased_bytes) != (u.reserved_bytes, u.leases, u.leased_bytes) {
                return Err(format!("session {s}: usage {have:?}, should be {u:?}"));
            }
        }
        if self.lease_keys != self.leases.values().map(|l| l.keys.len()).sum::<usize>() {
            return Err("lease key count disagrees".into());
        }
        let filed: usize = self.orders.iter().map(|o| o.demotable.len()).sum();
        let should: usize = self.entries.values().filter(|e| Self::is_demotable(e)).count();
        if filed != should {
            return Err(format!("{filed} entries filed as demotable, {should} are"));
        }
        Ok(())
    }
}
