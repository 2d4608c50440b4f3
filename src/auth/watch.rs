//! [`RevocationWatcher`]: keeps a service's copy of the gateway's revocations
//! current through `m2m.gateway.v1.Gateway/WatchRevocations`, so that its
//! [`AuthLayer`](super::AuthLayer) refuses revoked tokens with no network hop
//! per call.

use std::{
    fmt::{self, Write as _},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::{sync::watch, time::Instant};
use tonic::{metadata::MetadataValue, transport::Channel};

use super::TokenSource;
use crate::{
    proto::gateway::v1::{
        RevocationUpdate, WatchRevocationsRequest, gateway_client::GatewayClient,
    },
    revocations::{Revocation, RevocationList, Revocations, target_from_proto},
};

/// The gateway sends a heartbeat every 5 s; a stream silent for this long is
/// taken for dead and made again.
const SILENT_FOR: Duration = Duration::from_secs(15);

/// What a service does once its copy of the revocations is older than
/// [`WatchOptions::max_staleness`] (the gateway unreachable that long).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhenStale {
    /// Keep serving with the last list (availability first). The default.
    #[default]
    KeepServing,
    /// Refuse every token (UNAUTHENTICATED) until the list is current again
    /// (a revocation must never be missed, even at the cost of an outage).
    RefuseAll,
}

/// How a [`RevocationWatcher`] behaves.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// How old the list may get (no update or heartbeat from the gateway)
    /// before it counts as stale. Default 60 s.
    pub max_staleness: Duration,
    /// What happens then. Default [`WhenStale::KeepServing`].
    pub when_stale: WhenStale,
    /// First pause before reconnecting after a failure (doubled each time,
    /// with jitter). Default 100 ms.
    pub min_backoff: Duration,
    /// Longest pause between reconnects. Default 10 s.
    pub max_backoff: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            max_staleness: Duration::from_secs(60),
            when_stale: WhenStale::KeepServing,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// Where a watcher stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchState {
    /// No list received yet (nothing is refused for revocation yet).
    Starting,
    /// The stream is up and the list current.
    Current,
    /// The stream is down; the last list stays in force.
    Reconnecting,
    /// Down for longer than `max_staleness`, serving with the last list
    /// ([`WhenStale::KeepServing`]).
    Stale,
    /// Down for longer than `max_staleness`, refusing every token
    /// ([`WhenStale::RefuseAll`]).
    Refusing,
}

impl WatchState {
    /// Stable label for metrics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            WatchState::Starting => "starting",
            WatchState::Current => "current",
            WatchState::Reconnecting => "reconnecting",
            WatchState::Stale => "stale",
            WatchState::Refusing => "refusing",
        }
    }
}

/// Keeps a [`Revocations`] list in step with a gateway's, in the background:
/// the whole list first, then each change; it resumes where it left off,
/// reconnects with backoff, and authenticates with the service's own
/// [`TokenSource`]. Hand [`RevocationWatcher::revocations`] to the validator
/// ([`CognitoValidator::with_revocations`](crate::jwt::CognitoValidator::with_revocations))
/// and the [`AuthLayer`](super::AuthLayer) refuses revoked tokens in-process.
/// Stops when dropped.
///
/// ```no_run
/// # async fn demo(validator: m2m_gateway::jwt::CognitoValidator) -> Result<(), Box<dyn std::error::Error>> {
/// use m2m_gateway::auth::{AuthLayer, AuthPolicy, RevocationWatcher, TokenSource, WatchOptions};
/// let gateway = tonic::transport::Channel::from_static("http://127.0.0.1:50051").connect().await?;
/// let tokens = TokenSource::from_gateway(gateway.clone(), "orders-svc", "its-secret", Vec::<String>::new());
/// let watcher = RevocationWatcher::spawn(gateway, tokens, WatchOptions::default());
/// let validator = validator.with_revocations(watcher.revocations());
/// # let (_, health) = tonic_health::server::health_reporter();
/// tonic::transport::Server::builder()
///     .layer(AuthLayer::local(validator, AuthPolicy::new().require(["orders/read"])))
///     .add_service(health)
///     .serve("127.0.0.1:50052".parse()?)
///     .await?;
/// # Ok(()) }
/// ```
pub struct RevocationWatcher {
    shared: Arc<Shared>,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

struct Shared {
    revocations: Revocations,
    options: WatchOptions,
    state: watch::Sender<WatchState>,
    /// When the last update or heartbeat arrived.
    last_heard: Mutex<Option<Instant>>,
    updates: AtomicU64,
    reconnects: AtomicU64,
}

impl fmt::Debug for RevocationWatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RevocationWatcher")
            .field("state", &self.state())
            .field("revocations", &self.shared.revocations)
            .finish_non_exhaustive()
    }
}

impl Drop for RevocationWatcher {
    fn drop(&mut self) {
        self.tasks.iter().for_each(tokio::task::JoinHandle::abort);
    }
}

impl RevocationWatcher {
    /// Starts watching the gateway on `gateway` (call inside a Tokio runtime).
    pub fn spawn(gateway: Channel, tokens: TokenSource, options: WatchOptions) -> Self {
        let shared = Arc::new(Shared {
            revocations: Revocations::default(),
            options,
            state: watch::channel(WatchState::Starting).0,
            last_heard: Mutex::new(None),
            updates: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        });
        let follow = tokio::spawn(follow(shared.clone(), GatewayClient::new(gateway), tokens));
        let staleness = tokio::spawn(judge_staleness(shared.clone()));
        Self {
            shared,
            tasks: [follow, staleness],
        }
    }

    /// The list it keeps current: give it to the validator.
    pub fn revocations(&self) -> Revocations {
        self.shared.revocations.clone()
    }

    /// Where it stands now.
    pub fn state(&self) -> WatchState {
        *self.shared.state.borrow()
    }

    /// Whether the service should report ready: a list arrived at least once
    /// and tokens are not all being refused. Wire it into your readiness.
    pub fn is_ready(&self) -> bool {
        !matches!(self.state(), WatchState::Starting | WatchState::Refusing)
    }

    /// Waits until the state satisfies `pred` (e.g. the first list:
    /// `|s| s == WatchState::Current`).
    pub async fn wait_for(&self, pred: impl Fn(WatchState) -> bool) -> WatchState {
        let mut rx = self.shared.state.subscribe();
        rx.wait_for(|s| pred(*s))
            .await
            .map_or_else(|_| self.state(), |s| *s)
    }

    /// Updates (and heartbeats) received so far.
    pub fn updates(&self) -> u64 {
        self.shared.updates.load(Relaxed)
    }

    /// Times the stream was made again after it ended or failed.
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Relaxed)
    }

    /// The watcher's series in the Prometheus text format, for the service's
    /// own `/metrics`.
    pub fn encode_metrics(&self) -> String {
        let mut out = String::new();
        let state = self.state();
        let _ = writeln!(
            out,
            "# HELP m2m_gateway_revocation_watch_state 1 for the watcher's current state (current, reconnecting, stale, refusing, starting).\n# TYPE m2m_gateway_revocation_watch_state gauge"
        );
        for s in [
            WatchState::Starting,
            WatchState::Current,
            WatchState::Reconnecting,
            WatchState::Stale,
            WatchState::Refusing,
        ] {
            let _ = writeln!(
                out,
                "m2m_gateway_revocation_watch_state{{state=\"{}\"}} {}",
                s.as_str(),
                u8::from(s == state)
            );
        }
        let age = self
            .shared
            .last_heard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map_or(-1.0, |t| t.elapsed().as_secs_f64());
        let list = self.shared.revocations.snapshot();
        for (name, kind, help, value) in [
            (
                "revocation_watch_seconds_since_update",
                "gauge",
                "Seconds since the gateway last sent an update or heartbeat (-1: never).",
                age,
            ),
            (
                "revocation_watch_reconnects_total",
                "counter",
                "Times the revocation stream was made again.",
                self.reconnects() as f64,
            ),
            (
                "revocations_in_force",
                "gauge",
                "Revocations this service refuses tokens for.",
                list.entries().count() as f64,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP m2m_gateway_{name} {help}\n# TYPE m2m_gateway_{name} {kind}\nm2m_gateway_{name} {value}"
            );
        }
        out
    }
}

impl Shared {
    /// Moves to the state `to` computes from the current one and the time of
    /// the last update (`None`: stay). Every change of state goes through
    /// here, under the lock of `last_heard`, so that the stream's task and the
    /// staleness judge never undo each other's step; the refusal switch is set
    /// before the new state shows, so whoever sees a state sees its effect.
    fn transition(
        &self,
        heard_now: bool,
        to: impl FnOnce(WatchState, Option<Instant>) -> Option<WatchState>,
    ) {
        let mut last = self.last_heard.lock().unwrap_or_else(|p| p.into_inner());
        if heard_now {
            *last = Some(Instant::now());
        }
        let Some(state) = to(*self.state.borrow(), *last) else {
            return;
        };
        self.revocations
            .set_refuse_all(state == WatchState::Refusing);
        self.state.send_if_modified(|s| {
            if *s == state {
                return false;
            }
            tracing::info!(from = s.as_str(), to = state.as_str(), "revocation watcher");
            *s = state;
            true
        });
    }

    fn heard(&self) {
        self.updates.fetch_add(1, Relaxed);
        self.transition(true, |_, _| Some(WatchState::Current));
    }
}

/// The stream, made again whenever it ends, with backoff after failures.
async fn follow(shared: Arc<Shared>, mut client: GatewayClient<Channel>, tokens: TokenSource) {
    let options = shared.options.clone();
    let mut backoff = options.min_backoff;
    let mut list = RevocationList::new();
    let mut resume = WatchRevocationsRequest::default();
    let mut first = true;
    loop {
        if !first {
            shared.reconnects.fetch_add(1, Relaxed);
        }
        first = false;
        let outcome = session(&shared, &mut client, &tokens, &mut list, &mut resume).await;
        shared.transition(false, |s, _| {
            (s == WatchState::Current).then_some(WatchState::Reconnecting)
        });
        match outcome {
            // The gateway ended a healthy stream (its stream lifetime, a
            // drain): made again at once.
            Ok(()) => backoff = options.min_backoff,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "revocation stream failed; the last list stays in force");
                let jitter = 0.5 + crate::oauth::unit_random() * 0.5;
                tokio::time::sleep(backoff.mul_f64(jitter)).await;
                backoff = (backoff * 2).min(options.max_backoff);
            }
        }
    }
}

/// One stream: `Ok` when the gateway ended it after at least one update.
async fn session(
    shared: &Shared,
    client: &mut GatewayClient<Channel>,
    tokens: &TokenSource,
    list: &mut RevocationList,
    resume: &mut WatchRevocationsRequest,
) -> Result<(), String> {
    let token = tokens.token().await.map_err(|e| format!("no token: {e}"))?;
    let mut request = tonic::Request::new(resume.clone());
    let bearer = MetadataValue::try_from(format!("Bearer {}", token.expose()))
        .map_err(|_| "the token is not valid metadata".to_owned())?;
    request.metadata_mut().insert("authorization", bearer);
    let mut stream = client
        .watch_revocations(request)
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let mut heard = false;
    loop {
        match tokio::time::timeout(SILENT_FOR, stream.message()).await {
            Ok(Ok(Some(update))) => {
                apply(shared, list, resume, update);
                heard = true;
            }
            Ok(Ok(None)) if heard => return Ok(()),
            Ok(Ok(None)) => return Err("the stream ended before any update".into()),
            Ok(Err(s)) if heard && s.code() == tonic::Code::DeadlineExceeded => return Ok(()),
            Ok(Err(s)) => return Err(format!("{:?}: {}", s.code(), s.message())),
            Err(_) => return Err(format!("no heartbeat for {SILENT_FOR:?}")),
        }
    }
}

/// Applies one update to the copy and publishes it when it changed.
fn apply(
    shared: &Shared,
    list: &mut RevocationList,
    resume: &mut WatchRevocationsRequest,
    update: RevocationUpdate,
) {
    let entries = update
        .changed
        .iter()
        .filter_map(|r| Revocation::try_from(r).ok());
    let changed = if update.reset {
        *list = RevocationList::from_entries(entries);
        true
    } else {
        let mut changed = false;
        for entry in entries {
            list.upsert(entry);
            changed = true;
        }
        for key in &update.removed {
            if let Some(target) = target_from_proto(key.target) {
                changed |= list.remove(target, &key.id);
            }
        }
        changed
    };
    resume.resume_epoch = update.epoch;
    resume.resume_version = update.version;
    // Current first: whoever sees the new list sees the watcher current.
    let first = shared.updates.load(Relaxed) == 0;
    shared.heard();
    if changed || first {
        shared.revocations.publish(list.clone());
    }
}

/// Marks the list stale (and refuses everything, if the service chose so)
/// once nothing was heard for `max_staleness`.
async fn judge_staleness(shared: Arc<Shared>) {
    let max = shared.options.max_staleness;
    let mut tick =
        tokio::time::interval((max / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)));
    loop {
        tick.tick().await;
        let when_stale = shared.options.when_stale;
        shared.transition(false, |state, last| {
            let silent = last.is_some_and(|t| t.elapsed() > max);
            (silent && matches!(state, WatchState::Reconnecting | WatchState::Current)).then_some(
                match when_stale {
                    WhenStale::KeepServing => WatchState::Stale,
                    WhenStale::RefuseAll => WatchState::Refusing,
                },
            )
        });
    }
}
