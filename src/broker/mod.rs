//! The GetToken broker: registry checks, the token cache keyed by (client, scope
//! set), the secret verifier, single flight per key, refresh at a share of the
//! lifetime, and stale-on-error. Knows nothing of tonic; [`BrokerError`] is mapped
//! to gRPC statuses by `service`.

pub mod cognito;
mod fleet;
mod stats;

use std::{
    collections::HashMap,
    fmt,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::Duration,
};

use aws_lc_rs::hmac;
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use governor::{DefaultKeyedRateLimiter, Quota};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tokio::time::Instant;

pub use cognito::{AccessToken, CognitoClient, TokenEndpoint, TokenResponse, UpstreamError};
pub use fleet::{FleetCache, FleetSettings, FleetStats};
pub use stats::{BrokerStats, LATENCY_BUCKETS, StatsSnapshot};

use fleet::{PeerWait, SharedEntry};

use crate::registry::{Registry, ScopeRequestError, ScopeSet};

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

/// Why GetToken failed. One variant per row of the DESIGN status table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// No credentials, unknown client or wrong secret. One message for all three.
    #[error("invalid client credentials")]
    Unauthenticated,
    /// Malformed request.
    #[error("{0}")]
    InvalidArgument(String),
    /// Scope outside the client's registered scopes, or Cognito `invalid_scope`.
    #[error("{0}")]
    PermissionDenied(String),
    /// The app client may not use this grant.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A limit was hit (ours or Cognito's).
    #[error("{0}")]
    ResourceExhausted(String),
    /// Cognito unreachable, failing or answering garbage.
    #[error("{0}")]
    Unavailable(String),
    /// A gateway-side fault.
    #[error("{0}")]
    Internal(String),
}

impl BrokerError {
    /// Stable label for metrics and logs.
    pub const fn label(&self) -> &'static str {
        match self {
            BrokerError::Unauthenticated => "unauthenticated",
            BrokerError::InvalidArgument(_) => "invalid_argument",
            BrokerError::PermissionDenied(_) => "permission_denied",
            BrokerError::FailedPrecondition(_) => "failed_precondition",
            BrokerError::ResourceExhausted(_) => "resource_exhausted",
            BrokerError::Unavailable(_) => "unavailable",
            BrokerError::Internal(_) => "internal",
        }
    }

    fn is_transient(&self) -> bool {
        matches!(
            self,
            BrokerError::Unavailable(_)
                | BrokerError::ResourceExhausted(_)
                | BrokerError::Internal(_)
        )
    }
}

impl From<UpstreamError> for BrokerError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::InvalidClient => BrokerError::Unauthenticated,
            UpstreamError::InvalidScope => BrokerError::PermissionDenied(
                "the app client is not allowed a requested scope (invalid_scope)".into(),
            ),
            UpstreamError::NotPermitted(code) => BrokerError::FailedPrecondition(format!(
                "the app client may not use the client_credentials grant ({code})"
            )),
            UpstreamError::Throttled => {
                BrokerError::ResourceExhausted("Cognito is throttling token requests".into())
            }
            UpstreamError::Rejected(m) => BrokerError::Internal(m),
            UpstreamError::Unavailable(m) => {
                BrokerError::Unavailable(format!("Cognito unavailable: {m}"))
            }
        }
    }
}

/// Tunables of the broker.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// Most cached (client, scope set) entries.
    pub max_entries: u64,
    /// Share of the lifetime after which a token is refreshed.
    pub refresh_ratio: f64,
    /// A token with less life than this is never handed out.
    pub min_remaining: Duration,
    /// Unverified upstream attempts per client and minute once it has failed.
    pub failed_auth_per_minute: NonZeroU32,
    /// Keys the secret verifiers; random per process when `None`.
    pub verifier_key: Option<[u8; 32]>,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            max_entries: 10_000,
            refresh_ratio: 0.75,
            min_remaining: Duration::from_secs(10),
            failed_auth_per_minute: NonZeroU32::new(10).expect("non-zero"),
            verifier_key: None,
        }
    }
}

type CacheKey = (Arc<str>, Arc<str>);
type Verifier = [u8; 32];
type Flight = Shared<BoxFuture<'static, Result<Arc<Entry>, BrokerError>>>;

/// A cached token. Holds an HMAC of the secret that obtained it, never the secret.
struct Entry {
    token: AccessToken,
    scopes: Arc<[String]>,
    verifier: Verifier,
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

    fn to_shared(&self) -> SharedEntry {
        SharedEntry {
            token: self.token.expose().to_owned(),
            scopes: self.scopes.to_vec(),
            verifier: URL_SAFE_NO_PAD.encode(self.verifier),
            expires_at_ms: fleet::instant_to_ms(self.expires_at),
            refresh_at_ms: fleet::instant_to_ms(self.refresh_at),
        }
    }

    fn from_shared(shared: SharedEntry) -> Option<Arc<Entry>> {
        let verifier = <[u8; 32]>::try_from(URL_SAFE_NO_PAD.decode(&shared.verifier).ok()?).ok()?;
        let expires_at = fleet::ms_to_instant(shared.expires_at_ms);
        Some(Arc::new(Entry {
            token: AccessToken::new(shared.token),
            scopes: shared.scopes.into(),
            verifier,
            lifetime: expires_at.saturating_duration_since(Instant::now()),
            refresh_at: fleet::ms_to_instant(shared.refresh_at_ms),
            expires_at,
        }))
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

/// The GetToken broker. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    upstream: Arc<dyn TokenEndpoint>,
    /// Synchronous: a lookup is a call, not a future (the hit path stays small).
    cache: moka::sync::Cache<CacheKey, Arc<Entry>>,
    inflight: Mutex<HashMap<(CacheKey, Verifier), Flight>>,
    verifier_key: hmac::Key,
    limiter: DefaultKeyedRateLimiter<Arc<str>>,
    recent_failures: moka::sync::Cache<Arc<str>, ()>,
    settings: BrokerSettings,
    stats: BrokerStats,
    fleet: Option<Arc<FleetCache>>,
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

    /// A broker that also shares its cache with other replicas through `fleet`.
    /// The verifier key must then be the same on every replica
    /// ([`BrokerSettings::verifier_key`] from `cache.encryption_key`).
    pub fn with_fleet(
        registry: Registry,
        upstream: Arc<dyn TokenEndpoint>,
        settings: BrokerSettings,
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
            .build();
        let limiter =
            DefaultKeyedRateLimiter::keyed(Quota::per_minute(settings.failed_auth_per_minute));
        let recent_failures = moka::sync::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(Duration::from_secs(60))
            .build();
        Self {
            inner: Arc::new(Inner {
                registry,
                upstream,
                cache,
                inflight: Mutex::new(HashMap::new()),
                verifier_key,
                limiter,
                recent_failures,
                settings,
                stats: BrokerStats::default(),
                fleet,
            }),
        }
    }

    /// Counters.
    pub fn stats(&self) -> &BrokerStats {
        &self.inner.stats
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
    /// scope), from the cache when the same secret obtained it, else from Cognito.
    pub async fn get_token(
        &self,
        credentials: &Credentials,
        scopes: &[String],
    ) -> Result<IssuedToken, BrokerError> {
        let inner = &self.inner;
        let Some(client) = inner.registry.get(&credentials.client_id) else {
            return Err(BrokerError::Unauthenticated);
        };
        if credentials.secret.expose_secret().is_empty() {
            return Err(BrokerError::Unauthenticated);
        }
        let scopes = inner
            .registry
            .normalise(client, scopes)
            .map_err(|e| match e {
                ScopeRequestError::NotAllowed(_) => BrokerError::PermissionDenied(e.to_string()),
                _ => BrokerError::InvalidArgument(e.to_string()),
            })?;
        let key: CacheKey = (client.client_id.clone(), scopes.param().clone());
        let verifier = self.verifier(&credentials.client_id, &credentials.secret);
        let now = Instant::now();

        let mut cached = inner.cache.get(&key).filter(|e| self.usable(e, now));
        if let Some(fleet) = &inner.fleet {
            // Another replica may hold the entry, or a fresher one.
            if cached.as_ref().is_none_or(|e| now >= e.refresh_at) {
                // Boxed, like every path that leaves the process: a cache hit's
                // future stays small.
                cached = Box::pin(self.fresher_in_fleet(fleet, &key, cached, now)).await;
            }
        }
        let entry = match cached {
            Some(entry) if bool::from(entry.verifier.ct_eq(&verifier)) => {
                if now < entry.refresh_at {
                    inner.stats.hit();
                    // Served at `now`: no second clock read.
                    return Ok(entry.issued(now));
                } else {
                    inner.stats.refresh();
                    let current = Some(entry.clone());
                    match Box::pin(self.fetch(key, verifier, credentials, scopes, current)).await {
                        Ok(fresh) => fresh,
                        Err(e) if e.is_transient() && self.usable(&entry, Instant::now()) => {
                            inner.stats.stale_served();
                            tracing::warn!(client = %client.name, error = %e, "refresh failed; serving the cached token");
                            entry
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            Some(_) => {
                // A different secret: it may have been rotated in Cognito, so ask,
                // but only at the failed-attempt rate.
                inner.stats.secret_mismatch();
                self.admit_unverified(&client.client_id)?;
                Box::pin(self.fetch(key, verifier, credentials, scopes, None)).await?
            }
            None => {
                inner.stats.miss();
                if inner.recent_failures.contains_key(&client.client_id) {
                    self.admit_unverified(&client.client_id)?;
                }
                Box::pin(self.fetch(key, verifier, credentials, scopes, None)).await?
            }
        };
        Ok(entry.issued(Instant::now()))
    }

    /// The fleet's entry for `key` when it is fresher than `cached` (and usable).
    async fn fresher_in_fleet(
        &self,
        fleet: &FleetCache,
        key: &CacheKey,
        cached: Option<Arc<Entry>>,
        now: Instant,
    ) -> Option<Arc<Entry>> {
        let (shared_key, _) = fleet.keys(&key.0, &key.1);
        if let Ok(Some(shared)) = fleet.get(&shared_key).await {
            if let Some(entry) = Entry::from_shared(shared) {
                let fresher = cached
                    .as_ref()
                    .is_none_or(|c| entry.expires_at > c.expires_at);
                if fresher && self.usable(&entry, now) {
                    self.inner.cache.insert(key.clone(), entry.clone());
                    return Some(entry);
                }
            }
        }
        cached
    }

    fn usable(&self, entry: &Entry, now: Instant) -> bool {
        entry.expires_at.saturating_duration_since(now) > self.inner.settings.min_remaining
    }

    fn admit_unverified(&self, client_id: &Arc<str>) -> Result<(), BrokerError> {
        self.inner.limiter.check_key(client_id).map_err(|_| {
            self.inner.stats.rate_limited();
            BrokerError::ResourceExhausted(
                "too many failed authentication attempts for this client; retry later".into(),
            )
        })
    }

    fn verifier(&self, client_id: &str, secret: &SecretString) -> Verifier {
        let mut ctx = hmac::Context::with_key(&self.inner.verifier_key);
        ctx.update(client_id.as_bytes());
        ctx.update(&[0]);
        ctx.update(secret.expose_secret().as_bytes());
        <[u8; 32]>::try_from(ctx.sign().as_ref()).expect("HMAC-SHA-256 is 32 bytes")
    }

    /// One upstream call per (key, verifier) at a time; later callers join it. The
    /// call runs in its own task so that a caller giving up does not cancel it.
    async fn fetch(
        &self,
        key: CacheKey,
        verifier: Verifier,
        credentials: &Credentials,
        scopes: ScopeSet,
        current: Option<Arc<Entry>>,
    ) -> Result<Arc<Entry>, BrokerError> {
        let flight_key = (key, verifier);
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
                let this = self.clone();
                let credentials = credentials.clone();
                let task_key = flight_key.clone();
                let task = tokio::spawn(async move {
                    let result = this
                        .obtain(&task_key.0, task_key.1, &credentials, &scopes, current)
                        .await;
                    if let Ok(entry) = &result {
                        this.inner.cache.insert(task_key.0.clone(), entry.clone());
                    }
                    this.inner
                        .inflight
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&task_key);
                    result
                });
                let flight: Flight = async move {
                    task.await.unwrap_or_else(|_| {
                        Err(BrokerError::Internal("token fetch task failed".into()))
                    })
                }
                .boxed()
                .shared();
                inflight.insert(flight_key, flight.clone());
                flight
            }
        };
        flight.await
    }

    /// One token for the fleet: with a shared cache, the replica holding the lock
    /// fetches and stores; the others wait for its entry (or, refreshing, keep
    /// serving `current`), and fetch themselves if the wait runs out. Without
    /// Redis (absent or failing), a plain upstream call.
    async fn obtain(
        &self,
        key: &CacheKey,
        verifier: Verifier,
        credentials: &Credentials,
        scopes: &ScopeSet,
        current: Option<Arc<Entry>>,
    ) -> Result<Arc<Entry>, BrokerError> {
        let Some(fleet) = self.inner.fleet.clone() else {
            return self.upstream(key, verifier, credentials, scopes).await;
        };
        let (shared_key, lock_key) = fleet.keys(&key.0, &key.1);
        let deadline = Instant::now() + fleet.lock_wait();
        loop {
            match fleet.try_lock(&lock_key).await {
                Ok(Some(lock)) => {
                    let result = self.upstream(key, verifier, credentials, scopes).await;
                    if let Ok(entry) = &result {
                        let _ = fleet.put(&shared_key, &entry.to_shared()).await;
                    }
                    fleet.unlock(&lock_key, &lock).await;
                    return result;
                }
                Ok(None) => {
                    if let Some(current) =
                        current.as_ref().filter(|c| self.usable(c, Instant::now()))
                    {
                        // Another replica is refreshing; the current token still lives.
                        return Ok(current.clone());
                    }
                    match fleet.wait_for_peer(&shared_key, &lock_key, deadline).await {
                        PeerWait::Entry(shared) => {
                            if let Some(entry) = Entry::from_shared(shared) {
                                if bool::from(entry.verifier.ct_eq(&verifier))
                                    && self.usable(&entry, Instant::now())
                                {
                                    return Ok(entry);
                                }
                            }
                            // Fetched with another secret: ours needs its own answer.
                            break;
                        }
                        PeerWait::Released if Instant::now() < deadline => continue,
                        PeerWait::Released | PeerWait::TimedOut | PeerWait::Failed => break,
                    }
                }
                Err(_) => break,
            }
        }
        let result = self.upstream(key, verifier, credentials, scopes).await;
        if let Ok(entry) = &result {
            let _ = fleet.put(&shared_key, &entry.to_shared()).await;
        }
        result
    }

    async fn upstream(
        &self,
        key: &CacheKey,
        verifier: Verifier,
        credentials: &Credentials,
        scopes: &ScopeSet,
    ) -> Result<Arc<Entry>, BrokerError> {
        let inner = &self.inner;
        let started = Instant::now();
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
                    inner.recent_failures.insert(key.0.clone(), ());
                }
                tracing::info!(client_id = %credentials.client_id, outcome = e.label(), "token request refused or failed");
                return Err(e.into());
            }
        };
        let granted = match token_scopes(response.access_token.expose()) {
            Some(granted) => granted,
            None => scopes.iter().map(str::to_owned).collect(),
        };
        if let Some(extra) = granted.iter().find(|s| !scopes.contains(s)) {
            tracing::error!(client_id = %credentials.client_id, scope = %extra, "Cognito returned a token broader than the request; refusing it");
            return Err(BrokerError::Unavailable(
                "upstream returned a token with scopes outside the request".into(),
            ));
        }
        let lifetime = Duration::from_secs(response.expires_in);
        Ok(Arc::new(Entry {
            token: response.access_token,
            scopes: granted.into(),
            verifier,
            lifetime,
            refresh_at: started + lifetime.mul_f64(inner.settings.refresh_ratio),
            expires_at: started + lifetime,
        }))
    }
}

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
