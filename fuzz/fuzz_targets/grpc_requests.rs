//! gRPC requests as any client may send them: arbitrary bytes decoded as the protobuf messages
//! of the service, then applied to the index the way the server applies them (several sessions,
//! time moving on, expiries). Nothing may panic, and every structural invariant of the index
//! (accounting, no overlapping slots, leases, namespaces) must hold after every request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prefixd_cache::{Index, IndexConfig, Tier};
use prefixd_proto::keys::ChunkKey;
use prefixd_proto::v1::{BeginPutRequest, DeleteRequest, LookupRequest};
use prost::Message;
use std::time::{Duration, Instant};

fn keys(raw: &[Vec<u8>]) -> Option<Vec<ChunkKey>> {
    raw.iter().map(|k| ChunkKey::from_slice(k)).collect()
}

fuzz_target!(|data: &[u8]| {
    let mut idx = Index::new(IndexConfig {
        tiers: vec![(Tier::Gpu, 64 * 1024), (Tier::Host, 256 * 1024)],
        max_chunk_size: 64 * 1024,
        max_keys: 64,
        max_namespaces: 8,
        max_reserved_bytes_per_session: 192 * 1024,
        max_leases_per_session: 8,
        max_leased_bytes_per_session: 192 * 1024,
        grace: Duration::ZERO,
        ..IndexConfig::default()
    });
    let t0 = Instant::now();
    let mut now = t0;
    let mut puts = Vec::new();
    let mut leases = Vec::new();
    // Records: [op, session, len_hi, len_lo, message bytes...]
    let mut rest = data;
    while rest.len() >= 4 {
        let (op, session) = (rest[0], 1 + (rest[1] % 3) as u64);
        let len = (u16::from_be_bytes([rest[2], rest[3]]) as usize).min(rest.len() - 4);
        let msg = &rest[4..4 + len];
        rest = &rest[4 + len..];
        let ttl = Duration::from_millis(500);
        match op % 8 {
            0 => {
                if let Ok(r) = BeginPutRequest::decode(msg) {
                    let (Some(k), parent) = (keys(&r.keys), ChunkKey::from_slice(&r.parent_key)) else { continue };
                    let am = r.sizes.first().is_some_and(|s| s % 2 == 0);
                    if let Ok(b) = idx.begin_put(session, &r.namespace, &k, &r.sizes, parent, am, now, ttl) {
                        puts.push((b.put_id, session, am, k.len()));
                    }
                    // Copies succeed or fail as the input says (a failed one drops its chunk).
                    for m in idx.take_moves() {
                        idx.finish_move(&m, !msg.last().is_some_and(|b| b % 8 == 0));
                    }
                }
            }
            1 if !puts.is_empty() => {
                let (p, s, am, n) = puts.swap_remove(msg.first().map_or(0, |b| *b as usize) % puts.len());
                if am {
                    for i in 0..n as u32 {
                        if idx.begin_receive(p, s, i, now).is_ok() {
                            idx.end_receive(p, i, msg.get(1).is_some_and(|b| b % 4 != 0));
                        }
                    }
                }
                let _ = idx.commit_put(p, s, now);
            }
            2 if !puts.is_empty() => {
                let (p, s, ..) = puts.swap_remove(msg.first().map_or(0, |b| *b as usize) % puts.len());
                let _ = idx.abort_put(p, s);
            }
            3 => {
                if let Ok(r) = LookupRequest::decode(msg) {
                    let Some(k) = keys(&r.keys) else { continue };
                    let lease = r.lease.then_some((session, Duration::from_millis(r.lease_ttl_ms.min(2000))));
                    if let Ok(res) = idx.lookup(&r.namespace, &k, lease, now) {
                        if let Some((l, _)) = res.lease {
                            leases.push((l, session));
                        }
                    }
                }
            }
            4 if !leases.is_empty() => {
                let (l, s) = leases.swap_remove(msg.first().map_or(0, |b| *b as usize) % leases.len());
                let _ = idx.release(l, s);
            }
            5 => {
                if let Ok(r) = DeleteRequest::decode(msg) {
                    if let Some(k) = keys(&r.keys) {
                        let _ = idx.delete(&r.namespace, &k);
                    }
                }
            }
            6 => {
                now += Duration::from_millis(msg.first().map_or(100, |b| *b as u64 * 10));
                idx.expire(now);
            }
            _ => {
                idx.drop_session(session);
                if msg.first().is_some_and(|b| b % 2 == 0) {
                    idx.release_quarantine(session);
                }
            }
        }
        if let Err(e) = idx.check_invariants() {
            panic!("invariant broken: {e}");
        }
    }
});
