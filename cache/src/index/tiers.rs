//! Tiers: the LRU orders that say what may be evicted or demoted, allocation that makes room
//! (demoting to the next slower tier, evicting in the slowest), and the end of a demotion's copy.

use super::*;

impl Index {
    pub(super) fn is_demotable(e: &Entry) -> bool {
        e.state == State::Ready && e.leases == 0
    }

    pub(super) fn is_evictable(e: &Entry) -> bool {
        Self::is_demotable(e) && e.children.is_empty()
    }

    /// Takes an entry out of its tier's orders (before any change to its tier, tick or state).
    pub(super) fn unfile(&mut self, k: EntryKey) {
        let Some((tier, tick)) = self.entries.get(&k).map(|e| (e.tier, e.tick)) else {
            return;
        };
        if let Some(i) = self.tier_index(tier) {
            self.orders[i].evictable.remove(&(tick, k));
            self.orders[i].demotable.remove(&(tick, k));
        }
    }

    /// Files an entry in its tier's orders as its state allows.
    pub(super) fn file(&mut self, k: EntryKey) {
        let Some(e) = self.entries.get(&k) else {
            return;
        };
        let (tick, evictable, demotable) = (e.tick, Self::is_evictable(e), Self::is_demotable(e));
        if let Some(i) = self.tier_index(e.tier) {
            if evictable {
                self.orders[i].evictable.insert((tick, k));
            }
            if demotable {
                self.orders[i].demotable.insert((tick, k));
            }
        }
    }

    /// Re-files an entry in its tier's orders after a change to its state.
    pub(super) fn refile(&mut self, k: EntryKey) {
        self.unfile(k);
        self.file(k);
    }

    pub(super) fn touch(&mut self, k: EntryKey) {
        let tick = self.next_tick();
        self.unfile(k);
        if let Some(e) = self.entries.get_mut(&k) {
            e.tick = tick;
        }
        self.file(k);
    }

    /// The least recent evictable entry of a tier.
    pub(super) fn eviction_victim(&self, tier: Tier) -> Option<EntryKey> {
        self.orders[self.tier_index(tier)?].evictable.first().map(|(_, k)| *k)
    }

    /// Evicts least-recent leaves of `tier` until `len` bytes can be allocated there; returns
    /// the offset, or `None` when eviction runs out of candidates.
    pub(super) fn alloc_evicting(&mut self, tier: Tier, len: u64) -> Option<u64> {
        loop {
            if let Some(off) = self.pool_mut(tier)?.alloc(len) {
                return Some(off);
            }
            let k = self.eviction_victim(tier)?;
            self.remove_entry(k);
            self.counters.evictions += 1;
        }
    }

    /// The next slower tier after `tier` (tiers are listed fastest first).
    pub(super) fn lower_tier(&self, tier: Tier) -> Option<Tier> {
        let i = self.pools.iter().position(|(t, _)| *t == tier)?;
        self.pools.get(i + 1).map(|(t, _)| *t)
    }

    /// Allocates in `tier`, making room by demoting its least-recent leaves to the next slower
    /// tier (a copy, recorded in `moves`) or, in the slowest tier, by evicting them.
    pub(super) fn alloc_demoting(&mut self, tier: Tier, len: u64) -> Option<u64> {
        let Some(lower) = self.lower_tier(tier) else {
            return self.alloc_evicting(tier, len);
        };
        loop {
            if let Some(off) = self.pool_mut(tier)?.alloc(len) {
                return Some(off);
            }
            let i = self.tier_index(tier)?;
            let (_, k) = *self.orders[i].demotable.first()?;
            let (from_off, vlen) = self.entries.get(&k).map(|e| (e.offset, e.len))?;
            match self.alloc_evicting(lower, vlen) {
                Some(to_off) => {
                    self.unfile(k);
                    if let Some(e) = self.entries.get_mut(&k) {
                        e.tier = lower;
                        e.offset = to_off;
                        e.state = State::Moving;
                    }
                    self.count_entry(tier, false);
                    self.count_entry(lower, true);
                    self.file(k);
                    self.pool_mut(tier)?.free(from_off, vlen);
                    self.moves.push(Move {
                        from: Location { tier, offset: from_off, len: vlen },
                        to: Location { tier: lower, offset: to_off, len: vlen },
                        entry: k,
                    });
                    self.counters.demotions += 1;
                }
                None => {
                    self.remove_entry(k);
                    self.counters.evictions += 1;
                }
            }
        }
    }

    /// A slot for a new chunk: the fastest tier that can make room (demoting its least-recent
    /// leaves), else the next one. Reserved and leased chunks never move, so a tier full of them
    /// sends the chunk down a tier instead of failing the put.
    pub(super) fn alloc_in_tiers(&mut self, len: u64) -> Option<(Tier, u64)> {
        let tiers: Vec<Tier> = self.pools.iter().filter(|(_, a)| a.could_fit(len)).map(|(t, _)| *t).collect();
        tiers.into_iter().find_map(|t| self.alloc_demoting(t, len).map(|off| (t, off)))
    }

    /// Demotions recorded since the last call: take them under the same hold of the index as
    /// the call that made them. Until [`Index::finish_move`], the chunk is Moving (nobody can
    /// lease it, at either place), its new slot is its own, and its old slot belongs to the
    /// reservation that needed the room, whose writer must not get the address before the copy
    /// is done. The copy itself needs no lock.
    pub fn take_moves(&mut self) -> Vec<Move> {
        std::mem::take(&mut self.moves)
    }

    /// Ends a demotion: with `copied`, the chunk is Ready at its new place; otherwise its new
    /// slot holds no valid bytes and the chunk is dropped (4e6c6e7 served such a slot as a hit).
    /// Returns whether the chunk is still cached.
    pub fn finish_move(&mut self, m: &Move, copied: bool) -> bool {
        let k = m.entry;
        let ours = self
            .entries
            .get(&k)
            .is_some_and(|e| e.state == State::Moving && e.tier == m.to.tier && e.offset == m.to.offset);
        if !ours {
            return false;
        }
        if !copied {
            self.remove_entry(k);
            return false;
        }
        self.unfile(k);
        if let Some(e) = self.entries.get_mut(&k) {
            e.state = State::Ready;
        }
        self.file(k);
        true
    }

    /// Evicts leaves while a tier is above its high watermark, down to the low one.
    pub fn evict_to_watermarks(&mut self) -> usize {
        let mut evicted = 0;
        // Faster tiers demote on demand instead; only the slowest one evicts ahead of time.
        let tiers: Vec<Tier> = self.pools.last().map(|(t, _)| *t).into_iter().collect();
        for tier in tiers {
            let (high, low) = {
                let Some(a) = self.pool_mut(tier) else {
                    continue;
                };
                let cap = a.capacity() as f64;
                (cap * self.cfg.high_watermark, cap * self.cfg.low_watermark)
            };
            let used = |s: &mut Self| s.pool_mut(tier).map_or(0.0, |a| a.used() as f64);
            if used(self) <= high {
                continue;
            }
            while used(self) > low {
                let Some(k) = self.eviction_victim(tier) else { break };
                self.remove_entry(k);
                self.counters.evictions += 1;
                evicted += 1;
            }
        }
        evicted
    }
}
