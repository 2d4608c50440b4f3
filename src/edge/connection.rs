//! The connection guard: the cap, the preface and idle deadlines, the
//! per-address table, and the stalled-answer close.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use futures_util::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::{Instant, Sleep},
};
#[cfg(feature = "tls")]
use tonic::transport::server::TlsConnectInfo;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::*;

/// The connections of `listener`, guarded; never ends, never yields an error
/// (accept errors are counted, logged and waited out).
pub fn incoming(
    listener: TcpListener,
    edge: Arc<Edge>,
) -> impl Stream<Item = io::Result<Guarded<TcpStream>>> + Send + 'static {
    accepting(listener, edge)
}

/// Where connections come from: a listener, or a test's listener that fails.
pub(super) trait Accept: Send + 'static {
    fn accept(&mut self) -> impl Future<Output = io::Result<(TcpStream, SocketAddr)>> + Send;
}

impl Accept for TcpListener {
    async fn accept(&mut self) -> io::Result<(TcpStream, SocketAddr)> {
        TcpListener::accept(self).await
    }
}

pub(super) fn accepting(
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
    pub(super) fn stream_started(self: &Arc<Self>) -> Option<StreamGuard> {
        let max = self.edge.settings.max_streams_per_connection;
        self.streams
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| StreamGuard(self.clone()))
    }

    pub(super) fn call_started(self: &Arc<Self>, lifetime: Duration) -> CallGuard {
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
pub(super) struct CallGuard(pub(super) Arc<ConnState>, pub(super) u64);

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
pub(super) struct StreamGuard(pub(super) Arc<ConnState>);

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
    pub(super) conn: Arc<ConnState>,
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
