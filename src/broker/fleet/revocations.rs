//! The fleet's revocations on Redis: one hash (`m2m:{revocations}`) with a
//! sealed field per entry, named by an HMAC of what it covers, and a channel on
//! which a change is announced. The hash is not trusted to keep them: replicas
//! write back what it lacks (a Redis restart, a flush, an attacker's `HDEL`),
//! and a field that does not open, or opens under another name, is skipped.

use std::sync::atomic::Ordering::Relaxed;

use futures_util::future::BoxFuture;

use super::*;
use crate::{
    broker::shared::RevocationStore,
    revocations::{Revocation, Target},
};

/// The hash of every revocation in force (one slot in cluster mode).
pub(crate) const REVOCATIONS_KEY: &str = "m2m:{revocations}";
/// Where a change of the revocations is announced (the message says nothing:
/// replicas read the hash again).
pub(crate) const REVOCATION_CHANNEL: &str = "m2m:revocations";
/// Most entries read (each expires one token lifetime after its time); a
/// bigger hash is skipped as corrupt, and written back whole.
const MAX_REVOCATION_FIELDS: usize = 100_000;

impl FleetCache {
    /// The field of an entry: what it covers, never in the clear.
    fn revocation_field(&self, target: Target, id: &str) -> String {
        let kind: &[u8] = match target {
            Target::Client => b"client",
            Target::Token => b"token",
        };
        self.mac_id(&[b"revocation", kind, id.as_bytes()])
    }

    /// Every entry the hash holds that this fleet sealed under its own name.
    pub(crate) async fn load_revocations(&self) -> Result<Vec<Revocation>, FleetError> {
        let n = match self
            .call::<usize>(redis::cmd("HLEN").arg(REVOCATIONS_KEY))
            .await
        {
            Ok(n) => n,
            Err(FleetError::Data(e)) => {
                tracing::warn!(error = %e, "the revocations hash in Redis is unreadable; replicas write it back");
                return Ok(Vec::new());
            }
            Err(e) => return Err(e),
        };
        if n > MAX_REVOCATION_FIELDS {
            // Stuffed: cleared, so that a replica that starts later does not
            // read an empty list from it forever; the replicas write theirs back.
            self.stats.corrupt.fetch_add(1, Relaxed);
            tracing::warn!(
                fields = n,
                "the revocations hash in Redis is oversized; cleared (replicas write back theirs)"
            );
            let _: i64 = self.call(redis::cmd("DEL").arg(REVOCATIONS_KEY)).await?;
            return Ok(Vec::new());
        }
        let fields: Vec<(String, Vec<u8>)> =
            match self.call(redis::cmd("HGETALL").arg(REVOCATIONS_KEY)).await {
                Err(FleetError::Data(_)) => return Ok(Vec::new()),
                other => other?,
            };
        let mut entries = Vec::with_capacity(fields.len());
        let mut junk = Vec::new();
        for (field, blob) in fields {
            let opened: Option<Revocation> = self.open(&format!("{REVOCATIONS_KEY}/{field}"), blob);
            match opened {
                // Bound to its field: a sealed entry cannot be moved to
                // cover (or uncover) something else.
                Some(r) if self.revocation_field(r.target, &r.id) == field => entries.push(r),
                _ => junk.push(field),
            }
        }
        if !junk.is_empty() {
            // Removed, so that junk cannot pile up to the bound; a real entry
            // it replaced is written back by the replicas that hold it.
            self.stats.corrupt.fetch_add(junk.len() as u64, Relaxed);
            tracing::warn!(
                fields = junk.len(),
                "revocations in Redis that did not open with this fleet's key; removed (replicas write back theirs)"
            );
            let _: i64 = self
                .call(redis::cmd("HDEL").arg(REVOCATIONS_KEY).arg(&junk))
                .await?;
        }
        Ok(entries)
    }

    /// Stores entries and announces the change.
    pub(crate) async fn put_revocations(&self, entries: &[Revocation]) -> Result<(), FleetError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut hset = redis::cmd("HSET");
        hset.arg(REVOCATIONS_KEY);
        for r in entries {
            let field = self.revocation_field(r.target, &r.id);
            let blob = self.seal(&format!("{REVOCATIONS_KEY}/{field}"), r)?;
            hset.arg(field).arg(blob);
        }
        if let Err(FleetError::Data(e)) = self.call::<i64>(&hset).await {
            // Our own key, overwritten with another type: ours to replace.
            tracing::warn!(error = %e, "the revocations hash in Redis was not a hash; replaced");
            let _: i64 = self.call(redis::cmd("DEL").arg(REVOCATIONS_KEY)).await?;
            let _: i64 = self.call(&hset).await?;
        }
        let _: i64 = self
            .call(redis::cmd("PUBLISH").arg(REVOCATION_CHANNEL).arg("changed"))
            .await?;
        Ok(())
    }

    /// Removes entries that no longer cover a valid token.
    pub(crate) async fn remove_revocations(
        &self,
        entries: &[Revocation],
    ) -> Result<(), FleetError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut hdel = redis::cmd("HDEL");
        hdel.arg(REVOCATIONS_KEY);
        for r in entries {
            hdel.arg(self.revocation_field(r.target, &r.id));
        }
        let _: i64 = self.call(&hdel).await?;
        Ok(())
    }
}

/// The revocation store on Redis.
impl RevocationStore for std::sync::Arc<FleetCache> {
    fn load(&self) -> BoxFuture<'_, Option<Vec<Revocation>>> {
        Box::pin(async move { self.load_revocations().await.ok() })
    }

    fn store<'a>(&'a self, entries: &'a [Revocation]) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            match self.put_revocations(entries).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "revocations not stored in Redis; this replica keeps them and writes them back when Redis answers");
                    false
                }
            }
        })
    }

    fn remove<'a>(&'a self, entries: &'a [Revocation]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let _ = self.remove_revocations(entries).await;
        })
    }
}
