//! Keeps this replica's proven secrets in step with the fleet's: loads every
//! registered client's proofs from the store when the subscription is (re)made,
//! then applies the proofs and refusals other replicas announce. A replica that
//! misses announcements while the store is away reloads on resubscribing. The
//! fleet's revocations are reconciled at each (re)subscription, on each
//! announcement of a change, and every few seconds (a store that lost them
//! gets them back).

use std::{
    collections::HashMap,
    sync::{Arc, Weak},
    time::Duration,
};

use futures_util::StreamExt as _;
use tokio::sync::watch;

use super::{
    Inner,
    revoke::reconcile,
    shared::{FleetEvent, ProofEvent, ProofStore},
};

/// Pause before subscribing again after the store went away.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);
/// How often a subscribed replica checks that the store answers commands too.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Every this many heartbeats, the revocations are reconciled even without an
/// announcement.
const RECONCILE_EVERY: u32 = 5;

pub(super) async fn follow_proofs(
    broker: Weak<Inner>,
    store: Arc<dyn ProofStore>,
    mut alive: watch::Receiver<()>,
) {
    // The client each announced name belongs to, by registry index.
    let Some(index) = broker.upgrade().map(|inner| {
        inner
            .registry
            .clients()
            .map(|c| (store.client_ref(&c.client_id), c.index))
            .collect::<HashMap<_, _>>()
    }) else {
        return;
    };
    loop {
        let session = async {
            let Some(mut events) = store.subscribe().await else {
                return;
            };
            // Subscribed first, then loaded: nothing announced in between is lost.
            for (client, &i) in &index {
                let Some(proofs) = store.load(client).await else {
                    return;
                };
                let Some(inner) = broker.upgrade() else {
                    return;
                };
                for record in proofs {
                    inner.proven.apply(i, record);
                }
            }
            {
                let Some(inner) = broker.upgrade() else {
                    return;
                };
                if !reconcile(&inner).await {
                    return;
                }
            }
            store.set_subscribed(true);
            let mut beats = 0u32;
            // A heartbeat keeps redis_up and fleet_shared true to what the store
            // does while no call needs it (a cache hit never touches it).
            let mut beat = tokio::time::interval(HEARTBEAT);
            loop {
                let event = tokio::select! {
                    event = events.next() => event,
                    _ = beat.tick() => {
                        store.heartbeat().await;
                        beats += 1;
                        if beats % RECONCILE_EVERY == 0 {
                            let Some(inner) = broker.upgrade() else {
                                return;
                            };
                            reconcile(&inner).await;
                        }
                        continue;
                    }
                };
                let (Some(event), Some(inner)) = (event, broker.upgrade()) else {
                    return;
                };
                match event {
                    FleetEvent::Proof(ProofEvent { client, record }) => {
                        if let Some(&i) = index.get(&client) {
                            inner.proven.apply(i, record);
                        }
                    }
                    FleetEvent::Revocations => {
                        reconcile(&inner).await;
                    }
                }
            }
        };
        tokio::select! {
            () = session => {}
            _ = alive.changed() => return,
        }
        store.set_subscribed(false);
        if broker.strong_count() == 0 {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(RESUBSCRIBE_AFTER) => {}
            _ = alive.changed() => return,
        }
    }
}
