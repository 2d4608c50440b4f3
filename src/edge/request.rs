//! The request guard: a unary message collected within its deadline and size,
//! per-address slots for calls and streams, stream lifetimes, bounded status
//! messages, HTTP 415 for what is not gRPC.

use std::{
    future::Future,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, atomic::Ordering::Relaxed},
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use tokio::time::Sleep;
use tonic::{Status, body::Body};

use super::connection::{CallGuard, StreamGuard};
use super::*;

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
pub(super) struct PeerSlot {
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
pub(super) fn check_unary(body: &[u8], max: usize) -> Result<(), Status> {
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
pub(super) fn bound_status_message(headers: &mut http::HeaderMap) {
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
