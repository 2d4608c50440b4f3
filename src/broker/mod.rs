//! The GetToken broker: registry checks, the token cache keyed by (client, scope
//! set), proven secrets (several per client, so rotations cost nothing), the
//! failed-attempt limit for unproven ones, single flight per key (per fleet with
//! Redis), refresh at a jittered share of the lifetime, stale-on-error, and the
//! upstream budget that keeps the account under Cognito's quota. Knows nothing of
//! tonic; [`BrokerError`] is mapped to gRPC statuses by [`crate::status`].

mod budget;
mod check;
mod error;
mod fleet;
#[cfg(feature = "aws")]
mod iam;
mod iam_token;
mod link;
#[cfg(test)]
mod memory_fleet;
mod pools;
mod proven;
mod shared;
mod stats;
mod sync;
mod target;

use std::{
    collections::HashMap,
    fmt,
    net::IpAddr,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::Duration,
};

use aws_lc_rs::hmac;
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use futures_util::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use governor::{
    DefaultKeyedRateLimiter, Quota,
    clock::{Clock as _, DefaultClock},
};
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;

pub use crate::oauth::{AccessToken, CognitoClient, TokenEndpoint, TokenResponse, UpstreamError};
pub use budget::BudgetStats;
pub use check::{RedisCheckError, RedisReport};
pub use error::{BrokerError, CredentialsError, ScopeRefusal};
pub use fleet::{
    DEFAULT_LOCK_WAIT, DEFAULT_REDIS_TIMEOUT, FleetCache, FleetSettings, FleetSetupError,
    FleetStats,
};
pub use link::check_ca_pem;
pub use pools::PoolRoutes;
pub use stats::{BrokerStats, ClientSnapshot, ClientStats, LATENCY_BUCKETS, StatsSnapshot};
pub use target::{IamService, IamTarget, LinkError, RedisMode, RedisTarget, Topology};

use budget::{Grant, Priority, Schedule};
use proven::{ProvenSecrets, Verifier};
use shared::{Alone, Budget, Lock, PeerWait, ProofRecord, ProofStore, SharedTokens};

use crate::registry::{self, Client, Registry, ScopeRequestError, ScopeSet};

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

/// Upstream calls a second open to secrets not yet proven: a tenth of the budget
/// (at least one), so strangers cycling wrong secrets cannot spend the rest.
fn strangers_share(per_second: NonZeroU32) -> u32 {
    (per_second.get() / 10).max(1)
}

/// Slots of the schedule one client may hold ahead at once: a quarter of a
/// second's budget, at least two.
fn client_share(per_second: Option<NonZeroU32>) -> usize {
    per_second.map_or(usize::MAX >> 4, |n| (n.get() as usize / 4).max(2))
}

/// The time between two slots of the budget.
fn budget_interval(settings: &BrokerSettings) -> Duration {
    Duration::from_secs(1) / settings.upstream_per_second.map_or(1, NonZeroU32::get)
}

/// The per-client limit of unproven attempts is this many times the per-source
/// one: an owner at another address is served while one address floods.
const SOURCES_PER_CLIENT: u32 = 10;
/// Past this many (client, source) pairs the limiter forgets idle ones.
const MAX_LIMITED_SOURCES: usize = 65_536;
/// Buckets of the unknown-client-id limiter.
const UNKNOWN_BUCKETS: u64 = 4096;

/// Longest client secret accepted. Cognito's own are 24–64 characters; the room
/// above covers emulators and other OAuth servers, and anything longer is refused
/// before it costs an upstream or Redis call.
pub const MAX_SECRET_LEN: usize = 128;

/// Refuses ids and secrets that no Cognito app client can have.
fn check_shape(credentials: &Credentials) -> Result<(), BrokerError> {
    if credentials.client_id.is_empty() || credentials.secret.expose_secret().is_empty() {
        return Err(BrokerError::InvalidClient);
    }
    if !registry::is_valid_client_id(&credentials.client_id) {
        return Err(BrokerError::MalformedCredentials(
            CredentialsError::ClientId,
        ));
    }
    let secret = credentials.secret.expose_secret();
    if secret.len() > MAX_SECRET_LEN || !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(BrokerError::MalformedCredentials(CredentialsError::Secret));
    }
    Ok(())
}

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

type CacheKey = (Arc<str>, Arc<str>);
/// A flight for a key: shared by every proven caller (`None`), or by the callers
/// of one unproven secret.
type FlightKey = (CacheKey, Option<Verifier>);
/// What a flight ends with: the verifier whose secret it presented, and the entry.
type FlightResult = (Verifier, Result<Arc<Entry>, BrokerError>);
type Flight = Shared<BoxFuture<'static, FlightResult>>;

/// Who asks: the presented credentials, their verifier, and where the call came
/// from (for the failed-attempt limit).
#[derive(Clone, Copy)]
struct Caller<'a> {
    credentials: &'a Credentials,
    verifier: Verifier,
    source: Option<IpAddr>,
    /// Whether the secret is proven (a proven caller's attempts are not counted).
    proven: bool,
}

impl<'a> Caller<'a> {
    /// A caller whose secret is proven.
    fn proven(credentials: &'a Credentials, verifier: Verifier) -> Self {
        Self {
            credentials,
            verifier,
            source: None,
            proven: true,
        }
    }
}

/// A cached token. Whom it is handed to is decided by the client's proven
/// secrets, not by the entry.
struct Entry {
    token: AccessToken,
    scopes: Arc<[String]>,
    lifetime: Duration,
    refresh_at: Instant,
    expires_at: Instant,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("scopes", &self.scopes)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl Entry {
    /// The token as handed out at `at`.
    fn issued(&self, at: Instant) -> IssuedToken {
        IssuedToken {
            access_token: self.token.clone(),
            expires_in: self.expires_at.saturating_duration_since(at).as_secs(),
            scopes: self.scopes.clone(),
        }
    }
}

struct EntryExpiry;

impl moka::Expiry<CacheKey, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<Entry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.lifetime)
    }
}

/// Removes a flight from the in-flight table when its task ends, however it
/// ends (an error, a panic, an abort at shutdown): no stuck flight is left.
struct FlightGuard {
    broker: Broker,
    key: Option<FlightKey>,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.broker
                .inner
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
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
    inflight: Mutex<HashMap<FlightKey, Flight>>,
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
                stats: BrokerStats::default(),
                fleet,
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

    /// Number of cached entries (approximate).
    pub fn cached_entries(&self) -> u64 {
        self.inner.cache.entry_count()
    }

    /// Returns a token for `credentials` carrying `scopes` (empty = every allowed
    /// scope): from the cache when the secret is proven for the client, else from
    /// Cognito, which proves or refuses the secret.
    pub async fn get_token(
        &self,
        credentials: &Credentials,
        scopes: &[String],
    ) -> Result<IssuedToken, BrokerError> {
        self.get_token_from(credentials, scopes, None).await
    }

    /// [`Broker::get_token`] for a caller at `source`: unproven attempts are
    /// limited per (client, source) and, more loosely, per client, so that a
    /// stranger who knows a client id cannot lock its owner out. Until a secret
    /// is proven, the answer says nothing about the client: an unknown id, a
    /// scope the client may not ask and a wrong secret are refused alike.
    pub async fn get_token_from(
        &self,
        credentials: &Credentials,
        scopes: &[String],
        source: Option<IpAddr>,
    ) -> Result<IssuedToken, BrokerError> {
        let inner = &self.inner;
        check_shape(credentials)?;
        inner
            .registry
            .check_scope_syntax(scopes)
            .map_err(BrokerError::MalformedScopes)?;
        let Some(client) = inner.registry.get(&credentials.client_id) else {
            return Err(self.unknown_client(&credentials.client_id));
        };
        let verifier = self.verifier(&credentials.client_id, &credentials.secret);
        let now = Instant::now();
        let proven = inner.proven.is_proven(client.index, &verifier, now);
        let scopes = match inner.registry.normalise_checked(client, scopes) {
            Ok(scopes) => scopes,
            Err(e) => {
                inner.clients.refused(client.index);
                return Err(match e {
                    ScopeRequestError::NotAllowed(scope) if proven => {
                        BrokerError::ScopeNotAllowed(ScopeRefusal::NotRegistered(scope))
                    }
                    // Nothing about the client for an unproven secret: refused
                    // like an unknown id, and counted like a wrong secret.
                    ScopeRequestError::NotAllowed(_) => match self.admit_unverified(client, source)
                    {
                        Ok(()) => BrokerError::InvalidClient,
                        Err(limited) => limited,
                    },
                    e => BrokerError::MalformedScopes(e),
                });
            }
        };
        let key: CacheKey = (client.client_id.clone(), scopes.param().clone());
        if !proven {
            // Limited before anything else (Redis included) is asked.
            return Box::pin(self.unproven(client, key, verifier, credentials, scopes, source))
                .await;
        }

        let mut cached = inner.cache.get(&key).filter(|e| self.usable(e, now));
        // Another replica may hold the entry, or a fresher one.
        if inner.seams.shared && cached.as_ref().is_none_or(|e| now >= e.refresh_at) {
            // Boxed, like every path that leaves the process: a cache hit's
            // future stays small.
            cached = Box::pin(self.fresher_in_fleet(&key, cached, now)).await;
        }
        match cached {
            Some(entry) if now < entry.refresh_at => {
                inner.stats.hit();
                inner.clients.hit(client.index);
                // Served at `now`: no second clock read.
                Ok(entry.issued(now))
            }
            Some(entry) => {
                inner.stats.refresh();
                let fetched = self
                    .proven_fetch(
                        client,
                        key,
                        verifier,
                        credentials,
                        scopes,
                        Some(entry.clone()),
                    )
                    .await;
                match fetched {
                    Ok(fresh) => Ok(fresh.issued(Instant::now())),
                    Err(e) if e.is_transient() && self.usable(&entry, Instant::now()) => {
                        if !matches!(e, BrokerError::UpstreamBudget { .. }) {
                            inner.stats.stale_served();
                            tracing::warn!(client = %client.name, pool = %client.pool, error = %e, "refresh failed; serving the cached token");
                        }
                        inner.clients.hit(client.index);
                        Ok(entry.issued(Instant::now()))
                    }
                    Err(e) => Err(e),
                }
            }
            None => {
                inner.stats.miss();
                self.proven_fetch(client, key, verifier, credentials, scopes, None)
                    .await
                    .map(|entry| entry.issued(Instant::now()))
            }
        }
    }

    /// A secret Cognito has not (or no longer) accepted for this client: asked of
    /// Cognito at the failed-attempt rate; its token is handed out only once
    /// Cognito accepted it.
    async fn unproven(
        &self,
        client: &Client,
        key: CacheKey,
        verifier: Verifier,
        credentials: &Credentials,
        scopes: ScopeSet,
        source: Option<IpAddr>,
    ) -> Result<IssuedToken, BrokerError> {
        self.inner.stats.unproven();
        let (_, result) = self
            .fetch(
                client,
                (key, Some(verifier)),
                Caller {
                    credentials,
                    verifier,
                    source,
                    proven: false,
                },
                scopes,
                None,
            )
            .await;
        result.map(|entry| entry.issued(Instant::now()))
    }

    /// The shared flight of proven callers. When it fails because Cognito refused
    /// the secret of the caller who started it (deleted in a rotation), a caller
    /// whose own secret is still proven asks again with it.
    fn proven_fetch<'a>(
        &'a self,
        client: &'a Client,
        key: CacheKey,
        verifier: Verifier,
        credentials: &'a Credentials,
        scopes: ScopeSet,
        current: Option<Arc<Entry>>,
    ) -> BoxFuture<'a, Result<Arc<Entry>, BrokerError>> {
        Box::pin(async move {
            let flight_key = (key, None);
            let (used, result) = self
                .fetch(
                    client,
                    flight_key.clone(),
                    Caller::proven(credentials, verifier),
                    scopes.clone(),
                    current.clone(),
                )
                .await;
            match result {
                Err(BrokerError::InvalidClient)
                    if used != verifier
                        && self
                            .inner
                            .proven
                            .is_proven(client.index, &verifier, Instant::now()) =>
                {
                    self.fetch(
                        client,
                        flight_key,
                        Caller::proven(credentials, verifier),
                        scopes,
                        current,
                    )
                    .await
                    .1
                }
                other => other,
            }
        })
    }

    /// The fleet's entry for `key` when it is fresher than `cached` (and usable).
    async fn fresher_in_fleet(
        &self,
        key: &CacheKey,
        cached: Option<Arc<Entry>>,
        now: Instant,
    ) -> Option<Arc<Entry>> {
        if let Some(entry) = self.inner.seams.tokens.get(key).await {
            let fresher = cached
                .as_ref()
                .is_none_or(|c| entry.expires_at > c.expires_at);
            if fresher && self.usable(&entry, now) {
                self.inner.cache.insert(key.clone(), entry.clone());
                return Some(entry);
            }
        }
        cached
    }

    fn usable(&self, entry: &Entry, now: Instant) -> bool {
        entry.expires_at.saturating_duration_since(now) > self.inner.settings.min_remaining
    }

    /// One unproven attempt for `client` from `source`: within the limit of that
    /// (client, source), then within the looser one of the client.
    fn admit_unverified(&self, client: &Client, source: Option<IpAddr>) -> Result<(), BrokerError> {
        let inner = &self.inner;
        if inner.limiter.len() > MAX_LIMITED_SOURCES {
            inner.limiter.retain_recent();
        }
        let admitted = inner
            .limiter
            .check_key(&(client.index, source))
            .and_then(|()| inner.client_limiter.check_key(&client.index));
        admitted.map_err(|not_until| {
            inner.stats.rate_limited();
            inner.clients.refused(client.index);
            BrokerError::TooManyFailedAttempts {
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            }
        })
    }

    /// An unknown client id: refused like a known one with a wrong secret,
    /// limited like one too (in buckets, so that the table stays small).
    fn unknown_client(&self, client_id: &str) -> BrokerError {
        use std::hash::BuildHasher as _;
        let bucket = (self.inner.unknown_buckets.hash_one(client_id) % UNKNOWN_BUCKETS) as u16;
        match self.inner.unknown_limiter.check_key(&bucket) {
            Ok(()) => BrokerError::InvalidClient,
            Err(not_until) => {
                self.inner.stats.rate_limited();
                BrokerError::TooManyFailedAttempts {
                    retry_after: not_until.wait_time_from(DefaultClock::default().now()),
                }
            }
        }
    }

    fn verifier(&self, client_id: &str, secret: &SecretString) -> Verifier {
        let mut ctx = hmac::Context::with_key(&self.inner.verifier_key);
        ctx.update(client_id.as_bytes());
        ctx.update(&[0]);
        ctx.update(secret.expose_secret().as_bytes());
        <[u8; 32]>::try_from(ctx.sign().as_ref()).expect("HMAC-SHA-256 is 32 bytes")
    }

    /// One upstream call per flight key at a time; later callers join it. The call
    /// runs in its own task so that a caller giving up does not cancel it. A new
    /// flight of an unproven secret takes a unit of the failed-attempt limit;
    /// joining one does not.
    async fn fetch(
        &self,
        client: &Client,
        flight_key: FlightKey,
        caller: Caller<'_>,
        scopes: ScopeSet,
        current: Option<Arc<Entry>>,
    ) -> FlightResult {
        let Caller {
            credentials,
            verifier,
            source,
            ..
        } = caller;
        let flight = {
            let mut inflight = self
                .inner
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(flight) = inflight.get(&flight_key) {
                self.inner.stats.coalesced();
                flight.clone()
            } else {
                if flight_key.1.is_some() {
                    if let Err(e) = self.admit_unverified(client, source) {
                        return (verifier, Err(e));
                    }
                }
                let this = self.clone();
                let client = client.clone();
                let credentials = credentials.clone();
                let task_key = flight_key.clone();
                let task = tokio::spawn(async move {
                    let _guard = FlightGuard {
                        broker: this.clone(),
                        key: Some(task_key.clone()),
                    };
                    let caller = Caller {
                        credentials: &credentials,
                        verifier,
                        source,
                        proven: task_key.1.is_none(),
                    };
                    let result = this
                        .obtain(&client, &task_key.0, caller, &scopes, current)
                        .await;
                    if let Ok(entry) = &result {
                        this.inner.cache.insert(task_key.0.clone(), entry.clone());
                    }
                    result
                });
                let flight: Flight = async move {
                    let result = task.await.unwrap_or_else(|_| {
                        Err(BrokerError::Internal("token fetch task failed".into()))
                    });
                    (verifier, result)
                }
                .boxed()
                .shared();
                inflight.insert(flight_key, flight.clone());
                flight
            }
        };
        flight.await
    }

    /// One token for the fleet: the replica holding the fleet's lock looks once
    /// more for an entry a peer stored meanwhile, else fetches and stores; the
    /// others wait for its entry (or, refreshing, keep serving `current`), and
    /// fetch themselves if the wait runs out. A peer's entry goes to an unproven
    /// secret only once the fleet holds a proof of that secret (the peer
    /// presented the same one). On its own (or with the store down) a replica
    /// takes every lock at once and finds nothing stored: a plain upstream call.
    async fn obtain(
        &self,
        client: &Client,
        key: &CacheKey,
        caller: Caller<'_>,
        scopes: &ScopeSet,
        current: Option<Arc<Entry>>,
    ) -> Result<Arc<Entry>, BrokerError> {
        let (proven, verifier) = (caller.proven, caller.verifier);
        let priority = if current.is_some() {
            Priority::Refresh
        } else {
            Priority::Miss
        };
        let tokens = &self.inner.seams.tokens;
        let deadline = Instant::now() + tokens.lock_wait();
        loop {
            match tokens.try_lock(key).await {
                Lock::Taken(lock) => {
                    let mut peer = self.stored_by_peer(key, &current).await;
                    if peer.is_some() && !proven && !self.proven_by_fleet(client, &verifier).await {
                        peer = None;
                    }
                    let result = match peer {
                        Some(entry) => Ok(entry),
                        None => {
                            self.upstream_shared(client, key, caller, scopes, priority)
                                .await
                        }
                    };
                    tokens.unlock(key, lock).await;
                    return result;
                }
                Lock::Busy => {
                    if let Some(current) =
                        current.as_ref().filter(|c| self.usable(c, Instant::now()))
                    {
                        // Another replica is refreshing; the current token still lives.
                        return Ok(current.clone());
                    }
                    match tokens.wait_for_peer(key, deadline).await {
                        PeerWait::Entry(entry) => {
                            if self.usable(&entry, Instant::now())
                                && (proven || self.proven_by_fleet(client, &verifier).await)
                            {
                                return Ok(entry);
                            }
                            // Not for this secret: it needs its own answer.
                            break;
                        }
                        PeerWait::Released if Instant::now() < deadline => continue,
                        PeerWait::Released | PeerWait::TimedOut | PeerWait::Failed => break,
                    }
                }
                Lock::Unavailable => break,
            }
        }
        self.upstream_shared(client, key, caller, scopes, priority)
            .await
    }

    /// An upstream call whose entry is stored for the fleet.
    async fn upstream_shared(
        &self,
        client: &Client,
        key: &CacheKey,
        caller: Caller<'_>,
        scopes: &ScopeSet,
        priority: Priority,
    ) -> Result<Arc<Entry>, BrokerError> {
        let result = self.upstream(client, key, caller, scopes, priority).await;
        if let Ok(entry) = &result {
            self.inner.seams.tokens.put(key, entry).await;
        }
        result
    }

    /// Whether the fleet holds a live proof of `verifier` for `client` (imported
    /// into this replica's proofs as a side effect). Asked only by a flight of an
    /// unproven secret, which the failed-attempt limit admitted.
    async fn proven_by_fleet(&self, client: &Client, verifier: &Verifier) -> bool {
        let proofs = &self.inner.seams.proofs;
        let client_ref = proofs.client_ref(&client.client_id);
        for record in proofs.load(&client_ref).await.unwrap_or_default() {
            self.inner.proven.apply(client.index, record);
        }
        self.inner
            .proven
            .is_proven(client.index, verifier, Instant::now())
    }

    /// The entry a peer stored between this replica's look and its lock: usable,
    /// not yet due for refresh, and newer than `current`.
    async fn stored_by_peer(
        &self,
        key: &CacheKey,
        current: &Option<Arc<Entry>>,
    ) -> Option<Arc<Entry>> {
        let entry = self.inner.seams.tokens.get(key).await?;
        let now = Instant::now();
        let newer = current
            .as_ref()
            .is_none_or(|c| entry.expires_at > c.expires_at);
        (newer && now < entry.refresh_at && self.usable(&entry, now)).then_some(entry)
    }

    /// Waits for a slot of the upstream budget (a miss), or takes one only if it
    /// is free now (a refresh). A secret not yet proven first needs a slot of the
    /// strangers' share (a tenth of the budget, fleet-wide with Redis).
    async fn admit_upstream(
        &self,
        client: &Client,
        priority: Priority,
        proven: bool,
    ) -> Result<(), BrokerError> {
        let inner = &self.inner;
        let Some(budget) = &inner.seams.budget else {
            return Ok(());
        };
        let max_wait = inner.settings.upstream_max_wait;
        let started = Instant::now();
        // A client's misses reserve at most its share of slots ahead; the rest
        // queue here, behind its own, so another client's first miss is never
        // more than that share behind (one client's new scope sets cannot empty
        // the schedule for everyone else).
        let _share = if priority == Priority::Miss {
            let queue = &inner.client_queues[client.index];
            match tokio::time::timeout(max_wait, queue.acquire()).await {
                Ok(Ok(permit)) => Some(permit),
                Ok(Err(_)) => None,
                Err(_) => {
                    inner
                        .stats
                        .budget
                        .refused
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Err(BrokerError::UpstreamBudget {
                        retry_after: max_wait + budget_interval(&inner.settings),
                    });
                }
            }
        } else {
            None
        };
        let max_wait = max_wait.saturating_sub(started.elapsed());
        if !proven {
            if let Some(strangers) = &inner.seams.strangers {
                match strangers.reserve(Priority::Miss, max_wait).await {
                    Grant::After(delay) => tokio::time::sleep(delay).await,
                    Grant::Refused { retry_after } => {
                        let stats = &inner.stats.budget;
                        stats
                            .strangers_refused
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return Err(BrokerError::UpstreamBudget { retry_after });
                    }
                }
            }
        }
        let grant = budget.reserve(priority, max_wait).await;
        inner.stats.budget.record(priority, grant);
        match grant {
            Grant::After(delay) => {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Ok(())
            }
            Grant::Refused { retry_after } => Err(BrokerError::UpstreamBudget { retry_after }),
        }
    }

    async fn upstream(
        &self,
        client: &Client,
        key: &CacheKey,
        caller: Caller<'_>,
        scopes: &ScopeSet,
        priority: Priority,
    ) -> Result<Arc<Entry>, BrokerError> {
        let inner = &self.inner;
        let (credentials, verifier) = (caller.credentials, caller.verifier);
        self.admit_upstream(client, priority, caller.proven).await?;
        let started = Instant::now();
        inner.clients.upstream(client.index);
        let result = inner
            .upstream
            .client_credentials(&credentials.client_id, &credentials.secret, &key.1)
            .await;
        let elapsed = started.elapsed();
        let response = match result {
            Ok(r) => {
                inner.stats.upstream("ok", elapsed);
                r
            }
            Err(e) => {
                inner.stats.upstream(e.label(), elapsed);
                if e == UpstreamError::InvalidClient {
                    inner.clients.refused(client.index);
                    self.revoke(client, verifier, started).await;
                }
                tracing::info!(client = %client.name, pool = %client.pool, outcome = e.label(), "token request refused or failed");
                return Err(e.into());
            }
        };
        let granted = match token_scopes(response.access_token.expose()) {
            Some(granted) => granted,
            None => scopes.iter().map(str::to_owned).collect(),
        };
        let lifetime = Duration::from_secs(response.expires_in);
        // Cognito accepted the secret: proven (again) for one token lifetime.
        self.prove(client, verifier, started + lifetime, started)
            .await;
        if let Some(extra) = granted.iter().find(|s| !scopes.contains(s)) {
            tracing::error!(client = %client.name, pool = %client.pool, scope = %extra, "Cognito returned a token broader than the request; refusing it");
            return Err(BrokerError::UpstreamUnavailable(
                "the token endpoint returned a token with scopes outside the request".into(),
            ));
        }
        let settings = &inner.settings;
        let share = settings.refresh_ratio - settings.refresh_jitter * unit_random();
        Ok(Arc::new(Entry {
            token: response.access_token,
            scopes: granted.into(),
            lifetime,
            refresh_at: started + lifetime.mul_f64(share.max(0.0)),
            expires_at: started + lifetime,
        }))
    }

    /// Cognito, asked at `at`, accepted the secret: proven here and in the fleet.
    async fn prove(&self, client: &Client, verifier: Verifier, until: Instant, at: Instant) {
        self.inner
            .proven
            .prove_at(client.index, verifier, until, at);
        let proofs = &self.inner.seams.proofs;
        let record = ProofRecord::Proven {
            verifier,
            until,
            at,
        };
        proofs
            .record(&proofs.client_ref(&client.client_id), record)
            .await;
    }

    /// Cognito refused the secret: forgotten here and in the fleet.
    async fn revoke(&self, client: &Client, verifier: Verifier, at: Instant) {
        if self.inner.proven.revoke_at(client.index, &verifier, at) {
            tracing::info!(client = %client.name, pool = %client.pool, "Cognito refused a proven secret; it is no longer accepted");
        }
        let proofs = &self.inner.seams.proofs;
        proofs
            .record(
                &proofs.client_ref(&client.client_id),
                ProofRecord::Refused { verifier, at },
            )
            .await;
    }
}

pub(crate) use crate::oauth::unit_random;

/// The `scope` claim of a JWT access token, read without verification (the token
/// comes straight from the token endpoint over TLS). `None` for opaque tokens.
fn token_scopes(token: &str) -> Option<Vec<String>> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let scope = claims.get("scope")?.as_str()?;
    Some(
        scope
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    )
}

#[cfg(test)]
mod tests;
