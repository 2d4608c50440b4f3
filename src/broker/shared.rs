//! What the fleet gives the broker, as four narrow seams: single flight across
//! replicas ([`SharedTokens`]: the stored entry, the fetch lock, the wait for a
//! peer), the fleet's proven secrets with their announcements ([`ProofStore`]),
//! the revocations in force ([`RevocationStore`]), and the upstream schedule
//! ([`Budget`]). Each has a local implementation (one
//! replica on its own) and a Redis one (`fleet`) that owns its timeouts and its
//! fallback; the tests run the fleet protocol on an in-memory double
//! (`memory_fleet`). The broker speaks in its own terms here: cache keys, client
//! ids, verifiers and instants; never Redis key names or wall-clock time.

use std::{sync::Arc, time::Duration};

use futures_util::{
    FutureExt as _,
    future::{BoxFuture, ready},
    stream::BoxStream,
};
use tokio::time::Instant;

use crate::revocations::Revocation;

use super::{
    CacheKey, Entry,
    budget::{Grant, Priority, Schedule},
    proven::{ProvenSecrets, Verifier},
};

impl ProvenSecrets {
    /// Applies what the fleet recorded for client `index` (the newer of a proof
    /// and a refusal wins).
    pub(crate) fn apply(&self, index: usize, record: ProofRecord) {
        match record {
            ProofRecord::Proven {
                verifier,
                until,
                at,
            } => {
                self.prove_at(index, verifier, until, at);
            }
            ProofRecord::Refused { verifier, at } => {
                self.revoke_at(index, &verifier, at);
            }
        }
    }
}

/// How a try for the fleet's fetch lock of a key ended.
#[derive(Debug)]
pub(crate) enum Lock {
    /// Taken: this replica fetches for the fleet and releases it with this token.
    Taken(LockToken),
    /// Another replica holds it.
    Busy,
    /// The store did not answer: fetch without the fleet.
    Unavailable,
}

/// Proof that a replica holds a fetch lock.
#[derive(Debug)]
pub(crate) struct LockToken(pub(crate) String);

/// How a wait for another replica's fetch ended.
#[derive(Debug)]
pub(crate) enum PeerWait {
    /// The peer stored an entry.
    Entry(Arc<Entry>),
    /// The peer released the lock without storing one (its fetch failed).
    Released,
    /// The lock wait ran out.
    TimedOut,
    /// The store failed meanwhile.
    Failed,
}

/// Single flight across replicas: the entries the fleet shares and the lock that
/// lets one replica fetch a key while the others wait for its entry.
pub(crate) trait SharedTokens: Send + Sync {
    /// The fleet's entry for `key`, if it holds one.
    fn get<'a>(&'a self, key: &'a CacheKey) -> BoxFuture<'a, Option<Arc<Entry>>>;
    /// Stores `entry` for the fleet until it expires.
    fn put<'a>(&'a self, key: &'a CacheKey, entry: &'a Entry) -> BoxFuture<'a, ()>;
    /// Tries to take the fetch lock of `key`.
    fn try_lock<'a>(&'a self, key: &'a CacheKey) -> BoxFuture<'a, Lock>;
    /// Releases the lock if it is still this holder's.
    fn unlock<'a>(&'a self, key: &'a CacheKey, lock: LockToken) -> BoxFuture<'a, ()>;
    /// Waits until the holder stores an entry or releases the lock, or `deadline`.
    fn wait_for_peer<'a>(&'a self, key: &'a CacheKey, deadline: Instant)
    -> BoxFuture<'a, PeerWait>;
    /// Longest wait for a peer's fetch before fetching oneself.
    fn lock_wait(&self) -> Duration;
}

/// An opaque name of a client in the proof store's announcements.
pub(crate) type ClientRef = String;

/// What Cognito said of one secret, and when it was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProofRecord {
    /// Cognito accepted the secret of `verifier`; proven until `until`.
    Proven {
        verifier: Verifier,
        until: Instant,
        at: Instant,
    },
    /// Cognito refused it.
    Refused { verifier: Verifier, at: Instant },
}

/// A proof or a refusal announced by a replica.
#[derive(Debug, Clone)]
pub(crate) struct ProofEvent {
    pub(crate) client: ClientRef,
    pub(crate) record: ProofRecord,
}

/// What a replica hears on the fleet's channels.
#[derive(Debug, Clone)]
pub(crate) enum FleetEvent {
    /// A proof or a refusal.
    Proof(ProofEvent),
    /// The revocations changed: read them again.
    Revocations,
}

/// The fleet's revocations: every entry in force, stored for replicas that
/// start later and announced to those running. The store is not trusted to
/// keep them: each replica writes back what it holds and the store lacks.
pub(crate) trait RevocationStore: Send + Sync {
    /// Every entry the store holds; `None` when it did not answer.
    fn load(&self) -> BoxFuture<'_, Option<Vec<Revocation>>>;
    /// Stores entries (new, changed or written back) and announces them;
    /// `false` when the store did not take them.
    fn store<'a>(&'a self, entries: &'a [Revocation]) -> BoxFuture<'a, bool>;
    /// Removes entries that no longer cover a valid token.
    fn remove<'a>(&'a self, entries: &'a [Revocation]) -> BoxFuture<'a, ()>;
}

/// The fleet's proven secrets: stored, announced, and followed.
pub(crate) trait ProofStore: Send + Sync {
    /// The name announcements carry for `client_id`.
    fn client_ref(&self, client_id: &str) -> ClientRef;
    /// A client's proofs and refusals; `None` when the store did not answer.
    fn load<'a>(&'a self, client: &'a ClientRef) -> BoxFuture<'a, Option<Vec<ProofRecord>>>;
    /// Records and announces a proof or a refusal.
    fn record<'a>(&'a self, client: &'a ClientRef, record: ProofRecord) -> BoxFuture<'a, ()>;
    /// Drops every proof of a client (the kill switch).
    fn forget<'a>(&'a self, client: &'a ClientRef) -> BoxFuture<'a, ()>;
    /// A subscription to the announcements (proofs and revocations); `None`
    /// when it cannot be made now.
    fn subscribe(&self) -> BoxFuture<'_, Option<BoxStream<'static, FleetEvent>>>;
    /// Whether this replica hears the announcements (for `fleet_shared`).
    fn set_subscribed(&self, subscribed: bool);
    /// Checks, while subscribed, that the store answers commands too.
    fn heartbeat(&self) -> BoxFuture<'_, ()>;
}

/// The upstream schedule (`limits.upstream_per_second`).
pub(crate) trait Budget: Send + Sync {
    /// Reserves a slot: a miss waits up to `max_wait`, a refresh only takes a
    /// free one.
    fn reserve(&self, priority: Priority, max_wait: Duration) -> BoxFuture<'_, Grant>;
}

/// One replica on its own: nothing is shared, every lock is taken at once.
#[derive(Debug, Default)]
pub(crate) struct Alone;

impl SharedTokens for Alone {
    fn get<'a>(&'a self, _: &'a CacheKey) -> BoxFuture<'a, Option<Arc<Entry>>> {
        ready(None).boxed()
    }

    fn put<'a>(&'a self, _: &'a CacheKey, _: &'a Entry) -> BoxFuture<'a, ()> {
        ready(()).boxed()
    }

    fn try_lock<'a>(&'a self, _: &'a CacheKey) -> BoxFuture<'a, Lock> {
        ready(Lock::Taken(LockToken(String::new()))).boxed()
    }

    fn unlock<'a>(&'a self, _: &'a CacheKey, _: LockToken) -> BoxFuture<'a, ()> {
        ready(()).boxed()
    }

    fn wait_for_peer<'a>(&'a self, _: &'a CacheKey, _: Instant) -> BoxFuture<'a, PeerWait> {
        ready(PeerWait::Released).boxed()
    }

    fn lock_wait(&self) -> Duration {
        Duration::ZERO
    }
}

impl ProofStore for Alone {
    fn client_ref(&self, client_id: &str) -> ClientRef {
        client_id.to_owned()
    }

    fn load<'a>(&'a self, _: &'a ClientRef) -> BoxFuture<'a, Option<Vec<ProofRecord>>> {
        ready(Some(Vec::new())).boxed()
    }

    fn record<'a>(&'a self, _: &'a ClientRef, _: ProofRecord) -> BoxFuture<'a, ()> {
        ready(()).boxed()
    }

    fn forget<'a>(&'a self, _: &'a ClientRef) -> BoxFuture<'a, ()> {
        ready(()).boxed()
    }

    fn subscribe(&self) -> BoxFuture<'_, Option<BoxStream<'static, FleetEvent>>> {
        ready(None).boxed()
    }

    fn set_subscribed(&self, _: bool) {}

    fn heartbeat(&self) -> BoxFuture<'_, ()> {
        ready(()).boxed()
    }
}

/// This replica's own schedule.
impl Budget for Schedule {
    fn reserve(&self, priority: Priority, max_wait: Duration) -> BoxFuture<'_, Grant> {
        ready(Schedule::reserve(self, priority, max_wait)).boxed()
    }
}
