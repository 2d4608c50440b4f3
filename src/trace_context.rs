//! W3C trace context (`traceparent`, `tracestate`) across the calls this crate
//! makes and serves: a server span joins the caller's trace, an outgoing
//! request carries the current span's context on.
//!
//! The spans are `tracing` spans at `debug` under the target [`TARGET`]; with
//! the `otel` feature and `tracing-opentelemetry`'s layer installed they become
//! OpenTelemetry spans. Headers are read and written through the global text
//! map propagator (`opentelemetry::global::set_text_map_propagator`), which the
//! gateway sets to W3C trace context when it exports traces. Without the
//! feature, or while the span is disabled (the default log filter), nothing is
//! read or written: a disabled span costs one level check.

use tracing::Span;

/// The target of every span this crate opens (enable it, or install the
/// OpenTelemetry layer with a filter on it, to see them).
pub const TARGET: &str = "m2m_gateway::trace";

/// The server span of a gRPC call (OpenTelemetry's semantic conventions), a
/// child of the caller's trace when `headers` carry its `traceparent`. Named
/// by `method` (`/package.Service/Method`) when the server knows it, else
/// `unknown`: never by a path a caller made up. The status and the caller's
/// client id are recorded when known.
pub(crate) fn server_span(method: Option<&str>, headers: &http::HeaderMap) -> Span {
    let path = method.map_or("unknown", |m| m.trim_start_matches('/'));
    let (service, name) = path.split_once('/').unwrap_or(("unknown", "unknown"));
    let span = tracing::debug_span!(
        target: TARGET,
        "rpc",
        otel.name = path,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = name,
        rpc.grpc.status_code = tracing::field::Empty,
        m2m.client_id = tracing::field::Empty,
    );
    join(&span, headers);
    span
}

/// Makes `span` a child of the context carried in `headers`, if any.
pub(crate) fn join(span: &Span, headers: &http::HeaderMap) {
    #[cfg(feature = "otel")]
    if !span.is_disabled() {
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        let parent =
            opentelemetry::global::get_text_map_propagator(|p| p.extract(&otel::Headers(headers)));
        // A span already entered keeps its parent; nothing else can fail here.
        let _ = span.set_parent(parent);
    }
    #[cfg(not(feature = "otel"))]
    let _ = (span, headers);
}

/// Writes the context of `span` into `headers` (an outgoing request's).
pub(crate) fn inject(span: &Span, headers: &mut http::HeaderMap) {
    #[cfg(feature = "otel")]
    if !span.is_disabled() {
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        let cx = span.context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut otel::HeadersMut(headers));
        });
    }
    #[cfg(not(feature = "otel"))]
    let _ = (span, headers);
}

/// Writes the current span's context into an outgoing gRPC call's metadata.
pub(crate) fn inject_metadata(metadata: &mut tonic::metadata::MetadataMap) {
    #[cfg(feature = "otel")]
    {
        let span = Span::current();
        if !span.is_disabled() {
            use tracing_opentelemetry::OpenTelemetrySpanExt as _;
            let cx = span.context();
            opentelemetry::global::get_text_map_propagator(|p| {
                p.inject_context(&cx, &mut otel::Metadata(metadata));
            });
        }
    }
    #[cfg(not(feature = "otel"))]
    let _ = metadata;
}

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::propagation::{Extractor, Injector};

    pub(super) struct Headers<'a>(pub &'a http::HeaderMap);

    impl Extractor for Headers<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }

        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(http::HeaderName::as_str).collect()
        }
    }

    pub(super) struct HeadersMut<'a>(pub &'a mut http::HeaderMap);

    impl Injector for HeadersMut<'_> {
        fn set(&mut self, key: &str, value: String) {
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(key.as_bytes()),
                http::HeaderValue::from_str(&value),
            ) {
                self.0.insert(name, value);
            }
        }
    }

    pub(super) struct Metadata<'a>(pub &'a mut tonic::metadata::MetadataMap);

    impl Injector for Metadata<'_> {
        fn set(&mut self, key: &str, value: String) {
            if let (Ok(key), Ok(value)) = (
                tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
                value.parse(),
            ) {
                self.0.insert(key, value);
            }
        }
    }
}

#[cfg(all(test, feature = "otel"))]
mod tests {
    use opentelemetry::propagation::{Extractor as _, Injector as _};

    use super::otel::{Headers, HeadersMut, Metadata};

    #[test]
    fn headers_and_metadata_carry_what_the_propagator_writes() {
        let mut headers = http::HeaderMap::new();
        HeadersMut(&mut headers).set("traceparent", "00-aa-bb-01".into());
        // A value no header may carry is dropped, not panicked on.
        HeadersMut(&mut headers).set("tracestate", "a\nb".into());
        assert_eq!(Headers(&headers).get("traceparent"), Some("00-aa-bb-01"));
        assert_eq!(Headers(&headers).keys(), vec!["traceparent"]);
        let mut metadata = tonic::metadata::MetadataMap::new();
        Metadata(&mut metadata).set("traceparent", "00-aa-bb-01".into());
        Metadata(&mut metadata).set("bad key", "x".into());
        assert_eq!(metadata.len(), 1);
        assert_eq!(metadata.get("traceparent").unwrap(), "00-aa-bb-01");
    }
}
