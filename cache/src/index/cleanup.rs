//! What ends chunks, reservations and leases from outside a put: `Delete`, a session that goes
//! away, and the expiry of reservations and leases past their deadlines.

use super::*;

impl Index {
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
}
