//! Keeps this replica's proven secrets in step with the fleet's: loads every
//! registered client's proofs from Redis when the subscription is (re)made, then
//! applies the proofs and revocations other replicas announce. A replica that
//! misses announcements while Redis is away reloads on reconnecting.

use std::{
    collections::HashMap,
    sync::{Arc, Weak},
    time::Duration,
};

use futures_util::StreamExt as _;
use tokio::sync::watch;

use super::{
    Inner,
    fleet::{self, FleetCache, ProofEvent},
};

/// Pause before subscribing again after Redis went away.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);
/// How often a subscribed replica checks that Redis answers commands too.
const HEARTBEAT: Duration = Duration::from_secs(1);

pub(super) async fn follow_proofs(
    broker: Weak<Inner>,
    fleet: Arc<FleetCache>,
    mut alive: watch::Receiver<()>,
) {
    // The client each proof key belongs to, by registry index.
    let Some(index) = broker.upgrade().map(|inner| {
        inner
            .registry
            .clients()
            .map(|c| (fleet.proof_key(&c.client_id), c.index))
            .collect::<HashMap<_, _>>()
    }) else {
        return;
    };
    loop {
        let session = async {
            let mut events = match fleet.proof_events().await {
                Ok(events) => events,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot subscribe to the fleet's proven secrets yet");
                    fleet.set_subscribed(false, Some(&e));
                    return;
                }
            };
            // Subscribed first, then loaded: nothing announced in between is lost.
            for (client_key, &i) in &index {
                let Ok(proofs) = fleet.load_proofs(client_key).await else {
                    return;
                };
                let Some(inner) = broker.upgrade() else {
                    return;
                };
                for (verifier, until_ms) in proofs {
                    inner
                        .proven
                        .prove(i, verifier, fleet::ms_to_instant(until_ms));
                }
            }
            fleet.set_subscribed(true, None);
            // A heartbeat keeps redis_up and fleet_shared true to what Redis does
            // while no call needs it (a cache hit never touches Redis).
            let mut beat = tokio::time::interval(HEARTBEAT);
            loop {
                let event = tokio::select! {
                    event = events.next() => event,
                    _ = beat.tick() => {
                        let _ = fleet.heartbeat().await;
                        continue;
                    }
                };
                let Some(event) = event else { return };
                let Some(inner) = broker.upgrade() else {
                    return;
                };
                match event {
                    ProofEvent::Proven {
                        client_key,
                        verifier,
                        until_ms,
                    } => {
                        if let Some(&i) = index.get(&client_key) {
                            inner
                                .proven
                                .prove(i, verifier, fleet::ms_to_instant(until_ms));
                        }
                    }
                    ProofEvent::Revoked {
                        client_key,
                        verifier,
                    } => {
                        if let Some(&i) = index.get(&client_key) {
                            inner.proven.revoke(i, &verifier);
                        }
                    }
                }
            }
        };
        tokio::select! {
            () = session => {}
            _ = alive.changed() => return,
        }
        fleet.set_subscribed(
            false,
            Some(&fleet::FleetError::Redis("the subscription ended".into())),
        );
        if broker.strong_count() == 0 {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(RESUBSCRIBE_AFTER) => {}
            _ = alive.changed() => return,
        }
    }
}
