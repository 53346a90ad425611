//! Every metric prefixd exports, in one place: names `prefixd_{name}_{unit}`, `_total` only on
//! counters, units `_seconds` and `_bytes`. Labels take values from small fixed sets (operation
//! names, gRPC code names, tiers, data paths, transport names), never free text.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub const REQUESTS_TOTAL: &str = "prefixd_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "prefixd_request_duration_seconds";
pub const HIT_CHUNKS_TOTAL: &str = "prefixd_hit_chunks_total";
pub const MISS_CHUNKS_TOTAL: &str = "prefixd_miss_chunks_total";
pub const HIT_TOKENS_TOTAL: &str = "prefixd_hit_tokens_total";
pub const MISS_TOKENS_TOTAL: &str = "prefixd_miss_tokens_total";
pub const TRANSFER_BYTES_TOTAL: &str = "prefixd_transfer_bytes_total";
pub const POOL_USED_BYTES: &str = "prefixd_pool_used_bytes";
pub const POOL_CAPACITY_BYTES: &str = "prefixd_pool_capacity_bytes";
pub const ENTRIES: &str = "prefixd_entries";
pub const EVICTIONS_TOTAL: &str = "prefixd_evictions_total";
pub const DEMOTIONS_TOTAL: &str = "prefixd_demotions_total";
pub const EXPIRED_TOTAL: &str = "prefixd_expired_total";
pub const ACTIVE_LEASES: &str = "prefixd_active_leases";
pub const ACTIVE_RESERVATIONS: &str = "prefixd_active_reservations";
pub const SESSIONS: &str = "prefixd_sessions";
pub const REJECTED_MESSAGES_TOTAL: &str = "prefixd_rejected_messages_total";
pub const LIMIT_REJECTIONS_TOTAL: &str = "prefixd_limit_rejections_total";
pub const QUARANTINED_BYTES: &str = "prefixd_quarantined_bytes";
pub const FETCH_ASKS_TOTAL: &str = "prefixd_fetch_asks_total";

/// The `limit` label values of LIMIT_REJECTIONS_TOTAL.
pub const LIMITS: [&str; 8] = [
    "max_sessions",
    "max_sessions_per_peer",
    "max_concurrent_rpcs",
    "max_namespaces",
    "max_reserved_bytes_per_session",
    "max_leases_per_session",
    "max_leased_bytes_per_session",
    "max_lease_keys",
];

/// The `reason` label values of REJECTED_MESSAGES_TOTAL.
pub const REJECT_REASONS: [&str; 13] = [
    "bad_header",
    "bad_slot",
    "gpu_copy",
    "no_reservation",
    "unbound_endpoint",
    "wrong_size",
    "connect_unknown_client_id",
    "connect_too_many_unclaimed",
    "hello_no_endpoint",
    "hello_unknown_endpoint",
    "hello_unknown_session",
    "hello_already_bound",
    "hello_wrong_mode",
];

/// README.md's metrics table is this list (`prefixd --list-metrics`; a test keeps them equal).
pub const CATALOG: &[(&str, &str, &str, &str)] = &[
    (REQUESTS_TOTAL, "counter", "op, code", "gRPC requests by operation and status code"),
    (REQUEST_DURATION_SECONDS, "histogram", "op", "gRPC request latency"),
    (HIT_CHUNKS_TOTAL, "counter", "", "looked-up chunks that were cached"),
    (MISS_CHUNKS_TOTAL, "counter", "", "looked-up chunks that were not"),
    (HIT_TOKENS_TOTAL, "counter", "", "tokens of hit chunks (chunks x chunk_tokens)"),
    (MISS_TOKENS_TOTAL, "counter", "", "tokens of missed chunks"),
    (
        TRANSFER_BYTES_TOTAL,
        "counter",
        "direction, path, transport",
        "chunk bytes in (puts) and out (gets) by data path (rma: same host, direct; am_local: same host, active messages; am: another host) and transport (cuda_ipc: GPU pool; shm: mapped host pool; else the endpoint's UCX lane, e.g. tcp, posix); RMA bytes count at commit and at lease",
    ),
    (POOL_USED_BYTES, "gauge", "tier", "pool bytes allocated (entries and reservations)"),
    (POOL_CAPACITY_BYTES, "gauge", "tier", "pool size"),
    (ENTRIES, "gauge", "", "cached chunks (reserved and ready)"),
    (EVICTIONS_TOTAL, "counter", "", "chunks evicted under pressure"),
    (DEMOTIONS_TOTAL, "counter", "", "chunks copied from the GPU tier to the host tier under GPU pressure"),
    (EXPIRED_TOTAL, "counter", "what", "reservations (put) and leases (lease) reclaimed after their deadline"),
    (ACTIVE_LEASES, "gauge", "", "leases held"),
    (ACTIVE_RESERVATIONS, "gauge", "", "puts begun and not yet committed or aborted"),
    (SESSIONS, "gauge", "", "connected client sessions"),
    (
        QUARANTINED_BYTES,
        "gauge",
        "",
        "pool bytes of same-host RMA puts that ended uncommitted while their process may still write them; freed when it exits",
    ),
    (REJECTED_MESSAGES_TOTAL, "counter", "reason", "data-plane active messages dropped (bad header, unknown put, ...)"),
    (
        FETCH_ASKS_TOTAL,
        "counter",
        "answered",
        "remote gets asked on a data endpoint, by where they were answered (inline: on the UCX thread itself; async: by a task, as every error and GPU-tier chunk is)",
    ),
    (
        LIMIT_REJECTIONS_TOTAL,
        "counter",
        "limit",
        "calls refused with RESOURCE_EXHAUSTED by a configured limit (max_sessions, max_sessions_per_peer, max_concurrent_rpcs, max_namespaces, max_reserved_bytes_per_session, max_leases_per_session, max_leased_bytes_per_session, max_lease_keys)",
    ),
];

#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub hit_chunks: IntCounter,
    pub miss_chunks: IntCounter,
    pub hit_tokens: IntCounter,
    pub miss_tokens: IntCounter,
    pub transfer_bytes: IntCounterVec,
    pub pool_used: IntGaugeVec,
    pub pool_capacity: IntGaugeVec,
    pub entries: IntGauge,
    pub evictions: IntCounter,
    pub demotions: IntCounter,
    pub expired: IntCounterVec,
    pub active_leases: IntGauge,
    pub active_reservations: IntGauge,
    pub sessions: IntGauge,
    pub quarantined: IntGauge,
    pub rejected: IntCounterVec,
    pub fetch_asks: IntCounterVec,
    pub limit_rejections: IntCounterVec,
    /// When each limit was last logged (seconds since start), so a flood logs once a second.
    limit_logged: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<&'static str, std::time::Instant>>>,
}

fn help(name: &str) -> &'static str {
    CATALOG.iter().find(|m| m.0 == name).map_or("", |m| m.3)
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str| IntCounter::with_opts(Opts::new(name, help(name)));
        let counter_vec = |name: &str, labels: &[&str]| IntCounterVec::new(Opts::new(name, help(name)), labels);
        let gauge = |name: &str| IntGauge::with_opts(Opts::new(name, help(name)));
        let gauge_vec = |name: &str, labels: &[&str]| IntGaugeVec::new(Opts::new(name, help(name)), labels);
        let buckets = vec![
            50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
        ];
        let m = Metrics {
            requests: counter_vec(REQUESTS_TOTAL, &["op", "code"])?,
            duration: HistogramVec::new(
                HistogramOpts::new(REQUEST_DURATION_SECONDS, help(REQUEST_DURATION_SECONDS)).buckets(buckets),
                &["op"],
            )?,
            hit_chunks: counter(HIT_CHUNKS_TOTAL)?,
            miss_chunks: counter(MISS_CHUNKS_TOTAL)?,
            hit_tokens: counter(HIT_TOKENS_TOTAL)?,
            miss_tokens: counter(MISS_TOKENS_TOTAL)?,
            transfer_bytes: counter_vec(TRANSFER_BYTES_TOTAL, &["direction", "path", "transport"])?,
            pool_used: gauge_vec(POOL_USED_BYTES, &["tier"])?,
            pool_capacity: gauge_vec(POOL_CAPACITY_BYTES, &["tier"])?,
            entries: gauge(ENTRIES)?,
            evictions: counter(EVICTIONS_TOTAL)?,
            demotions: counter(DEMOTIONS_TOTAL)?,
            expired: counter_vec(EXPIRED_TOTAL, &["what"])?,
            active_leases: gauge(ACTIVE_LEASES)?,
            active_reservations: gauge(ACTIVE_RESERVATIONS)?,
            sessions: gauge(SESSIONS)?,
            quarantined: gauge(QUARANTINED_BYTES)?,
            rejected: counter_vec(REJECTED_MESSAGES_TOTAL, &["reason"])?,
            fetch_asks: counter_vec(FETCH_ASKS_TOTAL, &["answered"])?,
            limit_rejections: counter_vec(LIMIT_REJECTIONS_TOTAL, &["limit"])?,
            limit_logged: Default::default(),
            registry,
        };
        let r = &m.registry;
        r.register(Box::new(m.requests.clone()))?;
        r.register(Box::new(m.duration.clone()))?;
        r.register(Box::new(m.hit_chunks.clone()))?;
        r.register(Box::new(m.miss_chunks.clone()))?;
        r.register(Box::new(m.hit_tokens.clone()))?;
        r.register(Box::new(m.miss_tokens.clone()))?;
        r.register(Box::new(m.transfer_bytes.clone()))?;
        r.register(Box::new(m.pool_used.clone()))?;
        r.register(Box::new(m.pool_capacity.clone()))?;
        r.register(Box::new(m.entries.clone()))?;
        r.register(Box::new(m.evictions.clone()))?;
        r.register(Box::new(m.demotions.clone()))?;
        r.register(Box::new(m.expired.clone()))?;
        r.register(Box::new(m.active_leases.clone()))?;
        r.register(Box::new(m.active_reservations.clone()))?;
        r.register(Box::new(m.sessions.clone()))?;
        r.register(Box::new(m.quarantined.clone()))?;
        r.register(Box::new(m.rejected.clone()))?;
        r.register(Box::new(m.fetch_asks.clone()))?;
        r.register(Box::new(m.limit_rejections.clone()))?;
        Ok(m)
    }

    /// Creates every series whose labels are known in advance, at 0: a counter that appears
    /// with its first event already counted never shows an increase, so `rate()` (and every
    /// alert on it) would miss that event.
    pub fn preset(&self, transports: &[String]) {
        for what in ["put", "lease"] {
            self.expired.with_label_values(&[what]);
        }
        for limit in LIMITS {
            self.limit_rejections.with_label_values(&[limit]);
        }
        for reason in REJECT_REASONS {
            self.rejected.with_label_values(&[reason]);
        }
        for answered in ["inline", "async"] {
            self.fetch_asks.with_label_values(&[answered]);
        }
        let extra = ["cuda_ipc", "shm"].map(str::to_owned);
        for direction in ["in", "out"] {
            for path in ["rma", "am_local", "am"] {
                for t in transports.iter().chain(extra.iter()) {
                    self.transfer_bytes.with_label_values(&[direction, path, t]);
                }
            }
        }
    }

    /// Counts a refusal by `limit` and logs it, at most once a second per limit.
    pub fn limit_hit(&self, limit: &'static str, message: &str) {
        self.limit_rejections.with_label_values(&[limit]).inc();
        let now = std::time::Instant::now();
        let mut logged = self.limit_logged.lock().unwrap_or_else(|p| p.into_inner());
        let due = !logged.get(limit).is_some_and(|t| now.duration_since(*t) < std::time::Duration::from_secs(1));
        if due {
            logged.insert(limit, now);
            drop(logged);
            tracing::warn!(limit, "{message}");
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        buf
    }
}

/// The metrics table as Markdown, for the README.
pub fn markdown_table() -> String {
    let mut s = String::from("| metric | type | labels | meaning |\n|---|---|---|---|\n");
    for (name, kind, labels, meaning) in CATALOG {
        s += &format!("| `{name}` | {kind} | {labels} | {meaning} |\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_table_is_current() {
        let readme = include_str!("../../README.md");
        assert!(
            readme.contains(&markdown_table()),
            "README.md's metrics table is stale: replace it with `prefixd --list-metrics`"
        );
    }

    #[test]
    fn every_metric_is_registered_named_and_documented() {
        let m = Metrics::new().unwrap();
        m.requests.with_label_values(&["lookup", "ok"]).inc();
        m.duration.with_label_values(&["lookup"]).observe(0.001);
        m.transfer_bytes.with_label_values(&["in", "am", "tcp"]).inc();
        m.pool_used.with_label_values(&["host"]).set(1);
        m.pool_capacity.with_label_values(&["host"]).set(1);
        m.expired.with_label_values(&["put"]).inc();
        m.rejected.with_label_values(&["bad_header"]).inc();
        m.fetch_asks.with_label_values(&["inline"]).inc();
        m.limit_hit("max_sessions", "test");
        let text = String::from_utf8(m.encode()).unwrap();
        for (name, kind, _, meaning) in CATALOG {
            assert!(text.contains(&format!("# TYPE {name} {kind}")), "{name} missing from the exposition");
            assert!(!meaning.is_empty());
            assert!(name.starts_with("prefixd_"));
            assert_eq!(name.ends_with("_total"), *kind == "counter", "{name}: _total only on counters");
        }
    }
}
