//! Metrics and the admin HTTP listener: `/metrics` (Prometheus text format),
//! `/healthz` (alive) and `/readyz` (keys loaded and gRPC listener up). Metric
//! labels are bounded sets (outcomes, rejection reasons, method names); no metric
//! ever carries a token, a secret or a client-supplied string.

mod process;
pub mod traces;

use std::{
    fmt::Write as _,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tokio::net::TcpListener;

use crate::{broker::Broker, edge::Edge, jwt::CognitoValidator, prometheus::Encoder};

pub use crate::calls::{GATEWAY_METHODS, GET_TOKEN, Method, RpcStats, VALIDATE};

pub use crate::calls::{REFUSAL_LOG_INTERVAL, REFUSALS_LOGGED_PER_INTERVAL, RefusalLog};

/// Everything `/metrics` and `/readyz` report on.
#[derive(Debug, Clone)]
pub struct Telemetry {
    broker: Broker,
    validator: CognitoValidator,
    rpc: Arc<RpcStats>,
    listening: Arc<AtomicBool>,
    edge: Arc<std::sync::OnceLock<Arc<Edge>>>,
}

impl Telemetry {
    /// Telemetry over the gateway's parts.
    pub fn new(broker: Broker, validator: CognitoValidator, rpc: Arc<RpcStats>) -> Self {
        Self {
            broker,
            validator,
            rpc,
            listening: Arc::new(AtomicBool::new(false)),
            edge: Arc::default(),
        }
    }

    /// The gRPC listener's edge, reported on from now on.
    pub fn set_edge(&self, edge: Arc<Edge>) {
        let _ = self.edge.set(edge);
    }

    /// Marks the gRPC listener up or down.
    pub fn set_listening(&self, up: bool) {
        self.listening.store(up, Relaxed);
    }

    /// Ready: every pool's first key set is loaded, the gRPC listener is up and
    /// accepting works (not out of descriptors). A full connection table does not
    /// count: a stranger could cause it, and the per-address cap keeps room for
    /// other callers.
    pub fn ready(&self) -> bool {
        self.listening.load(Relaxed)
            && self.validator.is_loaded()
            && !self.edge.get().is_some_and(|e| e.is_accept_failing())
    }

    /// The Prometheus text exposition: each component's series, then the
    /// process's own.
    pub fn render(&self) -> String {
        let mut out = Encoder::new();
        self.rpc.encode(&mut out);
        let _ = writeln!(
            out,
            "# HELP m2m_gateway_build_info The running version.\n# TYPE m2m_gateway_build_info gauge\nm2m_gateway_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        self.broker.encode(&mut out);
        if let Some(fleet) = self.broker.fleet() {
            fleet.encode(&mut out);
        }
        if let Some(edge) = self.edge.get() {
            edge.encode(&mut out);
        }
        self.validator.encode(&mut out);
        out.gauge(
            "ready",
            "1 when keys are loaded and the gRPC listener is up.",
            if self.ready() { 1.0 } else { 0.0 },
        );
        process::ProcessStats::read().encode(&mut out);
        out.finish()
    }
}

async fn metrics(State(t): State<Telemetry>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        t.render(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(t): State<Telemetry>) -> (StatusCode, &'static str) {
    if t.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the first key set, or refusing connections\n",
        )
    }
}

/// Serves the admin endpoints on `listener` until `shutdown` resolves.
pub async fn serve_admin(
    listener: TcpListener,
    telemetry: Telemetry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(telemetry);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
