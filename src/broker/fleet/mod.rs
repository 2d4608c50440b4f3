//! The fleet-wide token cache on Redis: entries encrypted with AES-256-GCM under
//! keys derived by HMAC from (client id, scope set), a `SET NX PX` lock so that one
//! replica fetches while the others wait for its result, short timeouts on every
//! Redis call, and a breaker that falls back to the local cache while Redis is
//! down or slow. Also holds, for the broker, the fleet's proven secrets (a hash
//! per client, announced on a channel so every replica learns of a proof or a
//! revocation at once) and the shared upstream budget (one script).

use std::{
    fmt,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU8, Ordering::Relaxed},
    },
    time::Duration,
};

use aws_lc_rs::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    hmac,
};
use base64::{Engine as _, engine::general_purpose::STANDARD_NO_PAD};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

mod budget;
mod proofs;
mod revocations;
#[cfg(test)]
mod tests;
mod tokens;

pub(crate) use budget::FleetBudget;

use super::{
    CacheKey, Entry,
    budget::{Grant, Priority, RESERVE_SCRIPT, Schedule},
    link::Link,
    proven::Verifier,
    shared::{
        Budget, ClientRef, FleetEvent, Lock, LockToken, PeerWait, ProofEvent, ProofRecord,
        ProofStore, SharedTokens,
    },
    target::{LinkError, RedisTarget, Topology},
};
use crate::oauth::AccessToken;

/// Version 3: proofs and refusals carry when Cognito was asked, announcements
/// are sealed whole. (2: entries carry no secret verifier.)
const FORMAT_VERSION: u8 = 3;
/// Where proofs and revocations are announced.
pub(crate) const PROOF_CHANNEL: &str = "m2m:proofs";
/// The fleet's upstream schedule. Every key is hash-tagged (`{...}`) so that a
/// script or a multi-key command on one subject stays in one cluster slot, while
/// different subjects spread over the cluster.
pub(super) const BUDGET_KEY: &str = "m2m:{budget}";
/// The share of the schedule open to secrets not yet proven.
pub(super) const STRANGERS_KEY: &str = "m2m:{budget:unproven}";
/// Deletes a lock only if it still holds the caller's token.
pub(crate) const UNLOCK_SCRIPT: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";
/// How long Redis is left alone after a failure before it is tried again.
const BREAK_FOR: Duration = Duration::from_secs(1);
/// Pause between two looks at Redis while another replica holds the lock.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// A cached token as stored in Redis (encrypted). Times are wall-clock so that
/// every replica reads them the same way.
#[derive(Serialize, Deserialize)]
pub(crate) struct SharedEntry {
    pub(crate) token: String,
    pub(crate) scopes: Vec<String>,
    pub(crate) expires_at_ms: u64,
    pub(crate) refresh_at_ms: u64,
    /// When the token was issued (Unix ms); an entry without it counts as
    /// issued at 0, before any revocation.
    #[serde(default)]
    pub(crate) issued_ms: u64,
}

impl fmt::Debug for SharedEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedEntry")
            .field("scopes", &self.scopes)
            .field("expires_at_ms", &self.expires_at_ms)
            .finish_non_exhaustive()
    }
}

pub(crate) use crate::revocations::now_ms;

/// The wall-clock time (ms) of a local instant.
pub(crate) fn instant_to_ms(at: Instant) -> u64 {
    let now = Instant::now();
    let base = now_ms();
    if at >= now {
        base + (at - now).as_millis() as u64
    } else {
        base.saturating_sub((now - at).as_millis() as u64)
    }
}

/// The local instant of a wall-clock time (ms).
pub(crate) fn ms_to_instant(ms: u64) -> Instant {
    let now = Instant::now();
    let base = now_ms();
    if ms >= base {
        now + Duration::from_millis(ms - base)
    } else {
        now.checked_sub(Duration::from_millis(base - ms))
            .unwrap_or(now)
    }
}

crate::counters::counters! {
    /// Counters of the fleet cache.
    FleetStats => FleetStatsSnapshot {
        /// Entries found in Redis.
        hits => ("fleet_cache_hits_total", "Entries found in Redis."),
        /// Lookups that found nothing.
        misses => ("fleet_cache_misses_total", "Redis lookups that found nothing."),
        /// Locks taken (this replica fetched for the fleet).
        locks_acquired => ("fleet_locks_acquired_total", "Cognito calls made for the fleet by this replica."),
        /// Fetches answered by another replica's result.
        waited_for_peer => ("fleet_waited_for_peer_total", "Fetches answered by another replica's result."),
        /// Waits that ran out, after which this replica fetched itself.
        wait_timeouts => ("fleet_wait_timeouts_total", "Waits for another replica that ran out."),
        /// Redis calls that failed or timed out.
        errors => ("redis_errors_total", "Redis calls that failed or timed out."),
        /// Requests served without Redis because it was down.
        bypassed => ("redis_bypassed_total", "Redis calls skipped while it was down."),
        /// Values read from Redis that were corrupt or oversized, skipped or reset.
        corrupt => ("redis_corrupt_values_total", "Values read from Redis that were corrupt or oversized (skipped, or reset for the upstream schedule)."),
    }
}

/// Whether Redis has answered yet, and how the last call went.
const NEVER: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// Redis-backed shared cache.
pub struct FleetCache {
    link: Link,
    key_mac: hmac::Key,
    aead: LessSafeKey,
    timeout: Duration,
    lock_ttl: Duration,
    lock_wait: Duration,
    down_until: Mutex<Option<Instant>>,
    state: AtomicU8,
    /// Whether this replica hears the fleet's announcements.
    subscribed: AtomicBool,
    stats: FleetStats,
}

impl fmt::Debug for FleetCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetCache")
            .field("link", &self.link)
            .field("up", &self.is_up())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Why the fleet cache cannot be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetSetupError {
    /// `cache.redis_url` or the TLS material cannot make a Redis client.
    #[error("cache.redis_url: {0}")]
    RedisUrl(String),
    /// The crypto backend refused the derived key.
    #[error("cache encryption key rejected by the crypto backend")]
    Crypto,
}

/// Why a Redis call did not help.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FleetError {
    #[error("redis unavailable (breaker open)")]
    Down,
    #[error("redis timeout")]
    Timeout,
    #[error("redis: {0}")]
    Redis(String),
    #[error("redis: {0}")]
    Link(LinkError),
    /// Redis answered, but about one key's data (a value of the wrong type, a
    /// script error): not a reason to stop using Redis.
    #[error("redis refused a command on one key: {0}")]
    Data(String),
}

/// Whether Redis answered with an error about a key's data, rather than being
/// unreachable, unready or refusing the connection.
fn is_data_error(e: &redis::RedisError) -> bool {
    match e.code() {
        Some(
            "NOAUTH" | "WRONGPASS" | "NOPERM" | "LOADING" | "CLUSTERDOWN" | "TRYAGAIN"
            | "MASTERDOWN" | "READONLY" | "BUSY" | "OOM",
        ) => false,
        Some(_) => !e.is_io_error() && !e.is_timeout(),
        None => false,
    }
}

/// Most fields a client's proof hash may have (a handful of live secrets and the
/// refusals that outlive them); a bigger one is skipped as corrupt.
const MAX_PROOF_FIELDS: usize = 64;

fn derive(master: &[u8; 32], label: &[u8]) -> [u8; 32] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, master), label);
    <[u8; 32]>::try_from(tag.as_ref()).expect("HMAC-SHA-256 is 32 bytes")
}

/// Timeout of every Redis call (`cache.redis_timeout_ms`).
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(100);
/// Longest wait for another replica's Cognito call (`cache.lock_wait_ms`).
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(3);

/// Settings of the fleet cache.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    /// Where Redis is and how to reach it; its timeout bounds every Redis call.
    pub redis: RedisTarget,
    /// Lifetime of the fetch lock (longer than an upstream call may take).
    pub lock_ttl: Duration,
    /// Longest wait for another replica's fetch before fetching oneself.
    pub lock_wait: Duration,
}

impl FleetCache {
    /// Connects lazily (a Redis that is down at start does not stop the gateway).
    pub fn new(settings: &FleetSettings, master_key: &[u8; 32]) -> Result<Self, FleetSetupError> {
        let link = Link::new(settings.redis.clone())
            .map_err(|e| FleetSetupError::RedisUrl(e.to_string()))?;
        let aead_key = derive(master_key, b"m2m-gateway cache encryption v1");
        let aead = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &aead_key).map_err(|_| FleetSetupError::Crypto)?,
        );
        Ok(Self {
            link,
            key_mac: hmac::Key::new(
                hmac::HMAC_SHA256,
                &derive(master_key, b"m2m-gateway cache keys v1"),
            ),
            aead,
            timeout: settings.redis.timeout,
            lock_ttl: settings.lock_ttl,
            lock_wait: settings.lock_wait,
            down_until: Mutex::new(None),
            state: AtomicU8::new(NEVER),
            subscribed: AtomicBool::new(false),
            stats: FleetStats::default(),
        })
    }
    /// Checks that `target` makes a Redis client (URL, TLS material); connects nothing.
    pub fn check_target(target: &RedisTarget) -> Result<(), LinkError> {
        Link::new(target.clone()).map(drop)
    }
    /// Counters.
    pub fn stats(&self) -> &FleetStats {
        &self.stats
    }
    /// Whether the last Redis call succeeded (false until the first one did).
    pub fn is_up(&self) -> bool {
        self.state.load(Relaxed) == UP
    }
    /// Whether this replica shares the fleet's state: Redis answers and the
    /// fleet's announcements reach it. When false it serves from its own cache.
    pub fn is_shared(&self) -> bool {
        self.is_up() && self.subscribed.load(Relaxed)
    }
    /// What the endpoint turned out to be, once connected.
    pub fn topology(&self) -> Option<&Topology> {
        self.link.topology()
    }
    /// Connects now (if not yet) and says what the endpoint is.
    pub async fn connect(&self) -> Result<Topology, LinkError> {
        self.link.conn().await?;
        Ok(self
            .link
            .topology()
            .cloned()
            .unwrap_or(Topology::Standalone))
    }
    pub(super) fn mark_subscribed(&self, subscribed: bool) {
        if self.subscribed.swap(subscribed, Relaxed) != subscribed {
            if subscribed {
                tracing::info!("subscribed to the fleet's announcements");
            } else {
                tracing::warn!(
                    "lost the fleet's announcements: proofs and refusals of other replicas do not reach this one until it resubscribes"
                );
            }
        }
    }
    pub(super) fn link(&self) -> &Link {
        &self.link
    }
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }
    /// Longest wait for another replica's fetch.
    pub fn lock_wait(&self) -> Duration {
        self.lock_wait
    }
    /// The entry and lock keys of a cache key: an HMAC of client id and scope set,
    /// so Redis never sees either (nor any secret).
    pub(crate) fn keys(&self, client_id: &str, scope_param: &str) -> (String, String) {
        let id = self.mac_id(&[client_id.as_bytes(), scope_param.as_bytes()]);
        (format!("m2m:tok:{{{id}}}"), format!("m2m:lock:{{{id}}}"))
    }
    /// The key of a client's proven secrets: an HMAC of its id.
    pub(crate) fn proof_key(&self, client_id: &str) -> String {
        format!(
            "m2m:proven:{{{}}}",
            self.mac_id(&[b"proven", client_id.as_bytes()])
        )
    }
    pub(super) fn proof_field(&self, verifier: &[u8; 32]) -> String {
        self.mac_id(&[b"verifier", verifier])
    }
    /// An opaque, key-safe id of `parts` (NUL-separated) under the key-naming key.
    pub(super) fn mac_id(&self, parts: &[&[u8]]) -> String {
        let mut ctx = hmac::Context::with_key(&self.key_mac);
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                ctx.update(&[0]);
            }
            ctx.update(part);
        }
        STANDARD_NO_PAD
            .encode(ctx.sign().as_ref())
            .replace(['+', '/'], "_")
    }
    pub(super) fn breaker_open(&self) -> bool {
        let mut down = self.down_until.lock().unwrap_or_else(|p| p.into_inner());
        match *down {
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                *down = None;
                false
            }
            None => false,
        }
    }
    pub(super) async fn call<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> Result<T, FleetError> {
        if self.breaker_open() {
            self.stats.bypassed.fetch_add(1, Relaxed);
            return Err(FleetError::Down);
        }
        let result = match self.link.conn().await {
            Ok(mut conn) => {
                match tokio::time::timeout(self.timeout, cmd.query_async::<T>(&mut conn)).await {
                    Ok(Ok(v)) => Ok(v),
                    Ok(Err(e)) if is_data_error(&e) => {
                        self.stats.corrupt.fetch_add(1, Relaxed);
                        Err(FleetError::Data(e.to_string()))
                    }
                    Ok(Err(e)) => Err(FleetError::Link(LinkError::from_redis(&e))),
                    Err(_) => Err(FleetError::Timeout),
                }
            }
            Err(e) => Err(FleetError::Link(e)),
        };
        self.record(&result);
        result
    }
    /// Keeps the breaker and the up/down state, with one log line per transition.
    pub(super) fn record<T>(&self, result: &Result<T, FleetError>) {
        match result {
            // Redis answered: about one key's data, it is still up.
            Ok(_) | Err(FleetError::Data(_)) => match self.state.swap(UP, Relaxed) {
                UP => {}
                NEVER => tracing::info!(
                    redis = %self.link.describe(),
                    "redis answers: the token cache, proofs and upstream budget are shared by the fleet"
                ),
                _ => tracing::info!("redis is back: the fleet-wide token cache is in use again"),
            },
            Err(e) => {
                self.stats.errors.fetch_add(1, Relaxed);
                *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(Instant::now() + BREAK_FOR);
                if self.state.swap(DOWN, Relaxed) != DOWN {
                    tracing::warn!(error = %e, "redis unavailable: this replica serves from its own cache and budget, not shared with the fleet");
                }
            }
        }
    }
    /// One PING through the fleet's connection (keeps the up/down state current).
    pub(crate) async fn heartbeat(&self) -> Result<(), FleetError> {
        let _: String = self.call(&redis::cmd("PING")).await?;
        Ok(())
    }
    pub(super) fn seal<T: Serialize>(&self, key: &str, value: &T) -> Result<Vec<u8>, FleetError> {
        let mut plain = serde_json::to_vec(value).map_err(|e| FleetError::Redis(e.to_string()))?;
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| FleetError::Redis("rng".into()))?;
        self.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(key.as_bytes()),
                &mut plain,
            )
            .map_err(|_| FleetError::Redis("seal".into()))?;
        let mut blob = Vec::with_capacity(1 + NONCE_LEN + plain.len());
        blob.push(FORMAT_VERSION);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&plain);
        Ok(blob)
    }
    pub(super) fn open<T: for<'de> Deserialize<'de>>(
        &self,
        key: &str,
        mut blob: Vec<u8>,
    ) -> Option<T> {
        if blob.len() < 1 + NONCE_LEN || blob[0] != FORMAT_VERSION {
            return None;
        }
        let nonce = Nonce::try_assume_unique_for_key(&blob[1..1 + NONCE_LEN]).ok()?;
        let plain = self
            .aead
            .open_in_place(nonce, Aad::from(key.as_bytes()), &mut blob[1 + NONCE_LEN..])
            .ok()?;
        serde_json::from_slice(plain).ok()
    }
}

impl FleetCache {
    /// The fleet's series.
    pub(crate) fn encode(&self, out: &mut crate::prometheus::Encoder) {
        let fleet = self;
        // Fleet-wide cache.
        let f = fleet.stats();
        f.encode(out);
        out.gauge(
            "redis_up",
            "1 when the last Redis call succeeded (0 until the first one did).",
            if fleet.is_up() { 1.0 } else { 0.0 },
        );
        out.gauge(
            "fleet_shared",
            "1 when this replica shares tokens, proofs and the upstream budget with the fleet (Redis answers and its announcements arrive); 0 when it serves from its own cache.",
            if fleet.is_shared() { 1.0 } else { 0.0 },
        );
    }
}
