//! What a connection and a request must do before the gateway works for them, so
//! that a stranger without credentials cannot hold its resources:
//!
//! - **Connections** ([`incoming`], [`Guarded`]): at most `max_connections` open
//!   (beyond it new ones are closed at once, the established ones untouched); a
//!   connection that has not sent the 24-byte HTTP/2 preface within
//!   `handshake_timeout`, or that has had no call in flight for `idle_timeout`, is
//!   closed; during shutdown a connection without a call in flight is closed after
//!   a 250 ms linger (its last answer leaves first); accept errors (out of file descriptors) back off instead of spinning.
//!   hyper and h2 offer none of these for a server (keepalive PINGs start only
//!   after the handshake and are answered by an idle peer), so [`Guarded`] ends the
//!   connection the only way an I/O object can: its read reports `TimedOut`,
//!   exactly as a dead socket would. It reads and writes nothing itself and
//!   reports non-vectored writes (the reason is on [`Guarded`]).
//! - **Requests** ([`EdgeLayer`]): a unary call's message must arrive within
//!   `body_timeout` of its headers, hold exactly one gRPC message and be no larger
//!   than `max_message_bytes`; only then does it take a slot of the shared
//!   concurrency budget (the layer after this one), so a caller that never sends
//!   its message holds an HTTP/2 stream of its own connection, not the budget.
//!   One peer address takes at most `max_requests_per_peer` slots. A content type
//!   other than `application/grpc` is answered HTTP 415, as the gRPC protocol says.
//!
//! [`Edge`] holds the state both share; `connection` guards connections and
//! `request` guards requests; [`Edge::layers`] is the ordered stack a server
//! serves with (edge, then shedding, then the concurrency budget; put an
//! `AuthLayer` after it).

mod connection;
mod request;
#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::time::Instant;

pub use connection::{incoming, peer_addr};
// The guard's own types and the gateway's constants: not an adopter's API.
#[cfg_attr(not(feature = "gateway"), doc(hidden))]
pub use connection::{ConnState, Guarded, PeerInfo, peer_info};
pub use request::{EdgeLayer, EdgeService};

/// Length of the HTTP/2 client connection preface (`PRI * HTTP/2.0…`).
const PREFACE_LEN: u64 = 24;
/// At shutdown, how long a connection without a call in flight is left to h2's
/// own graceful close (GOAWAY, the last frames flushed) before it is closed.
const SHUTDOWN_LINGER: Duration = Duration::from_millis(250);
/// Longest `grpc-message` sent: error details never grow with the request.
pub(crate) const MAX_STATUS_MESSAGE: usize = 1024;
/// Longest pause between two accept attempts after an accept error.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Server reflection's bidirectional streams (v1 and v1alpha): pass them to
/// [`EdgeLayer::new`] so that their messages are not collected before the call.
pub const REFLECTION_PATHS: [&str; 2] = [
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Server-streaming methods whose answers last (a stream, not one message):
/// they get the stream lifetime and the stream slots instead of the unary ones.
pub(crate) const LONG_LIVED_PATHS: [&str; 2] = [
    "/grpc.health.v1.Health/Watch",
    "/m2m.gateway.v1.Gateway/WatchRevocations",
];

/// Time a call's answer may take to leave after its deadline before its
/// connection is closed as stalled (a peer that does not read, a flow-control
/// window left at 0).
const STALL_GRACE: Duration = Duration::from_secs(2);

/// Descriptors kept for the process itself (upstream, Redis, admin, logs).
const RESERVED_DESCRIPTORS: usize = 256;

/// `wanted` connections, lowered to stay below the open-file limit so that the
/// process never runs out of descriptors for its own sockets (upstream calls,
/// Redis, logs).
pub(crate) fn connection_cap(wanted: usize) -> usize {
    let Some(limit) = open_file_limit() else {
        return wanted;
    };
    let room = limit.saturating_sub(RESERVED_DESCRIPTORS).max(1);
    if room < wanted {
        tracing::warn!(
            configured = wanted,
            open_file_limit = limit,
            effective = room,
            "max_connections lowered to stay below the open-file limit (raise it with ulimit -n)"
        );
    }
    room.min(wanted)
}

/// The soft open-file limit, from `/proc/self/limits` (Linux).
fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Default of [`EdgeSettings::max_connections`] (before [`connection_cap`]).
pub(crate) const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default of [`EdgeSettings::max_connections_per_peer`]: a tenth of the default
/// table, so that one address cannot fill it.
pub(crate) const DEFAULT_MAX_CONNECTIONS_PER_PEER: usize = 1_000;
/// Default of [`EdgeSettings::response_timeout`], in milliseconds (the gateway's
/// `server.request_timeout_ms`).
pub(crate) const DEFAULT_RESPONSE_TIMEOUT_MS: u64 = 10_000;
/// Default of [`EdgeSettings::max_stream_lifetime`], in seconds.
pub(crate) const DEFAULT_MAX_STREAM_SECS: u64 = 300;
/// Default of [`EdgeSettings::max_streams_per_peer`].
pub(crate) const DEFAULT_MAX_STREAMS_PER_PEER: usize = 16;
/// Default of [`EdgeSettings::max_streams_per_connection`].
pub(crate) const DEFAULT_MAX_STREAMS_PER_CONNECTION: usize = 4;
/// Default of [`EdgeSettings::handshake_timeout`], in milliseconds.
pub(crate) const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// Default of [`EdgeSettings::idle_timeout`], in seconds.
pub(crate) const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 300;
/// Default of [`EdgeSettings::body_timeout`], in milliseconds.
pub(crate) const DEFAULT_BODY_TIMEOUT_MS: u64 = 3_000;
/// Default of [`EdgeSettings::max_message_bytes`].
pub(crate) const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Default of [`EdgeSettings::max_requests_per_peer`] (a quarter of the
/// gateway's default `max_concurrent_requests`).
pub(crate) const DEFAULT_MAX_REQUESTS_PER_PEER: usize = 256;

/// Limits of the listener and of every request. The defaults are the gateway's
/// (`[server]` in its configuration) and suit any tonic service.
#[derive(Debug, Clone)]
pub struct EdgeSettings {
    /// Most open connections.
    pub max_connections: usize,
    /// Most open connections from one peer address.
    pub max_connections_per_peer: usize,
    /// Time for a new connection to send the HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// Time a connection may stay open with no call in flight.
    pub idle_timeout: Duration,
    /// Time for a unary call's message to arrive after its headers.
    pub body_timeout: Duration,
    /// Largest request message.
    pub max_message_bytes: usize,
    /// Most calls in flight from one peer address.
    pub max_requests_per_peer: usize,
    /// Time a unary call has to be answered, its answer sent included; past it
    /// (and a short grace) a connection whose answer cannot leave is closed.
    pub response_timeout: Duration,
    /// Longest life of a stream (Health/Watch, reflection): it then ends with
    /// `DEADLINE_EXCEEDED`, and the client opens a new one.
    pub max_stream_lifetime: Duration,
    /// Most streams open from one peer address (apart from its unary calls).
    pub max_streams_per_peer: usize,
    /// Most streams open on one connection.
    pub max_streams_per_connection: usize,
}

impl Default for EdgeSettings {
    /// 10,000 connections (lowered below the open-file limit), 1,000 of them
    /// from one address, 5 s for the
    /// preface, 5 min idle, 3 s for a request's message, 64 KiB messages, 256
    /// calls in flight per peer address.
    fn default() -> Self {
        Self {
            max_connections: connection_cap(DEFAULT_MAX_CONNECTIONS),
            max_connections_per_peer: DEFAULT_MAX_CONNECTIONS_PER_PEER,
            handshake_timeout: Duration::from_millis(DEFAULT_HANDSHAKE_TIMEOUT_MS),
            idle_timeout: Duration::from_secs(DEFAULT_IDLE_TIMEOUT_SECS),
            body_timeout: Duration::from_millis(DEFAULT_BODY_TIMEOUT_MS),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_requests_per_peer: DEFAULT_MAX_REQUESTS_PER_PEER,
            response_timeout: Duration::from_millis(DEFAULT_RESPONSE_TIMEOUT_MS),
            max_stream_lifetime: Duration::from_secs(DEFAULT_MAX_STREAM_SECS),
            max_streams_per_peer: DEFAULT_MAX_STREAMS_PER_PEER,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
        }
    }
}

crate::counters::counters! {
    /// Counters of the edge.
    EdgeStats => EdgeStatsSnapshot {
        /// Connections accepted and kept.
        accepted => ("connections_accepted_total", "gRPC connections accepted."),
        /// Connections closed at once because `max_connections` were open.
        refused => ("connections_refused_total", "Connections closed at once because server.max_connections were open."),
        /// Connections closed at once because their address had
        /// `max_connections_per_peer` open.
        peer_refused => ("connections_peer_refused_total", "Connections closed at once because their address had server.max_connections_per_peer open."),
        /// Connections closed because an answer could not leave by its deadline.
        stalled_closed => ("connections_stalled_closed_total", "Connections closed because an answer could not leave by its deadline (the peer does not read)."),
        /// Streams ended at `max_stream_lifetime`.
        streams_expired => ("streams_expired_total", "Streams ended at server.max_stream_secs."),
        /// Streams refused because their peer had `max_streams_per_peer` open, or
        /// their connection `max_streams_per_connection`.
        streams_peer_limited => ("streams_peer_limited_total", "Streams refused because their address had server.max_streams_per_peer open."),
        /// Connections closed for not sending the preface in time.
        handshake_timeouts => ("connections_handshake_timeouts_total", "Connections closed for not sending the HTTP/2 preface in time."),
        /// Connections closed after `idle_timeout` without a call.
        idle_closed => ("connections_idle_closed_total", "Connections closed after server.idle_timeout_secs without a call."),
        /// Accept errors (e.g. out of file descriptors).
        accept_errors => ("accept_errors_total", "Errors accepting connections."),
        /// Calls whose message did not arrive within `body_timeout`.
        body_timeouts => ("request_body_timeouts_total", "Calls whose message did not arrive within server.request_body_timeout_ms."),
        /// Calls refused because their peer had `max_requests_per_peer` in flight.
        peer_limited => ("peer_limited_total", "Calls refused because their address had server.max_requests_per_peer in flight."),
    }
}

/// State shared by the listener, its connections and the request layer.
///
/// Serving through [`incoming`] (the connection guard) and [`Edge::layers`]
/// (the request guard, load shedding, a concurrency budget):
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use m2m_gateway::{Edge, EdgeSettings, edge};
/// use tonic::transport::Server;
///
/// let edge = Edge::new(EdgeSettings::default());
/// let listener = tokio::net::TcpListener::bind("0.0.0.0:50052").await?;
/// Server::builder()
///     .layer(edge.layers(&edge::REFLECTION_PATHS, 1_000))
/// #   .add_service(m2m_gateway::proto::demo::v1::echo_server::EchoServer::new(m2m_gateway::demo::EchoService))
///     // .add_service(OrdersServer::new(orders))
///     .serve_with_incoming(edge::incoming(listener, edge.clone()))
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Edge {
    settings: EdgeSettings,
    open: AtomicUsize,
    created: Instant,
    /// Milliseconds after `created` of the last accept error (0 = none yet).
    last_accept_error_ms: AtomicU64,
    shutting_down: std::sync::OnceLock<Instant>,
    peers: Mutex<HashMap<IpAddr, usize>>,
    /// Open streams by peer address.
    stream_peers: Mutex<HashMap<IpAddr, usize>>,
    /// Open connections by peer address.
    connections: Mutex<HashMap<IpAddr, usize>>,
    stats: EdgeStats,
}

impl Edge {
    /// Edge state for `settings`.
    pub fn new(settings: EdgeSettings) -> Arc<Self> {
        Arc::new(Self {
            settings,
            open: AtomicUsize::new(0),
            created: Instant::now(),
            last_accept_error_ms: AtomicU64::new(0),
            shutting_down: std::sync::OnceLock::new(),
            peers: Mutex::new(HashMap::new()),
            stream_peers: Mutex::new(HashMap::new()),
            connections: Mutex::new(HashMap::new()),
            stats: EdgeStats::default(),
        })
    }

    /// The settings.
    pub fn settings(&self) -> &EdgeSettings {
        &self.settings
    }

    /// Counters.
    pub fn stats(&self) -> &EdgeStats {
        &self.stats
    }

    /// Open connections.
    pub fn open_connections(&self) -> usize {
        self.open.load(Relaxed)
    }

    /// Whether accepting connections fails (out of descriptors, say): readiness.
    /// A full connection table is not a reason to be taken out of rotation: a
    /// stranger could cause it, and other addresses are still served while one
    /// address holds its maximum.
    pub fn is_accept_failing(&self) -> bool {
        let last_error = self.last_accept_error_ms.load(Relaxed);
        last_error != 0
            && self.created.elapsed().as_millis() as u64
                <= last_error + MAX_ACCEPT_BACKOFF.as_millis() as u64
    }

    /// Takes a connection slot of `ip`, unless it holds its maximum.
    fn take_peer_slot(&self, ip: IpAddr) -> bool {
        let mut open = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.settings.max_connections_per_peer {
            return false;
        }
        *n += 1;
        true
    }

    fn release_peer_slot(&self, ip: IpAddr) {
        let mut open = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&ip);
            }
        }
    }

    /// Whether new connections are being refused (cap reached, accept failing).
    /// Derived from the state, so it clears by itself when connections close or
    /// accepting works again, whether or not a new connection comes.
    pub fn is_refusing(&self) -> bool {
        if self.open.load(Relaxed) >= self.settings.max_connections {
            return true;
        }
        let last_error = self.last_accept_error_ms.load(Relaxed);
        last_error != 0
            && self.created.elapsed().as_millis() as u64
                <= last_error + MAX_ACCEPT_BACKOFF.as_millis() as u64
    }

    /// From now on, connections without a call in flight are closed at once.
    pub fn begin_shutdown(&self) {
        let _ = self.shutting_down.set(Instant::now());
    }
}

/// The ordered layers of [`Edge::layers`]: the edge's request guard, load
/// shedding, then the shared concurrency budget.
pub type Hardened = tower::layer::util::Stack<
    tower::limit::GlobalConcurrencyLimitLayer,
    tower::layer::util::Stack<
        tower::load_shed::LoadShedLayer,
        tower::layer::util::Stack<EdgeLayer, tower::layer::util::Identity>,
    >,
>;

impl Edge {
    /// The stack every server of this crate serves with, in its one order: a
    /// call's message is collected (bounded in time and size) by the edge before
    /// the call takes a slot of the budget; beyond `max_concurrent_requests`
    /// calls in flight, new calls are shed at once with RESOURCE_EXHAUSTED
    /// instead of queueing. `exempt_paths` are the streaming methods whose
    /// bodies the edge does not collect (e.g. [`REFLECTION_PATHS`]). Add your
    /// `AuthLayer` after it:
    ///
    /// ```no_run
    /// # fn demo(validator: m2m_gateway::jwt::CognitoValidator) {
    /// use m2m_gateway::{auth::{AuthLayer, AuthPolicy}, edge::{self, Edge, EdgeSettings}};
    /// let edge = Edge::new(EdgeSettings::default());
    /// let layers = edge
    ///     .layers(&edge::REFLECTION_PATHS, 1024)
    ///     .layer(AuthLayer::local(validator, AuthPolicy::new()));
    /// # let _ = layers;
    /// # }
    /// ```
    pub fn layers(
        self: &Arc<Self>,
        exempt_paths: &[&'static str],
        max_concurrent_requests: usize,
    ) -> tower::ServiceBuilder<Hardened> {
        tower::ServiceBuilder::new()
            .layer(EdgeLayer::new(self.clone(), exempt_paths))
            .load_shed()
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                max_concurrent_requests.max(1),
            ))
    }
}

#[cfg(feature = "gateway")]
impl Edge {
    /// The edge's series.
    pub(crate) fn encode(&self, out: &mut crate::prometheus::Encoder) {
        let edge = self;
        // Connections and requests at the edge.
        let e = edge.stats();
        e.encode(out);
        out.gauge(
            "connections_open",
            "Open gRPC connections.",
            edge.open_connections() as f64,
        );
    }
}
