//! Randomized (property) tests: long random sequences of puts, commits, aborts, lookups,
//! leases, releases, deletes, session drops and expiry against a small pool, checking every
//! invariant after each step, plus the specific promises the server relies on.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use prefixd_cache::{ErrorKind, Index, IndexConfig, Slot, Tier};
use prefixd_proto::keys::ChunkKey;
use std::time::{Duration, Instant};

/// xorshift64*: deterministic, so a failing seed reproduces.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn key(prompt: u64, chunk: u64) -> ChunkKey {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&prompt.to_le_bytes());
    k[8..16].copy_from_slice(&chunk.to_le_bytes());
    ChunkKey(k)
}

fn small_index() -> Index {
    Index::new(IndexConfig {
        tiers: vec![(Tier::Host, 64 * 1024)],
        max_chunk_size: 16 * 1024,
        max_keys: 64,
        max_namespaces: 8,
        high_watermark: 0.9,
        low_watermark: 0.7,
        grace: Duration::ZERO,
        ..IndexConfig::default()
    })
}

#[test]
fn random_operations_keep_every_invariant() {
    for seed in 1..=40u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut idx = small_index();
        let t0 = Instant::now();
        let mut now = t0;
        let ttl = Duration::from_secs(5);
        let mut open_puts: Vec<(u64, u64)> = Vec::new(); // (put, session)
        let mut leases: Vec<(u64, u64, Vec<ChunkKey>)> = Vec::new(); // (lease, session, keys)
        for step in 0..400 {
            let ns = ["a", "b"][rng.below(2) as usize];
            let prompt = rng.below(6);
            let session = 1 + rng.below(3);
            let n = 1 + rng.below(5);
            let keys: Vec<ChunkKey> = (0..n).map(|c| key(prompt, c)).collect();
            match rng.below(10) {
                0..=2 => {
                    let sizes: Vec<u64> = keys.iter().map(|_| 1 + rng.below(8 * 1024)).collect();
                    if let Ok(b) = idx.begin_put(session, ns, &keys, &sizes, None, false, now, ttl) {
                        open_puts.push((b.put_id, session));
                    }
                }
                3 | 4 if !open_puts.is_empty() => {
                    let (p, s) = open_puts.swap_remove(rng.below(open_puts.len() as u64) as usize);
                    if rng.below(4) == 0 {
                        let _ = idx.abort_put(p, s); // may have expired or been dropped
                    } else {
                        let _ = idx.commit_put(p, s, now); // may have expired
                    }
                }
                5 | 6 => {
                    let lease = (rng.below(2) == 0).then_some((session, ttl));
                    let r = idx.lookup(ns, &keys, lease, now).unwrap();
                    if let Some((l, _)) = r.lease {
                        leases.push((l, session, keys[..r.hits].to_vec()));
                    }
                }
                7 if !leases.is_empty() => {
                    let (l, s, _) = leases.swap_remove(rng.below(leases.len() as u64) as usize);
                    let _ = idx.release(l, s); // may have expired
                }
                8 => {
                    let _ = idx.delete(ns, &keys);
                }
                _ => {
                    now += Duration::from_millis(rng.below(1500));
                    idx.expire(now);
                    if rng.below(10) == 0 {
                        idx.drop_session(session);
                    }
                    if rng.below(3) == 0 {
                        idx.release_quarantine(session); // its writer is gone
                    }
                }
            }
            if let Err(e) = idx.check_invariants() {
                panic!("seed {seed} step {step}: {e}");
            }
        }
    }
}

#[test]
fn reserved_chunks_are_invisible_until_commit() {
    let mut idx = small_index();
    let now = Instant::now();
    let keys = [key(1, 0), key(1, 1)];
    let b = idx.begin_put(1, "ns", &keys, &[100, 100], None, false, now, Duration::from_secs(5)).unwrap();
    assert!(b.slots.iter().all(|s| matches!(s, Slot::Reserved(_))));
    assert_eq!(idx.lookup("ns", &keys, None, now).unwrap().hits, 0, "no partial reads");
    // A second producer sees them as present (being written) and skips them.
    let b2 = idx.begin_put(2, "ns", &keys, &[100, 100], None, false, now, Duration::from_secs(5)).unwrap();
    assert!(b2.slots.iter().all(|s| *s == Slot::Present));
    assert_eq!(idx.commit_put(b.put_id, 1, now).unwrap().0, 2);
    assert_eq!(idx.lookup("ns", &keys, None, now).unwrap().hits, 2);
    // Namespaces never mix.
    assert_eq!(idx.lookup("other", &keys, None, now).unwrap().hits, 0);
    idx.check_invariants().unwrap();
}

#[test]
fn longest_prefix_stops_at_first_miss() {
    let mut idx = small_index();
    let now = Instant::now();
    let keys: Vec<ChunkKey> = (0..4).map(|c| key(2, c)).collect();
    let b = idx.begin_put(1, "ns", &keys[..2], &[10, 10], None, false, now, Duration::from_secs(5)).unwrap();
    idx.commit_put(b.put_id, 1, now).unwrap();
    let b = idx.begin_put(1, "ns", &keys[3..], &[10], Some(keys[2]), false, now, Duration::from_secs(5)).unwrap();
    idx.commit_put(b.put_id, 1, now).unwrap();
    assert_eq!(idx.lookup("ns", &keys, None, now).unwrap().hits, 2);
}

#[test]
fn leased_chunks_survive_pressure_and_expire() {
    let mut idx = small_index();
    let now = Instant::now();
    let ttl = Duration::from_secs(2);
    let keys = [key(3, 0)];
    let b = idx.begin_put(1, "ns", &keys, &[16 * 1024], None, false, now, ttl).unwrap();
    idx.commit_put(b.put_id, 1, now).unwrap();
    let r = idx.lookup("ns", &keys, Some((9, ttl)), now).unwrap();
    let (lease, _) = r.lease.unwrap();
    let loc = r.locations[0];
    // Fill the pool many times over: the leased chunk must neither move nor vanish.
    for p in 100..140 {
        let k = [key(p, 0)];
        if let Ok(b) = idx.begin_put(1, "ns", &k, &[16 * 1024], None, false, now, ttl) {
            idx.commit_put(b.put_id, 1, now).unwrap();
        }
        assert_eq!(idx.lease_chunk(lease, 9, 0, now).unwrap(), loc);
        idx.check_invariants().unwrap();
    }
    // Someone else's session cannot touch the lease.
    assert_eq!(idx.release(lease, 1).unwrap_err().kind, ErrorKind::PermissionDenied);
    // After the TTL the lease is gone (a dead consumer leaks nothing) and reads fail.
    let later = now + ttl + Duration::from_millis(1);
    assert_eq!(idx.lease_chunk(lease, 9, 0, later).unwrap_err().kind, ErrorKind::Expired);
    assert_eq!(idx.expire(later).leases, 1);
    assert_eq!(idx.active_leases(), 0);
    idx.check_invariants().unwrap();
}

#[test]
fn dead_producer_reservations_are_reclaimed() {
    let mut idx = small_index();
    let now = Instant::now();
    let ttl = Duration::from_secs(1);
    let keys: Vec<ChunkKey> = (0..3).map(|c| key(4, c)).collect();
    let b = idx.begin_put(7, "ns", &keys, &[16 * 1024; 3], None, false, now, ttl).unwrap();
    assert_eq!(idx.usage()[0].used, 3 * 16 * 1024);
    // The producer stalls: nothing is visible; after the TTL its keys are free for others, but
    // its slots stay out of use (it may still write them) until its writer is known gone.
    assert_eq!(idx.lookup("ns", &keys, None, now).unwrap().hits, 0);
    let later = now + ttl + Duration::from_millis(1);
    assert_eq!(idx.expire(later).puts, 1);
    assert_eq!(idx.commit_put(b.put_id, 7, later).unwrap_err().kind, ErrorKind::NotFound);
    assert_eq!(idx.quarantined_bytes(), 3 * 16 * 1024);
    let other = idx.begin_put(8, "other", &keys[..1], &[16 * 1024], None, false, later, ttl).unwrap();
    let slot = |s: &Slot| match s {
        Slot::Reserved(l) => l.offset,
        Slot::Present => panic!("not reserved"),
    };
    assert!(b.slots.iter().all(|s| slot(s) != slot(&other.slots[0])), "a quarantined slot was handed out again");
    idx.abort_put(other.put_id, 8).unwrap();
    idx.check_invariants().unwrap();
    assert_eq!(idx.release_quarantine(7), (1, 3 * 16 * 1024));
    assert_eq!(idx.usage()[0].used, 0);
    idx.check_invariants().unwrap();
}

#[test]
fn pool_accounting_never_exceeds_capacity() {
    let mut idx = small_index();
    let now = Instant::now();
    let ttl = Duration::from_secs(5);
    // Fill with reservations nobody commits: a further put cannot evict them.
    let mut held = Vec::new();
    for p in 0..4 {
        held.push(idx.begin_put(1, "ns", &[key(p, 0)], &[16 * 1024], None, false, now, ttl).unwrap());
    }
    let e = idx.begin_put(1, "ns", &[key(99, 0)], &[16 * 1024], None, false, now, ttl).unwrap_err();
    assert_eq!(e.kind, ErrorKind::ResourceExhausted);
    // All or nothing: a two-chunk put that only half fits reserves nothing.
    idx.abort_put(held.pop().unwrap().put_id, 1).unwrap();
    let before = idx.usage()[0].used;
    let e =
        idx.begin_put(1, "ns", &[key(98, 0), key(98, 1)], &[16 * 1024, 16 * 1024], None, false, now, ttl).unwrap_err();
    assert_eq!(e.kind, ErrorKind::ResourceExhausted);
    assert_eq!(idx.usage()[0].used, before);
    // A chunk larger than the pool is refused up front.
    let e = idx.begin_put(1, "ns", &[key(97, 0)], &[1 << 20], None, false, now, ttl).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    idx.check_invariants().unwrap();
}

#[test]
fn eviction_is_leaf_first_and_least_recent_first() {
    // Watermarks off: only on-demand eviction here.
    let mut idx = Index::new(IndexConfig {
        tiers: vec![(Tier::Host, 4 * 1024)],
        high_watermark: 1.0,
        low_watermark: 1.0,
        ..IndexConfig::default()
    });
    let now = Instant::now();
    let ttl = Duration::from_secs(5);
    // One prompt of 3 chunks (a chain) and one single chunk; 4 KiB pool, 1 KiB chunks.
    let chain: Vec<ChunkKey> = (0..3).map(|c| key(5, c)).collect();
    let b = idx.begin_put(1, "ns", &chain, &[1024; 3], None, false, now, ttl).unwrap();
    idx.commit_put(b.put_id, 1, now).unwrap();
    let single = [key(6, 0)];
    let b = idx.begin_put(1, "ns", &single, &[1024], None, false, now, ttl).unwrap();
    idx.commit_put(b.put_id, 1, now).unwrap();
    // Touch the chain so the single chunk is least recent among leaves.
    idx.lookup("ns", &chain, None, now).unwrap();
    let b = idx.begin_put(1, "ns", &[key(7, 0)], &[1024], None, false, now, ttl).unwrap();
    idx.commit_put(b.put_id, 1, now).unwrap();
    assert_eq!(idx.lookup("ns", &single, None, now).unwrap().hits, 0, "least recent leaf went first");
    assert_eq!(idx.lookup("ns", &chain, None, now).unwrap().hits, 3);
    // Next pressure trims the chain from its end, never its middle.
    let b = idx.begin_put(1, "ns", &[key(8, 0)], &[1024], None, false, now, ttl).unwrap();
    idx.commit_put(b.put_id, 1, now).unwrap();
    let hits = idx.lookup("ns", &chain, None, now).unwrap().hits;
    assert!(hits == 2 || hits == 3, "chain trimmed from its tail, hits={hits}");
    idx.check_invariants().unwrap();
}

#[test]
fn watermarks_evict_down_to_low_after_commit() {
    let mut idx = small_index(); // 64 KiB, high 0.9, low 0.7
    let now = Instant::now();
    let ttl = Duration::from_secs(5);
    for p in 0..16 {
        let b = idx.begin_put(1, "ns", &[key(p, 0)], &[4096], None, false, now, ttl).unwrap();
        idx.commit_put(b.put_id, 1, now).unwrap();
        let u = idx.usage()[0];
        assert!(u.used as f64 <= 0.9 * u.capacity as f64, "above high watermark after commit: {u:?}");
    }
    assert!(idx.counters().evictions > 0);
    idx.check_invariants().unwrap();
}

#[test]
fn bad_input_changes_nothing() {
    let mut idx = small_index();
    let now = Instant::now();
    let ttl = Duration::from_secs(5);
    let snapshot = |idx: &Index| (idx.entries(), idx.usage(), idx.active_reservations(), idx.active_leases());
    let before = snapshot(&idx);
    let k = [key(1, 0)];
    let cases: Vec<ErrorKind> = vec![
        idx.begin_put(1, "", &k, &[1], None, false, now, ttl).unwrap_err().kind,
        idx.begin_put(1, &"x".repeat(300), &k, &[1], None, false, now, ttl).unwrap_err().kind,
        idx.begin_put(1, "ns", &[], &[], None, false, now, ttl).unwrap_err().kind,
        idx.begin_put(1, "ns", &k, &[1, 2], None, false, now, ttl).unwrap_err().kind,
        idx.begin_put(1, "ns", &k, &[0], None, false, now, ttl).unwrap_err().kind,
        idx.begin_put(1, "ns", &k, &[u64::MAX], None, false, now, ttl).unwrap_err().kind,
        idx.begin_put(1, "ns", &vec![key(1, 0); 65], &[1; 65], None, false, now, ttl).unwrap_err().kind,
        idx.commit_put(12345, 1, now).unwrap_err().kind,
        idx.abort_put(12345, 1).unwrap_err().kind,
        idx.release(999, 1).unwrap_err().kind,
        idx.lookup("", &k, None, now).unwrap_err().kind,
        idx.lookup("ns", &[], None, now).unwrap_err().kind,
        idx.delete("ns", &[]).unwrap_err().kind,
    ];
    assert_eq!(cases.len(), 13);
    assert_eq!(snapshot(&idx), before, "errors changed state");
    // Double commit: the second one fails and changes nothing.
    let b = idx.begin_put(1, "ns", &k, &[10], None, false, now, ttl).unwrap();
    idx.commit_put(b.put_id, 1, now).unwrap();
    let mid = snapshot(&idx);
    assert_eq!(idx.commit_put(b.put_id, 1, now).unwrap_err().kind, ErrorKind::NotFound);
    assert_eq!(snapshot(&idx), mid);
    idx.check_invariants().unwrap();
}

#[test]
fn active_message_puts_commit_only_when_all_data_arrived() {
    let mut idx = small_index();
    let now = Instant::now();
    let keys = [key(1, 0), key(1, 1)];
    let b = idx.begin_put(1, "ns", &keys, &[10, 10], None, true, now, Duration::from_secs(5)).unwrap();
    assert_eq!(idx.missing_chunks(b.put_id, 1).unwrap(), 2);
    let loc = idx.begin_receive(b.put_id, 1, 0, now).unwrap();
    assert_eq!(loc.len, 10);
    // The same chunk cannot be received twice at once.
    assert_eq!(idx.begin_receive(b.put_id, 1, 0, now).unwrap_err().kind, ErrorKind::FailedPrecondition);
    idx.end_receive(b.put_id, 0, true);
    assert_eq!(idx.commit_put(b.put_id, 1, now).unwrap_err().kind, ErrorKind::FailedPrecondition);
    idx.begin_receive(b.put_id, 1, 1, now).unwrap();
    idx.end_receive(b.put_id, 1, true);
    assert_eq!(idx.commit_put(b.put_id, 1, now).unwrap().0, 2);
}

#[test]
fn slots_in_flight_are_not_reused_after_abort_or_expiry() {
    let mut idx = small_index();
    let now = Instant::now();
    let ttl = Duration::from_secs(1);
    let keys: Vec<ChunkKey> = (0..4).map(|c| key(1, c)).collect();
    let b = idx.begin_put(1, "ns", &keys, &[16 * 1024; 4], None, true, now, ttl).unwrap();
    idx.begin_receive(b.put_id, 1, 0, now).unwrap();
    idx.abort_put(b.put_id, 1).unwrap();
    // The slot is still held: the pool is full, so another put cannot get it.
    let e = idx.begin_put(2, "ns", &[key(2, 0)], &[16 * 1024], None, true, now, ttl).unwrap_err();
    assert_eq!(e.kind, ErrorKind::ResourceExhausted);
    idx.check_invariants().unwrap();
    idx.end_receive(b.put_id, 0, true);
    assert_eq!(idx.usage()[0].used, 0, "freed once the receive ended");
    // Leases: a pinned lease outlives its expiry until unpinned.
    let b = idx.begin_put(1, "ns", &[key(3, 0)], &[100], None, false, now, ttl).unwrap();
    idx.commit_put(b.put_id, 1, now).unwrap();
    let (lease, _) = idx.lookup("ns", &[key(3, 0)], Some((1, ttl)), now).unwrap().lease.unwrap();
    idx.pin_lease(lease, 1, now).unwrap();
    idx.expire(now + Duration::from_secs(10));
    assert_eq!(idx.active_leases(), 1, "pinned lease kept");
    idx.unpin_lease(lease);
    assert_eq!(idx.active_leases(), 0);
    idx.check_invariants().unwrap();
}

#[test]
fn gpu_pressure_demotes_to_host_instead_of_dropping() {
    let mut idx = Index::new(IndexConfig {
        tiers: vec![(Tier::Gpu, 4 * 1024), (Tier::Host, 16 * 1024)],
        high_watermark: 1.0,
        low_watermark: 1.0,
        grace: Duration::ZERO,
        ..IndexConfig::default()
    });
    let now = Instant::now();
    let ttl = Duration::from_secs(5);
    let mut all = Vec::new();
    for p in 0..8 {
        let k = [key(p, 0)];
        let b = idx.begin_put(1, "ns", &k, &[1024], None, false, now, ttl).unwrap();
        assert!(matches!(b.slots[0], Slot::Reserved(l) if l.tier == Tier::Gpu), "new chunks go to the GPU");
        idx.commit_put(b.put_id, 1, now).unwrap();
        all.push(k);
        let moves = idx.take_moves();
        for m in &moves {
            assert_eq!((m.from.tier, m.to.tier), (Tier::Gpu, Tier::Host));
            assert!(idx.finish_move(m, true), "copied: the chunk stays cached");
        }
        idx.check_invariants().unwrap();
    }
    // 8 KiB of chunks in a 4 KiB GPU tier: four were demoted, none dropped, all still hit.
    assert_eq!(idx.counters().demotions, 4);
    assert_eq!(idx.counters().evictions, 0);
    for k in &all {
        assert_eq!(idx.lookup("ns", k, None, now).unwrap().hits, 1);
    }
    let usage = idx.usage();
    assert_eq!((usage[0].tier, usage[0].entries), (Tier::Gpu, 4));
    assert_eq!((usage[1].tier, usage[1].entries), (Tier::Host, 4));
    // A leased GPU chunk is not demoted.
    let (lease, _) = idx.lookup("ns", &all[7], Some((1, ttl)), now).unwrap().lease.unwrap();
    let before = idx.lease_chunk(lease, 1, 0, now).unwrap();
    for p in 100..104 {
        let b = idx.begin_put(1, "ns", &[key(p, 0)], &[1024], None, false, now, ttl).unwrap();
        idx.commit_put(b.put_id, 1, now).unwrap();
        for m in idx.take_moves() {
            idx.finish_move(&m, true);
        }
    }
    assert_eq!(idx.lease_chunk(lease, 1, 0, now).unwrap(), before, "leased chunk moved");
    idx.check_invariants().unwrap();
}

#[test]
fn a_put_larger_than_the_gpu_tier_spills_to_host() {
    let mut idx = Index::new(IndexConfig {
        tiers: vec![(Tier::Gpu, 4 * 1024), (Tier::Host, 16 * 1024)],
        high_watermark: 1.0,
        low_watermark: 1.0,
        grace: Duration::ZERO,
        ..IndexConfig::default()
    });
    let now = Instant::now();
    let keys: Vec<ChunkKey> = (0..6).map(|c| key(9, c)).collect();
    let b = idx.begin_put(1, "ns", &keys, &[1024; 6], None, false, now, Duration::from_secs(5)).unwrap();
    let tiers: Vec<Tier> =
        b.slots.iter().map(|s| if let Slot::Reserved(l) = s { l.tier } else { Tier::Host }).collect();
    assert_eq!(tiers, vec![Tier::Gpu, Tier::Gpu, Tier::Gpu, Tier::Gpu, Tier::Host, Tier::Host]);
    assert!(idx.take_moves().is_empty(), "reserved chunks never move");
    idx.commit_put(b.put_id, 1, now).unwrap();
    assert_eq!(idx.lookup("ns", &keys, None, now).unwrap().hits, 6);
    idx.check_invariants().unwrap();
}

/// Long prompts are chains of chunks, and only a chain's last chunk is a leaf. Demotion must not
/// wait for leaves: once the GPU tier is full of older prompts' inner chunks, a new prompt still
/// goes to the GPU tier (older chunks move down), or its reader pays PCIe speed for every byte.
/// (Seen on 2x H200 with 8k-token prompts: after the first twenty, every chunk went to host.)
#[test]
fn new_prompts_take_the_gpu_tier_even_when_it_is_full_of_chains() {
    let mut idx = Index::new(IndexConfig {
        tiers: vec![(Tier::Gpu, 8 * 1024), (Tier::Host, 64 * 1024)],
        high_watermark: 1.0,
        low_watermark: 1.0,
        grace: Duration::ZERO,
        ..IndexConfig::default()
    });
    let now = Instant::now();
    let ttl = Duration::from_secs(5);
    for p in 0..6 {
        // A prompt of four chunks, each extending the previous one: one leaf, three inner chunks.
        let keys: Vec<ChunkKey> = (0..4).map(|c| key(p, c)).collect();
        let b = idx.begin_put(1, "ns", &keys, &[1024; 4], None, false, now, ttl).unwrap();
        for (i, s) in b.slots.iter().enumerate() {
            assert!(matches!(s, Slot::Reserved(l) if l.tier == Tier::Gpu), "prompt {p} chunk {i} not in the GPU tier");
        }
        idx.commit_put(b.put_id, 1, now).unwrap();
        for m in idx.take_moves() {
            assert_eq!((m.from.tier, m.to.tier), (Tier::Gpu, Tier::Host));
            assert!(idx.finish_move(&m, true));
        }
        idx.check_invariants().unwrap();
        // The newest prompt is whole and fast; older ones are whole, partly on the host.
        let r = idx.lookup("ns", &keys, None, now).unwrap();
        assert_eq!(r.hits, 4);
    }
    assert_eq!(idx.counters().evictions, 0);
    assert_eq!(idx.counters().demotions, 16, "24 KiB of chunks through an 8 KiB GPU tier");
    for p in 0..6 {
        let keys: Vec<ChunkKey> = (0..4).map(|c| key(p, c)).collect();
        assert_eq!(idx.lookup("ns", &keys, None, now).unwrap().hits, 4, "prompt {p} still whole");
    }
}

/// Defect 11 (4e6c6e7): when a demotion's copy failed, the entry already pointed at its host
/// slot and was served as a hit of uninitialised memory. A failed move now drops it.
#[test]
fn a_failed_demotion_copy_drops_the_chunk() {
    let mut idx = Index::new(IndexConfig {
        tiers: vec![(Tier::Gpu, 4 * 1024), (Tier::Host, 64 * 1024)],
        high_watermark: 1.0,
        low_watermark: 1.0,
        grace: Duration::ZERO,
        ..IndexConfig::default()
    });
    let (now, ttl) = (Instant::now(), Duration::from_secs(5));
    let first = [key(1, 0)];
    let b = idx.begin_put(1, "ns", &first, &[4 * 1024], None, false, now, ttl).unwrap();
    idx.commit_put(b.put_id, 1, now).unwrap();
    let b = idx.begin_put(1, "ns", &[key(2, 0)], &[4 * 1024], None, false, now, ttl).unwrap();
    let moves = idx.take_moves();
    assert_eq!(moves.len(), 1, "the first chunk was demoted to make room");
    // The copy failed: the chunk is forgotten, not served from a slot of garbage.
    assert!(!idx.finish_move(&moves[0], false));
    assert_eq!(idx.lookup("ns", &first, None, now).unwrap().hits, 0);
    assert_eq!(idx.usage().iter().find(|u| u.tier == Tier::Host).unwrap().used, 0);
    idx.commit_put(b.put_id, 1, now).unwrap();
    idx.check_invariants().unwrap();
}

/// Defect 11, second half (4e6c6e7): demotion copied whole chunks (36 MiB at the Qwen3-4B shape)
/// while holding the index lock, so every call waited for PCIe. The copy now runs outside the
/// lock; meanwhile the chunk is Moving: no lookup finds it (its new slot has no bytes yet, its
/// old one belongs to the put that needed the room), nothing evicts or deletes it, and other
/// work goes on. Its move's end publishes it. On 4e6c6e7 it was a hit the moment it moved.
#[test]
fn a_chunk_in_motion_is_invisible_until_its_copy_is_done() {
    let mut idx = Index::new(IndexConfig {
        tiers: vec![(Tier::Gpu, 4 * 1024), (Tier::Host, 8 * 1024)],
        high_watermark: 1.0,
        low_watermark: 1.0,
        grace: Duration::ZERO,
        ..IndexConfig::default()
    });
    let (now, ttl) = (Instant::now(), Duration::from_secs(5));
    let old = [key(1, 0)];
    let b = idx.begin_put(1, "ns", &old, &[4 * 1024], None, false, now, ttl).unwrap();
    idx.commit_put(b.put_id, 1, now).unwrap();
    // A new chunk needs the GPU tier: the old one moves to host.
    let b = idx.begin_put(1, "ns", &[key(2, 0)], &[4 * 1024], None, false, now, ttl).unwrap();
    let moves = idx.take_moves();
    assert_eq!(moves.len(), 1);
    assert!(matches!(b.slots[0], Slot::Reserved(l) if l == moves[0].from), "the put got the old slot");
    // In motion: not found, not leasable, not deleted, not evicted by the host tier's needs.
    assert_eq!(idx.lookup("ns", &old, None, now).unwrap().hits, 0);
    assert!(idx.lookup("ns", &old, Some((1, ttl)), now).unwrap().lease.is_none());
    assert_eq!(idx.delete("ns", &old).unwrap(), (0, 1), "busy, not deleted");
    let filler = idx.begin_put(1, "ns", &[key(3, 0)], &[8 * 1024], None, false, now, ttl);
    assert!(filler.is_err(), "the host tier's only other room is the moving chunk's: not taken");
    idx.check_invariants().unwrap();
    // Copied: it is a hit, at its new place.
    assert!(idx.finish_move(&moves[0], true));
    let r = idx.lookup("ns", &old, Some((1, ttl)), now).unwrap();
    assert_eq!(r.hits, 1);
    assert_eq!(r.locations[0], moves[0].to);
    idx.commit_put(b.put_id, 1, now).unwrap();
    idx.check_invariants().unwrap();
}

/// 4e6c6e7 interned names before allocating and never forgot them: after 65,536 distinct names,
/// even from failed puts, every new namespace was refused until restart. Names are now counted
/// and freed with their last chunk, put or lease.
#[test]
fn namespaces_are_freed_with_their_last_reference() {
    let mut idx = Index::new(IndexConfig {
        tiers: vec![(Tier::Host, 8 * 1024)],
        max_namespaces: 4,
        grace: Duration::ZERO,
        ..IndexConfig::default()
    });
    let now = Instant::now();
    let ttl = Duration::from_secs(5);
    for i in 0..100 {
        let ns = format!("tenant-{i}");
        // Aborted puts, failed puts (too large), committed-then-deleted chunks, released leases.
        let b = idx.begin_put(1, &ns, &[key(i, 0)], &[512], None, false, now, ttl).unwrap();
        match i % 3 {
            0 => {
                idx.abort_put(b.put_id, 1).unwrap();
            }
            1 => {
                idx.commit_put(b.put_id, 1, now).unwrap();
                let (lease, _) = idx.lookup(&ns, &[key(i, 0)], Some((1, ttl)), now).unwrap().lease.unwrap();
                idx.release(lease, 1).unwrap();
                assert_eq!(idx.delete(&ns, &[key(i, 0)]).unwrap(), (1, 0));
            }
            _ => {
                idx.commit_put(b.put_id, 1, now).unwrap();
                idx.delete(&ns, &[key(i, 0)]).unwrap();
            }
        }
        let too_big = idx.begin_put(1, &ns, &[key(i, 1)], &[64 * 1024], None, false, now, ttl);
        assert!(too_big.is_err());
        idx.check_invariants().unwrap();
    }
    // Four alive at once is the cap; the fifth waits until one goes.
    let mut puts = Vec::new();
    for i in 0..4 {
        puts.push(idx.begin_put(1, &format!("live-{i}"), &[key(500 + i, 0)], &[256], None, false, now, ttl).unwrap());
    }
    let e = idx.begin_put(1, "live-4", &[key(504, 0)], &[256], None, false, now, ttl).unwrap_err();
    assert_eq!(e.kind, ErrorKind::ResourceExhausted);
    assert!(e.message.contains("max_namespaces"), "{}", e.message);
    idx.abort_put(puts[0].put_id, 1).unwrap();
    idx.begin_put(1, "live-4", &[key(504, 0)], &[256], None, false, now, ttl).unwrap();
    idx.check_invariants().unwrap();
}

/// One BeginPut could reserve the whole pool (evicting everything): a session's reservations
/// are now capped, and a refused put changes nothing.
#[test]
fn a_session_cannot_reserve_more_than_its_share() {
    let mut idx = Index::new(IndexConfig {
        tiers: vec![(Tier::Host, 64 * 1024)],
        max_reserved_bytes_per_session: 16 * 1024,
        grace: Duration::ZERO,
        ..IndexConfig::default()
    });
    let now = Instant::now();
    let ttl = Duration::from_secs(5);
    let b = idx.begin_put(2, "ns", &[key(1, 0)], &[1024], None, false, now, ttl).unwrap();
    idx.commit_put(b.put_id, 2, now).unwrap();
    let keys: Vec<ChunkKey> = (0..32).map(|c| key(9, c)).collect();
    let e = idx.begin_put(1, "ns", &keys, &[1024; 32], None, false, now, ttl).unwrap_err();
    assert_eq!(e.kind, ErrorKind::ResourceExhausted);
    assert!(e.message.contains("max_reserved_bytes_per_session"), "{}", e.message);
    assert_eq!((idx.entries(), idx.active_reservations()), (1, 0), "nothing changed");
    // Within the share: fine; the share frees at commit.
    let b = idx.begin_put(1, "ns", &keys[..16], &[1024; 16], None, false, now, ttl).unwrap();
    assert!(idx.begin_put(1, "ns", &keys[16..], &[1024; 16], None, false, now, ttl).is_err());
    idx.commit_put(b.put_id, 1, now).unwrap();
    idx.begin_put(1, "ns", &keys[16..], &[1024; 16], None, false, now, ttl).unwrap();
    idx.check_invariants().unwrap();
}

/// Leasing lookups were unbounded (9,000 leases of 4,096 keys took 1.19 GiB): leases per
/// session, leased bytes per session and lease keys in all are capped.
#[test]
fn leases_are_capped_per_session_and_in_all() {
    let mut idx = Index::new(IndexConfig {
        tiers: vec![(Tier::Host, 64 * 1024)],
        max_leases_per_session: 3,
        max_leased_bytes_per_session: 4 * 1024,
        max_lease_keys: 5,
        grace: Duration::ZERO,
        ..IndexConfig::default()
    });
    let now = Instant::now();
    let ttl = Duration::from_secs(5);
    let keys: Vec<ChunkKey> = (0..4).map(|c| key(7, c)).collect();
    let b = idx.begin_put(1, "ns", &keys, &[1024; 4], None, false, now, ttl).unwrap();
    idx.commit_put(b.put_id, 1, now).unwrap();
    let lease = |idx: &mut Index, s, n: usize| idx.lookup("ns", &keys[..n], Some((s, ttl)), now);
    lease(&mut idx, 1, 1).unwrap();
    lease(&mut idx, 1, 1).unwrap();
    let third = lease(&mut idx, 1, 1).unwrap().lease.unwrap().0;
    let e = lease(&mut idx, 1, 1).unwrap_err();
    assert!(e.message.contains("max_leases_per_session"), "{}", e.message);
    idx.release(third, 1).unwrap();
    let e = lease(&mut idx, 1, 3).unwrap_err();
    assert!(e.message.contains("max_leased_bytes_per_session"), "{}", e.message);
    let e = lease(&mut idx, 2, 4).unwrap_err();
    assert!(e.message.contains("max_lease_keys"), "{}", e.message);
    assert_eq!(lease(&mut idx, 2, 3).unwrap().hits, 3);
    idx.check_invariants().unwrap();
    // A refused lease counted nothing: hits counters moved only for the granted ones.
    idx.drop_session(1);
    idx.drop_session(2);
    assert_eq!(idx.active_leases(), 0);
    idx.check_invariants().unwrap();
}

/// A dead active-message producer's reservation, with receives still in flight, used to hide its
/// keys from other producers for the whole receive timeout ("already present", never stored).
/// Its slots now leave the index at once; only their bytes wait for the receives to end.
#[test]
fn a_doomed_put_frees_its_keys_at_once_and_its_bytes_after_the_receives() {
    let mut idx = small_index();
    let now = Instant::now();
    let ttl = Duration::from_secs(1);
    let b = idx.begin_put(1, "ns", &[key(1, 0), key(1, 1)], &[4096, 4096], None, true, now, ttl).unwrap();
    let loc = idx.begin_receive(b.put_id, 1, 0, now).unwrap();
    idx.drop_session(1); // the producer died
    let other = idx.begin_put(2, "ns", &[key(1, 0)], &[4096], None, true, now, ttl).unwrap();
    match other.slots[0] {
        Slot::Reserved(l) => assert_ne!(l.offset, loc.offset, "the slot still being written is not reused"),
        Slot::Present => panic!("the dead producer's key hides the chunk from another producer"),
    }
    idx.check_invariants().unwrap();
    idx.end_receive(b.put_id, 0, false);
    idx.check_invariants().unwrap();
    assert_eq!(idx.usage()[0].used, 4096, "the zombie slot was freed; only the new put's is held");
}
