//! Namespace names interned to small ids, counted and freed.
//!
//! Every entry, put and lease of a namespace holds a reference; a namespace whose last one goes
//! (its chunks evicted or deleted, its puts aborted, its leases released) is forgotten and its id
//! reused. So the cap on distinct namespaces bounds what is alive, not what was ever seen: an
//! attacker who creates names (even with puts that fail) cannot lock everyone else out.

use crate::error::{IndexError, Result};
use std::collections::HashMap;

pub type NsId = u32;

#[derive(Debug)]
pub(crate) struct Namespaces {
    ids: HashMap<String, NsId>,
    /// id -> (name, references)
    names: HashMap<NsId, (String, u32)>,
    free: Vec<NsId>,
    next: NsId,
    max: usize,
}

impl Namespaces {
    pub(crate) fn new(max: usize) -> Self {
        Namespaces { ids: HashMap::new(), names: HashMap::new(), free: Vec::new(), next: 0, max }
    }

    pub(crate) fn lookup(&self, name: &str) -> Option<NsId> {
        self.ids.get(name).copied()
    }

    /// The id of `name`, made if new (with no references: hold one, or `collect` it).
    pub(crate) fn intern(&mut self, name: &str) -> Result<NsId> {
        if let Some(id) = self.ids.get(name) {
            return Ok(*id);
        }
        if self.ids.len() >= self.max {
            return Err(IndexError::limit(
                "max_namespaces",
                format!(
                    "{} namespaces hold chunks, puts or leases: the limit (max_namespaces) is {}",
                    self.ids.len(),
                    self.max
                ),
            ));
        }
        let id = self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        });
        self.ids.insert(name.to_owned(), id);
        self.names.insert(id, (name.to_owned(), 0));
        Ok(id)
    }

    pub(crate) fn retain(&mut self, id: NsId) {
        if let Some((_, n)) = self.names.get_mut(&id) {
            *n += 1;
        }
    }

    pub(crate) fn release(&mut self, id: NsId) {
        if let Some((_, n)) = self.names.get_mut(&id) {
            *n = n.saturating_sub(1);
        }
        self.collect(id);
    }

    /// Forgets a namespace nothing refers to.
    pub(crate) fn collect(&mut self, id: NsId) {
        if let Some((name, 0)) = self.names.get(&id) {
            self.ids.remove(name);
            self.names.remove(&id);
            self.free.push(id);
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    /// References held, by id (for the invariant check).
    pub(crate) fn references(&self) -> impl Iterator<Item = (NsId, u32)> + '_ {
        self.names.iter().map(|(id, (_, n))| (*id, *n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreferenced_namespaces_are_freed_and_their_ids_reused() {
        let mut ns = Namespaces::new(2);
        let a = ns.intern("a").unwrap();
        ns.retain(a);
        let b = ns.intern("b").unwrap();
        assert!(ns.intern("c").is_err(), "two alive: the cap holds");
        ns.collect(b); // b was never referenced
        let c = ns.intern("c").unwrap();
        assert_eq!(c, b, "ids are reused");
        ns.release(a);
        assert_eq!(ns.lookup("a"), None);
        assert_eq!(ns.len(), 1);
    }
}
