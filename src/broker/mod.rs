//! The GetToken broker: registry checks, the token cache keyed by (client, scope
//! set), proven secrets (several per client, so rotations cost nothing), the
//! failed-attempt limit for unproven ones, single flight per key (per fleet with
//! Redis), refresh at a jittered share of the lifetime, stale-on-error, and the
//! upstream budget that keeps the account under Cognito's quota. Knows nothing of
//! tonic; [`BrokerError`] is mapped to gRPC statuses by [`crate::status`].

mod budget;
mod check;
mod entry;
mod error;
mod fleet;
mod flight;
mod hot_path;
#[cfg(feature = "aws")]
mod iam;
mod iam_token;
mod link;
#[cfg(test)]
mod memory_fleet;
mod pools;
mod proven;
mod revoke;
mod shared;
mod stats;
mod sync;
mod target;
mod upstream;

use std::{
    collections::HashMap,
    fmt,
    net::IpAddr,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::Duration,
};

use aws_lc_rs::hmac;
use governor::{DefaultKeyedRateLimiter, Quota};
use secrecy::SecretString;

pub(crate) use crate::oauth::CognitoClient;
pub use crate::oauth::{AccessToken, TokenEndpoint, TokenResponse, UpstreamError};
pub use budget::{BudgetStats, BudgetStatsSnapshot};
pub use check::{RedisCheckError, RedisReport};
pub use error::{BrokerError, CredentialsError, ScopeRefusal};
pub use fleet::{
    DEFAULT_LOCK_WAIT, DEFAULT_REDIS_TIMEOUT, FleetCache, FleetSettings, FleetSetupError,
    FleetStats, FleetStatsSnapshot,
};
pub use link::check_ca_pem;
pub use pools::PoolRoutes;
pub use stats::{
    BrokerStats, ClientSnapshot, ClientStats, LATENCY_BUCKETS, PoolUpstreamSnapshot, StatsSnapshot,
};
pub use target::{IamService, IamTarget, LinkError, RedisMode, RedisTarget, Topology};

pub use hot_path::MAX_SECRET_LEN;

use budget::Schedule;
use entry::{CacheKey, Entry, EntryExpiry};
use flight::Flights;
use proven::ProvenSecrets;
use shared::{Alone, Budget, ProofStore, RevocationStore, SharedTokens};
use upstream::{client_share, strangers_share};

use crate::registry::Registry;

/// A caller's credentials. `Debug` never shows the secret.
#[derive(Clone)]
pub struct Credentials {
    /// The Cognito app client id.
    pub client_id: String,
    /// The app client secret.
    pub secret: SecretString,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("client_id", &self.client_id)
            .field("secret", &"...")
            .finish()
    }
}

/// A token handed to a caller.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The access token.
    pub access_token: AccessToken,
    /// Whole seconds of validity left now.
    pub expires_in: u64,
    /// Scopes the token carries (shared with the cache entry).
    pub scopes: Arc<[String]>,
}

/// The per-client limit of unproven attempts is this many times the per-source
/// one: an owner at another address is served while one address floods.
const SOURCES_PER_CLIENT: u32 = 10;
/// Tunables of the broker. `Debug` never shows the key.
#[derive(Clone)]
pub struct BrokerSettings {
    /// Most cached (client, scope set) entries.
    pub max_entries: u64,
    /// Share of the lifetime after which a token is refreshed.
    pub refresh_ratio: f64,
    /// Refresh points are spread over `[refresh_ratio - refresh_jitter,
    /// refresh_ratio]` of the lifetime, so that tokens obtained together are not
    /// all refreshed in the same second.
    pub refresh_jitter: f64,
    /// A token with less life than this is never handed out.
    pub min_remaining: Duration,
    /// Upstream attempts per client and minute with secrets Cognito has not
    /// accepted (proven secrets are never limited).
    pub failed_auth_per_minute: NonZeroU32,
    /// Token calls per second to Cognito (fleet-wide with Redis); `None` = no cap.
    pub upstream_per_second: Option<NonZeroU32>,
    /// Longest wait of a miss for an upstream slot.
    pub upstream_max_wait: Duration,
    /// Keys the secret verifiers; random per process when `None`.
    pub verifier_key: Option<[u8; 32]>,
}

impl fmt::Debug for BrokerSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerSettings")
            .field("max_entries", &self.max_entries)
            .field("refresh_ratio", &self.refresh_ratio)
            .field("refresh_jitter", &self.refresh_jitter)
            .field("min_remaining", &self.min_remaining)
            .field("failed_auth_per_minute", &self.failed_auth_per_minute)
            .field("upstream_per_second", &self.upstream_per_second)
            .field("upstream_max_wait", &self.upstream_max_wait)
            .field("verifier_key", &self.verifier_key.as_ref().map(|_| "..."))
            .finish()
    }
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            max_entries: 10_000,
            refresh_ratio: 0.75,
            refresh_jitter: 0.05,
            min_remaining: Duration::from_secs(10),
            failed_auth_per_minute: NonZeroU32::new(10).expect("non-zero"),
            upstream_per_second: NonZeroU32::new(100),
            upstream_max_wait: Duration::from_secs(5),
            verifier_key: None,
        }
    }
}

/// What the broker shares with other replicas, behind three seams (see `shared`).
pub(crate) struct Seams {
    tokens: Arc<dyn SharedTokens>,
    proofs: Arc<dyn ProofStore>,
    /// `None`: no upstream cap.
    budget: Option<Arc<dyn Budget>>,
    /// The share of the budget open to secrets not yet proven.
    strangers: Option<Arc<dyn Budget>>,
    /// The fleet's revocations (`None` for a replica on its own).
    revocations: Option<Arc<dyn RevocationStore>>,
    /// Whether announcements are followed (false for a replica on its own).
    shared: bool,
}

impl Seams {
    /// One replica on its own, with its own schedule.
    fn alone(settings: &BrokerSettings) -> Self {
        Self {
            tokens: Arc::new(Alone),
            proofs: Arc::new(Alone),
            budget: settings
                .upstream_per_second
                .map(|n| Arc::new(Schedule::new(n.get())) as Arc<dyn Budget>),
            strangers: settings
                .upstream_per_second
                .map(|n| Arc::new(Schedule::new(strangers_share(n))) as Arc<dyn Budget>),
            revocations: None,
            shared: false,
        }
    }

    /// The fleet on Redis: its own timeouts, and this replica's schedule while
    /// Redis does not answer.
    fn redis(fleet: &Arc<FleetCache>, settings: &BrokerSettings) -> Self {
        Self {
            tokens: fleet.clone(),
            proofs: Arc::new(fleet.clone()),
            budget: settings.upstream_per_second.map(|n| {
                Arc::new(fleet::FleetBudget::new(
                    fleet.clone(),
                    Schedule::new(n.get()),
                    fleet::BUDGET_KEY,
                )) as Arc<dyn Budget>
            }),
            strangers: settings.upstream_per_second.map(|n| {
                Arc::new(fleet::FleetBudget::new(
                    fleet.clone(),
                    Schedule::new(strangers_share(n)),
                    fleet::STRANGERS_KEY,
                )) as Arc<dyn Budget>
            }),
            revocations: Some(Arc::new(fleet.clone())),
            shared: true,
        }
    }
}

/// The GetToken broker. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    upstream: Arc<dyn TokenEndpoint>,
    /// Synchronous: a lookup is a call, not a future (the hit path stays small).
    cache: moka::sync::Cache<CacheKey, Arc<Entry>, foldhash::fast::RandomState>,
    inflight: Flights,
    verifier_key: hmac::Key,
    proven: ProvenSecrets,
    /// Unproven attempts per (client, source address).
    limiter: DefaultKeyedRateLimiter<(usize, Option<IpAddr>)>,
    /// Unproven attempts per client, over every source.
    client_limiter: DefaultKeyedRateLimiter<usize>,
    /// Attempts with unknown client ids, in a fixed number of buckets: an
    /// unknown id is refused (and limited) like a known one with a wrong secret.
    unknown_limiter: DefaultKeyedRateLimiter<u16>,
    unknown_buckets: foldhash::fast::RandomState,
    seams: Seams,
    /// Each client's share of the schedule's slots ahead (by registry index).
    client_queues: Box<[tokio::sync::Semaphore]>,
    settings: BrokerSettings,
    stats: BrokerStats,
    clients: ClientStats,
    /// The Redis behind the seams, for its counters and state.
    fleet: Option<Arc<FleetCache>>,
    /// The revocations in force (shared with the gateway's validator).
    revocations: crate::revocations::Revocations,
    /// Dropped with the broker: ends its background tasks.
    _alive: tokio::sync::watch::Sender<()>,
    alive: tokio::sync::watch::Receiver<()>,
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broker")
            .field("endpoint", &self.inner.upstream.describe())
            .field("entries", &self.inner.cache.entry_count())
            .field("settings", &self.inner.settings.refresh_ratio)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// A broker for the clients of `registry`, fetching from `upstream`.
    pub fn new(
        registry: Registry,
        upstream: Arc<dyn TokenEndpoint>,
        settings: BrokerSettings,
    ) -> Self {
        Self::with_fleet(registry, upstream, settings, None)
    }

    /// A broker that also shares its cache, its proven secrets and its upstream
    /// budget with other replicas through `fleet`. The verifier key must then be
    /// the same on every replica ([`BrokerSettings::verifier_key`] from
    /// `cache.encryption_key`). Call [`Broker::start`] once a runtime runs.
    pub fn with_fleet(
        registry: Registry,
        upstream: Arc<dyn TokenEndpoint>,
        settings: BrokerSettings,
        fleet: Option<Arc<FleetCache>>,
    ) -> Self {
        let seams = match &fleet {
            Some(fleet) => Seams::redis(fleet, &settings),
            None => Seams::alone(&settings),
        };
        Self::with_seams(registry, upstream, settings, seams, fleet)
    }

    /// A broker on the given seams (the tests' in-memory fleet).
    pub(crate) fn with_seams(
        registry: Registry,
        upstream: Arc<dyn TokenEndpoint>,
        settings: BrokerSettings,
        seams: Seams,
        fleet: Option<Arc<FleetCache>>,
    ) -> Self {
        let key_bytes = settings.verifier_key.map(|k| {
            // Derive rather than reuse the configured key directly.
            let derive = hmac::Key::new(hmac::HMAC_SHA256, &k);
            let tag = hmac::sign(&derive, b"m2m-gateway secret verifier v1");
            <[u8; 32]>::try_from(tag.as_ref()).expect("HMAC-SHA-256 is 32 bytes")
        });
        let verifier_key = match key_bytes {
            Some(k) => hmac::Key::new(hmac::HMAC_SHA256, &k),
            None => hmac::Key::generate(hmac::HMAC_SHA256, &aws_lc_rs::rand::SystemRandom::new())
                .expect("random HMAC key"),
        };
        let cache = moka::sync::Cache::builder()
            .max_capacity(settings.max_entries)
            .expire_after(EntryExpiry)
            .build_with_hasher(foldhash::fast::RandomState::default());
        let per_source = Quota::per_minute(settings.failed_auth_per_minute);
        let limiter = DefaultKeyedRateLimiter::keyed(per_source);
        let per_client = settings
            .failed_auth_per_minute
            .saturating_mul(NonZeroU32::new(SOURCES_PER_CLIENT).expect("non-zero"));
        let client_limiter = DefaultKeyedRateLimiter::keyed(Quota::per_minute(per_client));
        let unknown_limiter = DefaultKeyedRateLimiter::keyed(per_source);
        let slots = registry.clients().map(|c| c.index + 1).max().unwrap_or(0);
        let (alive_tx, alive) = tokio::sync::watch::channel(());
        let mut pools: Vec<Arc<str>> = registry.clients().map(|c| c.pool.clone()).collect();
        pools.sort();
        pools.dedup();
        Self {
            inner: Arc::new(Inner {
                upstream,
                cache,
                inflight: Mutex::new(HashMap::new()),
                verifier_key,
                proven: ProvenSecrets::new(slots),
                limiter,
                client_limiter,
                unknown_limiter,
                unknown_buckets: foldhash::fast::RandomState::default(),
                seams,
                client_queues: (0..slots)
                    .map(|_| {
                        tokio::sync::Semaphore::new(client_share(settings.upstream_per_second))
                    })
                    .collect(),
                clients: ClientStats::new(&registry, slots),
                registry,
                settings,
                stats: BrokerStats::for_pools(pools),
                fleet,
                revocations: crate::revocations::Revocations::default(),
                _alive: alive_tx,
                alive,
            }),
        }
    }

    /// Starts the background work of a fleet broker: connects to Redis now (a
    /// Redis that is down does not stop the start), loads the fleet's proven
    /// secrets and follows their announcements. Stops when the broker is dropped.
    /// Does nothing without Redis.
    pub fn start(&self) {
        if self.inner.seams.shared {
            tokio::spawn(sync::follow_proofs(
                Arc::downgrade(&self.inner),
                self.inner.seams.proofs.clone(),
                self.inner.alive.clone(),
            ));
        }
    }

    /// Counters.
    pub fn stats(&self) -> &BrokerStats {
        &self.inner.stats
    }

    /// Counters of the upstream budget.
    pub fn budget_stats(&self) -> &BudgetStats {
        &self.inner.stats.budget
    }

    /// Per-client counters, by registered name.
    pub fn client_stats(&self) -> &ClientStats {
        &self.inner.clients
    }

    /// Proven secrets currently live, over every client.
    pub fn proven_secrets(&self) -> usize {
        self.inner.proven.live()
    }

    /// The fleet-wide cache, when configured.
    pub fn fleet(&self) -> Option<&FleetCache> {
        self.inner.fleet.as_deref()
    }

    /// Number of cached entries (exact: the cache's pending inserts and
    /// evictions are applied first).
    pub fn cached_entries(&self) -> u64 {
        self.inner.cache.run_pending_tasks();
        self.inner.cache.entry_count()
    }
}

pub(crate) use crate::oauth::unit_random;

#[cfg(test)]
pub(crate) mod tests;
