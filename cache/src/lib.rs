//! # prefixd-cache
//!
//! ## Motivation
//! The cache logic of prefixd, kept free of UCX and CUDA so it builds and is tested anywhere
//! (the idea of Dynamo's `kvbm-logical`): memory and transports plug in beneath it.
//!
//! ## Components
//! - [`Index`]: namespace + chunk key → entry; longest-prefix lookup; two-phase puts
//!   (Reserved → Ready); leases with deadlines; leaf-first LRU eviction on demand and between
//!   watermarks; expiry of reservations and leases; per-session cleanup.
//! - [`Allocator`]: best-fit allocation with coalescing over one pool's bytes.
//! - [`Tier`]: host or GPU.
//!
//! Invariants (each checked by [`Index::check_invariants`] in the randomized tests): pool
//! accounting equals the sum of live entries and never exceeds capacity; ranges never overlap;
//! Reserved entries are invisible; leased and reserved entries are never evicted; the eviction
//! set holds exactly the Ready, unleased leaves.

mod alloc;
mod error;
mod index;
mod namespaces;
mod tier;

pub use alloc::{Allocator, ALIGN};
pub use error::{ErrorKind, IndexError, Result};
pub use index::{
    BeginPut, Counters, Expired, Index, IndexConfig, LeaseId, Location, LookupResult, Move, PutId, SessionId, Slot,
    TierBytes, TierUsage,
};
pub use tier::Tier;
