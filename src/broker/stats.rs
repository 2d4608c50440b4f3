//! Broker counters, exported by the admin listener.

use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use std::fmt::Write as _;

use super::budget::BudgetStats;
use crate::{
    histogram::{Histogram, HistogramSnapshot},
    prometheus::{Encoder, label_value},
    registry::Registry,
};

/// Upper bounds of the upstream latency histogram, in seconds.
pub const LATENCY_BUCKETS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

const OUTCOMES: [&str; 7] = [
    "ok",
    "invalid_client",
    "invalid_scope",
    "unauthorized_client",
    "rejected",
    "throttled",
    "unavailable",
];

/// Counters of the broker.
#[derive(Debug)]
pub struct BrokerStats {
    hits: AtomicU64,
    misses: AtomicU64,
    refreshes: AtomicU64,
    coalesced: AtomicU64,
    stale_served: AtomicU64,
    unproven: AtomicU64,
    rate_limited: AtomicU64,
    /// Token endpoint calls by pool: outcomes and latency.
    pools: Box<[PoolUpstream]>,
    pub(crate) budget: BudgetStats,
}

/// One pool's token endpoint calls.
#[derive(Debug)]
struct PoolUpstream {
    pool: std::sync::Arc<str>,
    outcomes: [AtomicU64; OUTCOMES.len()],
    latency: Histogram,
}

impl PoolUpstream {
    fn new(pool: std::sync::Arc<str>) -> Self {
        Self {
            pool,
            outcomes: Default::default(),
            latency: Histogram::new(&LATENCY_BUCKETS),
        }
    }
}

impl Default for BrokerStats {
    fn default() -> Self {
        Self::for_pools([std::sync::Arc::from(crate::rules::cognito::DEFAULT_POOL)])
    }
}

impl BrokerStats {
    /// Counters for the token endpoints of `pools` (a call of another pool
    /// counts under the first).
    pub(crate) fn for_pools(pools: impl IntoIterator<Item = std::sync::Arc<str>>) -> Self {
        let mut pools: Vec<PoolUpstream> = pools.into_iter().map(PoolUpstream::new).collect();
        if pools.is_empty() {
            pools.push(PoolUpstream::new(
                crate::rules::cognito::DEFAULT_POOL.into(),
            ));
        }
        Self {
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            refreshes: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            stale_served: AtomicU64::new(0),
            unproven: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            pools: pools.into_boxed_slice(),
            budget: BudgetStats::default(),
        }
    }
}

/// A point-in-time copy of [`BrokerStats`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatsSnapshot {
    /// Served from cache.
    pub hits: u64,
    /// Not in cache.
    pub misses: u64,
    /// Past the refresh point.
    pub refreshes: u64,
    /// Joined an upstream call already in flight.
    pub coalesced: u64,
    /// Served the old token because a refresh failed.
    pub stale_served: u64,
    /// Calls with a secret not (or no longer) proven for the client.
    pub unproven: u64,
    /// Refused by the failed-attempt limit.
    pub rate_limited: u64,
    /// Upstream calls by outcome label.
    pub upstream: Vec<(&'static str, u64)>,
    /// Upstream latency.
    pub latency: HistogramSnapshot,
    /// Upstream calls by pool: outcomes and latency.
    pub pools: Vec<PoolUpstreamSnapshot>,
}

/// One pool's token endpoint calls.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolUpstreamSnapshot {
    /// The pool's name.
    pub pool: String,
    /// Calls by outcome label.
    pub outcomes: Vec<(&'static str, u64)>,
    /// Latency.
    pub latency: HistogramSnapshot,
}

impl StatsSnapshot {
    /// Upstream calls with outcome `label`.
    pub fn upstream_calls(&self, label: &str) -> u64 {
        self.upstream
            .iter()
            .find(|(l, _)| *l == label)
            .map_or(0, |(_, n)| *n)
    }

    /// Upstream calls of every outcome.
    pub fn upstream_total(&self) -> u64 {
        self.upstream.iter().map(|(_, n)| n).sum()
    }
}

impl BrokerStats {
    pub(crate) fn hit(&self) {
        self.hits.fetch_add(1, Relaxed);
    }
    pub(crate) fn miss(&self) {
        self.misses.fetch_add(1, Relaxed);
    }
    pub(crate) fn refresh(&self) {
        self.refreshes.fetch_add(1, Relaxed);
    }
    pub(crate) fn coalesced(&self) {
        self.coalesced.fetch_add(1, Relaxed);
    }
    pub(crate) fn stale_served(&self) {
        self.stale_served.fetch_add(1, Relaxed);
    }
    pub(crate) fn unproven(&self) {
        self.unproven.fetch_add(1, Relaxed);
    }
    pub(crate) fn rate_limited(&self) {
        self.rate_limited.fetch_add(1, Relaxed);
    }

    pub(crate) fn upstream(&self, pool: &str, outcome: &str, latency: Duration) {
        let p = self
            .pools
            .iter()
            .find(|p| &*p.pool == pool)
            .unwrap_or(&self.pools[0]);
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            p.outcomes[i].fetch_add(1, Relaxed);
        }
        p.latency.record(latency);
    }

    /// A copy of every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            refreshes: self.refreshes.load(Relaxed),
            coalesced: self.coalesced.load(Relaxed),
            stale_served: self.stale_served.load(Relaxed),
            unproven: self.unproven.load(Relaxed),
            rate_limited: self.rate_limited.load(Relaxed),
            upstream: OUTCOMES
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    (
                        *l,
                        self.pools.iter().map(|p| p.outcomes[i].load(Relaxed)).sum(),
                    )
                })
                .collect(),
            latency: merged(self.pools.iter().map(|p| p.latency.snapshot())),
            pools: self
                .pools
                .iter()
                .map(|p| PoolUpstreamSnapshot {
                    pool: p.pool.to_string(),
                    outcomes: OUTCOMES
                        .iter()
                        .zip(&p.outcomes)
                        .map(|(l, n)| (*l, n.load(Relaxed)))
                        .collect(),
                    latency: p.latency.snapshot(),
                })
                .collect(),
        }
    }
}

/// One histogram of several (same buckets).
fn merged(snapshots: impl Iterator<Item = HistogramSnapshot>) -> HistogramSnapshot {
    let mut out = HistogramSnapshot::default();
    for s in snapshots {
        if out.buckets.is_empty() {
            out.buckets = s.buckets.clone();
        } else {
            for (o, (_, n)) in out.buckets.iter_mut().zip(&s.buckets) {
                o.1 += n;
            }
        }
        out.count += s.count;
        out.sum_secs += s.sum_secs;
    }
    out
}

#[derive(Debug, Default)]
struct ClientCounters {
    hits: AtomicU64,
    upstream: AtomicU64,
    refused: AtomicU64,
}

/// A client's registered name and its pool's.
type NameAndPool = (std::sync::Arc<str>, std::sync::Arc<str>);

/// Per-client counters, labelled by the registered `name` (the registry bounds
/// the cardinality; no caller-supplied string becomes a label).
#[derive(Debug)]
pub struct ClientStats {
    /// Name and pool, by registry index.
    names: Box<[Option<NameAndPool>]>,
    counters: Box<[ClientCounters]>,
}

/// One client's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSnapshot {
    /// The registered name.
    pub name: std::sync::Arc<str>,
    /// The user pool it belongs to.
    pub pool: std::sync::Arc<str>,
    /// GetToken answered from the cache.
    pub hits: u64,
    /// Token endpoint calls made for it.
    pub upstream: u64,
    /// GetToken refused (credentials, scopes, limits).
    pub refused: u64,
}

impl ClientStats {
    pub(crate) fn new(registry: &Registry, slots: usize) -> Self {
        let mut names = vec![None; slots];
        for c in registry.clients() {
            names[c.index] = Some((c.name.clone(), c.pool.clone()));
        }
        Self {
            names: names.into(),
            counters: (0..slots).map(|_| ClientCounters::default()).collect(),
        }
    }

    fn bump(&self, index: usize, pick: impl Fn(&ClientCounters) -> &AtomicU64) {
        if let Some(c) = self.counters.get(index) {
            pick(c).fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn hit(&self, index: usize) {
        self.bump(index, |c| &c.hits);
    }
    pub(crate) fn upstream(&self, index: usize) {
        self.bump(index, |c| &c.upstream);
    }
    pub(crate) fn refused(&self, index: usize) {
        self.bump(index, |c| &c.refused);
    }

    /// Every client's counters, sorted by name.
    pub fn snapshot(&self) -> Vec<ClientSnapshot> {
        let mut out: Vec<ClientSnapshot> = self
            .names
            .iter()
            .zip(self.counters.iter())
            .filter_map(|(name, c)| {
                let (name, pool) = name.clone()?;
                Some(ClientSnapshot {
                    name,
                    pool,
                    hits: c.hits.load(Relaxed),
                    upstream: c.upstream.load(Relaxed),
                    refused: c.refused.load(Relaxed),
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

impl super::Broker {
    /// The broker's series: the token cache, the upstream budget, each client,
    /// and the token endpoint calls.
    pub(crate) fn encode(&self, out: &mut Encoder) {
        let list = self.revocations().snapshot();
        out.family(
            "revocations_in_force",
            "gauge",
            "Revocations in force (the kill switch), by what they cover; a revoked client stays listed one token lifetime after its revocation or restore.",
        );
        for (target, n) in [
            (
                "client",
                list.entries()
                    .filter(|r| r.target == crate::revocations::Target::Client)
                    .count(),
            ),
            (
                "token",
                list.entries()
                    .filter(|r| r.target == crate::revocations::Target::Token)
                    .count(),
            ),
        ] {
            let _ = writeln!(
                out,
                "m2m_gateway_revocations_in_force{{target=\"{target}\"}} {n}"
            );
        }
        out.gauge(
            "revoked_clients_blocked",
            "Clients cut off from new tokens now.",
            list.entries().filter(|r| r.blocked).count() as f64,
        );
        let b = self.stats().snapshot();
        // Token cache.
        for (name, help, value) in [
            (
                "token_cache_hits_total",
                "GetToken answered from the cache.",
                b.hits,
            ),
            (
                "token_cache_misses_total",
                "GetToken with no usable cached entry.",
                b.misses,
            ),
            (
                "token_cache_refreshes_total",
                "GetToken past the refresh point of its entry.",
                b.refreshes,
            ),
            (
                "token_cache_coalesced_total",
                "GetToken that waited for an upstream call already in flight.",
                b.coalesced,
            ),
            (
                "token_cache_stale_served_total",
                "Cached tokens served because a refresh failed.",
                b.stale_served,
            ),
            (
                "unproven_secrets_total",
                "GetToken with a secret not (or no longer) proven for its client.",
                b.unproven,
            ),
            (
                "failed_auth_limited_total",
                "GetToken refused by the failed-attempt limit.",
                b.rate_limited,
            ),
        ] {
            out.counter(name, help, value);
        }
        out.gauge(
            "proven_secrets",
            "Client secrets Cognito accepted, live (kept as keyed hashes).",
            self.proven_secrets() as f64,
        );

        // Upstream budget (limits.upstream_per_second).
        let budget = self.budget_stats();
        let _ = writeln!(
            out,
            "# HELP m2m_gateway_upstream_budget_granted_total Slots of the upstream budget taken, by kind.\n# TYPE m2m_gateway_upstream_budget_granted_total counter"
        );
        for (kind, n) in [
            ("miss", &budget.granted_miss),
            ("refresh", &budget.granted_refresh),
        ] {
            let _ = writeln!(
                out,
                "m2m_gateway_upstream_budget_granted_total{{kind=\"{kind}\"}} {}",
                n.load(Relaxed)
            );
        }
        budget.encode(out);
        let _ = writeln!(
            out,
            "# HELP m2m_gateway_upstream_budget_wait_seconds_total Time misses waited for upstream slots.\n# TYPE m2m_gateway_upstream_budget_wait_seconds_total counter\nm2m_gateway_upstream_budget_wait_seconds_total {}",
            budget.waited_us.load(Relaxed) as f64 / 1e6
        );

        // Per client, by registered name.
        let clients = self.client_stats().snapshot();
        for (family, help, pick) in [
            (
                "client_token_cache_hits_total",
                "GetToken answered from the cache, by client.",
                (|c: &ClientSnapshot| c.hits) as fn(&ClientSnapshot) -> u64,
            ),
            (
                "client_upstream_requests_total",
                "Token endpoint calls, by client.",
                |c: &ClientSnapshot| c.upstream,
            ),
            (
                "client_refusals_total",
                "GetToken refused (credentials, scopes, limits), by client.",
                |c: &ClientSnapshot| c.refused,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP m2m_gateway_{family} {help}\n# TYPE m2m_gateway_{family} counter"
            );
            for c in &clients {
                let _ = writeln!(
                    out,
                    "m2m_gateway_{family}{{client=\"{}\",pool=\"{}\"}} {}",
                    label_value(&c.name),
                    label_value(&c.pool),
                    pick(c)
                );
            }
        }
        out.gauge(
            "token_cache_entries",
            "Cached (client, scope set) entries.",
            self.cached_entries() as f64,
        );

        // Upstream, by pool.
        let _ = writeln!(
            out,
            "# HELP m2m_gateway_upstream_requests_total Token endpoint calls by pool and outcome.\n# TYPE m2m_gateway_upstream_requests_total counter"
        );
        for p in &b.pools {
            let pool = crate::prometheus::label_value(&p.pool);
            for (label, n) in &p.outcomes {
                let _ = writeln!(
                    out,
                    "m2m_gateway_upstream_requests_total{{pool=\"{pool}\",outcome=\"{label}\"}} {n}"
                );
            }
        }
        let series: Vec<(String, HistogramSnapshot)> = b
            .pools
            .iter()
            .map(|p| {
                (
                    format!("pool=\"{}\"", crate::prometheus::label_value(&p.pool)),
                    p.latency.clone(),
                )
            })
            .collect();
        out.histogram(
            "m2m_gateway_upstream_duration_seconds",
            "Token endpoint call latency, by pool.",
            &series,
        );
    }
}
