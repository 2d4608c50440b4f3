//! Traces over OTLP/gRPC, configured by the standard `OTEL_*` variables and off
//! unless an endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, e.g. `http://localhost:4317` for an
//! ADOT or OpenTelemetry collector beside the pod).
//!
//! One span per RPC, joined to the caller's trace through the W3C
//! `traceparent` metadata, with children for the cache lookup, the fleet wait,
//! the budget wait, the token endpoint call (which carries `traceparent` on)
//! and the JWKS fetch. Only the spans under [`crate::trace_context::TARGET`]
//! are exported: never a log line, a token or a secret.
//!
//! Also read by the SDK and the exporter: `OTEL_SERVICE_NAME` (default
//! `m2m-gateway`), `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and
//! `OTEL_TRACES_SAMPLER_ARG` (default `parentbased_always_on`: a caller's
//! sampling decision is kept), `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_BSP_*`. `OTEL_SDK_DISABLED=true` or
//! `OTEL_TRACES_EXPORTER=none` turn export off.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing::Subscriber;
use tracing_subscriber::{Layer, filter::Targets, registry::LookupSpan};

use crate::trace_context::TARGET;

/// Why traces cannot be exported as the environment asks.
#[derive(Debug, thiserror::Error)]
pub enum TracesError {
    /// A protocol other than OTLP/gRPC.
    #[error(
        "{var}={value:?}: traces are exported over OTLP/gRPC only; set it to \"grpc\" (or unset it) and point the endpoint at the collector's gRPC port (4317)"
    )]
    Protocol {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
    },
    /// An exporter other than OTLP.
    #[error("OTEL_TRACES_EXPORTER={0:?}: only \"otlp\" (or \"none\") is supported")]
    Exporter(String),
    /// The exporter refused its configuration (a malformed endpoint, say).
    #[error("the OTLP trace exporter: {0}")]
    Build(String),
}

/// The trace pipeline while it runs: spans go to the exporter in batches.
/// [`Traces::shutdown`] sends what is left.
#[derive(Debug)]
pub struct Traces {
    provider: SdkTracerProvider,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl Traces {
    /// The pipeline the `OTEL_*` variables ask for, or `None` when they ask for
    /// none (no endpoint set, or export turned off). Must run inside a Tokio
    /// runtime (the exporter's gRPC channel).
    pub fn from_env() -> Result<Option<Self>, TracesError> {
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        match var("OTEL_TRACES_EXPORTER").as_deref() {
            None | Some("otlp") => {}
            Some("none") => return Ok(None),
            Some(other) => return Err(TracesError::Exporter(other.to_owned())),
        }
        if var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .is_none()
        {
            return Ok(None);
        }
        for name in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(value) = var(name) {
                if value != "grpc" {
                    return Err(TracesError::Protocol { var: name, value });
                }
                break;
            }
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| TracesError::Build(e.to_string()))?;
        let mut resource = Resource::builder().with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ));
        let named = var("OTEL_SERVICE_NAME").is_some()
            || var("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| a.contains("service.name="));
        if !named {
            resource = resource.with_service_name("m2m-gateway");
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        Ok(Some(Self { provider }))
    }

    /// The `tracing` layer that turns this crate's spans into OpenTelemetry
    /// spans (and nothing else: logs stay logs).
    pub fn layer<S>(&self) -> impl Layer<S> + Send + Sync + 'static
    where
        S: Subscriber + for<'span> LookupSpan<'span> + Send + Sync,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer("m2m-gateway"))
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_filter(Targets::new().with_target(TARGET, tracing::Level::TRACE))
    }

    /// Exports the spans not yet sent, then stops.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "traces: the last spans were not exported");
        }
    }
}
