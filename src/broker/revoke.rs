//! The broker's part of the kill switch: a revoked client gets no token (the
//! check is in the hot path), its proven secrets and cached tokens are dropped
//! here and in the fleet, and the fleet's revocations are kept in step with
//! this replica's (taken in, written back, expired).

use std::sync::Arc;

use tokio::time::Instant;

use super::{Broker, Inner};
use crate::revocations::{RevocationList, Revocations, Target, now_ms};

impl Broker {
    /// The revocations in force, shared with the gateway's validator.
    pub fn revocations(&self) -> &Revocations {
        &self.inner.revocations
    }

    /// Whether `client_id` is in the registry.
    pub fn is_registered(&self, client_id: &str) -> bool {
        self.inner.registry.get(client_id).is_some()
    }

    /// Drops what this replica and the fleet hold for `client_id`: its proven
    /// secrets (its next call goes to Cognito, which checks the secret again)
    /// and its cached tokens.
    pub async fn forget_client(&self, client_id: &str) {
        forget_locally(&self.inner, client_id);
        let proofs = &self.inner.seams.proofs;
        proofs.forget(&proofs.client_ref(client_id)).await;
    }

    /// Stores entries in the fleet and announces them (true without a fleet:
    /// there is no one else to tell).
    pub async fn share_revocations(&self, entries: &[crate::revocations::Revocation]) -> bool {
        match &self.inner.seams.revocations {
            Some(store) => store.store(entries).await,
            None => true,
        }
    }

    /// Takes in the fleet's revocations, writes back what it lacks and drops
    /// what expired. `false` when the store did not answer.
    pub async fn reconcile_revocations(&self) -> bool {
        reconcile(&self.inner).await
    }
}

/// Drops a client's proofs and cached entries on this replica.
pub(super) fn forget_locally(inner: &Inner, client_id: &str) {
    if let Some(client) = inner.registry.get(client_id) {
        inner.proven.forget_client(client.index, Instant::now());
    }
    let keys: Vec<_> = inner
        .cache
        .iter()
        .filter(|(k, _)| &*k.0 == client_id)
        .map(|(k, _)| (*k).clone())
        .collect();
    for key in keys {
        inner.cache.invalidate(&key);
    }
}

/// One round with the fleet's store: its entries merged into this replica's
/// (a later change wins; a client newly revoked or restored has its proofs and
/// cached tokens dropped here), this replica's entries that the store lacks
/// written back (a Redis restart or flush loses nothing in force), and entries
/// that no longer cover a valid token removed from both.
pub(super) async fn reconcile(inner: &Arc<Inner>) -> bool {
    let Some(store) = inner.seams.revocations.clone() else {
        return true;
    };
    let Some(stored) = store.load().await else {
        return false;
    };
    let theirs = RevocationList::from_entries(stored);
    let now = now_ms();
    let (taken, write_back) = inner.revocations.update(|list| {
        let taken = list.merge(theirs.entries());
        let expired = list.expire(now);
        let write_back: Vec<_> = list.newer_than(&theirs).into_iter().cloned().collect();
        (!taken.is_empty() || expired > 0, (taken, write_back))
    });
    for r in &taken {
        if r.target == Target::Client {
            forget_locally(inner, &r.id);
        }
    }
    if !taken.is_empty() {
        tracing::info!(entries = taken.len(), "revocations taken in from the fleet");
    }
    if !write_back.is_empty() {
        tracing::warn!(
            entries = write_back.len(),
            "the fleet's store lacked revocations this replica holds; written back"
        );
        store.store(&write_back).await;
    }
    let expired: Vec<_> = theirs
        .entries()
        .filter(|r| !r.blocked && r.until_ms <= now)
        .cloned()
        .collect();
    store.remove(&expired).await;
    true
}
