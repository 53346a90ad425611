//! Lookups (the longest Ready prefix of a key list) and leases: chunks pinned for reading, so
//! that nothing evicts, moves or deletes them until release or expiry.

use super::*;

impl Index {
    /// How many leading chunks of `keys` are Ready, changing nothing (no recency, no counters):
    /// what a lookup waiting for chunks checks each time a put commits.
    pub fn ready_prefix(&self, ns: &str, keys: &[ChunkKey]) -> Result<usize> {
        Self::check_namespace(ns)?;
        self.check_keys(keys)?;
        let Some(nsid) = self.ns_lookup(ns) else {
            return Ok(0);
        };
        Ok(keys.iter().take_while(|k| self.entries.get(&(nsid, **k)).is_some_and(|e| e.state == State::Ready)).count())
    }

    /// Counts the leading Ready chunks; with `lease`, pins them until release or expiry.
    pub fn lookup(
        &mut self,
        ns: &str,
        keys: &[ChunkKey],
        lease: Option<(SessionId, Duration)>,
        now: Instant,
    ) -> Result<LookupResult> {
        Self::check_namespace(ns)?;
        self.check_keys(keys)?;
        let Some(nsid) = self.ns_lookup(ns) else {
            self.counters.miss_chunks += keys.len() as u64;
            return Ok(LookupResult::default());
        };
        let mut hits = 0;
        for key in keys {
            match self.entries.get(&(nsid, *key)) {
                Some(e) if e.state == State::Ready => hits += 1,
                _ => break,
            }
        }
        if let (Some((session, _)), true) = (lease, hits > 0) {
            // The limits are checked before anything changes: a refused lease counts nothing.
            let bytes: u64 = keys[..hits].iter().filter_map(|k| self.entries.get(&(nsid, *k))).map(|e| e.len).sum();
            self.check_lease_limits(session, hits, bytes)?;
        }
        self.counters.hit_chunks += hits as u64;
        self.counters.miss_chunks += (keys.len() - hits) as u64;
        for key in &keys[..hits] {
            self.touch((nsid, *key));
        }
        let mut result = LookupResult { hits, ..Default::default() };
        if let (Some((session, ttl)), true) = (lease, hits > 0) {
            let lease_id = self.next_id();
            let expires = now + ttl;
            let mut bytes = 0;
            for key in &keys[..hits] {
                let k = (nsid, *key);
                if let Some(e) = self.entries.get_mut(&k) {
                    e.leases += 1;
                    bytes += e.len;
                    result.locations.push(Location { tier: e.tier, offset: e.offset, len: e.len });
                }
                self.refile(k);
            }
            let lease =
                Lease { session, ns: nsid, keys: keys[..hits].to_vec(), expires, inflight: 0, doomed: false, bytes };
            self.leases.insert(lease_id, lease);
            self.namespaces.retain(nsid);
            self.lease_keys += hits;
            let u = self.usage_mut(session);
            u.leases += 1;
            u.leased_bytes += bytes;
            result.lease = Some((lease_id, expires));
        }
        Ok(result)
    }

    pub(super) fn check_lease_limits(&self, session: SessionId, chunks: usize, bytes: u64) -> Result<()> {
        let u = self.usage.get(&session).copied().unwrap_or_default();
        if u.leases >= self.cfg.max_leases_per_session {
            return Err(IndexError::limit(
                "max_leases_per_session",
                format!(
                    "the session holds {} leases; the limit (max_leases_per_session) is {}: release some",
                    u.leases, self.cfg.max_leases_per_session
                ),
            ));
        }
        if u.leased_bytes.saturating_add(bytes) > self.cfg.max_leased_bytes_per_session {
            return Err(IndexError::limit(
                "max_leased_bytes_per_session",
                format!(
                    "the session would hold {} bytes leased; the limit (max_leased_bytes_per_session) is {}",
                    u.leased_bytes.saturating_add(bytes),
                    self.cfg.max_leased_bytes_per_session
                ),
            ));
        }
        if self.lease_keys + chunks > self.cfg.max_lease_keys {
            return Err(IndexError::limit(
                "max_lease_keys",
                format!(
                    "leases pin {} chunks in all; the limit (max_lease_keys) is {}",
                    self.lease_keys + chunks,
                    self.cfg.max_lease_keys
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn own_lease(&self, lease_id: LeaseId, session: SessionId) -> Result<&Lease> {
        match self.leases.get(&lease_id) {
            Some(l) if l.doomed => Err(IndexError::not_found(format!("lease {lease_id} was released or expired"))),
            None => Err(IndexError::not_found(format!("no lease {lease_id} (unknown, released or expired)"))),
            Some(l) if l.session != session => {
                Err(IndexError::denied(format!("lease {lease_id} belongs to another session")))
            }
            Some(l) => Ok(l),
        }
    }

    /// The location of chunk `index` of a live lease.
    pub fn lease_chunk(&self, lease_id: LeaseId, session: SessionId, index: u32, now: Instant) -> Result<Location> {
        let l = self.own_lease(lease_id, session)?;
        if now > l.expires {
            return Err(IndexError::expired(format!("lease {lease_id} expired")));
        }
        let key = l.keys.get(index as usize).ok_or_else(|| {
            IndexError::invalid(format!("lease {lease_id} has {} chunks, no index {index}", l.keys.len()))
        })?;
        let e = self.entries.get(&(l.ns, *key)).ok_or_else(|| IndexError::not_found("leased entry vanished"))?;
        Ok(Location { tier: e.tier, offset: e.offset, len: e.len })
    }

    /// Number of chunks a lease pins.
    pub fn lease_len(&self, lease_id: LeaseId, session: SessionId) -> Result<usize> {
        Ok(self.own_lease(lease_id, session)?.keys.len())
    }

    /// Pins a live lease while its chunks are sent out (the active-message path): it is not
    /// released before [`Index::unpin_lease`], whatever happens to it meanwhile.
    pub fn pin_lease(&mut self, lease_id: LeaseId, session: SessionId, now: Instant) -> Result<usize> {
        let l = self.own_lease(lease_id, session)?;
        if now > l.expires {
            return Err(IndexError::expired(format!("lease {lease_id} expired")));
        }
        let n = l.keys.len();
        if let Some(l) = self.leases.get_mut(&lease_id) {
            l.inflight += 1;
        }
        Ok(n)
    }

    pub fn unpin_lease(&mut self, lease_id: LeaseId) {
        let Some(l) = self.leases.get_mut(&lease_id) else {
            return;
        };
        l.inflight = l.inflight.saturating_sub(1);
        if l.doomed && l.inflight == 0 {
            self.drop_lease(lease_id);
        }
    }

    pub fn release(&mut self, lease_id: LeaseId, session: SessionId) -> Result<()> {
        self.own_lease(lease_id, session)?;
        self.drop_lease(lease_id);
        Ok(())
    }

    pub(super) fn drop_lease(&mut self, lease_id: LeaseId) {
        match self.leases.get_mut(&lease_id) {
            None => return,
            Some(l) if l.inflight > 0 => {
                l.doomed = true;
                return;
            }
            Some(_) => {}
        }
        let Some(l) = self.leases.remove(&lease_id) else {
            return;
        };
        self.lease_keys = self.lease_keys.saturating_sub(l.keys.len());
        if let Some(u) = self.usage.get_mut(&l.session) {
            u.leases = u.leases.saturating_sub(1);
            u.leased_bytes = u.leased_bytes.saturating_sub(l.bytes);
        }
        self.tidy_usage(l.session);
        for key in &l.keys {
            let k = (l.ns, *key);
            if let Some(e) = self.entries.get_mut(&k) {
                e.leases = e.leases.saturating_sub(1);
            }
            self.refile(k);
        }
        self.namespaces.release(l.ns);
    }
}
