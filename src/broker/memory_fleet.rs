//! An in-memory double of "several replicas sharing a store": the fleet's
//! entries, locks, proofs, announcements and one upstream schedule in one
//! process, behind the same seams as Redis. The fleet protocol's tests run on it
//! under paused time, without redis-server.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::SeqCst},
    },
    time::Duration,
};

use futures_util::{
    future::BoxFuture,
    stream::{BoxStream, StreamExt as _},
};
use tokio::{
    sync::{Notify, broadcast},
    time::Instant,
};
use tokio_stream::wrappers::BroadcastStream;

use super::{
    CacheKey, Entry, Seams,
    budget::{Grant, Priority, Schedule},
    proven::Verifier,
    shared::{
        Budget, ClientRef, FleetEvent, Lock, LockToken, PeerWait, ProofEvent, ProofRecord,
        ProofStore, SharedTokens,
    },
};

#[derive(Default)]
struct State {
    entries: HashMap<CacheKey, Arc<Entry>>,
    /// Holder's token and when the lock lapses.
    locks: HashMap<CacheKey, (String, Instant)>,
    /// Every record of each client, as Redis keeps a proof and a refusal apart.
    proofs: HashMap<ClientRef, HashMap<(Verifier, bool), ProofRecord>>,
}

/// The store every replica of a test fleet shares.
pub(crate) struct MemoryStore {
    state: Mutex<State>,
    changed: Notify,
    events: broadcast::Sender<ProofEvent>,
    schedule: Option<Schedule>,
    strangers: Option<Arc<Schedule>>,
    lock_ttl: Duration,
    lock_wait: Duration,
    up: AtomicBool,
    next_token: AtomicU64,
    /// Locks taken, over the whole fleet.
    pub(crate) locks_taken: AtomicU64,
    /// Every call any replica made to the store.
    pub(crate) calls: AtomicU64,
}

impl MemoryStore {
    /// A store with an upstream schedule of `per_second` (none when 0).
    pub(crate) fn new(per_second: u32) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            changed: Notify::new(),
            events: broadcast::channel(1024).0,
            schedule: (per_second > 0).then(|| Schedule::new(per_second)),
            strangers: (per_second > 0).then(|| Arc::new(Schedule::new((per_second / 10).max(1)))),
            lock_ttl: Duration::from_secs(10),
            lock_wait: Duration::from_secs(3),
            up: AtomicBool::new(true),
            next_token: AtomicU64::new(1),
            locks_taken: AtomicU64::new(0),
            calls: AtomicU64::new(0),
        })
    }

    /// The seams of one replica on this store.
    pub(crate) fn seams(self: &Arc<Self>) -> Seams {
        Seams {
            tokens: self.clone(),
            proofs: self.clone(),
            budget: self
                .schedule
                .as_ref()
                .map(|_| self.clone() as Arc<dyn Budget>),
            strangers: self
                .strangers
                .as_ref()
                .map(|s| s.clone() as Arc<dyn Budget>),
            revocations: None,
            shared: true,
        }
    }

    /// Makes the store stop (or start again) answering, like a Redis that died.
    pub(crate) fn set_up(&self, up: bool) {
        self.up.store(up, SeqCst);
    }

    fn up(&self) -> bool {
        self.calls.fetch_add(1, SeqCst);
        self.up.load(SeqCst)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl SharedTokens for MemoryStore {
    fn get<'a>(&'a self, key: &'a CacheKey) -> BoxFuture<'a, Option<Arc<Entry>>> {
        let now = Instant::now();
        let found = self.up().then(|| self.state().entries.get(key).cloned());
        Box::pin(async move { found.flatten().filter(|e| e.expires_at > now) })
    }

    fn put<'a>(&'a self, key: &'a CacheKey, entry: &'a Entry) -> BoxFuture<'a, ()> {
        if self.up() {
            let copy = Arc::new(Entry {
                token: entry.token.clone(),
                scopes: entry.scopes.clone(),
                lifetime: entry.lifetime,
                refresh_at: entry.refresh_at,
                expires_at: entry.expires_at,
                issued_ms: entry.issued_ms,
                jti: entry.jti.clone(),
            });
            self.state().entries.insert(key.clone(), copy);
            self.changed.notify_waiters();
        }
        Box::pin(async {})
    }

    fn try_lock<'a>(&'a self, key: &'a CacheKey) -> BoxFuture<'a, Lock> {
        let outcome = if !self.up() {
            Lock::Unavailable
        } else {
            let now = Instant::now();
            let mut state = self.state();
            match state.locks.get(key) {
                Some((_, until)) if *until > now => Lock::Busy,
                _ => {
                    let token = self.next_token.fetch_add(1, SeqCst).to_string();
                    state
                        .locks
                        .insert(key.clone(), (token.clone(), now + self.lock_ttl));
                    self.locks_taken.fetch_add(1, SeqCst);
                    Lock::Taken(LockToken(token))
                }
            }
        };
        Box::pin(async move { outcome })
    }

    fn unlock<'a>(&'a self, key: &'a CacheKey, lock: LockToken) -> BoxFuture<'a, ()> {
        if self.up() {
            let mut state = self.state();
            if state.locks.get(key).is_some_and(|(t, _)| *t == lock.0) {
                state.locks.remove(key);
            }
            drop(state);
            self.changed.notify_waiters();
        }
        Box::pin(async {})
    }

    fn wait_for_peer<'a>(
        &'a self,
        key: &'a CacheKey,
        deadline: Instant,
    ) -> BoxFuture<'a, PeerWait> {
        Box::pin(async move {
            loop {
                let notified = self.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if !self.up() {
                    return PeerWait::Failed;
                }
                let now = Instant::now();
                let lapses = {
                    let state = self.state();
                    if let Some(entry) = state.entries.get(key).filter(|e| e.expires_at > now) {
                        return PeerWait::Entry(entry.clone());
                    }
                    match state.locks.get(key) {
                        Some((_, until)) if *until > now => *until,
                        _ => return PeerWait::Released,
                    }
                };
                if now >= deadline {
                    return PeerWait::TimedOut;
                }
                tokio::select! {
                    () = notified => {}
                    () = tokio::time::sleep_until(deadline.min(lapses)) => {}
                }
            }
        })
    }

    fn lock_wait(&self) -> Duration {
        self.lock_wait
    }
}

impl ProofStore for MemoryStore {
    fn client_ref(&self, client_id: &str) -> ClientRef {
        format!("client:{client_id}")
    }

    fn load<'a>(&'a self, client: &'a ClientRef) -> BoxFuture<'a, Option<Vec<ProofRecord>>> {
        let now = Instant::now();
        let records = self.up().then(|| {
            self.state()
                .proofs
                .get(client)
                .map(|p| {
                    p.values()
                        .filter(
                            |r| !matches!(r, ProofRecord::Proven { until, .. } if *until <= now),
                        )
                        .copied()
                        .collect()
                })
                .unwrap_or_default()
        });
        Box::pin(async move { records })
    }

    fn record<'a>(&'a self, client: &'a ClientRef, record: ProofRecord) -> BoxFuture<'a, ()> {
        if self.up() {
            let key = match record {
                ProofRecord::Proven { verifier, .. } => (verifier, false),
                ProofRecord::Refused { verifier, .. } => (verifier, true),
            };
            self.state()
                .proofs
                .entry(client.clone())
                .or_default()
                .insert(key, record);
            let _ = self.events.send(ProofEvent {
                client: client.clone(),
                record,
            });
        }
        Box::pin(async {})
    }

    fn subscribe(&self) -> BoxFuture<'_, Option<BoxStream<'static, FleetEvent>>> {
        let stream = self.up().then(|| {
            BroadcastStream::new(self.events.subscribe())
                .filter_map(|e| std::future::ready(e.ok().map(FleetEvent::Proof)))
                .boxed()
        });
        Box::pin(async move { stream })
    }

    fn forget<'a>(&'a self, client: &'a ClientRef) -> BoxFuture<'a, ()> {
        if self.up() {
            self.state().proofs.remove(client);
        }
        Box::pin(async {})
    }

    fn set_subscribed(&self, _: bool) {}

    fn heartbeat(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

impl Budget for MemoryStore {
    fn reserve(&self, priority: Priority, max_wait: Duration) -> BoxFuture<'_, Grant> {
        let grant = match &self.schedule {
            Some(schedule) => schedule.reserve(priority, max_wait),
            None => Grant::After(Duration::ZERO),
        };
        Box::pin(async move { grant })
    }
}
