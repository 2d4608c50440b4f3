//! The upstream call: a slot of the budget first (the client's share, the
//! strangers' share, the schedule), then Cognito, whose answer proves or refuses
//! the secret here and in the fleet.

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use tokio::time::Instant;

use super::{
    Broker, BrokerError, BrokerSettings, UpstreamError,
    budget::{Grant, Priority},
    entry::{Entry, read_unverified},
    flight::Fetch,
    proven::Verifier,
    shared::ProofRecord,
    unit_random,
};
use crate::registry::Client;

/// Upstream calls a second open to secrets not yet proven: a tenth of the budget
/// (at least one), so strangers cycling wrong secrets cannot spend the rest.
pub(super) fn strangers_share(per_second: NonZeroU32) -> u32 {
    (per_second.get() / 10).max(1)
}

/// Slots of the schedule one client may hold ahead at once: a quarter of a
/// second's budget, at least two.
pub(super) fn client_share(per_second: Option<NonZeroU32>) -> usize {
    per_second.map_or(usize::MAX >> 4, |n| (n.get() as usize / 4).max(2))
}

/// The time between two slots of the budget.
fn budget_interval(settings: &BrokerSettings) -> Duration {
    Duration::from_secs(1) / settings.upstream_per_second.map_or(1, NonZeroU32::get)
}

impl Broker {
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

    /// One call to the token endpoint for `req`, once the budget admits it.
    pub(super) async fn upstream(
        &self,
        req: &Fetch<'_>,
        priority: Priority,
    ) -> Result<Arc<Entry>, BrokerError> {
        let inner = &self.inner;
        let (client, key, scopes) = (req.client, &req.key, &req.scopes);
        let (credentials, verifier) = (req.caller.credentials, req.caller.verifier);
        let wait = if inner.seams.budget.is_some() {
            tracing::debug_span!(target: crate::trace_context::TARGET, "budget wait")
        } else {
            tracing::Span::none()
        };
        tracing::Instrument::instrument(
            self.admit_upstream(client, priority, req.caller.proven),
            wait,
        )
        .await?;
        let started = Instant::now();
        inner.clients.upstream(client.index);
        let result = inner
            .upstream
            .client_credentials(&credentials.client_id, &credentials.secret, &key.1)
            .await;
        let elapsed = started.elapsed();
        let response = match result {
            Ok(r) => {
                inner.stats.upstream(&client.pool, "ok", elapsed);
                r
            }
            Err(e) => {
                inner.stats.upstream(&client.pool, e.label(), elapsed);
                if e == UpstreamError::InvalidClient {
                    inner.clients.refused(client.index);
                    self.revoke(client, verifier, started).await;
                }
                tracing::info!(client = %client.name, pool = %client.pool, outcome = e.label(), error = %e, "token request refused or failed");
                return Err(e.into());
            }
        };
        let read = read_unverified(response.access_token.expose());
        let issued_ms = read.issued_ms.unwrap_or_else(crate::revocations::now_ms);
        let granted = match read.scopes.clone() {
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
            issued_ms,
            jti: read.jti.unwrap_or_default().into(),
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
