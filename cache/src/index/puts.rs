//! Two-phase puts: reserve slots (Reserved, invisible), receive active-message data, commit
//! (Ready) or abort; a put whose writer may still be writing is fenced and its slots quarantined.

use super::*;

impl Index {
    /// Reserves slots for the keys not yet present. All or nothing: when the pool cannot hold
    /// every new chunk even after eviction, nothing is reserved (RESOURCE_EXHAUSTED).
    #[allow(clippy::too_many_arguments)]
    pub fn begin_put(
        &mut self,
        session: SessionId,
        ns: &str,
        keys: &[ChunkKey],
        sizes: &[u64],
        parent: Option<ChunkKey>,
        active_message: bool,
        now: Instant,
        ttl: Duration,
    ) -> Result<BeginPut> {
        Self::check_namespace(ns)?;
        self.check_keys(keys)?;
        if sizes.len() != keys.len() {
            return Err(IndexError::invalid(format!("{} keys but {} sizes", keys.len(), sizes.len())));
        }
        for (i, &s) in sizes.iter().enumerate() {
            if s == 0 || s > self.cfg.max_chunk_size {
                return Err(IndexError::invalid(format!(
                    "chunk {i}: size {s} outside 1..={}",
                    self.cfg.max_chunk_size
                )));
            }
        }
        let total: u64 = sizes.iter().map(|&s| Allocator::footprint(s)).sum();
        let capacity: u64 = self.pools.iter().map(|(_, a)| a.capacity()).sum();
        if total > capacity {
            return Err(IndexError::exhausted(format!("put of {total} bytes exceeds the pools' {capacity} bytes")));
        }
        let nsid = self.namespaces.intern(ns)?;
        // The put's own reference, taken first: eviction below may remove the namespace's last
        // chunks, and the namespace must not go while this put fills it.
        self.namespaces.retain(nsid);
        // The session's reservation limit, counted over the chunks not cached yet.
        let new_bytes: u64 = keys
            .iter()
            .zip(sizes)
            .filter(|(k, _)| !self.entries.contains_key(&(nsid, **k)))
            .map(|(_, &s)| Allocator::footprint(s))
            .sum();
        let held = self.usage.get(&session).map_or(0, |u| u.reserved_bytes);
        if held.saturating_add(new_bytes) > self.cfg.max_reserved_bytes_per_session {
            self.namespaces.release(nsid);
            return Err(IndexError::limit(
                "max_reserved_bytes_per_session",
                format!(
                    "the session would hold {} bytes reserved (it holds {held}); the limit \
                 (max_reserved_bytes_per_session) is {}",
                    held.saturating_add(new_bytes),
                    self.cfg.max_reserved_bytes_per_session
                ),
            ));
        }
        let put_id = self.next_id();
        let mut slots = Vec::with_capacity(keys.len());
        let mut reserved: Vec<(u32, ChunkKey)> = Vec::new();
        let mut reserved_bytes = 0;
        let mut prev = parent;
        for (i, (&key, &size)) in keys.iter().zip(sizes).enumerate() {
            let k = (nsid, key);
            if self.entries.contains_key(&k) || reserved.iter().any(|(_, r)| *r == key) {
                slots.push(Slot::Present);
                prev = Some(key);
                continue;
            }
            let Some((tier, offset)) = self.alloc_in_tiers(size) else {
                // Roll back: nothing of this put stays.
                for (_, rk) in reserved {
                    self.remove_entry((nsid, rk));
                }
                self.namespaces.release(nsid);
                return Err(IndexError::exhausted(format!(
                    "no room for chunk {i} ({size} bytes): everything left is reserved or leased"
                )));
            };
            let tick = self.next_tick();
            // Eviction above may have taken the parent; then the chain starts here.
            let parent = prev.filter(|p| self.entries.contains_key(&(nsid, *p)));
            self.entries.insert(
                k,
                Entry {
                    state: State::Reserved(put_id),
                    tier,
                    offset,
                    len: size,
                    parent,
                    children: Vec::new(),
                    leases: 0,
                    tick,
                },
            );
            self.count_entry(tier, true);
            self.namespaces.retain(nsid);
            self.link_child(nsid, parent, key, true);
            reserved.push((i as u32, key));
            reserved_bytes += Allocator::footprint(size);
            slots.push(Slot::Reserved(Location { tier, offset, len: size }));
            prev = Some(key);
        }
        let expires = now + ttl;
        let received = active_message.then(|| vec![Arrival::Waiting; reserved.len()]);
        self.usage_mut(session).reserved_bytes += reserved_bytes;
        let put = Put {
            session,
            ns: nsid,
            reserved,
            received,
            expires,
            inflight: 0,
            doomed: false,
            zombies: Vec::new(),
            reserved_bytes,
            quarantined: false,
        };
        self.puts.insert(put_id, put);
        Ok(BeginPut { put_id, slots, expires })
    }

    /// Ends a put's hold on its session's reservation and its namespace.
    pub(super) fn unhold_put(&mut self, p: &Put) {
        if let Some(u) = self.usage.get_mut(&p.session) {
            u.reserved_bytes = u.reserved_bytes.saturating_sub(p.reserved_bytes);
        }
        self.tidy_usage(p.session);
        self.namespaces.release(p.ns);
    }

    pub(super) fn own_put(&self, put_id: PutId, session: SessionId) -> Result<&Put> {
        match self.puts.get(&put_id) {
            Some(p) if p.doomed => Err(IndexError::not_found(format!("put {put_id} was aborted or expired"))),
            None => Err(IndexError::not_found(format!("no put {put_id} (unknown, committed, aborted or expired)"))),
            Some(p) if p.session != session => {
                Err(IndexError::denied(format!("put {put_id} belongs to another session")))
            }
            Some(p) => Ok(p),
        }
    }

    /// Starts receiving an active-message put's chunk `index` (index in the BeginPut request):
    /// returns where its bytes go. The slot stays reserved until [`Index::end_receive`], even if
    /// the put is aborted or expires meanwhile, so a late write never lands in someone else's slot.
    pub fn begin_receive(&mut self, put_id: PutId, session: SessionId, index: u32, now: Instant) -> Result<Location> {
        let p = self.own_put(put_id, session)?;
        if now > p.expires {
            return Err(IndexError::expired(format!("put {put_id} expired")));
        }
        let pos = p
            .reserved
            .iter()
            .position(|(i, _)| *i == index)
            .ok_or_else(|| IndexError::invalid(format!("put {put_id} has no reserved chunk at index {index}")))?;
        let key = p.reserved[pos].1;
        let ns = p.ns;
        match p.received.as_ref().map(|r| r[pos]) {
            None => return Err(IndexError::precondition(format!("put {put_id} uses RMA, not active messages"))),
            Some(Arrival::Waiting) => {}
            Some(_) => return Err(IndexError::precondition(format!("put {put_id}: chunk {index} was already sent"))),
        }
        let e = self.entries.get(&(ns, key)).ok_or_else(|| IndexError::not_found("reserved entry vanished"))?;
        let loc = Location { tier: e.tier, offset: e.offset, len: e.len };
        if let Some(p) = self.puts.get_mut(&put_id) {
            if let Some(r) = p.received.as_mut() {
                r[pos] = Arrival::Receiving;
            }
            p.inflight += 1;
        }
        Ok(loc)
    }

    /// Ends a receive started by [`Index::begin_receive`]; `ok` marks the chunk as arrived.
    pub fn end_receive(&mut self, put_id: PutId, index: u32, ok: bool) {
        let Some(p) = self.puts.get_mut(&put_id) else {
            return;
        };
        p.inflight = p.inflight.saturating_sub(1);
        if let (Some(pos), Some(r)) = (p.reserved.iter().position(|(i, _)| *i == index), p.received.as_mut()) {
            r[pos] = if ok { Arrival::Received } else { Arrival::Waiting };
        }
        if p.doomed && p.inflight == 0 && !p.quarantined {
            self.bury_put(put_id);
        }
    }

    /// Frees the slots of a doomed put once no receive writes them any more.
    pub(super) fn bury_put(&mut self, put_id: PutId) {
        let Some(p) = self.puts.remove(&put_id) else {
            return;
        };
        for &(tier, offset, len) in &p.zombies {
            if let Some(pool) = self.pool_mut(tier) {
                pool.free(offset, len);
            }
        }
        if p.quarantined {
            if let Some(u) = self.usage.get_mut(&p.session) {
                u.reserved_bytes = u.reserved_bytes.saturating_sub(p.reserved_bytes);
            }
            self.tidy_usage(p.session);
        }
        self.namespaces.release(p.ns);
    }

    /// Frees the quarantined slots of `session`'s RMA puts: its writer is gone (its process
    /// exited, or the session never had a way to write after its end). Returns (puts, bytes).
    pub fn release_quarantine(&mut self, session: SessionId) -> (usize, u64) {
        let ids: Vec<PutId> =
            self.puts.iter().filter(|(_, p)| p.quarantined && p.session == session).map(|(id, _)| *id).collect();
        let bytes = ids.iter().filter_map(|id| self.puts.get(id)).map(|p| p.reserved_bytes).sum();
        for id in &ids {
            self.bury_put(*id);
        }
        (ids.len(), bytes)
    }

    /// Bytes held in quarantine (see [`Index::release_quarantine`]).
    pub fn quarantined_bytes(&self) -> u64 {
        self.puts.values().filter(|p| p.quarantined).map(|p| p.reserved_bytes).sum()
    }

    /// How many reserved chunks of an active-message put have not arrived yet (0 for RMA).
    pub fn missing_chunks(&self, put_id: PutId, session: SessionId) -> Result<usize> {
        let p = self.own_put(put_id, session)?;
        Ok(p.received.as_ref().map_or(0, |r| r.iter().filter(|x| **x != Arrival::Received).count()))
    }

    /// Makes a put's chunks visible; returns how many chunks, and their bytes by tier. Fails (changing nothing) if the put is unknown, belongs to
    /// another session, expired, or still misses active-message data.
    pub fn commit_put(&mut self, put_id: PutId, session: SessionId, now: Instant) -> Result<(u32, TierBytes)> {
        let p = self.own_put(put_id, session)?;
        if now > p.expires {
            return Err(IndexError::expired(format!("put {put_id} expired before its commit")));
        }
        if let Some(r) = &p.received {
            let missing = r.iter().filter(|x| **x != Arrival::Received).count();
            if missing > 0 {
                return Err(IndexError::precondition(format!("put {put_id}: {missing} chunks have not arrived")));
            }
        }
        let p = self.puts.remove(&put_id).ok_or_else(|| IndexError::not_found("put vanished"))?;
        self.unhold_put(&p);
        let (mut n, mut bytes) = (0, TierBytes::default());
        for (_, key) in &p.reserved {
            let k = (p.ns, *key);
            if let Some(e) = self.entries.get_mut(&k) {
                e.state = State::Ready;
                n += 1;
                bytes.add(e.tier, e.len);
            }
            self.touch(k);
            self.refile(k);
        }
        self.evict_to_watermarks();
        Ok((n, bytes))
    }

    /// Frees a put's reservations.
    pub fn abort_put(&mut self, put_id: PutId, session: SessionId) -> Result<u32> {
        self.own_put(put_id, session)?;
        Ok(self.drop_put(put_id))
    }

    pub(super) fn drop_put(&mut self, put_id: PutId) -> u32 {
        self.end_put(put_id, false)
    }

    /// Ends a put without its commit. With `fence` (it expired, or its session ended: its
    /// writer did not say it stopped), an RMA put's slots go to quarantine instead of the free
    /// list: a stalled writer that wakes up writes there, not into another tenant's chunk.
    pub(super) fn end_put(&mut self, put_id: PutId, fence: bool) -> u32 {
        let (inflight, ns, reserved, rma) = match self.puts.get(&put_id) {
            None => return 0,
            Some(p) if p.doomed => return 0,
            Some(p) => (p.inflight, p.ns, p.reserved.clone(), p.received.is_none()),
        };
        let quarantine = fence && rma;
        let hold = inflight > 0 || quarantine;
        let mut n = 0;
        let mut zombies = Vec::new();
        // Children before parents, so each removal sees an up-to-date child count.
        for (_, key) in reserved.iter().rev() {
            let k = (ns, *key);
            if !matches!(self.entries.get(&k), Some(e) if e.state == State::Reserved(put_id)) {
                continue;
            }
            n += 1;
            if hold {
                // Receives (or a stalled RMA writer) may still write into this slot: out of the
                // index now (another producer may put the key), its bytes freed when the last
                // receive ends (or the quarantine is released).
                if let Some(e) = self.detach_entry(k) {
                    zombies.push((e.tier, e.offset, e.len));
                }
            } else {
                self.remove_entry(k);
            }
        }
        if hold {
            if let Some(p) = self.puts.get_mut(&put_id) {
                p.doomed = true;
                p.zombies = zombies;
                p.quarantined = quarantine;
            }
            // An AM zombie's slots no longer count against the session: its limit is about what
            // it can still use, and the session may be gone already. A quarantine does count:
            // a writer that keeps stalling cannot hold more than its share.
            if let Some(p) = self.puts.get(&put_id).filter(|p| !p.quarantined).cloned() {
                if let Some(u) = self.usage.get_mut(&p.session) {
                    u.reserved_bytes = u.reserved_bytes.saturating_sub(p.reserved_bytes);
                }
                self.tidy_usage(p.session);
            }
        } else if let Some(p) = self.puts.remove(&put_id) {
            self.unhold_put(&p);
        }
        n
    }
}
