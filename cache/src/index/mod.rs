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
//! Demotion (a copy to the next slower tier) keeps the entry in its chain, so its candidates are
//! every Ready, unleased entry of the tier, least recent first, leaves or not: a GPU tier must not
//! fill up with the inner chunks of long prompts while new chunks go to host memory (measured on
//! 2x H200: every 8k-token prompt after the first twenty read at PCIe speed). While its bytes are
//! copied (by the caller, outside the lock) a demoted entry is Moving: invisible, never evicted.
//!
//! The parts: this file holds the types and entry bookkeeping; `tiers` the LRU orders, room
//! making and demotion; `puts` two-phase puts; `leases` lookups and leases; `cleanup` deletes,
//! dead sessions and expiry; `invariants` the checks the randomized tests run.

use crate::alloc::Allocator;
use crate::error::{IndexError, Result};
use crate::namespaces::{Namespaces, NsId};
use crate::tier::Tier;
use prefixd_proto::keys::ChunkKey;
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

mod cleanup;
mod invariants;
mod leases;
mod puts;
mod tiers;

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
    /// Entries (Reserved, Ready or Moving) whose parent is this one: a chain has one, a shared
    /// prefix a few.
    children: Vec<ChunkKey>,
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
    /// Entries in this tier, in any state (kept as they come and go: stats and every metrics
    /// scrape read it, and 4e6c6e7 counted them by scanning every entry under the lock).
    entries: u64,
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

    fn tier_index(&self, tier: Tier) -> Option<usize> {
        self.pools.iter().position(|(t, _)| *t == tier)
    }

    /// Counts an entry into (`came`) or out of `tier`.
    fn count_entry(&mut self, tier: Tier, came: bool) {
        if let Some(i) = self.tier_index(tier) {
            let n = &mut self.orders[i].entries;
            *n = if came { *n + 1 } else { n.saturating_sub(1) };
        }
    }

    /// Links `child` under `parent` (`linked`) or unlinks it.
    fn link_child(&mut self, ns: NsId, parent: Option<ChunkKey>, child: ChunkKey, linked: bool) {
        let Some(p) = parent else { return };
        let pk = (ns, p);
        if let Some(e) = self.entries.get_mut(&pk) {
            if linked {
                e.children.push(child);
            } else {
                e.children.retain(|c| *c != child);
            }
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
        self.count_entry(e.tier, false);
        self.namespaces.release(k.0);
        self.link_child(k.0, e.parent, k.1, false);
        // Orphan the children: they stay reachable only through their own prefix walk. (Found
        // from the entry's own list: 4e6c6e7 scanned every entry, under the lock, per removal.)
        for c in &e.children {
            if let Some(c) = self.entries.get_mut(&(k.0, *c)) {
                c.parent = None;
            }
        }
        Some(e)
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

    /// Per lease: its session, and the sends out of it still in flight (for a drain that times
    /// out: who holds it up).
    pub fn lease_holders(&self) -> Vec<(SessionId, u32)> {
        self.leases.values().map(|l| (l.session, l.inflight)).collect()
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
                entries: self.tier_index(*t).map_or(0, |i| self.orders[i].entries),
            })
            .collect()
    }
}
