//! The prefix index: namespace + chunk key → entry, with two-phase puts, leases and leaf-first
//! LRU eviction. Single-threaded by design (`&mut self`): the server wraps it in one mutex, since
//! eviction and accounting need one consistent view and every call is short (O(keys · log n)).
//!
//! ```text
//!  begin_put ──► Reserved ──commit──► Ready ◄──► Leased (leases > 0)
//!                  │  (invisible)       │
//!     abort/expiry ▼                    ▼ evict (leaf, unleased, least recent) / delete
//!                 freed               freed
//! ```
//! Eviction candidates are exactly the Ready entries with no lease and no children (leaves), so
//! a prefix is trimmed from its end: lookups walk from the front and stop at the first miss.
//! Demotion (a copy to the next slower tier) leaves the entry where lookups find it, so its
//! candidates are every Ready, unleased entry of the tier, least recent first, leaves or not: a
//! GPU tier must not fill up with the inner chunks of long prompts while new chunks go to host
//! memory (measured on 2x H200: every 8k-token prompt after the first twenty read at PCIe speed).

use crate::alloc::Allocator;
use crate::error::{IndexError, Result};
use crate::namespaces::{Namespaces, NsId};
use crate::tier::Tier;
use prefixd_proto::keys::ChunkKey;
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

pub type SessionId = u64;
pub type PutId = u64;
pub type LeaseId = u64;

/// Limits the index enforces (all from the server's configuration).
#[derive(Debug, Clone)]
pub struct IndexConfig {
    /// Capacity of each tier's pool in bytes.
    pub tiers: Vec<(Tier, u64)>,
    /// Largest chunk.
    pub max_chunk_size: u64,
    /// Most keys in one request.
    pub max_keys: usize,
    /// Most namespaces alive at once (holding chunks, puts or leases).
    pub max_namespaces: usize,
    /// Most bytes one session may hold reserved (begun, uncommitted puts): no single client can
    /// take the whole pool.
    pub max_reserved_bytes_per_session: u64,
    /// Most leases one session may hold at once.
    pub max_leases_per_session: usize,
    /// Most bytes one session may hold leased.
    pub max_leased_bytes_per_session: u64,
    /// Most chunk references all leases together may hold (each costs a key in memory).
    pub max_lease_keys: usize,
    /// Start background eviction above this fraction of a pool ...
    pub high_watermark: f64,
    /// ... and stop below this one.
    pub low_watermark: f64,
    /// How long after its deadline an expired reservation or lease is actually freed. Clients
    /// that move bytes by RMA stop at the deadline they were told; the grace keeps a late
    /// transfer from touching a slot that was already handed to someone else.
    pub grace: Duration,
}

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig {
            tiers: vec![(Tier::Host, 1 << 30)],
            max_chunk_size: 256 << 20,
            max_keys: prefixd_proto::limits::MAX_KEYS_PER_REQUEST,
            max_namespaces: 65536,
            max_reserved_bytes_per_session: u64::MAX,
            max_leases_per_session: 4096,
            max_leased_bytes_per_session: u64::MAX,
            max_lease_keys: 1 << 20,
            high_watermark: 0.95,
            low_watermark: 0.85,
            grace: Duration::from_secs(2),
        }
    }
}

type EntryKey = (NsId, ChunkKey);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Reserved(PutId),
    Ready,
    /// Demoted to a slower tier: the entry already names its new slot, but the bytes are still
    /// being copied there (outside the index lock). Not found by lookups, never evicted or
    /// deleted, until [`Index::finish_move`] makes it Ready or drops it.
    Moving,
}

#[derive(Debug, Clone)]
struct Entry {
    state: State,
    tier: Tier,
    offset: u64,
    len: u64,
    parent: Option<ChunkKey>,
    /// Entries (Reserved or Ready) whose parent is this one.
    children: u32,
    leases: u32,
    /// Recency stamp; the key into its tier's orders while evictable or demotable.
    tick: u64,
}

/// Where a chunk's bytes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub tier: Tier,
    pub offset: u64,
    pub len: u64,
}

/// A chunk demoted from a faster tier to a slower one. The index has already recorded the new
/// location, with the chunk Moving; the caller copies the bytes from `from` to `to` (the index
/// need not be held) before the put that took `from` gets its slot, then calls
/// [`Index::finish_move`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub from: Location,
    pub to: Location,
    entry: EntryKey,
}

/// Bytes by tier (for metrics that say which path the bytes took).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierBytes {
    pub gpu: u64,
    pub host: u64,
}

impl TierBytes {
    pub fn add(&mut self, tier: Tier, len: u64) {
        match tier {
            Tier::Gpu => self.gpu += len,
            Tier::Host => self.host += len,
        }
    }

    pub fn total(&self) -> u64 {
        self.gpu + self.host
    }
}

/// One slot of a [`BeginPut`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Already cached or being written by another put: skip.
    Present,
    /// Write here, then commit.
    Reserved(Location),
}

#[derive(Debug, Clone)]
pub struct BeginPut {
    pub put_id: PutId,
    pub slots: Vec<Slot>,
    pub expires: Instant,
}

#[derive(Debug, Clone)]
struct Put {
    session: SessionId,
    ns: NsId,
    /// (index in the request, key) of each reserved chunk.
    reserved: Vec<(u32, ChunkKey)>,
    /// Active-message puts: the state of each reserved chunk's data. RMA puts: None.
    received: Option<Vec<Arrival>>,
    expires: Instant,
    /// Active-message receives into this put's slots still in flight.
    inflight: u32,
    /// Aborted or expired while receives were in flight: freed when the last one ends.
    doomed: bool,
    /// A doomed put's slots, taken out of the index at once (their keys are free for other
    /// producers) but still allocated until the last receive into them ends.
    zombies: Vec<(Tier, u64, u64)>,
    /// Bytes this put holds reserved (allocator footprints), counted against its session.
    reserved_bytes: u64,
    /// An RMA put that ended without its commit (expired, or its session ended) while its
    /// writer may still write the slots (a stalled process, an RMA put in flight): the slots
    /// stay allocated, out of the index, until [`Index::release_quarantine`] says the writer is
    /// gone. Its bytes still count against the session.
    quarantined: bool,
}

/// What one session holds, for the per-session limits.
#[derive(Debug, Clone, Copy, Default)]
struct SessionUsage {
    reserved_bytes: u64,
    leased_bytes: u64,
    leases: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    Waiting,
    Receiving,
    Received,
}

#[derive(Debug, Clone)]
struct Lease {
    session: SessionId,
    ns: NsId,
    keys: Vec<ChunkKey>,
    expires: Instant,
    /// Sends out of this lease's chunks still in flight (the active-message path).
    inflight: u32,
    /// Released or expired while sends were in flight: released when the last one ends.
    doomed: bool,
    /// Bytes of the leased chunks, counted against the session.
    bytes: u64,
}

#[derive(Debug, Clone, Default)]
pub struct LookupResult {
    pub hits: usize,
    pub lease: Option<(LeaseId, Instant)>,
    /// Locations of the hit chunks (only when leased).
    pub locations: Vec<Location>,
}

/// Counters the server exports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub hit_chunks: u64,
    pub miss_chunks: u64,
    pub evictions: u64,
    pub demotions: u64,
    pub expired_puts: u64,
    pub expired_leases: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierUsage {
    pub tier: Tier,
    pub used: u64,
    pub capacity: u64,
    pub entries: u64,
}

/// What expiry reclaimed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expired {
    pub puts: usize,
    pub leases: usize,
}

/// One tier's candidates, least recent first.
#[derive(Debug, Default)]
struct TierOrder {
    /// Ready, unleased leaves: may be evicted.
    evictable: BTreeSet<(u64, EntryKey)>,
    /// Ready, unleased entries: may be moved to a slower tier.
    demotable: BTreeSet<(u64, EntryKey)>,
}

#[derive(Debug)]
pub struct Index {
    cfg: IndexConfig,
    pools: Vec<(Tier, Allocator)>,
    namespaces: Namespaces,
    entries: HashMap<EntryKey, Entry>,
    usage: HashMap<SessionId, SessionUsage>,
    /// Chunk references held by all leases.
    lease_keys: usize,
    /// Parallel to `pools`.
    orders: Vec<TierOrder>,
    puts: HashMap<PutId, Put>,
    leases: HashMap<LeaseId, Lease>,
    tick: u64,
    next_id: u64,
    counters: Counters,
    /// Demotions recorded but not yet handed to the caller.
    moves: Vec<Move>,
}

impl Index {
    pub fn new(cfg: IndexConfig) -> Self {
        let pools: Vec<(Tier, Allocator)> = cfg.tiers.iter().map(|&(t, cap)| (t, Allocator::new(cap))).collect();
        let orders = pools.iter().map(|_| TierOrder::default()).collect();
        Index {
            pools,
            namespaces: Namespaces::new(cfg.max_namespaces),
            entries: HashMap::new(),
            usage: HashMap::new(),
            lease_keys: 0,
            orders,
            puts: HashMap::new(),
            leases: HashMap::new(),
            tick: 0,
            next_id: 1,
            counters: Counters::default(),
            moves: Vec::new(),
            cfg,
        }
    }

    pub fn config(&self) -> &IndexConfig {
        &self.cfg
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn check_keys(&self, keys: &[ChunkKey]) -> Result<()> {
        if keys.is_empty() {
            return Err(IndexError::invalid("no keys"));
        }
        if keys.len() > self.cfg.max_keys {
            return Err(IndexError::invalid(format!("{} keys exceed the limit of {}", keys.len(), self.cfg.max_keys)));
        }
        Ok(())
    }

    fn check_namespace(ns: &str) -> Result<()> {
        if ns.is_empty() || ns.len() > prefixd_proto::limits::MAX_NAMESPACE_LEN {
            return Err(IndexError::invalid(format!(
                "namespace must be 1..={} bytes, got {}",
                prefixd_proto::limits::MAX_NAMESPACE_LEN,
                ns.len()
            )));
        }
        Ok(())
    }

    fn ns_lookup(&self, ns: &str) -> Option<NsId> {
        self.namespaces.lookup(ns)
    }

    fn usage_mut(&mut self, session: SessionId) -> &mut SessionUsage {
        self.usage.entry(session).or_default()
    }

    /// Forgets a session's usage record once it holds nothing.
    fn tidy_usage(&mut self, session: SessionId) {
        if self.usage.get(&session).is_some_and(|u| u.reserved_bytes == 0 && u.leases == 0) {
            self.usage.remove(&session);
        }
    }

    fn pool_mut(&mut self, tier: Tier) -> Option<&mut Allocator> {
        self.pools.iter_mut().find(|(t, _)| *t == tier).map(|(_, a)| a)
    }

    fn is_demotable(e: &Entry) -> bool {
        e.state == State::Ready && e.leases == 0
    }

    fn is_evictable(e: &Entry) -> bool {
        Self::is_demotable(e) && e.children == 0
    }

    fn tier_index(&self, tier: Tier) -> Option<usize> {
        self.pools.iter().position(|(t, _)| *t == tier)
    }

    /// Takes an entry out of its tier's orders (before any change to its tier, tick or state).
    fn unfile(&mut self, k: EntryKey) {
        let Some((tier, tick)) = self.entries.get(&k).map(|e| (e.tier, e.tick)) else {
            return;
        };
        if let Some(i) = self.tier_index(tier) {
            self.orders[i].evictable.remove(&(tick, k));
            self.orders[i].demotable.remove(&(tick, k));
        }
    }

    /// Files an entry in its tier's orders as its state allows.
    fn file(&mut self, k: EntryKey) {
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
    fn refile(&mut self, k: EntryKey) {
        self.unfile(k);
        self.file(k);
    }

    fn touch(&mut self, k: EntryKey) {
        let tick = self.next_tick();
        self.unfile(k);
        if let Some(e) = self.entries.get_mut(&k) {
            e.tick = tick;
        }
        self.file(k);
    }

    /// The least recent evictable entry of a tier.
    fn eviction_victim(&self, tier: Tier) -> Option<EntryKey> {
        self.orders[self.tier_index(tier)?].evictable.first().map(|(_, k)| *k)
    }

    fn add_child(&mut self, ns: NsId, parent: Option<ChunkKey>, delta: i32) {
        let Some(p) = parent else { return };
        let pk = (ns, p);
        if let Some(e) = self.entries.get_mut(&pk) {
            e.children = e.children.saturating_add_signed(delta);
            self.refile(pk);
        }
    }

    /// Removes an entry, frees its bytes and unlinks it from its parent and children.
    fn remove_entry(&mut self, k: EntryKey) -> Option<Entry> {
        let e = self.detach_entry(k)?;
        if let Some(pool) = self.pool_mut(e.tier) {
            pool.free(e.offset, e.len);
        }
        Some(e)
    }

    /// Takes an entry out of the index (unlinked from parent and children) but leaves its bytes
    /// allocated: the caller frees them, now or once nothing writes them any more.
    fn detach_entry(&mut self, k: EntryKey) -> Option<Entry> {
        self.unfile(k);
        let e = self.entries.remove(&k)?;
        self.namespaces.release(k.0);
        self.add_child(k.0, e.parent, -1);
        if e.children > 0 {
            // Orphan the children: they stay reachable only through their own prefix walk.
            let orphans: Vec<EntryKey> =
                self.entries.iter().filter(|(ck, c)| ck.0 == k.0 && c.parent == Some(k.1)).map(|(ck, _)| *ck).collect();
            for ck in orphans {
                if let Some(c) = self.entries.get_mut(&ck) {
                    c.parent = None;
                }
            }
        }
        Some(e)
    }

    /// Evicts least-recent leaves of `tier` until `len` bytes can be allocated there; returns
    /// the offset, or `None` when eviction runs out of candidates.
    fn alloc_evicting(&mut self, tier: Tier, len: u64) -> Option<u64> {
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
    fn lower_tier(&self, tier: Tier) -> Option<Tier> {
        let i = self.pools.iter().position(|(t, _)| *t == tier)?;
        self.pools.get(i + 1).map(|(t, _)| *t)
    }

    /// Allocates in `tier`, making room by demoting its least-recent leaves to the next slower
    /// tier (a copy, recorded in `moves`) or, in the slowest tier, by evicting them.
    fn alloc_demoting(&mut self, tier: Tier, len: u64) -> Option<u64> {
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
    fn alloc_in_tiers(&mut self, len: u64) -> Option<(Tier, u64)> {
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
                Entry { state: State::Reserved(put_id), tier, offset, len: size, parent, children: 0, leases: 0, tick },
            );
            self.namespaces.retain(nsid);
            self.add_child(nsid, parent, 1);
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
    fn unhold_put(&mut self, p: &Put) {
        if let Some(u) = self.usage.get_mut(&p.session) {
            u.reserved_bytes = u.reserved_bytes.saturating_sub(p.reserved_bytes);
        }
        self.tidy_usage(p.session);
        self.namespaces.release(p.ns);
    }

    fn own_put(&self, put_id: PutId, session: SessionId) -> Result<&Put> {
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
    fn bury_put(&mut self, put_id: PutId) {
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

    fn drop_put(&mut self, put_id: PutId) -> u32 {
        self.end_put(put_id, false)
    }

    /// Ends a put without its commit. With `fence` (it expired, or its session ended: its
    /// writer did not say it stopped), an RMA put's slots go to quarantine instead of the free
    /// list: a stalled writer that wakes up writes there, not into another tenant's chunk.
    fn end_put(&mut self, put_id: PutId, fence: bool) -> u32 {
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

    fn check_lease_limits(&self, session: SessionId, chunks: usize, bytes: u64) -> Result<()> {
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

    fn own_lease(&self, lease_id: LeaseId, session: SessionId) -> Result<&Lease> {
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

    fn drop_lease(&mut self, lease_id: LeaseId) {
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

    /// Removes Ready, unleased chunks; returns (deleted, skipped because leased).
    pub fn delete(&mut self, ns: &str, keys: &[ChunkKey]) -> Result<(u32, u32)> {
        Self::check_namespace(ns)?;
        self.check_keys(keys)?;
        let Some(nsid) = self.ns_lookup(ns) else {
            return Ok((0, 0));
        };
        let (mut deleted, mut leased) = (0, 0);
        for key in keys {
            let k = (nsid, *key);
            match self.entries.get(&k) {
                Some(e) if e.state == State::Ready && e.leases == 0 => {
                    self.remove_entry(k);
                    deleted += 1;
                }
                // Leased, or Moving (a demotion's copy in flight): not deleted now.
                Some(e) if matches!(e.state, State::Ready | State::Moving) => leased += 1,
                _ => {}
            }
        }
        Ok((deleted, leased))
    }

    /// Frees everything a session holds: its reservations and its leases.
    pub fn drop_session(&mut self, session: SessionId) -> Expired {
        let puts: Vec<PutId> =
            self.puts.iter().filter(|(_, p)| p.session == session && !p.doomed).map(|(id, _)| *id).collect();
        let leases: Vec<LeaseId> =
            self.leases.iter().filter(|(_, l)| l.session == session && !l.doomed).map(|(id, _)| *id).collect();
        for p in &puts {
            self.end_put(*p, true);
        }
        for l in &leases {
            self.drop_lease(*l);
        }
        Expired { puts: puts.len(), leases: leases.len() }
    }

    /// Frees reservations and leases whose deadline has passed.
    /// (Deadline plus the grace period.)
    pub fn expire(&mut self, now: Instant) -> Expired {
        let grace = self.cfg.grace;
        let puts: Vec<PutId> =
            self.puts.iter().filter(|(_, p)| !p.doomed && now > p.expires + grace).map(|(id, _)| *id).collect();
        let leases: Vec<LeaseId> =
            self.leases.iter().filter(|(_, l)| !l.doomed && now > l.expires + grace).map(|(id, _)| *id).collect();
        for p in &puts {
            self.end_put(*p, true);
        }
        for l in &leases {
            self.drop_lease(*l);
        }
        self.counters.expired_puts += puts.len() as u64;
        self.counters.expired_leases += leases.len() as u64;
        Expired { puts: puts.len(), leases: leases.len() }
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    pub fn entries(&self) -> usize {
        self.entries.len()
    }

    pub fn active_leases(&self) -> usize {
        self.leases.len()
    }

    /// Puts begun and not yet committed, aborted or expired.
    pub fn active_reservations(&self) -> usize {
        self.puts.values().filter(|p| !p.doomed).count()
    }

    pub fn usage(&self) -> Vec<TierUsage> {
        self.pools
            .iter()
            .map(|(t, a)| TierUsage {
                tier: *t,
                used: a.used(),
                capacity: a.capacity(),
                entries: self.entries.values().filter(|e| e.tier == *t).count() as u64,
            })
            .collect()
    }

    /// Checks every structural invariant; for tests. Returns the first violation found.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
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
            let children = self.entries.iter().filter(|(ck, c)| ck.0 == k.0 && c.parent == Some(k.1)).count() as u32;
            if children != e.children {
                return Err(format!("{:?} counts {} children, has {children}", k.1, e.children));
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
