//! Per-call metrics and log lines for every service the gateway serves, in one
//! tower layer keyed by the call's method path: handlers only say who called
//! and why a token was refused ([`CallNote`]), never count or log calls.
//!
//! A call is recorded when its answer ends (trailers sent, or the body dropped:
//! `CANCELLED`), so latency covers the whole answer. Routine successes log at
//! `debug` (`RUST_LOG=info,m2m_gateway::rpc=debug` logs every call); failures
//! and Validate's `valid: false` log at `info`, at a bounded rate per kind
//! ([`RefusalLog`]). Never a token or a secret.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use tonic::{Code, body::Body};

use crate::{
    edge,
    histogram::{Histogram, HistogramSnapshot},
    jwt::Rejection,
    prometheus::Encoder,
    registry,
};

/// What a handler tells the call's log line beyond its status. The layer puts
/// one in every request's extensions; [`CallNote::of`] finds it.
#[derive(Debug, Default)]
pub struct CallNote {
    client_id: OnceLock<Box<str>>,
    rejection: OnceLock<(Rejection, Box<str>)>,
}

impl CallNote {
    /// The note of the call carrying `extensions` (none outside the layer).
    pub fn of(extensions: &http::Extensions) -> Option<Arc<CallNote>> {
        extensions.get::<Arc<CallNote>>().cloned()
    }

    /// The caller's client id, logged only when it looks like one.
    pub fn client_id(&self, client_id: &str) {
        if registry::is_valid_client_id(client_id) {
            let _ = self.client_id.set(client_id.into());
        }
    }

    /// Why Validate answered `valid: false`, and the validator's detail (which
    /// never echoes the token; for a wrong issuer, the issuer seen and those
    /// trusted).
    pub fn rejection(&self, rejection: Rejection, detail: &str) {
        let _ = self.rejection.set((rejection, detail.into()));
    }
}

/// Counts and logs every call of the services below it.
#[derive(Debug, Clone)]
pub struct CallLayer {
    stats: Arc<RpcStats>,
}

impl CallLayer {
    /// The layer recording into `stats`.
    pub fn new(stats: Arc<RpcStats>) -> Self {
        Self { stats }
    }
}

impl<S> tower::Layer<S> for CallLayer {
    type Service = CallService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallService {
            inner,
            stats: self.stats.clone(),
        }
    }
}

/// The service of [`CallLayer`].
#[derive(Debug, Clone)]
pub struct CallService<S> {
    inner: S,
    stats: Arc<RpcStats>,
}

impl<S> tower::Service<http::Request<Body>> for CallService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let method = self.stats.method(req.uri().path());
        let span =
            crate::trace_context::server_span(method.map(|i| self.stats.at(i).path), req.headers());
        let mut call = Call {
            stats: self.stats.clone(),
            method,
            started: Instant::now(),
            note: Arc::new(CallNote::default()),
            peer: edge::peer_addr(&req),
            header_code: None,
            span: span.clone(),
        };
        req.extensions_mut().insert(call.note.clone());
        let answer = span.in_scope(|| self.inner.call(req));
        Box::pin(tracing::Instrument::instrument(
            async move {
                let response = answer.await?;
                call.header_code = response
                    .headers()
                    .get("grpc-status")
                    .map(|v| grpc_code(v.as_bytes()));
                Ok(response.map(|inner| {
                    Body::new(Observed {
                        inner,
                        call: Some(call),
                    })
                }))
            },
            span,
        ))
    }
}

fn grpc_code(value: &[u8]) -> Code {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(Code::Unknown, Code::from)
}

/// One call until its answer ends.
struct Call {
    stats: Arc<RpcStats>,
    /// Index of a known method (`None`: an unknown path, logged, not counted).
    method: Option<usize>,
    started: Instant,
    note: Arc<CallNote>,
    peer: Option<SocketAddr>,
    /// `grpc-status` of a trailers-only answer.
    header_code: Option<Code>,
    /// The call's trace span (disabled unless traces are on).
    span: tracing::Span,
}

impl Call {
    fn finish(self, code: Code) {
        let latency = self.started.elapsed();
        if let Some(i) = self.method {
            self.stats.record(i, code, latency);
        }
        let (service, method) = self
            .method
            .map_or(("unknown", "unknown"), |i| self.stats.at(i).names());
        let client_id = self.note.client_id.get().map_or("-", |c| &**c);
        let rejection = self.note.rejection.get().map(|(r, _)| r.as_str());
        let detail = self.note.rejection.get().map(|(_, d)| &**d);
        let latency_us = latency.as_micros() as u64;
        let peer = self.peer.map(tracing::field::display);
        if !self.span.is_disabled() {
            self.span.record("rpc.grpc.status_code", code as i32);
            self.span.record("m2m.client_id", client_id);
            if code != Code::Ok {
                self.span.record("otel.status_code", "ERROR");
            }
        }
        if code == Code::Ok && rejection.is_none() {
            tracing::debug!(target: "m2m_gateway::rpc", service, method, status = ?code, latency_us, client_id, peer, "rpc");
            return;
        }
        // Counted always (above); logged at a bounded rate per kind.
        let kind = (method, code as i32, rejection);
        if let Some(suppressed) = self.stats.refusals.admit(kind, Instant::now()) {
            tracing::info!(
                target: "m2m_gateway::rpc",
                service,
                method,
                status = ?code,
                rejection,
                detail,
                latency_us,
                client_id,
                peer,
                suppressed,
                "rpc"
            );
        }
    }
}

/// An answer's body, reporting the call when it ends.
struct Observed {
    inner: Body,
    call: Option<Call>,
}

impl Drop for Observed {
    fn drop(&mut self) {
        // A trailers-only answer may never be polled (its status is in the
        // headers); any other answer dropped before its end lost its caller.
        if let Some(call) = self.call.take() {
            let code = call.header_code.unwrap_or(Code::Cancelled);
            call.finish(code);
        }
    }
}

impl http_body::Body for Observed {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        let ended = match &frame {
            Some(Ok(f)) => f.trailers_ref().map(|t| {
                t.get("grpc-status")
                    .map_or(Code::Unknown, |v| grpc_code(v.as_bytes()))
            }),
            Some(Err(_)) => Some(Code::Internal),
            None => Some(Code::Unknown),
        };
        if let Some(trailer_code) = ended
            && let Some(call) = self.call.take()
        {
            let code = call.header_code.unwrap_or(trailer_code);
            call.finish(code);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A method counted per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Method {
    /// `/package.Service/Method`.
    pub path: &'static str,
    /// go-grpc-prometheus's `grpc_type`: `unary`, `server_stream`, `bidi_stream`.
    pub kind: &'static str,
}

impl Method {
    const fn unary(path: &'static str) -> Self {
        Self {
            path,
            kind: "unary",
        }
    }

    /// The service's full name and the method's name.
    pub fn names(&self) -> (&'static str, &'static str) {
        let p = self.path.trim_start_matches('/');
        p.split_once('/').unwrap_or((p, ""))
    }
}

/// GetToken.
pub const GET_TOKEN: Method = Method::unary("/m2m.gateway.v1.Gateway/GetToken");
/// Validate.
pub const VALIDATE: Method = Method::unary("/m2m.gateway.v1.Gateway/Validate");

/// Every method the gateway serves.
pub const GATEWAY_METHODS: [Method; 11] = [
    GET_TOKEN,
    VALIDATE,
    Method {
        path: "/m2m.gateway.v1.Gateway/WatchRevocations",
        kind: "server_stream",
    },
    Method::unary("/m2m.gateway.admin.v1.Admin/RevokeClient"),
    Method::unary("/m2m.gateway.admin.v1.Admin/RestoreClient"),
    Method::unary("/m2m.gateway.admin.v1.Admin/RevokeToken"),
    Method::unary("/m2m.gateway.admin.v1.Admin/ListRevocations"),
    Method::unary("/grpc.health.v1.Health/Check"),
    Method {
        path: "/grpc.health.v1.Health/Watch",
        kind: "server_stream",
    },
    Method {
        path: "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        kind: "bidi_stream",
    },
    Method {
        path: "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        kind: "bidi_stream",
    },
];

const CODES: usize = 17;
/// Seconds; past the upstream timeout (5 s) and the request timeout (10 s).
const LATENCY_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug)]
struct MethodStats {
    method: Method,
    codes: [AtomicU64; CODES],
    latency: Histogram,
}

impl MethodStats {
    /// (status code, calls) for every code seen at least once.
    fn codes_seen(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.codes
            .iter()
            .enumerate()
            .map(|(code, n)| (code, n.load(Relaxed)))
            .filter(|&(_, n)| n > 0)
    }
}

/// Per-method outcome counters and latency histograms, recorded by
/// [`crate::calls::CallLayer`].
#[derive(Debug)]
pub struct RpcStats {
    methods: Vec<MethodStats>,
    /// Bounds the log lines of refused calls.
    pub refusals: RefusalLog,
}

impl Default for RpcStats {
    /// The gateway's methods.
    fn default() -> Self {
        Self::new(&GATEWAY_METHODS)
    }
}

impl RpcStats {
    /// Counters for `methods` (calls of other paths are logged, not counted).
    pub fn new(methods: &[Method]) -> Self {
        Self {
            methods: methods
                .iter()
                .map(|&method| MethodStats {
                    method,
                    codes: Default::default(),
                    latency: Histogram::new(&LATENCY_BUCKETS),
                })
                .collect(),
            refusals: RefusalLog::default(),
        }
    }

    /// The index of the method at `path`.
    pub fn method(&self, path: &str) -> Option<usize> {
        self.methods.iter().position(|m| m.method.path == path)
    }

    /// The method at `index`.
    pub fn at(&self, index: usize) -> Method {
        self.methods[index].method
    }

    /// Records one finished call of the method at `index`.
    pub fn record(&self, index: usize, code: Code, latency: Duration) {
        let Some(m) = self.methods.get(index) else {
            return;
        };
        m.codes[(code as usize).min(CODES - 1)].fetch_add(1, Relaxed);
        m.latency.record(latency);
    }
}

/// A status code as grpc-go names it (go-grpc-prometheus's `grpc_code`).
fn go_code_name(code: usize) -> &'static str {
    const NAMES: [&str; CODES] = [
        "OK",
        "Canceled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    NAMES[code.min(CODES - 1)]
}

impl RpcStats {
    /// The RPC series: the gateway's own, then go-grpc-prometheus's for every
    /// service.
    pub(crate) fn encode(&self, out: &mut Encoder) {
        // RPCs: the gateway's own series, then go-grpc-prometheus's for every service.
        let _ = writeln!(
            out,
            "# HELP m2m_gateway_rpc_requests_total Gateway RPCs by method and gRPC status.\n# TYPE m2m_gateway_rpc_requests_total counter"
        );
        let gateway_methods = || {
            self.methods
                .iter()
                .filter(|m| matches!(m.method, GET_TOKEN | VALIDATE))
        };
        for m in gateway_methods() {
            let (_, method) = m.method.names();
            for (code, n) in m.codes_seen() {
                let code = Code::from(code as i32);
                let _ = writeln!(
                    out,
                    "m2m_gateway_rpc_requests_total{{method=\"{method}\",code=\"{code:?}\"}} {n}"
                );
            }
        }
        let rpc_latency: Vec<(String, HistogramSnapshot)> = gateway_methods()
            .map(|m| {
                let (_, method) = m.method.names();
                (format!("method=\"{method}\""), m.latency.snapshot())
            })
            .collect();
        out.histogram(
            "m2m_gateway_rpc_duration_seconds",
            "Gateway RPC latency.",
            &rpc_latency,
        );
        let _ = writeln!(
            out,
            "# HELP grpc_server_handled_total Total number of RPCs completed on the server, regardless of success or failure.\n# TYPE grpc_server_handled_total counter"
        );
        let grpc_labels = |m: &Method| {
            let (service, method) = m.names();
            format!(
                "grpc_type=\"{}\",grpc_service=\"{service}\",grpc_method=\"{method}\"",
                m.kind
            )
        };
        for m in &self.methods {
            let labels = grpc_labels(&m.method);
            for (code, n) in m.codes_seen() {
                let code = go_code_name(code);
                let _ = writeln!(
                    out,
                    "grpc_server_handled_total{{{labels},grpc_code=\"{code}\"}} {n}"
                );
            }
        }
        let handling: Vec<(String, HistogramSnapshot)> = self
            .methods
            .iter()
            .map(|m| (grpc_labels(&m.method), m.latency.snapshot()))
            .collect();
        out.histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
            &handling,
        );
    }
}

pub use crate::refusal_log::{REFUSAL_LOG_INTERVAL, REFUSALS_LOGGED_PER_INTERVAL, RefusalLog};
