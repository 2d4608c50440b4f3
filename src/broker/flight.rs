//! Single flight: one upstream call per key at a time (per fleet with Redis),
//! joined by every later caller, in its own task so that a caller giving up does
//! not cancel it; the fleet's lock, and the wait for a peer's entry.

use std::{collections::HashMap, sync::Arc};

use futures_util::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use tokio::time::Instant;

use super::{
    Broker, BrokerError, Credentials,
    budget::Priority,
    entry::{CacheKey, Entry},
    proven::Verifier,
    shared::{Lock, PeerWait},
};
use crate::registry::{Client, ScopeSet};

/// A flight for a key: shared by every proven caller (`None`), or by the callers
/// of one unproven secret.
pub(super) type FlightKey = (CacheKey, Option<Verifier>);
/// What a flight ends with: the verifier whose secret it presented, and the entry.
pub(super) type FlightResult = (Verifier, Result<Arc<Entry>, BrokerError>);
pub(super) type Flight = Shared<BoxFuture<'static, FlightResult>>;

/// The in-flight table.
pub(super) type Flights = std::sync::Mutex<HashMap<FlightKey, Flight>>;

/// Who asks: the presented credentials, their verifier, and where the call came
/// from (for the failed-attempt limit).
#[derive(Clone, Copy)]
pub(super) struct Caller<'a> {
    pub(super) credentials: &'a Credentials,
    pub(super) verifier: Verifier,
    pub(super) source: Option<std::net::IpAddr>,
    /// Whether the secret is proven (a proven caller's attempts are not counted).
    pub(super) proven: bool,
}

impl<'a> Caller<'a> {
    /// A caller whose secret is proven.
    pub(super) fn proven(credentials: &'a Credentials, verifier: Verifier) -> Self {
        Self {
            credentials,
            verifier,
            source: None,
            proven: true,
        }
    }
}

/// One request for a token: who asks, for which key and scopes, and the entry
/// being refreshed (`None` for a miss).
#[derive(Clone)]
pub(super) struct Fetch<'a> {
    pub(super) client: &'a Client,
    pub(super) key: CacheKey,
    pub(super) caller: Caller<'a>,
    pub(super) scopes: ScopeSet,
    pub(super) current: Option<Arc<Entry>>,
}

impl Fetch<'_> {
    /// Proven callers share one flight per key; an unproven secret has its own.
    fn flight_key(&self) -> FlightKey {
        (
            self.key.clone(),
            (!self.caller.proven).then_some(self.caller.verifier),
        )
    }

    fn priority(&self) -> Priority {
        if self.current.is_some() {
            Priority::Refresh
        } else {
            Priority::Miss
        }
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

impl Broker {
    /// The shared flight of proven callers. When it fails because Cognito refused
    /// the secret of the caller who started it (deleted in a rotation), a caller
    /// whose own secret is still proven asks again with it.
    pub(super) fn proven_fetch<'a>(
        &'a self,
        req: Fetch<'a>,
    ) -> BoxFuture<'a, Result<Arc<Entry>, BrokerError>> {
        Box::pin(async move {
            let verifier = req.caller.verifier;
            let (used, result) = self.fetch(req.clone()).await;
            match result {
                Err(BrokerError::InvalidClient)
                    if used != verifier
                        && self.inner.proven.is_proven(
                            req.client.index,
                            &verifier,
                            Instant::now(),
                        ) =>
                {
                    self.fetch(req).await.1
                }
                other => other,
            }
        })
    }

    /// One upstream call per flight key at a time; later callers join it. The call
    /// runs in its own task so that a caller giving up does not cancel it. A new
    /// flight of an unproven secret takes a unit of the failed-attempt limit;
    /// joining one does not.
    pub(super) async fn fetch(&self, req: Fetch<'_>) -> FlightResult {
        let flight_key = req.flight_key();
        let Caller {
            credentials,
            verifier,
            source,
            proven,
        } = req.caller;
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
                if !proven {
                    if let Err(e) = self.admit_unverified(req.client, source) {
                        return (verifier, Err(e));
                    }
                }
                let this = self.clone();
                let client = req.client.clone();
                let credentials = credentials.clone();
                let (key, scopes, current) = (req.key, req.scopes, req.current);
                let guard_key = flight_key.clone();
                // The fetch is the flight's first caller's child in its trace.
                let span = tracing::Span::current();
                let task = tokio::spawn(tracing::Instrument::instrument(
                    async move {
                        let _guard = FlightGuard {
                            broker: this.clone(),
                            key: Some(guard_key),
                        };
                        let req = Fetch {
                            client: &client,
                            key,
                            caller: Caller {
                                credentials: &credentials,
                                verifier,
                                source,
                                proven,
                            },
                            scopes,
                            current,
                        };
                        let result = this.obtain(&req).await;
                        if let Ok(entry) = &result {
                            this.inner.cache.insert(req.key.clone(), entry.clone());
                        }
                        result
                    },
                    span,
                ));
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
    async fn obtain(&self, req: &Fetch<'_>) -> Result<Arc<Entry>, BrokerError> {
        let (proven, verifier) = (req.caller.proven, req.caller.verifier);
        let (client, key, current) = (req.client, &req.key, &req.current);
        let tokens = &self.inner.seams.tokens;
        let deadline = Instant::now() + tokens.lock_wait();
        loop {
            match tokens.try_lock(key).await {
                Lock::Taken(lock) => {
                    let mut peer = self.stored_by_peer(key, current).await;
                    if peer.is_some() && !proven && !self.proven_by_fleet(client, &verifier).await {
                        peer = None;
                    }
                    let result = match peer {
                        Some(entry) => Ok(entry),
                        None => self.upstream_shared(req).await,
                    };
                    tokens.unlock(key, lock).await;
                    return result;
                }
                Lock::Busy => {
                    if let Some(current) = current
                        .as_ref()
                        .filter(|c| self.usable(&key.0, c, Instant::now()))
                    {
                        // Another replica is refreshing; the current token still lives.
                        return Ok(current.clone());
                    }
                    let wait = tracing::debug_span!(
                        target: crate::trace_context::TARGET,
                        "fleet wait",
                        m2m.fleet.outcome = tracing::field::Empty,
                    );
                    let waited = tracing::Instrument::instrument(
                        tokens.wait_for_peer(key, deadline),
                        wait.clone(),
                    )
                    .await;
                    wait.record(
                        "m2m.fleet.outcome",
                        match &waited {
                            PeerWait::Entry(_) => "entry",
                            PeerWait::Released => "released",
                            PeerWait::TimedOut => "timed_out",
                            PeerWait::Failed => "failed",
                        },
                    );
                    drop(wait);
                    match waited {
                        PeerWait::Entry(entry) => {
                            if self.usable(&key.0, &entry, Instant::now())
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
        self.upstream_shared(req).await
    }

    /// An upstream call whose entry is stored for the fleet.
    async fn upstream_shared(&self, req: &Fetch<'_>) -> Result<Arc<Entry>, BrokerError> {
        let result = self.upstream(req, req.priority()).await;
        if let Ok(entry) = &result {
            self.inner.seams.tokens.put(&req.key, entry).await;
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
        (newer && now < entry.refresh_at && self.usable(&key.0, &entry, now)).then_some(entry)
    }
}
