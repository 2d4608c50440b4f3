//! The way in: shape checks, the failed-attempt limits, the verifier of a
//! secret, and the cache hit that most calls end with.

use std::{net::IpAddr, sync::Arc};

use aws_lc_rs::hmac;
use governor::clock::{Clock as _, DefaultClock};
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;

use super::{
    Broker, BrokerError, Credentials, CredentialsError, IssuedToken, ScopeRefusal,
    entry::{CacheKey, Entry},
    flight::{Caller, Fetch},
    proven::Verifier,
};
use crate::registry::{Client, ScopeRequestError, ScopeSet};

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
    if !crate::rules::scope::is_valid_client_id(&credentials.client_id) {
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

impl Broker {
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
        if inner.revocations.is_blocked(&client.client_id) {
            inner.clients.refused(client.index);
            return Err(BrokerError::ClientRevoked);
        }
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
        let lookup = tracing::debug_span!(
            target: crate::trace_context::TARGET,
            "cache lookup",
            m2m.cache.outcome = tracing::field::Empty,
            m2m.secret_proven = proven,
        );
        if !proven {
            // Not served from the cache until Cognito accepts the secret: a
            // miss, as the metrics count it.
            lookup.record("m2m.cache.outcome", "miss");
            drop(lookup);
            // Limited before anything else (Redis included) is asked.
            return Box::pin(self.unproven(client, key, verifier, credentials, scopes, source))
                .await;
        }

        let mut cached = lookup.in_scope(|| {
            inner
                .cache
                .get(&key)
                .filter(|e| self.usable(&key.0, e, now))
        });
        // Another replica may hold the entry, or a fresher one.
        if inner.seams.shared && cached.as_ref().is_none_or(|e| now >= e.refresh_at) {
            // Boxed, like every path that leaves the process: a cache hit's
            // future stays small.
            cached = Box::pin(tracing::Instrument::instrument(
                self.fresher_in_fleet(&key, cached, now),
                lookup.clone(),
            ))
            .await;
        }
        lookup.record(
            "m2m.cache.outcome",
            match &cached {
                Some(entry) if now < entry.refresh_at => "hit",
                Some(_) => "refresh",
                None => "miss",
            },
        );
        drop(lookup);
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
                    .proven_fetch(Fetch {
                        client,
                        key,
                        caller: Caller::proven(credentials, verifier),
                        scopes,
                        current: Some(entry.clone()),
                    })
                    .await;
                match fetched {
                    Ok(fresh) => Ok(fresh.issued(Instant::now())),
                    Err(e)
                        if e.is_transient()
                            && self.usable(&client.client_id, &entry, Instant::now()) =>
                    {
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
                self.proven_fetch(Fetch {
                    client,
                    key,
                    caller: Caller::proven(credentials, verifier),
                    scopes,
                    current: None,
                })
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
        // Not served from the cache: a miss, whatever the secret's state, so
        // that hits / (hits + misses) is the cache's hit ratio.
        self.inner.stats.miss();
        let (_, result) = self
            .fetch(Fetch {
                client,
                key,
                caller: Caller {
                    credentials,
                    verifier,
                    source,
                    proven: false,
                },
                scopes,
                current: None,
            })
            .await;
        result.map(|entry| entry.issued(Instant::now()))
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
            if fresher && self.usable(&key.0, &entry, now) {
                self.inner.cache.insert(key.clone(), entry.clone());
                return Some(entry);
            }
        }
        cached
    }

    /// Whether `entry` may be handed out at `now`: enough life left, and not
    /// issued before a revocation of its client (even one since restored).
    pub(super) fn usable(&self, client_id: &str, entry: &Entry, now: Instant) -> bool {
        entry.usable(now, self.inner.settings.min_remaining)
            && !self
                .inner
                .revocations
                .covers(client_id, entry.issued_ms, &entry.jti)
    }

    /// One unproven attempt for `client` from `source`: within the limit of that
    /// (client, source), then within the looser one of the client.
    pub(super) fn admit_unverified(
        &self,
        client: &Client,
        source: Option<IpAddr>,
    ) -> Result<(), BrokerError> {
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
}
