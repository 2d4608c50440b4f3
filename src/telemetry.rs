//! Metrics and the admin HTTP listener: `/metrics` (Prometheus text format),
//! `/healthz` (alive) and `/readyz` (keys loaded and gRPC listener up). Metric
//! labels are bounded sets (outcomes, rejection reasons, method names); no metric
//! ever carries a token, a secret or a client-supplied string.

use std::{
    fmt::Write as _,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tokio::net::TcpListener;
use tonic::Code;

use crate::{
    broker::{Broker, ClientSnapshot},
    edge::Edge,
    histogram::{Histogram, HistogramSnapshot},
    jwt::{JwtValidator, Rejection},
};

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
pub const GATEWAY_METHODS: [Method; 6] = [
    GET_TOKEN,
    VALIDATE,
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

/// A label value escaped for the text format (names come from the config).
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// How many refusals of one kind (method, status, rejection) are logged per
/// interval; the rest are counted and summed up in the next line of that kind.
pub const REFUSALS_LOGGED_PER_INTERVAL: u32 = 5;
/// The interval of [`REFUSALS_LOGGED_PER_INTERVAL`].
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Keeps refusal logging bounded: a stranger's flood of junk costs metrics
/// counts, not a log line per call. Every kind of refusal is still logged (its
/// first few per interval), with the number left out since the last line.
#[derive(Debug, Default)]
pub struct RefusalLog {
    kinds: std::sync::Mutex<std::collections::HashMap<RefusalKind, Window>>,
}

type RefusalKind = (&'static str, i32, Option<&'static str>);

#[derive(Debug)]
struct Window {
    started: std::time::Instant,
    logged: u32,
    suppressed: u64,
}

impl RefusalLog {
    /// Whether to log this refusal now, and how many of its kind were left
    /// out before it (to report on the line).
    pub fn admit(&self, kind: RefusalKind, now: std::time::Instant) -> Option<u64> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        let w = kinds.entry(kind).or_insert(Window {
            started: now,
            logged: 0,
            suppressed: 0,
        });
        if now.duration_since(w.started) >= REFUSAL_LOG_INTERVAL {
            w.started = now;
            w.logged = 0;
        }
        if w.logged < REFUSALS_LOGGED_PER_INTERVAL {
            w.logged += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

/// Writes one Prometheus histogram family `name`; `series` pairs a label set (`a="b"`,
/// possibly empty) with its snapshot.
fn write_histogram(
    out: &mut String,
    name: &str,
    help: &str,
    series: &[(String, HistogramSnapshot)],
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (labels, h) in series {
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, n) in &h.buckets {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
        let braced = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braced} {}", h.sum_secs);
        let _ = writeln!(out, "{name}_count{braced} {}", h.count);
    }
}

/// Everything `/metrics` and `/readyz` report on.
#[derive(Debug, Clone)]
pub struct Telemetry {
    broker: Broker,
    validator: JwtValidator,
    rpc: Arc<RpcStats>,
    listening: Arc<AtomicBool>,
    edge: Arc<std::sync::OnceLock<Arc<Edge>>>,
}

impl Telemetry {
    /// Telemetry over the gateway's parts.
    pub fn new(broker: Broker, validator: JwtValidator, rpc: Arc<RpcStats>) -> Self {
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

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let b = self.broker.stats().snapshot();
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP m2m_gateway_{name} {help}\n# TYPE m2m_gateway_{name} counter\nm2m_gateway_{name} {value}"
            );
        };
        let gauge = |out: &mut String, name: &str, help: &str, value: f64| {
            let _ = writeln!(
                out,
                "# HELP m2m_gateway_{name} {help}\n# TYPE m2m_gateway_{name} gauge\nm2m_gateway_{name} {value}"
            );
        };

        // RPCs: the gateway's own series, then go-grpc-prometheus's for every service.
        let _ = writeln!(
            out,
            "# HELP m2m_gateway_rpc_requests_total Gateway RPCs by method and gRPC status.\n# TYPE m2m_gateway_rpc_requests_total counter"
        );
        let gateway_methods = || {
            self.rpc
                .methods
                .iter()
                .filter(|m| matches!(m.method, GET_TOKEN | VALIDATE))
        };
        for m in gateway_methods() {
            let (_, method) = m.method.names();
            for (code, n) in m.codes.iter().enumerate() {
                let n = n.load(Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "m2m_gateway_rpc_requests_total{{method=\"{method}\",code=\"{:?}\"}} {n}",
                        Code::from(code as i32)
                    );
                }
            }
        }
        let rpc_latency: Vec<(String, HistogramSnapshot)> = gateway_methods()
            .map(|m| {
                let (_, method) = m.method.names();
                (format!("method=\"{method}\""), m.latency.snapshot())
            })
            .collect();
        write_histogram(
            &mut out,
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
        for m in &self.rpc.methods {
            let labels = grpc_labels(&m.method);
            for (code, n) in m.codes.iter().enumerate() {
                let n = n.load(Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "grpc_server_handled_total{{{labels},grpc_code=\"{}\"}} {n}",
                        go_code_name(code)
                    );
                }
            }
        }
        let handling: Vec<(String, HistogramSnapshot)> = self
            .rpc
            .methods
            .iter()
            .map(|m| (grpc_labels(&m.method), m.latency.snapshot()))
            .collect();
        write_histogram(
            &mut out,
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
            &handling,
        );
        let _ = writeln!(
            out,
            "# HELP m2m_gateway_build_info The running version.\n# TYPE m2m_gateway_build_info gauge\nm2m_gateway_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );

        // Token cache.
        for (name, help, value) in [
            (
                "token_cache_hits_total",
                "GetToken answered from the cache.",
                b.hits,
            ),
            (
                "token_cache_misses_total",
                "GetToken with no usable cached entry.",
                b.misses,
            ),
            (
                "token_cache_refreshes_total",
                "GetToken past the refresh point of its entry.",
                b.refreshes,
            ),
            (
                "token_cache_coalesced_total",
                "GetToken that waited for an upstream call already in flight.",
                b.coalesced,
            ),
            (
                "token_cache_stale_served_total",
                "Cached tokens served because a refresh failed.",
                b.stale_served,
            ),
            (
                "unproven_secrets_total",
                "GetToken with a secret not (or no longer) proven for its client.",
                b.unproven,
            ),
            (
                "failed_auth_limited_total",
                "GetToken refused by the failed-attempt limit.",
                b.rate_limited,
            ),
        ] {
            counter(&mut out, name, help, value);
        }
        gauge(
            &mut out,
            "proven_secrets",
            "Client secrets Cognito accepted, live (kept as keyed hashes).",
            self.broker.proven_secrets() as f64,
        );

        // Upstream budget (limits.upstream_per_second).
        let budget = self.broker.budget_stats();
        let _ = writeln!(
            out,
            "# HELP m2m_gateway_upstream_budget_granted_total Slots of the upstream budget taken, by kind.\n# TYPE m2m_gateway_upstream_budget_granted_total counter"
        );
        for (kind, n) in [
            ("miss", &budget.granted_miss),
            ("refresh", &budget.granted_refresh),
        ] {
            let _ = writeln!(
                out,
                "m2m_gateway_upstream_budget_granted_total{{kind=\"{kind}\"}} {}",
                n.load(Relaxed)
            );
        }
        for (name, help, value) in [
            (
                "upstream_budget_waits_total",
                "Misses that waited for a slot of the upstream budget.",
                budget.waits.load(Relaxed),
            ),
            (
                "upstream_budget_refreshes_deferred_total",
                "Refreshes put off while misses were queued (the current token was served).",
                budget.refreshes_deferred.load(Relaxed),
            ),
            (
                "upstream_budget_refused_total",
                "Misses refused because no slot was free within limits.upstream_max_wait_ms.",
                budget.refused.load(Relaxed),
            ),
            (
                "upstream_budget_strangers_refused_total",
                "Attempts with secrets not yet proven refused because their tenth of the budget was spent.",
                budget.strangers_refused.load(Relaxed),
            ),
        ] {
            counter(&mut out, name, help, value);
        }
        let _ = writeln!(
            out,
            "# HELP m2m_gateway_upstream_budget_wait_seconds_total Time misses waited for upstream slots.\n# TYPE m2m_gateway_upstream_budget_wait_seconds_total counter\nm2m_gateway_upstream_budget_wait_seconds_total {}",
            budget.waited_us.load(Relaxed) as f64 / 1e6
        );

        // Per client, by registered name.
        let clients = self.broker.client_stats().snapshot();
        for (family, help, pick) in [
            (
                "client_token_cache_hits_total",
                "GetToken answered from the cache, by client.",
                (|c: &ClientSnapshot| c.hits) as fn(&ClientSnapshot) -> u64,
            ),
            (
                "client_upstream_requests_total",
                "Token endpoint calls, by client.",
                |c: &ClientSnapshot| c.upstream,
            ),
            (
                "client_refusals_total",
                "GetToken refused (credentials, scopes, limits), by client.",
                |c: &ClientSnapshot| c.refused,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP m2m_gateway_{family} {help}\n# TYPE m2m_gateway_{family} counter"
            );
            for c in &clients {
                let _ = writeln!(
                    out,
                    "m2m_gateway_{family}{{client=\"{}\",pool=\"{}\"}} {}",
                    label_value(&c.name),
                    label_value(&c.pool),
                    pick(c)
                );
            }
        }
        gauge(
            &mut out,
            "token_cache_entries",
            "Cached (client, scope set) entries.",
            self.broker.cached_entries() as f64,
        );

        // Fleet-wide cache.
        if let Some(fleet) = self.broker.fleet() {
            let f = fleet.stats();
            for (name, help, value) in [
                (
                    "fleet_cache_hits_total",
                    "Entries found in Redis.",
                    f.hits.load(Relaxed),
                ),
                (
                    "fleet_cache_misses_total",
                    "Redis lookups that found nothing.",
                    f.misses.load(Relaxed),
                ),
                (
                    "fleet_locks_acquired_total",
                    "Cognito calls made for the fleet by this replica.",
                    f.locks_acquired.load(Relaxed),
                ),
                (
                    "fleet_waited_for_peer_total",
                    "Fetches answered by another replica's result.",
                    f.waited_for_peer.load(Relaxed),
                ),
                (
                    "fleet_wait_timeouts_total",
                    "Waits for another replica that ran out.",
                    f.wait_timeouts.load(Relaxed),
                ),
                (
                    "redis_errors_total",
                    "Redis calls that failed or timed out.",
                    f.errors.load(Relaxed),
                ),
                (
                    "redis_bypassed_total",
                    "Redis calls skipped while it was down.",
                    f.bypassed.load(Relaxed),
                ),
                (
                    "redis_corrupt_values_total",
                    "Values read from Redis that were corrupt or oversized (skipped, or reset for the upstream schedule).",
                    f.corrupt.load(Relaxed),
                ),
            ] {
                counter(&mut out, name, help, value);
            }
            gauge(
                &mut out,
                "redis_up",
                "1 when the last Redis call succeeded (0 until the first one did).",
                if fleet.is_up() { 1.0 } else { 0.0 },
            );
            gauge(
                &mut out,
                "fleet_shared",
                "1 when this replica shares tokens, proofs and the upstream budget with the fleet (Redis answers and its announcements arrive); 0 when it serves from its own cache.",
                if fleet.is_shared() { 1.0 } else { 0.0 },
            );
        }

        // Connections and requests at the edge.
        if let Some(edge) = self.edge.get() {
            let e = edge.stats();
            for (name, help, value) in [
                (
                    "connections_accepted_total",
                    "gRPC connections accepted.",
                    &e.accepted,
                ),
                (
                    "connections_refused_total",
                    "Connections closed at once because server.max_connections were open.",
                    &e.refused,
                ),
                (
                    "connections_peer_refused_total",
                    "Connections closed at once because their address had server.max_connections_per_peer open.",
                    &e.peer_refused,
                ),
                (
                    "connections_stalled_closed_total",
                    "Connections closed because an answer could not leave by its deadline (the peer does not read).",
                    &e.stalled_closed,
                ),
                (
                    "streams_expired_total",
                    "Streams ended at server.max_stream_secs.",
                    &e.streams_expired,
                ),
                (
                    "streams_peer_limited_total",
                    "Streams refused because their address had server.max_streams_per_peer open.",
                    &e.streams_peer_limited,
                ),
                (
                    "connections_handshake_timeouts_total",
                    "Connections closed for not sending the HTTP/2 preface in time.",
                    &e.handshake_timeouts,
                ),
                (
                    "connections_idle_closed_total",
                    "Connections closed after server.idle_timeout_secs without a call.",
                    &e.idle_closed,
                ),
                (
                    "accept_errors_total",
                    "Errors accepting connections.",
                    &e.accept_errors,
                ),
                (
                    "request_body_timeouts_total",
                    "Calls whose message did not arrive within server.request_body_timeout_ms.",
                    &e.body_timeouts,
                ),
                (
                    "peer_limited_total",
                    "Calls refused because their address had server.max_requests_per_peer in flight.",
                    &e.peer_limited,
                ),
            ] {
                counter(&mut out, name, help, value.load(Relaxed));
            }
            gauge(
                &mut out,
                "connections_open",
                "Open gRPC connections.",
                edge.open_connections() as f64,
            );
        }

        // Upstream.
        let _ = writeln!(
            out,
            "# HELP m2m_gateway_upstream_requests_total Token endpoint calls by outcome.\n# TYPE m2m_gateway_upstream_requests_total counter"
        );
        for (label, n) in &b.upstream {
            let _ = writeln!(
                out,
                "m2m_gateway_upstream_requests_total{{outcome=\"{label}\"}} {n}"
            );
        }
        write_histogram(
            &mut out,
            "m2m_gateway_upstream_duration_seconds",
            "Token endpoint call latency.",
            &[(String::new(), b.latency.clone())],
        );

        // Validation.
        let v = self.validator.stats();
        let _ = writeln!(
            out,
            "# HELP m2m_gateway_validations_total Token validations by result.\n# TYPE m2m_gateway_validations_total counter"
        );
        let _ = writeln!(
            out,
            "m2m_gateway_validations_total{{result=\"valid\"}} {}",
            v.valid()
        );
        for r in Rejection::ALL {
            let _ = writeln!(
                out,
                "m2m_gateway_validations_total{{result=\"{}\"}} {}",
                r.as_str(),
                v.rejected(r)
            );
        }
        let _ = writeln!(
            out,
            "# HELP m2m_gateway_pool_validations_total Token validations by the trusted issuer the token claimed, and result.\n# TYPE m2m_gateway_pool_validations_total counter"
        );
        for (trusted, v) in self.validator.issuers() {
            let labels = format!(
                "pool=\"{}\",issuer=\"{}\"",
                label_value(trusted.pool()),
                label_value(trusted.issuer())
            );
            let _ = writeln!(
                out,
                "m2m_gateway_pool_validations_total{{{labels},result=\"valid\"}} {}",
                v.valid()
            );
            for r in Rejection::ALL {
                let n = v.rejected(r);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "m2m_gateway_pool_validations_total{{{labels},result=\"{}\"}} {n}",
                        r.as_str()
                    );
                }
            }
        }
        gauge(
            &mut out,
            "verified_cache_entries",
            "Verified tokens remembered.",
            self.validator.cached_verifications() as f64,
        );

        // Keys: one key set per trusted issuer.
        let key_sets: Vec<(String, &Arc<crate::jwt::KeySet>)> = self
            .validator
            .issuers()
            .map(|(trusted, _)| {
                (
                    format!(
                        "pool=\"{}\",issuer=\"{}\"",
                        label_value(trusted.pool()),
                        label_value(trusted.issuer())
                    ),
                    trusted.keys(),
                )
            })
            .collect();
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(
                out,
                "# HELP m2m_gateway_{name} {help}\n# TYPE m2m_gateway_{name} {kind}"
            );
        };
        family(
            &mut out,
            "jwks_fetches_total",
            "counter",
            "JWKS fetches by key set and outcome.",
        );
        for (labels, keys) in &key_sets {
            let s = keys.stats();
            let _ = writeln!(
                out,
                "m2m_gateway_jwks_fetches_total{{{labels},outcome=\"ok\"}} {}\nm2m_gateway_jwks_fetches_total{{{labels},outcome=\"failed\"}} {}",
                s.fetch_ok.load(Relaxed),
                s.fetch_failed.load(Relaxed)
            );
        }
        family(
            &mut out,
            "jwks_refetches_suppressed_total",
            "counter",
            "Unknown-kid refetches skipped by the cool-down.",
        );
        for (labels, keys) in &key_sets {
            let _ = writeln!(
                out,
                "m2m_gateway_jwks_refetches_suppressed_total{{{labels}}} {}",
                keys.stats().refetch_suppressed.load(Relaxed)
            );
        }
        family(
            &mut out,
            "jwks_keys",
            "gauge",
            "Keys in the current key set.",
        );
        for (labels, keys) in &key_sets {
            let _ = writeln!(
                out,
                "m2m_gateway_jwks_keys{{{labels}}} {}",
                keys.kids().len()
            );
        }
        family(
            &mut out,
            "jwks_age_seconds",
            "gauge",
            "Age of the current key set (-1 = never loaded).",
        );
        for (labels, keys) in &key_sets {
            let age = keys.loaded_at().map_or(-1.0, |t| t.elapsed().as_secs_f64());
            let _ = writeln!(out, "m2m_gateway_jwks_age_seconds{{{labels}}} {age}");
        }
        gauge(
            &mut out,
            "ready",
            "1 when keys are loaded and the gRPC listener is up.",
            if self.ready() { 1.0 } else { 0.0 },
        );
        out
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

#[cfg(test)]
mod refusal_log_tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn a_few_lines_per_kind_and_interval_then_the_count_of_the_rest() {
        let log = RefusalLog::default();
        let t0 = Instant::now();
        let kind = ("Validate", 0, Some("malformed"));
        let logged = (0..100).filter(|_| log.admit(kind, t0).is_some()).count();
        assert_eq!(logged, REFUSALS_LOGGED_PER_INTERVAL as usize);
        // Another kind has its own allowance.
        assert_eq!(log.admit(("GetToken", 16, None), t0), Some(0));
        // The next interval's first line carries what was left out.
        let later = t0 + REFUSAL_LOG_INTERVAL + Duration::from_millis(1);
        assert_eq!(log.admit(kind, later), Some(95));
        assert_eq!(log.admit(kind, later), Some(0));
    }
}
