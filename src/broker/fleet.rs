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
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aws_lc_rs::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    hmac,
};
use base64::{Engine as _, engine::general_purpose::STANDARD_NO_PAD};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use futures_util::{future::BoxFuture, stream::BoxStream};

use super::{
    CacheKey, Entry,
    budget::{Grant, Priority, RESERVE_SCRIPT, Schedule},
    link::Link,
    proven::Verifier,
    shared::{
        Budget, ClientRef, Lock, LockToken, PeerWait, ProofEvent, ProofRecord, ProofStore,
        SharedTokens,
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
}

impl fmt::Debug for SharedEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedEntry")
            .field("scopes", &self.scopes)
            .field("expires_at_ms", &self.expires_at_ms)
            .finish_non_exhaustive()
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

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

/// A proof or a refusal as stored and announced (encrypted): the verifier, never
/// the secret; when Cognito was asked; until when a proof lasts.
#[derive(Serialize, Deserialize)]
pub(crate) struct SharedProof {
    verifier: String,
    refused: bool,
    at_ms: u64,
    until_ms: u64,
}

/// An announcement: a record and the client it is for, sealed together.
#[derive(Serialize, Deserialize)]
struct Announcement {
    client: String,
    proof: SharedProof,
}

/// The longest access-token lifetime Cognito allows, in ms.
const ONE_DAY_MS: u64 = 86_400_000;
/// The associated data of sealed announcements.
const ANNOUNCEMENT_AAD: &str = "m2m:proofs announcement";
/// The longest announcement read (a real one is about 300 bytes).
const MAX_ANNOUNCEMENT: usize = 4096;

/// A stored or announced record, in the broker's terms; a proof whose end has
/// passed (by `now_ms`, 0 = keep) is none.
fn to_record(proof: &SharedProof, verifier: Verifier, now_ms: u64) -> Option<ProofRecord> {
    let at = ms_to_instant(proof.at_ms);
    if proof.refused {
        Some(ProofRecord::Refused { verifier, at })
    } else {
        (proof.until_ms > now_ms).then(|| ProofRecord::Proven {
            verifier,
            until: ms_to_instant(proof.until_ms),
            at,
        })
    }
}

/// Counters of the fleet cache.
#[derive(Debug, Default)]
pub struct FleetStats {
    /// Entries found in Redis.
    pub hits: AtomicU64,
    /// Lookups that found nothing.
    pub misses: AtomicU64,
    /// Locks taken (this replica fetched for the fleet).
    pub locks_acquired: AtomicU64,
    /// Fetches answered by another replica's result.
    pub waited_for_peer: AtomicU64,
    /// Waits that ran out, after which this replica fetched itself.
    pub wait_timeouts: AtomicU64,
    /// Redis calls that failed or timed out.
    pub errors: AtomicU64,
    /// Requests served without Redis because it was down.
    pub bypassed: AtomicU64,
    /// Values read from Redis that were corrupt or oversized, skipped or reset.
    pub corrupt: AtomicU64,
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

    fn mark_subscribed(&self, subscribed: bool) {
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

    fn proof_field(&self, verifier: &[u8; 32]) -> String {
        self.mac_id(&[b"verifier", verifier])
    }

    /// An opaque, key-safe id of `parts` (NUL-separated) under the key-naming key.
    fn mac_id(&self, parts: &[&[u8]]) -> String {
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

    fn breaker_open(&self) -> bool {
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

    async fn call<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, FleetError> {
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
    fn record<T>(&self, result: &Result<T, FleetError>) {
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

    /// The entry under `key`, decrypted; `None` when absent or unreadable.
    pub(crate) async fn get_entry(&self, key: &str) -> Result<Option<SharedEntry>, FleetError> {
        let blob: Option<Vec<u8>> = self.call(redis::cmd("GET").arg(key)).await?;
        let entry = blob.and_then(|b| self.open(key, b));
        let counter = if entry.is_some() {
            &self.stats.hits
        } else {
            &self.stats.misses
        };
        counter.fetch_add(1, Relaxed);
        Ok(entry)
    }

    /// Stores `entry` under `key` until it expires.
    pub(crate) async fn put_entry(&self, key: &str, entry: &SharedEntry) -> Result<(), FleetError> {
        let ttl = entry.expires_at_ms.saturating_sub(now_ms());
        if ttl == 0 {
            return Ok(());
        }
        let blob = self.seal(key, entry)?;
        let _: () = self
            .call(redis::cmd("SET").arg(key).arg(blob).arg("PX").arg(ttl))
            .await?;
        Ok(())
    }

    /// Tries to take the fetch lock; returns its token when taken.
    async fn lock(&self, lock_key: &str) -> Result<Option<String>, FleetError> {
        let mut nonce = [0u8; 16];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| FleetError::Redis("rng".into()))?;
        let token = STANDARD_NO_PAD.encode(nonce);
        let set: Option<String> = self
            .call(
                redis::cmd("SET")
                    .arg(lock_key)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(self.lock_ttl.as_millis() as u64),
            )
            .await?;
        if set.is_some() {
            self.stats.locks_acquired.fetch_add(1, Relaxed);
            Ok(Some(token))
        } else {
            Ok(None)
        }
    }

    /// Releases the lock if it is still ours.
    async fn release(&self, lock_key: &str, token: &str) {
        let script = redis::Script::new(UNLOCK_SCRIPT);
        let Ok(mut conn) = self.link.conn().await else {
            return;
        };
        let _ = tokio::time::timeout(
            self.timeout,
            script
                .key(lock_key)
                .arg(token)
                .invoke_async::<i64>(&mut conn),
        )
        .await;
    }

    /// Waits for another replica's fetch: its entry, or the news that it gave up
    /// the lock without one, or the end of the lock wait.
    async fn await_peer(&self, key: &str, lock_key: &str, deadline: Instant) -> PeerWait {
        while Instant::now() < deadline {
            tokio::time::sleep(POLL_EVERY).await;
            match self.get_entry(key).await {
                Ok(Some(entry)) => {
                    self.stats.waited_for_peer.fetch_add(1, Relaxed);
                    return PeerWait::Entry(entry_from_shared(entry));
                }
                Ok(None) => {}
                Err(_) => return PeerWait::Failed,
            }
            match self.call::<bool>(redis::cmd("EXISTS").arg(lock_key)).await {
                Ok(true) => {}
                Ok(false) => return PeerWait::Released,
                Err(_) => return PeerWait::Failed,
            }
        }
        self.stats.wait_timeouts.fetch_add(1, Relaxed);
        PeerWait::TimedOut
    }

    /// Records a proof or a refusal for the fleet and announces it. Proofs and
    /// refusals of one verifier live in two fields (`p:`, `r:`), so neither
    /// overwrites the other: whoever reads both applies the newer.
    pub(crate) async fn put_record(
        &self,
        client_key: &str,
        record: &ProofRecord,
    ) -> Result<(), FleetError> {
        let (proof, ttl) = match *record {
            ProofRecord::Proven {
                verifier,
                until,
                at,
            } => {
                let until_ms = instant_to_ms(until);
                let shared = SharedProof {
                    verifier: STANDARD_NO_PAD.encode(verifier),
                    refused: false,
                    at_ms: instant_to_ms(at),
                    until_ms,
                };
                (shared, until_ms.saturating_sub(now_ms()))
            }
            ProofRecord::Refused { verifier, at } => {
                let shared = SharedProof {
                    verifier: STANDARD_NO_PAD.encode(verifier),
                    refused: true,
                    at_ms: instant_to_ms(at),
                    until_ms: 0,
                };
                (shared, 0)
            }
        };
        if ttl == 0 && !proof.refused {
            return Ok(());
        }
        let verifier = match record {
            ProofRecord::Proven { verifier, .. } | ProofRecord::Refused { verifier, .. } => {
                verifier
            }
        };
        let field = self.record_field(verifier, proof.refused);
        if proof.refused {
            // Stored only where it beats a stored proof (it lives as long as that
            // proof's hash): a stranger's wrong secrets add nothing to Redis.
            let proven: bool = self
                .call(
                    redis::cmd("HEXISTS")
                        .arg(client_key)
                        .arg(self.record_field(verifier, false)),
                )
                .await
                .unwrap_or(false);
            if !proven {
                return self.announce(client_key, proof).await;
            }
        }
        let blob = self.seal(&format!("{client_key}/{field}"), &proof)?;
        let hset = redis::cmd("HSET")
            .arg(client_key)
            .arg(&field)
            .arg(&blob)
            .clone();
        if let Err(FleetError::Data(e)) = self.call::<i64>(&hset).await {
            // Our own key, overwritten with another type: it is ours to replace.
            tracing::warn!(key = client_key, error = %e, "a client's proof hash in Redis was not a hash; replaced");
            let _: i64 = self.call(redis::cmd("DEL").arg(client_key)).await?;
            let _: i64 = self.call(&hset).await?;
        }
        // NX gives a new hash its lifetime; GT lets a later proof extend it (a
        // refusal lives as long as the proofs it beats).
        if ttl > 0 {
            for flag in ["NX", "GT"] {
                let _: i64 = self
                    .call(redis::cmd("PEXPIRE").arg(client_key).arg(ttl).arg(flag))
                    .await?;
            }
        } else {
            // The proof's hash may have expired since: never a key without a TTL.
            let _: i64 = self
                .call(
                    redis::cmd("PEXPIRE")
                        .arg(client_key)
                        .arg(ONE_DAY_MS)
                        .arg("NX"),
                )
                .await?;
        }
        self.announce(client_key, proof).await
    }

    /// Publishes a record, sealed whole: kind, client, verifier and times are
    /// authenticated together, so none can be changed or moved to another client.
    async fn announce(&self, client_key: &str, proof: SharedProof) -> Result<(), FleetError> {
        let sealed = self.seal(
            ANNOUNCEMENT_AAD,
            &Announcement {
                client: client_key.to_owned(),
                proof,
            },
        )?;
        let message = STANDARD_NO_PAD.encode(sealed);
        let _: i64 = self
            .call(redis::cmd("PUBLISH").arg(PROOF_CHANNEL).arg(message))
            .await?;
        Ok(())
    }

    /// A client's live proofs and remembered refusals.
    pub(crate) async fn load_proofs(
        &self,
        client_key: &str,
    ) -> Result<Vec<ProofRecord>, FleetError> {
        // Bounded: a hash overwritten with another type or stuffed with junk is
        // skipped (and said so), never read whole and never fatal.
        let fields: Vec<(String, Vec<u8>)> = match self
            .call::<usize>(redis::cmd("HLEN").arg(client_key))
            .await
        {
            Ok(n) if n > MAX_PROOF_FIELDS => {
                self.stats.corrupt.fetch_add(1, Relaxed);
                tracing::warn!(
                    key = client_key,
                    fields = n,
                    "a client's proof hash in Redis is oversized; skipped"
                );
                return Ok(Vec::new());
            }
            Ok(_) => match self.call(redis::cmd("HGETALL").arg(client_key)).await {
                Err(FleetError::Data(e)) => {
                    tracing::warn!(key = client_key, error = %e, "a client's proof hash in Redis is unreadable; skipped");
                    return Ok(Vec::new());
                }
                other => other?,
            },
            Err(FleetError::Data(e)) => {
                tracing::warn!(key = client_key, error = %e, "a client's proof hash in Redis is unreadable; skipped");
                return Ok(Vec::new());
            }
            Err(e) => return Err(e),
        };
        let now = now_ms();
        Ok(fields
            .into_iter()
            .filter_map(|(field, blob)| {
                let proof: SharedProof = self.open(&format!("{client_key}/{field}"), blob)?;
                let (verifier, refused) = self.check_proof(&proof)?;
                // The field is the record's own name: a sealed record cannot be
                // replayed under another verifier or kind.
                (self.record_field(&verifier, refused) == field).then_some(())?;
                to_record(&proof, verifier, now)
            })
            .collect())
    }

    fn check_proof(&self, proof: &SharedProof) -> Option<(Verifier, bool)> {
        let verifier = <[u8; 32]>::try_from(STANDARD_NO_PAD.decode(&proof.verifier).ok()?).ok()?;
        Some((verifier, proof.refused))
    }

    /// Subscribes to the fleet's proof announcements (a dedicated connection).
    async fn proof_events(
        self: &std::sync::Arc<Self>,
    ) -> Result<impl futures_util::Stream<Item = ProofEvent> + Send + use<>, FleetError> {
        let mut pubsub = self.link.pubsub().await.map_err(FleetError::Link)?;
        tokio::time::timeout(
            self.timeout.max(Duration::from_secs(1)),
            pubsub.subscribe(PROOF_CHANNEL),
        )
        .await
        .map_err(|_| FleetError::Timeout)?
        .map_err(|e| FleetError::Link(LinkError::from_redis(&e)))?;
        let this = std::sync::Arc::clone(self);
        Ok(futures_util::StreamExt::filter_map(
            pubsub.into_on_message(),
            move |msg| {
                let event = msg
                    .get_payload::<String>()
                    .ok()
                    .and_then(|text| this.parse_event(&text));
                std::future::ready(event)
            },
        ))
    }

    /// An announcement, if it is one this fleet sealed; anything else (junk,
    /// a changed byte, a message of another fleet) is dropped and counted.
    fn parse_event(&self, text: &str) -> Option<ProofEvent> {
        if text.len() > MAX_ANNOUNCEMENT {
            self.stats.corrupt.fetch_add(1, Relaxed);
            return None;
        }
        let opened = STANDARD_NO_PAD
            .decode(text)
            .ok()
            .and_then(|blob| self.open::<Announcement>(ANNOUNCEMENT_AAD, blob));
        let Some(announcement) = opened else {
            self.stats.corrupt.fetch_add(1, Relaxed);
            return None;
        };
        let (verifier, _) = self.check_proof(&announcement.proof)?;
        let record = to_record(&announcement.proof, verifier, 0)?;
        Some(ProofEvent {
            client: announcement.client,
            record,
        })
    }

    fn record_field(&self, verifier: &Verifier, refused: bool) -> String {
        let name = self.proof_field(verifier);
        if refused {
            format!("r:{name}")
        } else {
            format!("p:{name}")
        }
    }

    /// Reserves a slot of the fleet's upstream schedule (see `budget`).
    async fn reserve_budget(
        &self,
        key: &str,
        priority: Priority,
        interval: Duration,
        max_wait: Duration,
    ) -> Result<Grant, FleetError> {
        let refresh = if priority == Priority::Refresh {
            "1"
        } else {
            "0"
        };
        let (admitted, delay_us, corrupt): (i64, i64, i64) = self
            .call(
                redis::cmd("EVAL")
                    .arg(RESERVE_SCRIPT)
                    .arg(1)
                    .arg(key)
                    .arg(interval.as_micros() as u64)
                    .arg(refresh)
                    .arg(max_wait.as_micros() as u64),
            )
            .await?;
        if corrupt == 1 {
            self.stats.corrupt.fetch_add(1, Relaxed);
            tracing::warn!(
                key = BUDGET_KEY,
                "the fleet's upstream schedule in Redis was corrupt (not a number, another type, or beyond any honest wait); it starts again from now"
            );
        }
        let delay = Duration::from_micros(
            delay_us.clamp(0, max_wait.as_micros() as i64 + interval.as_micros() as i64) as u64,
        );
        Ok(if admitted == 1 {
            Grant::After(delay)
        } else {
            Grant::Refused { retry_after: delay }
        })
    }

    fn seal<T: Serialize>(&self, key: &str, value: &T) -> Result<Vec<u8>, FleetError> {
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

    fn open<T: for<'de> Deserialize<'de>>(&self, key: &str, mut blob: Vec<u8>) -> Option<T> {
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

/// An entry as the fleet stores it (wall-clock times every replica reads alike).
fn shared_from_entry(entry: &Entry) -> SharedEntry {
    SharedEntry {
        token: entry.token.expose().to_owned(),
        scopes: entry.scopes.to_vec(),
        expires_at_ms: instant_to_ms(entry.expires_at),
        refresh_at_ms: instant_to_ms(entry.refresh_at),
    }
}

fn entry_from_shared(shared: SharedEntry) -> std::sync::Arc<Entry> {
    let expires_at = ms_to_instant(shared.expires_at_ms);
    std::sync::Arc::new(Entry {
        token: AccessToken::new(shared.token),
        scopes: shared.scopes.into(),
        lifetime: expires_at.saturating_duration_since(Instant::now()),
        refresh_at: ms_to_instant(shared.refresh_at_ms),
        expires_at,
    })
}

impl SharedTokens for FleetCache {
    fn get<'a>(&'a self, key: &'a CacheKey) -> BoxFuture<'a, Option<std::sync::Arc<Entry>>> {
        Box::pin(async move {
            let (entry_key, _) = self.keys(&key.0, &key.1);
            self.get_entry(&entry_key)
                .await
                .ok()
                .flatten()
                .map(entry_from_shared)
        })
    }

    fn put<'a>(&'a self, key: &'a CacheKey, entry: &'a Entry) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let (entry_key, _) = self.keys(&key.0, &key.1);
            let _ = self.put_entry(&entry_key, &shared_from_entry(entry)).await;
        })
    }

    fn try_lock<'a>(&'a self, key: &'a CacheKey) -> BoxFuture<'a, Lock> {
        Box::pin(async move {
            let (_, lock_key) = self.keys(&key.0, &key.1);
            match self.lock(&lock_key).await {
                Ok(Some(token)) => Lock::Taken(LockToken(token)),
                Ok(None) => Lock::Busy,
                Err(_) => Lock::Unavailable,
            }
        })
    }

    fn unlock<'a>(&'a self, key: &'a CacheKey, lock: LockToken) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let (_, lock_key) = self.keys(&key.0, &key.1);
            self.release(&lock_key, &lock.0).await;
        })
    }

    fn wait_for_peer<'a>(
        &'a self,
        key: &'a CacheKey,
        deadline: Instant,
    ) -> BoxFuture<'a, PeerWait> {
        Box::pin(async move {
            let (entry_key, lock_key) = self.keys(&key.0, &key.1);
            self.await_peer(&entry_key, &lock_key, deadline).await
        })
    }

    fn lock_wait(&self) -> Duration {
        self.lock_wait
    }
}

/// The proof store on Redis (an `Arc`: the subscription outlives the call that
/// makes it).
impl ProofStore for std::sync::Arc<FleetCache> {
    fn client_ref(&self, client_id: &str) -> ClientRef {
        self.proof_key(client_id)
    }

    fn load<'a>(&'a self, client: &'a ClientRef) -> BoxFuture<'a, Option<Vec<ProofRecord>>> {
        Box::pin(async move { self.load_proofs(client).await.ok() })
    }

    fn record<'a>(&'a self, client: &'a ClientRef, record: ProofRecord) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let _ = self.put_record(client, &record).await;
        })
    }

    fn subscribe(&self) -> BoxFuture<'_, Option<BoxStream<'static, ProofEvent>>> {
        Box::pin(async move {
            match self.proof_events().await {
                Ok(events) => Some(Box::pin(events) as BoxStream<'static, ProofEvent>),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot subscribe to the fleet's proven secrets yet");
                    None
                }
            }
        })
    }

    fn set_subscribed(&self, subscribed: bool) {
        self.mark_subscribed(subscribed);
    }

    fn heartbeat(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = FleetCache::heartbeat(self).await;
        })
    }
}

/// The fleet's upstream schedule on Redis; this replica's own while Redis does
/// not answer.
pub(super) struct FleetBudget {
    fleet: std::sync::Arc<FleetCache>,
    local: Schedule,
    key: &'static str,
}

impl FleetBudget {
    pub(super) fn new(
        fleet: std::sync::Arc<FleetCache>,
        local: Schedule,
        key: &'static str,
    ) -> Self {
        Self { fleet, local, key }
    }
}

impl Budget for FleetBudget {
    fn reserve(&self, priority: Priority, max_wait: Duration) -> BoxFuture<'_, Grant> {
        Box::pin(async move {
            match self
                .fleet
                .reserve_budget(self.key, priority, self.local.interval(), max_wait)
                .await
            {
                Ok(grant) => grant,
                Err(_) => self.local.reserve(priority, max_wait),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> FleetCache {
        FleetCache::new(
            &FleetSettings {
                redis: RedisTarget {
                    url: "redis://127.0.0.1:1".into(),
                    mode: super::super::target::RedisMode::Auto,
                    ca_pem: None,
                    username: None,
                    password: None,
                    iam: None,
                    timeout: Duration::from_millis(50),
                },
                lock_ttl: Duration::from_secs(10),
                lock_wait: Duration::from_secs(1),
            },
            &[7u8; 32],
        )
        .unwrap()
    }

    fn entry() -> SharedEntry {
        SharedEntry {
            token: "eyJ.secret-token.sig".into(),
            scopes: vec!["a/b".into()],
            expires_at_ms: now_ms() + 60_000,
            refresh_at_ms: now_ms() + 45_000,
        }
    }

    #[tokio::test]
    async fn entries_are_encrypted_and_bound_to_their_key() {
        let c = cache();
        let (key, _) = c.keys("client-a", "a/b");
        let blob = c.seal(&key, &entry()).unwrap();
        assert!(!String::from_utf8_lossy(&blob).contains("secret-token"));
        assert_eq!(
            c.open::<SharedEntry>(&key, blob.clone()).unwrap().token,
            "eyJ.secret-token.sig"
        );
        let (other, _) = c.keys("client-b", "a/b");
        assert!(
            c.open::<SharedEntry>(&other, blob.clone()).is_none(),
            "moved to another key"
        );
        let mut tampered = blob;
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(c.open::<SharedEntry>(&key, tampered).is_none());
    }

    #[tokio::test]
    async fn keys_hide_the_client_and_scopes() {
        let c = cache();
        let (key, lock) = c.keys("client-a", "orders/read");
        assert!(!key.contains("client-a") && !key.contains("orders"));
        assert_ne!(key, c.keys("client-a", "orders/write").0);
        assert!(lock.starts_with("m2m:lock:{") && key.starts_with("m2m:tok:{"));
        // One hash tag for the entry and its lock: one cluster slot.
        let tag = |k: &str| k[k.find('{').unwrap()..=k.find('}').unwrap()].to_owned();
        assert_eq!(tag(&key), tag(&lock));
        assert_ne!(tag(&key), tag(&c.keys("client-b", "orders/read").0));
    }

    #[tokio::test]
    async fn an_unreachable_redis_opens_the_breaker() {
        let c = cache();
        assert!(!c.is_up() && !c.is_shared(), "down until the first answer");
        let (key, _) = c.keys("client-a", "a/b");
        assert!(c.get_entry(&key).await.is_err());
        assert!(!c.is_up());
        assert!(matches!(c.get_entry(&key).await, Err(FleetError::Down)));
        assert_eq!(c.stats().bypassed.load(Relaxed), 1);
    }

    #[test]
    fn wall_clock_round_trip() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let at = Instant::now() + Duration::from_secs(30);
            let back = ms_to_instant(instant_to_ms(at));
            let diff = if back > at { back - at } else { at - back };
            assert!(diff < Duration::from_millis(50), "{diff:?}");
        });
    }
}
