//! The fleet-wide token cache on Redis: entries encrypted with AES-256-GCM under
//! keys derived by HMAC from (client id, scope set), a `SET NX PX` lock so that one
//! replica fetches while the others wait for its result, short timeouts on every
//! Redis call, and a breaker that falls back to the local cache while Redis is
//! down or slow.

use std::{
    fmt,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aws_lc_rs::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    hmac,
};
use base64::{Engine as _, engine::general_purpose::STANDARD_NO_PAD};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

const FORMAT_VERSION: u8 = 1;
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
    pub(crate) verifier: String,
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

/// How a wait for another replica's fetch ended.
#[derive(Debug)]
pub(crate) enum PeerWait {
    /// The peer stored an entry.
    Entry(SharedEntry),
    /// The peer released the lock without storing one (its fetch failed).
    Released,
    /// The lock wait ran out.
    TimedOut,
    /// Redis failed meanwhile.
    Failed,
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
}

/// Redis-backed shared cache.
pub struct FleetCache {
    conn: ConnectionManager,
    key_mac: hmac::Key,
    aead: LessSafeKey,
    timeout: Duration,
    lock_ttl: Duration,
    lock_wait: Duration,
    down_until: Mutex<Option<Instant>>,
    up: AtomicBool,
    stats: FleetStats,
}

impl fmt::Debug for FleetCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetCache")
            .field("up", &self.up.load(Relaxed))
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
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
}

fn derive(master: &[u8; 32], label: &[u8]) -> [u8; 32] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, master), label);
    <[u8; 32]>::try_from(tag.as_ref()).expect("HMAC-SHA-256 is 32 bytes")
}

/// Settings of the fleet cache.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    /// Redis URL.
    pub url: String,
    /// Timeout of every Redis call.
    pub timeout: Duration,
    /// Lifetime of the fetch lock (longer than an upstream call may take).
    pub lock_ttl: Duration,
    /// Longest wait for another replica's fetch before fetching oneself.
    pub lock_wait: Duration,
}

impl FleetCache {
    /// Connects lazily (a Redis that is down at start does not stop the gateway).
    pub fn new(settings: &FleetSettings, master_key: &[u8; 32]) -> Result<Self, String> {
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|e| format!("cache.redis_url: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("redis: {e}"))?;
        let aead_key = derive(master_key, b"m2m-gateway cache encryption v1");
        let aead =
            LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &aead_key).map_err(|_| "AES key")?);
        Ok(Self {
            conn,
            key_mac: hmac::Key::new(
                hmac::HMAC_SHA256,
                &derive(master_key, b"m2m-gateway cache keys v1"),
            ),
            aead,
            timeout: settings.timeout,
            lock_ttl: settings.lock_ttl,
            lock_wait: settings.lock_wait,
            down_until: Mutex::new(None),
            up: AtomicBool::new(true),
            stats: FleetStats::default(),
        })
    }

    /// Counters.
    pub fn stats(&self) -> &FleetStats {
        &self.stats
    }

    /// Whether the last Redis call succeeded.
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Longest wait for another replica's fetch.
    pub fn lock_wait(&self) -> Duration {
        self.lock_wait
    }

    /// The entry and lock keys of a cache key: an HMAC of client id and scope set,
    /// so Redis never sees either (nor any secret).
    pub(crate) fn keys(&self, client_id: &str, scope_param: &str) -> (String, String) {
        let mut ctx = hmac::Context::with_key(&self.key_mac);
        ctx.update(client_id.as_bytes());
        ctx.update(&[0]);
        ctx.update(scope_param.as_bytes());
        let id = STANDARD_NO_PAD
            .encode(ctx.sign().as_ref())
            .replace(['+', '/'], "_");
        (format!("m2m:tok:{id}"), format!("m2m:lock:{id}"))
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
        let mut conn = self.conn.clone();
        let result = match tokio::time::timeout(self.timeout, cmd.query_async::<T>(&mut conn)).await
        {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(FleetError::Redis(e.to_string())),
            Err(_) => Err(FleetError::Timeout),
        };
        match &result {
            Ok(_) => {
                if !self.up.swap(true, Relaxed) {
                    tracing::info!("redis is back: the fleet-wide token cache is in use again");
                }
            }
            Err(e) => {
                self.stats.errors.fetch_add(1, Relaxed);
                *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(Instant::now() + BREAK_FOR);
                if self.up.swap(false, Relaxed) {
                    tracing::warn!(error = %e, "redis unavailable: falling back to the local token cache");
                }
            }
        }
        result
    }

    /// The entry under `key`, decrypted; `None` when absent or unreadable.
    pub(crate) async fn get(&self, key: &str) -> Result<Option<SharedEntry>, FleetError> {
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
    pub(crate) async fn put(&self, key: &str, entry: &SharedEntry) -> Result<(), FleetError> {
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
    pub(crate) async fn try_lock(&self, lock_key: &str) -> Result<Option<String>, FleetError> {
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
    pub(crate) async fn unlock(&self, lock_key: &str, token: &str) {
        let script = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end",
        );
        let mut conn = self.conn.clone();
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
    pub(crate) async fn wait_for_peer(
        &self,
        key: &str,
        lock_key: &str,
        deadline: Instant,
    ) -> PeerWait {
        while Instant::now() < deadline {
            tokio::time::sleep(POLL_EVERY).await;
            match self.get(key).await {
                Ok(Some(entry)) => {
                    self.stats.waited_for_peer.fetch_add(1, Relaxed);
                    return PeerWait::Entry(entry);
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

    fn seal(&self, key: &str, entry: &SharedEntry) -> Result<Vec<u8>, FleetError> {
        let mut plain = serde_json::to_vec(entry).map_err(|e| FleetError::Redis(e.to_string()))?;
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

    fn open(&self, key: &str, mut blob: Vec<u8>) -> Option<SharedEntry> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> FleetCache {
        FleetCache::new(
            &FleetSettings {
                url: "redis://127.0.0.1:1".into(),
                timeout: Duration::from_millis(50),
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
            verifier: "dmVyaWZpZXI".into(),
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
            c.open(&key, blob.clone()).unwrap().token,
            "eyJ.secret-token.sig"
        );
        let (other, _) = c.keys("client-b", "a/b");
        assert!(
            c.open(&other, blob.clone()).is_none(),
            "moved to another key"
        );
        let mut tampered = blob;
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(c.open(&key, tampered).is_none());
    }

    #[tokio::test]
    async fn keys_hide_the_client_and_scopes() {
        let c = cache();
        let (key, lock) = c.keys("client-a", "orders/read");
        assert!(!key.contains("client-a") && !key.contains("orders"));
        assert_ne!(key, c.keys("client-a", "orders/write").0);
        assert!(lock.starts_with("m2m:lock:") && key.starts_with("m2m:tok:"));
    }

    #[tokio::test]
    async fn an_unreachable_redis_opens_the_breaker() {
        let c = cache();
        let (key, _) = c.keys("client-a", "a/b");
        assert!(c.get(&key).await.is_err());
        assert!(!c.is_up());
        assert!(matches!(c.get(&key).await, Err(FleetError::Down)));
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
