//! Per-call metrics and log lines for every service the gateway serves, in one
//! tower layer keyed by the call's method path: handlers only say who called
//! and why a token was refused ([`CallNote`]), never count or log calls.
//!
//! A call is recorded when its answer ends (trailers sent, or the body dropped:
//! `CANCELLED`), so latency covers the whole answer. Routine successes log at
//! `debug` (`RUST_LOG=info,m2m_gateway::rpc=debug` logs every call); failures
//! and Validate's `valid: false` log at `info`, at a bounded rate per kind
//! ([`crate::telemetry::RefusalLog`]). Never a token or a secret.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll, ready},
    time::Instant,
};

use tonic::{Code, body::Body};

use crate::{edge, jwt::Rejection, registry, telemetry::RpcStats};

/// What a handler tells the call's log line beyond its status. The layer puts
/// one in every request's extensions; [`CallNote::of`] finds it.
#[derive(Debug, Default)]
pub struct CallNote {
    client_id: OnceLock<Box<str>>,
    rejection: OnceLock<Rejection>,
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

    /// Why Validate answered `valid: false`.
    pub fn rejection(&self, rejection: Rejection) {
        let _ = self.rejection.set(rejection);
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
        let mut call = Call {
            stats: self.stats.clone(),
            method: self.stats.method(req.uri().path()),
            started: Instant::now(),
            note: Arc::new(CallNote::default()),
            peer: edge::peer_addr(&req),
            header_code: None,
        };
        req.extensions_mut().insert(call.note.clone());
        let answer = self.inner.call(req);
        Box::pin(async move {
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
        })
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
        let rejection = self.note.rejection.get().map(|r| r.as_str());
        let latency_us = latency.as_micros() as u64;
        let peer = self.peer.map(tracing::field::display);
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
