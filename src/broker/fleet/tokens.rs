//! The fleet's tokens: sealed entries, the fetch lock and the wait for a
//! peer's entry.

use std::sync::atomic::Ordering::Relaxed;

use futures_util::future::BoxFuture;
use tokio::time::Instant;

use super::*;

impl FleetCache {
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
    pub(super) async fn lock(&self, lock_key: &str) -> Result<Option<String>, FleetError> {
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
    pub(super) async fn release(&self, lock_key: &str, token: &str) {
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
    pub(super) async fn await_peer(
        &self,
        key: &str,
        lock_key: &str,
        deadline: Instant,
    ) -> PeerWait {
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
}

/// An entry as the fleet stores it (wall-clock times every replica reads alike).
fn shared_from_entry(entry: &Entry) -> SharedEntry {
    SharedEntry {
        token: entry.token.expose().to_owned(),
        scopes: entry.scopes.to_vec(),
        expires_at_ms: instant_to_ms(entry.expires_at),
        refresh_at_ms: instant_to_ms(entry.refresh_at),
        issued_ms: entry.issued_ms,
    }
}

fn entry_from_shared(shared: SharedEntry) -> std::sync::Arc<Entry> {
    let expires_at = ms_to_instant(shared.expires_at_ms);
    std::sync::Arc::new(Entry {
        scopes: shared.scopes.into(),
        lifetime: expires_at.saturating_duration_since(Instant::now()),
        refresh_at: ms_to_instant(shared.refresh_at_ms),
        expires_at,
        issued_ms: shared.issued_ms,
        jti: super::super::entry::read_unverified(&shared.token)
            .jti
            .unwrap_or_default()
            .into(),
        token: AccessToken::new(shared.token),
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
