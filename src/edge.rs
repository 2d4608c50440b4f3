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

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use futures_util::Stream;
use http_body_util::BodyExt as _;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::{Instant, Sleep},
};
#[cfg(feature = "tls")]
use tonic::transport::server::TlsConnectInfo;
use tonic::{
    Status,
    body::Body,
    transport::server::{Connected, TcpConnectInfo},
};

/// Length of the HTTP/2 client connection preface (`PRI * HTTP/2.0…`).
const PREFACE_LEN: u64 = 24;
/// At shutdown, how long a connection without a call in flight is left to h2's
/// own graceful close (GOAWAY, the last frames flushed) before it is closed.
const SHUTDOWN_LINGER: Duration = Duration::from_millis(250);
/// Longest `grpc-message` sent: error details never grow with the request.
pub const MAX_STATUS_MESSAGE: usize = 1024;
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
pub const LONG_LIVED_PATHS: [&str; 1] = ["/grpc.health.v1.Health/Watch"];

/// Time a call's answer may take to leave after its deadline before its
/// connection is closed as stalled (a peer that does not read, a flow-control
/// window left at 0).
const STALL_GRACE: Duration = Duration::from_secs(2);

/// Descriptors kept for the process itself (upstream, Redis, admin, logs).
const RESERVED_DESCRIPTORS: usize = 256;

/// `wanted` connections, lowered to stay below the open-file limit so that the
/// process never runs out of descriptors for its own sockets (upstream calls,
/// Redis, logs).
pub fn connection_cap(wanted: usize) -> usize {
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
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default of [`EdgeSettings::max_connections_per_peer`]: a tenth of the default
/// table, so that one address cannot fill it.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: usize = 1_000;
/// Default of [`EdgeSettings::response_timeout`], in milliseconds (the gateway's
/// `server.request_timeout_ms`).
pub const DEFAULT_RESPONSE_TIMEOUT_MS: u64 = 10_000;
/// Default of [`EdgeSettings::max_stream_lifetime`], in seconds.
pub const DEFAULT_MAX_STREAM_SECS: u64 = 300;
/// Default of [`EdgeSettings::max_streams_per_peer`].
pub const DEFAULT_MAX_STREAMS_PER_PEER: usize = 16;
/// Default of [`EdgeSettings::max_streams_per_connection`].
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: usize = 4;
/// Default of [`EdgeSettings::handshake_timeout`], in milliseconds.
pub const DEFAULT_HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// Default of [`EdgeSettings::idle_timeout`], in seconds.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 300;
/// Default of [`EdgeSettings::body_timeout`], in milliseconds.
pub const DEFAULT_BODY_TIMEOUT_MS: u64 = 3_000;
/// Default of [`EdgeSettings::max_message_bytes`].
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Default of [`EdgeSettings::max_requests_per_peer`] (a quarter of the
/// gateway's default `max_concurrent_requests`).
pub const DEFAULT_MAX_REQUESTS_PER_PEER: usize = 256;

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

/// Counters of the edge.
#[derive(Debug, Default)]
pub struct EdgeStats {
    /// Connections accepted and kept.
    pub accepted: AtomicU64,
    /// Connections closed at once because `max_connections` were open.
    pub refused: AtomicU64,
    /// Connections closed for not sending the preface in time.
    pub handshake_timeouts: AtomicU64,
    /// Connections closed after `idle_timeout` without a call.
    pub idle_closed: AtomicU64,
    /// Accept errors (e.g. out of file descriptors).
    pub accept_errors: AtomicU64,
    /// Calls whose message did not arrive within `body_timeout`.
    pub body_timeouts: AtomicU64,
    /// Calls refused because their peer had `max_requests_per_peer` in flight.
    pub peer_limited: AtomicU64,
    /// Connections closed at once because their address had
    /// `max_connections_per_peer` open.
    pub peer_refused: AtomicU64,
    /// Connections closed because an answer could not leave by its deadline.
    pub stalled_closed: AtomicU64,
    /// Streams ended at `max_stream_lifetime`.
    pub streams_expired: AtomicU64,
    /// Streams refused because their peer had `max_streams_per_peer` open, or
    /// their connection `max_streams_per_connection`.
    pub streams_peer_limited: AtomicU64,
}

/// State shared by the listener, its connections and the request layer.
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

/// The connections of `listener`, guarded; never ends, never yields an error
/// (accept errors are counted, logged and waited out).
pub fn incoming(
    listener: TcpListener,
    edge: Arc<Edge>,
) -> impl Stream<Item = io::Result<Guarded<TcpStream>>> + Send + 'static {
    accepting(listener, edge)
}

/// Where connections come from: a listener, or a test's listener that fails.
trait Accept: Send + 'static {
    fn accept(&mut self) -> impl Future<Output = io::Result<(TcpStream, SocketAddr)>> + Send;
}

impl Accept for TcpListener {
    async fn accept(&mut self) -> io::Result<(TcpStream, SocketAddr)> {
        TcpListener::accept(self).await
    }
}

fn accepting(
    listener: impl Accept,
    edge: Arc<Edge>,
) -> impl Stream<Item = io::Result<Guarded<TcpStream>>> + Send + 'static {
    futures_util::stream::unfold(
        (listener, edge, Duration::ZERO),
        |(mut listener, edge, mut backoff)| async move {
            loop {
                match listener.accept().await {
                    Ok((stream, remote)) => {
                        backoff = Duration::ZERO;
                        if edge.open.load(Relaxed) >= edge.settings.max_connections {
                            edge.stats.refused.fetch_add(1, Relaxed);
                            drop(stream);
                            continue;
                        }
                        if !edge.take_peer_slot(remote.ip()) {
                            edge.stats.peer_refused.fetch_add(1, Relaxed);
                            drop(stream);
                            continue;
                        }
                        // Small answers (tokens, claims) must not wait for Nagle.
                        let _ = stream.set_nodelay(true);
                        edge.stats.accepted.fetch_add(1, Relaxed);
                        let mut guarded = Guarded::new(stream, Some(remote), edge.clone());
                        guarded.counted_peer = true;
                        return Some((Ok(guarded), (listener, edge, backoff)));
                    }
                    Err(e) => {
                        let at = edge.created.elapsed().as_millis() as u64;
                        edge.last_accept_error_ms.store(at.max(1), Relaxed);
                        let n = edge.stats.accept_errors.fetch_add(1, Relaxed);
                        backoff = (backoff * 2)
                            .max(Duration::from_millis(5))
                            .min(MAX_ACCEPT_BACKOFF);
                        if n.is_power_of_two() {
                            tracing::warn!(error = %e, errors = n + 1, ?backoff, "accepting connections fails; backing off");
                        }
                        tokio::time::sleep(backoff).await;
                    }
                }
            }
        },
    )
}

/// One connection's activity, seen by its I/O and by the calls it carries.
#[derive(Debug)]
pub struct ConnState {
    edge: Arc<Edge>,
    accepted: Instant,
    read: AtomicU64,
    calls: AtomicUsize,
    /// Milliseconds since `accepted` when the last call ended.
    last_call_ms: AtomicU64,
    /// When each call in flight must have left, by call number.
    call_deadlines: Mutex<Vec<(u64, Instant)>>,
    next_call: AtomicU64,
    /// Streams open on this connection.
    streams: AtomicUsize,
}

impl ConnState {
    /// When the connection should be closed, if nothing changes: with calls in
    /// flight, when the first of them is overdue (its answer cannot leave).
    fn deadline(&self) -> Option<Instant> {
        let settings = &self.edge.settings;
        if self.calls.load(Relaxed) > 0 {
            let due = self
                .call_deadlines
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            return due.iter().map(|(_, at)| *at).min();
        }
        let last_call = self.accepted + Duration::from_millis(self.last_call_ms.load(Relaxed));
        if let Some(&since) = self.edge.shutting_down.get() {
            // Never before the last answer has had time to leave.
            return Some(since.max(last_call) + SHUTDOWN_LINGER);
        }
        if self.read.load(Relaxed) < PREFACE_LEN {
            return Some(self.accepted + settings.handshake_timeout);
        }
        Some(last_call + settings.idle_timeout)
    }

    /// Takes one of the connection's stream slots, unless all are taken.
    fn stream_started(self: &Arc<Self>) -> Option<StreamGuard> {
        let max = self.edge.settings.max_streams_per_connection;
        self.streams
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| StreamGuard(self.clone()))
    }

    fn call_started(self: &Arc<Self>, lifetime: Duration) -> CallGuard {
        let id = self.next_call.fetch_add(1, Relaxed);
        self.call_deadlines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((id, Instant::now() + lifetime + STALL_GRACE));
        self.calls.fetch_add(1, Relaxed);
        CallGuard(self.clone(), id)
    }
}

/// Marks a call in flight on its connection until dropped.
#[derive(Debug)]
struct CallGuard(Arc<ConnState>, u64);

impl Drop for CallGuard {
    fn drop(&mut self) {
        let ms = self.0.accepted.elapsed().as_millis() as u64;
        self.0.last_call_ms.store(ms, Relaxed);
        self.0
            .call_deadlines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(id, _)| *id != self.1);
        self.0.calls.fetch_sub(1, Relaxed);
    }
}

/// Holds one of a connection's stream slots until dropped.
#[derive(Debug)]
struct StreamGuard(Arc<ConnState>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Relaxed);
    }
}

/// What a request learns of its connection (the `ConnectInfo` of [`Guarded`]).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    conn: Arc<ConnState>,
}

/// An accepted connection: closes itself (its read fails with `TimedOut`) when the
/// preface does not come in time, when it stays idle, or at shutdown when idle.
///
/// It reports non-vectored writes: with vectored I/O h2 writes every DATA payload
/// of 256 bytes or more with its own `writev` (the threshold is 1024 otherwise),
/// so a token answer (~0.8 KB) would leave as two TCP segments. Measured with
/// h2load on one core: Validate 0.53× → 0.88× and GetToken 0.75× → 0.85× of
/// Health req/s (BENCHMARKS.md).
#[derive(Debug)]
pub struct Guarded<IO> {
    io: IO,
    remote: Option<SocketAddr>,
    /// Whether it holds a slot of its address's connection cap.
    counted_peer: bool,
    conn: Arc<ConnState>,
    timer: Pin<Box<Sleep>>,
}

impl<IO> Guarded<IO> {
    fn new(io: IO, remote: Option<SocketAddr>, edge: Arc<Edge>) -> Self {
        edge.open.fetch_add(1, Relaxed);
        let accepted = Instant::now();
        let timer = Box::pin(tokio::time::sleep_until(
            accepted + edge.settings.handshake_timeout,
        ));
        Self {
            io,
            remote,
            counted_peer: false,
            conn: Arc::new(ConnState {
                edge,
                accepted,
                read: AtomicU64::new(0),
                calls: AtomicUsize::new(0),
                last_call_ms: AtomicU64::new(0),
                call_deadlines: Mutex::new(Vec::new()),
                next_call: AtomicU64::new(0),
                streams: AtomicUsize::new(0),
            }),
            timer,
        }
    }
}

impl<IO> Drop for Guarded<IO> {
    fn drop(&mut self) {
        self.conn.edge.open.fetch_sub(1, Relaxed);
        if self.counted_peer {
            if let Some(remote) = self.remote {
                self.conn.edge.release_peer_slot(remote.ip());
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        if let Poll::Ready(result) = Pin::new(&mut this.io).poll_read(cx, buf) {
            let n = (buf.filled().len() - before) as u64;
            this.conn.read.fetch_add(n, Relaxed);
            return Poll::Ready(result);
        }
        // Nothing to read: is the connection past its deadline?
        loop {
            let Some(deadline) = this.conn.deadline() else {
                return Poll::Pending;
            };
            if Instant::now() >= deadline {
                let edge = &this.conn.edge;
                let (counter, why) = if this.conn.calls.load(Relaxed) > 0 {
                    (
                        &edge.stats.stalled_closed,
                        "an answer could not leave by its deadline (the peer does not read)",
                    )
                } else if this.conn.read.load(Relaxed) < PREFACE_LEN {
                    (&edge.stats.handshake_timeouts, "no HTTP/2 preface in time")
                } else {
                    (&edge.stats.idle_closed, "idle connection closed")
                };
                counter.fetch_add(1, Relaxed);
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why)));
            }
            this.timer.as_mut().reset(deadline);
            ready!(this.timer.as_mut().poll(cx));
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

impl Connected for Guarded<TcpStream> {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        PeerInfo {
            remote: self.remote,
            conn: self.conn.clone(),
        }
    }
}

/// The peer of a request served through [`incoming`] (plain or TLS).
pub fn peer_info<B>(req: &http::Request<B>) -> Option<&PeerInfo> {
    let ext = req.extensions();
    let plain = ext.get::<PeerInfo>();
    #[cfg(feature = "tls")]
    let plain = plain.or_else(|| ext.get::<TlsConnectInfo<PeerInfo>>().map(|t| t.get_ref()));
    plain
}

/// The peer address of a request, whatever listener accepted it.
pub fn peer_addr<B>(req: &http::Request<B>) -> Option<SocketAddr> {
    if let Some(p) = peer_info(req) {
        return p.remote;
    }
    let ext = req.extensions();
    let plain = ext
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr);
    #[cfg(feature = "tls")]
    let plain = plain.or_else(|| {
        ext.get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|t| t.get_ref().remote_addr())
    });
    plain
}

/// Applies the request rules of [`Edge`]; `streaming` lists the paths whose
/// messages are not collected first (bidirectional streams such as reflection).
#[derive(Debug, Clone)]
pub struct EdgeLayer {
    edge: Arc<Edge>,
    streaming: Arc<[&'static str]>,
}

impl EdgeLayer {
    /// The layer over `edge`.
    pub fn new(edge: Arc<Edge>, streaming: &[&'static str]) -> Self {
        Self {
            edge,
            streaming: streaming.into(),
        }
    }
}

impl<S> tower::Layer<S> for EdgeLayer {
    type Service = EdgeService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        EdgeService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`EdgeLayer`].
#[derive(Debug, Clone)]
pub struct EdgeService<S> {
    inner: S,
    layer: EdgeLayer,
}

/// Holds one of a peer's request slots.
struct PeerSlot {
    edge: Arc<Edge>,
    ip: IpAddr,
    /// A stream's slot (its own table), or a unary call's.
    stream: bool,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let table = if self.stream {
            &self.edge.stream_peers
        } else {
            &self.edge.peers
        };
        let mut peers = table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = peers.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                peers.remove(&self.ip);
            }
        }
    }
}

impl Edge {
    fn peer_slot(self: &Arc<Self>, ip: IpAddr, stream: bool) -> Option<PeerSlot> {
        let (table, max) = if stream {
            (&self.stream_peers, self.settings.max_streams_per_peer)
        } else {
            (&self.peers, self.settings.max_requests_per_peer)
        };
        let mut peers = table.lock().unwrap_or_else(|p| p.into_inner());
        let n = peers.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            edge: self.clone(),
            ip,
            stream,
        })
    }
}

/// Why a unary request body is not one acceptable gRPC message.
fn check_unary(body: &[u8], max: usize) -> Result<(), Status> {
    let mut rest = body;
    let mut messages = 0;
    while !rest.is_empty() {
        if rest.len() < 5 {
            return Err(Status::invalid_argument("truncated gRPC message frame"));
        }
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if len > max {
            return Err(Status::resource_exhausted(format!(
                "request message of {len} bytes is larger than the limit of {max} bytes"
            )));
        }
        if rest.len() < 5 + len {
            return Err(Status::invalid_argument("truncated gRPC message frame"));
        }
        rest = &rest[5 + len..];
        messages += 1;
    }
    if messages > 1 {
        return Err(Status::invalid_argument(
            "a unary call carries exactly one request message",
        ));
    }
    Ok(())
}

/// Cuts a `grpc-message` longer than [`MAX_STATUS_MESSAGE`] (it is
/// percent-encoded: never in the middle of an escape).
fn bound_status_message(headers: &mut http::HeaderMap) {
    let Some(value) = headers.get("grpc-message") else {
        return;
    };
    let bytes = value.as_bytes();
    if bytes.len() <= MAX_STATUS_MESSAGE {
        return;
    }
    let mut end = MAX_STATUS_MESSAGE;
    if let Some(pct) = bytes[end - 2..end].iter().position(|b| *b == b'%') {
        end = end - 2 + pct;
    }
    let mut cut = bytes[..end].to_vec();
    cut.extend_from_slice(b"%E2%80%A6");
    if let Ok(v) = http::HeaderValue::from_bytes(&cut) {
        headers.insert("grpc-message", v);
    }
}

fn unsupported_media_type() -> http::Response<Body> {
    let mut response = http::Response::new(Body::default());
    *response.status_mut() = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
    response.headers_mut().insert(
        http::header::ACCEPT,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// A response body that keeps its call counted on the connection until it is
/// sent (or dropped).
struct Tracked {
    inner: Body,
    _call: Option<CallGuard>,
    _peer: Option<PeerSlot>,
    /// A stream's end of life: it then ends with `DEADLINE_EXCEEDED`.
    expires: Option<Pin<Box<Sleep>>>,
    _stream: Option<StreamGuard>,
    edge: Arc<Edge>,
    ended: bool,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                let this = &mut *self;
                let Some(expires) = this.expires.as_mut() else {
                    return Poll::Pending;
                };
                ready!(expires.as_mut().poll(cx));
                this.ended = true;
                this.edge.stats.streams_expired.fetch_add(1, Relaxed);
                let status = Status::deadline_exceeded(format!(
                    "streams last at most {} s: open a new one",
                    this.edge.settings.max_stream_lifetime.as_secs()
                ));
                let mut trailers = http::HeaderMap::new();
                let _ = status.add_header(&mut trailers);
                return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
            }
        };
        Poll::Ready(frame.map(|f| {
            f.map(|frame| match frame.into_trailers() {
                Ok(mut trailers) => {
                    bound_status_message(&mut trailers);
                    http_body::Frame::trailers(trailers)
                }
                Err(frame) => frame,
            })
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<S> tower::Service<http::Request<Body>> for EdgeService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        // Readiness is asked of the inner service once the message is in.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let edge = self.layer.edge.clone();
        let path = req.uri().path();
        let streaming = self.layer.streaming.contains(&path);
        let long_lived = streaming || LONG_LIVED_PATHS.contains(&path);
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let grpc = req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/grpc"));
            if !grpc {
                return Ok(unsupported_media_type());
            }
            let lifetime = if long_lived {
                edge.settings.max_stream_lifetime
            } else {
                edge.settings.response_timeout
            };
            let stream = match peer_info(&req) {
                Some(p) if long_lived => match p.conn.stream_started() {
                    Some(guard) => Some(guard),
                    None => {
                        edge.stats.streams_peer_limited.fetch_add(1, Relaxed);
                        return Ok(Status::resource_exhausted(
                            "too many streams open on this connection",
                        )
                        .into_http());
                    }
                },
                _ => None,
            };
            let call = peer_info(&req).map(|p| p.conn.call_started(lifetime));
            let ip = peer_addr(&req).map(|a| a.ip());
            let req = if streaming {
                req
            } else {
                let (parts, body) = req.into_parts();
                let max = edge.settings.max_message_bytes;
                let limited = http_body_util::Limited::new(body, max.saturating_add(5));
                let collected =
                    match tokio::time::timeout(edge.settings.body_timeout, limited.collect()).await
                    {
                        Ok(Ok(collected)) => collected.to_bytes(),
                        Ok(Err(e)) => {
                            let status = if e.is::<http_body_util::LengthLimitError>() {
                                Status::resource_exhausted(format!(
                                    "request message larger than the limit of {max} bytes"
                                ))
                            } else {
                                Status::cancelled("request body ended with an error")
                            };
                            return Ok(status.into_http());
                        }
                        Err(_) => {
                            edge.stats.body_timeouts.fetch_add(1, Relaxed);
                            return Ok(Status::deadline_exceeded(format!(
                                "the request message did not arrive within {} ms of its headers",
                                edge.settings.body_timeout.as_millis()
                            ))
                            .into_http());
                        }
                    };
                if let Err(status) = check_unary(&collected, max) {
                    return Ok(status.into_http());
                }
                http::Request::from_parts(parts, Body::new(http_body_util::Full::new(collected)))
            };
            // The message is in: from here on the gateway works, and the call counts
            // against its peer's share.
            let peer = match ip {
                Some(ip) => match edge.peer_slot(ip, long_lived) {
                    Some(slot) => Some(slot),
                    None if long_lived => {
                        edge.stats.streams_peer_limited.fetch_add(1, Relaxed);
                        return Ok(Status::resource_exhausted(
                            "too many streams open from this address",
                        )
                        .into_http());
                    }
                    None => {
                        edge.stats.peer_limited.fetch_add(1, Relaxed);
                        return Ok(Status::resource_exhausted(
                            "too many calls in flight from this address",
                        )
                        .into_http());
                    }
                },
                None => None,
            };
            let response = tower::ServiceExt::ready(&mut inner)
                .await?
                .call(req)
                .await?;
            let mut response = response;
            bound_status_message(response.headers_mut());
            let expires =
                long_lived.then(|| Box::pin(tokio::time::sleep(edge.settings.max_stream_lifetime)));
            Ok(response.map(|inner| {
                Body::new(Tracked {
                    inner,
                    _call: call,
                    _peer: peer,
                    expires,
                    _stream: stream,
                    edge,
                    ended: false,
                })
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt as _;

    use super::*;

    /// A listener that fails with EMFILE `failures` times, then accepts.
    struct OutOfDescriptors {
        listener: TcpListener,
        failures: usize,
        attempts: Arc<AtomicUsize>,
    }

    impl Accept for OutOfDescriptors {
        async fn accept(&mut self) -> io::Result<(TcpStream, SocketAddr)> {
            self.attempts.fetch_add(1, Relaxed);
            if self.failures > 0 {
                self.failures -= 1;
                return Err(io::Error::from_raw_os_error(24)); // EMFILE
            }
            self.listener.accept().await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn accept_errors_back_off_instead_of_spinning_and_mark_the_edge_refusing() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let attempts = Arc::new(AtomicUsize::new(0));
        let edge = Edge::new(EdgeSettings::default());
        let started = Instant::now();
        let _client = TcpStream::connect(addr).await.unwrap();
        let mut conns = Box::pin(accepting(
            OutOfDescriptors {
                listener,
                failures: 12,
                attempts: attempts.clone(),
            },
            edge.clone(),
        ));
        let first = conns.next().await.unwrap().unwrap();
        // One attempt per error plus the one that accepted: no spinning.
        assert_eq!(attempts.load(Relaxed), 13);
        assert_eq!(edge.stats().accept_errors.load(Relaxed), 12);
        // 5, 10, 20, … ms doubling up to 1 s: at least 5.635 s of (paused) waiting.
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(5 + 10 + 20 + 40 + 80 + 160 + 320 + 640 + 4 * 1000),
            "{waited:?}"
        );
        assert!(waited < Duration::from_secs(8), "{waited:?}");
        // Readiness: refusing for a second after the last accept error.
        assert!(edge.is_refusing());
        tokio::time::advance(Duration::from_millis(1100)).await;
        assert!(!edge.is_refusing());
        drop(first);
    }

    fn frame(len: usize) -> Vec<u8> {
        let mut f = vec![0u8];
        f.extend_from_slice(&(len as u32).to_be_bytes());
        f.extend(std::iter::repeat_n(7u8, len));
        f
    }

    #[test]
    fn status_messages_are_bounded_without_breaking_an_escape() {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-message", http::HeaderValue::from_static("short"));
        bound_status_message(&mut h);
        assert_eq!(h["grpc-message"], "short");
        let long = format!(
            "{}%41{}",
            "a".repeat(MAX_STATUS_MESSAGE - 2),
            "b".repeat(5000)
        );
        h.insert("grpc-message", http::HeaderValue::from_str(&long).unwrap());
        bound_status_message(&mut h);
        let v = h["grpc-message"].to_str().unwrap();
        assert!(v.len() <= MAX_STATUS_MESSAGE + 9, "{}", v.len());
        assert!(
            v.ends_with("a%E2%80%A6"),
            "cut before the escape: {}",
            &v[v.len() - 12..]
        );
    }

    #[test]
    fn a_unary_body_is_exactly_one_message_within_the_limit() {
        assert!(check_unary(&frame(10), 100).is_ok());
        assert!(
            check_unary(&[], 100).is_ok(),
            "an empty message is tonic's to judge"
        );
        let two = [frame(3), frame(3)].concat();
        assert_eq!(
            check_unary(&two, 100).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            check_unary(&frame(101), 100).unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(
            check_unary(&frame(10)[..8], 100).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
