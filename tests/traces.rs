//! Traces as an operator meets them: `m2m-gateway serve` with
//! `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at a real OTLP/gRPC receiver (the
//! collector's trace service from opentelemetry-proto, on loopback). A GetToken
//! carrying a caller's `traceparent` yields spans of that trace: the RPC's, a
//! child of the caller's span, then the cache lookup (with its outcome), the
//! token endpoint call, whose `traceparent` reaches the token endpoint itself,
//! and the JWKS fetch. Nothing exported carries a secret or a token.

mod support;

use std::{process::Command, time::Duration};

use axum::{Router, body::Bytes, extract::State, http::HeaderMap, routing::post};
use m2m_gateway::proto::gateway::v1::{
    GetTokenRequest, ValidateRequest, gateway_client::GatewayClient,
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::{Span, span::SpanKind},
};
use support::*;
use tokio::sync::mpsc;

/// The receiver: every span of every export, in order.
struct Receiver(mpsc::UnboundedSender<Span>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let _ = self.0.send(span);
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A token endpoint in front of the emulator's that records the
/// `traceparent` of every request it forwards.
#[derive(Clone)]
struct Recording {
    upstream: String,
    seen: mpsc::UnboundedSender<Option<String>>,
}

async fn token(
    State(r): State<Recording>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let traceparent = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let _ = r.seen.send(traceparent);
    let answer = reqwest::Client::new()
        .post(&r.upstream)
        .header(
            "authorization",
            headers.get("authorization").unwrap().clone(),
        )
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    let body = answer.bytes().await.unwrap();
    axum::response::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body))
        .unwrap()
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn text<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    match attr(span, key) {
        Some(Value::StringValue(s)) => Some(s),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Spans received so far, and a wait for more (bounded).
struct Spans {
    rx: mpsc::UnboundedReceiver<Span>,
    all: Vec<Span>,
}

impl Spans {
    /// An OTLP/gRPC receiver on a free loopback port: what it receives, and its address.
    async fn receive() -> (Self, std::net::SocketAddr) {
        let (span_tx, rx) = mpsc::unbounded_channel();
        let otlp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = otlp.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Receiver(span_tx)))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(otlp)),
        );
        (
            Self {
                rx,
                all: Vec::new(),
            },
            addr,
        )
    }

    async fn until(&mut self, what: &str, done: impl Fn(&[Span]) -> bool) {
        let wait = async {
            while !done(&self.all) {
                match self.rx.recv().await {
                    Some(span) => self.all.push(span),
                    None => break,
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .is_err()
        {
            let names: Vec<_> = self.all.iter().map(|s| &s.name).take(40).collect();
            panic!("no {what} among the spans exported: {names:?}");
        }
    }

    fn find(&self, pred: impl Fn(&Span) -> bool) -> Option<&Span> {
        self.all.iter().find(|s| pred(s))
    }
}

fn rpc_of(trace: &[u8], parent: &[u8]) -> impl Fn(&Span) -> bool {
    move |s: &Span| {
        s.trace_id == trace && s.parent_span_id == parent && s.kind == SpanKind::Server as i32
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_token_spans_join_the_callers_trace_and_go_on_to_the_token_endpoint() {
    let (mut spans, otlp_addr) = Spans::receive().await;

    // Cognito: the emulator behind a recording token endpoint.
    let emu = emulator(vec![]).await;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let recording = Recording {
        upstream: emu.token_endpoint().to_string(),
        seen: seen_tx,
    };
    tokio::spawn(async move {
        axum::serve(
            upstream,
            Router::new()
                .route("/oauth2/token", post(token))
                .with_state(recording),
        )
        .await
    });

    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("gateway.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[cognito]\nregion = \"us-east-1\"\n\
             user_pool_id = \"us-east-1_Traces001\"\ntoken_endpoint = \"http://{upstream_addr}/oauth2/token\"\n\
             issuer = \"{iss}\"\njwks_uri = \"{jwks}\"\n\n[[clients]]\nclient_id = \"{CLIENT}\"\nname = \"a\"\n\
             allowed_scopes = [\"orders/read\", \"orders/write\"]\n",
            iss = emu.issuer(),
            jwks = emu.jwks_uri(),
        ),
    )
    .unwrap();
    let (mut child, _lines, addr) = serve_process(
        &cfg_path,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp_addr}")),
            ("OTEL_BSP_SCHEDULE_DELAY", "50".into()),
            ("OTEL_SERVICE_NAME", "gateway-under-test".into()),
        ],
    )
    .await;
    let mut client = GatewayClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    let trace: [u8; 16] = *b"\x4b\xf9\x2f\x35\x77\xb3\x4d\xa6\xa3\xce\x92\x9d\x0e\x0e\x47\x36";
    let callers = [
        [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7],
        [0x11; 8],
        [0x22; 8],
    ];
    fn with_parent<T>(trace: &[u8; 16], parent: &[u8; 8], msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut().insert(
            "traceparent",
            format!("00-{}-{}-01", hex(trace), hex(parent))
                .parse()
                .unwrap(),
        );
        req
    }
    let ask = || GetTokenRequest {
        client_id: CLIENT.into(),
        client_secret: SECRET.into(),
        scopes: vec!["orders/read".into()],
    };
    let first = client
        .get_token(with_parent(&trace, &callers[0], ask()))
        .await
        .unwrap()
        .into_inner();
    client
        .get_token(with_parent(&trace, &callers[1], ask()))
        .await
        .unwrap();
    let checked = client
        .validate(with_parent(
            &trace,
            &callers[2],
            ValidateRequest {
                token: first.access_token.clone(),
                required_scopes: vec![],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(checked.valid);
    // A path no service has, made up by the caller: its span is `unknown`.
    let stranger = [0x33; 8];
    let made_up = raw_call(
        &format!("http://{addr}/made.Up/Path-{}", "x".repeat(40)),
        &format!("00-{}-{}-01", hex(&trace), hex(&stranger)),
        None,
    )
    .await;
    // Refused before any service: it carries no token.
    assert_eq!(made_up.headers()["grpc-status"], "16", "UNAUTHENTICATED");

    // The miss: the RPC's span is the caller's child; the cache lookup, the
    // token endpoint call are the RPC's.
    spans
        .until("spans of the three calls", |all| {
            callers.iter().all(|c| all.iter().any(rpc_of(&trace, c)))
                && all.iter().filter(|s| s.name == "cache lookup").count() >= 2
                && all.iter().any(|s| s.name == "token endpoint")
                && all.iter().any(|s| s.name == "jwks fetch")
        })
        .await;
    let miss = spans.find(rpc_of(&trace, &callers[0])).unwrap().clone();
    assert_eq!(miss.name, "m2m.gateway.v1.Gateway/GetToken");
    assert_eq!(text(&miss, "rpc.system"), Some("grpc"));
    assert_eq!(text(&miss, "rpc.method"), Some("GetToken"));
    assert!(
        matches!(
            attr(&miss, "rpc.grpc.status_code"),
            Some(Value::IntValue(0))
        ),
        "{miss:?}"
    );
    let lookup = spans
        .find(|s| s.name == "cache lookup" && s.parent_span_id == miss.span_id)
        .expect("the miss's cache lookup is its child");
    assert_eq!(lookup.trace_id, trace);
    assert_eq!(text(lookup, "m2m.cache.outcome"), Some("miss"));
    assert!(matches!(
        attr(lookup, "m2m.secret_proven"),
        Some(Value::BoolValue(false))
    ));
    let call = spans.find(|s| s.name == "token endpoint").unwrap().clone();
    assert_eq!(
        call.trace_id, trace,
        "the token endpoint call is in the caller's trace"
    );
    assert_eq!(call.kind, SpanKind::Client as i32);
    assert!(
        matches!(
            attr(&call, "http.response.status_code"),
            Some(Value::IntValue(200))
        ),
        "{call:?}"
    );
    // Its ancestors lead to the miss's RPC span.
    let mut up = call.parent_span_id.clone();
    let mut hops = 0;
    while up != miss.span_id {
        let parent = spans.find(|s| s.span_id == up).unwrap_or_else(|| {
            panic!(
                "the token endpoint call's ancestor {} was not exported",
                hex(&up)
            )
        });
        up = parent.parent_span_id.clone();
        hops += 1;
        assert!(
            hops < 8,
            "the token endpoint call does not descend from the RPC"
        );
    }
    // The token endpoint got the call span's context.
    let sent = seen
        .recv()
        .await
        .unwrap()
        .expect("a traceparent reached the token endpoint");
    assert_eq!(
        sent,
        format!("00-{}-{}-01", hex(&trace), hex(&call.span_id)),
        "the traceparent sent on names the token endpoint call's span"
    );

    // The hit: its own RPC span and a cache lookup saying so; no upstream call.
    let hit = spans.find(rpc_of(&trace, &callers[1])).unwrap().clone();
    let hit_lookup = spans
        .find(|s| s.name == "cache lookup" && s.parent_span_id == hit.span_id)
        .expect("the hit's cache lookup is its child");
    assert_eq!(text(hit_lookup, "m2m.cache.outcome"), Some("hit"));
    assert!(matches!(
        attr(hit_lookup, "m2m.secret_proven"),
        Some(Value::BoolValue(true))
    ));
    assert_eq!(
        spans
            .all
            .iter()
            .filter(|s| s.name == "token endpoint")
            .count(),
        1
    );

    // Validate's span; the key set's fetch (a root of its own, at start).
    let validate = spans.find(rpc_of(&trace, &callers[2])).unwrap();
    assert_eq!(validate.name, "m2m.gateway.v1.Gateway/Validate");
    let jwks = spans.find(|s| s.name == "jwks fetch").unwrap();
    assert_eq!(text(jwks, "url.full"), Some(emu.jwks_uri().as_str()));

    // Nothing exported carries the secret or the token.
    let exported = format!("{:?}", spans.all);
    assert!(!exported.contains(SECRET));
    assert!(!exported.contains(&first.access_token));
    spans
        .until("the made-up path's span", |all| {
            all.iter().any(rpc_of(&trace, &stranger))
        })
        .await;
    let made_up = spans.find(rpc_of(&trace, &stranger)).unwrap();
    assert_eq!(made_up.name, "unknown");
    // Nor anywhere else: not a name, not an attribute.
    assert!(!format!("{:?}", spans.all).contains("made.Up"));

    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn an_unsupported_protocol_is_refused_at_start_with_the_fix() {
    let emu = emulator(vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gateway.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[cognito]\nregion = \"us-east-1\"\n\
             user_pool_id = \"us-east-1_Traces001\"\nissuer = \"{iss}\"\njwks_uri = \"{jwks}\"\n\
             token_endpoint = \"{tok}\"\n",
            iss = emu.issuer(),
            jwks = emu.jwks_uri(),
            tok = emu.token_endpoint(),
        ),
    )
    .unwrap();
    let (ok, out) = run_to_end(
        Command::new(env!("CARGO_BIN_EXE_m2m-gateway"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
    );
    assert!(!ok);
    assert!(
        out.contains("OTEL_EXPORTER_OTLP_PROTOCOL=\"http/protobuf\"") && out.contains("4317"),
        "{out}"
    );
}

/// The library's side, in-process as an adopter sets it up: an OpenTelemetry
/// pipeline of its own, W3C propagation, `tracing-opentelemetry`'s layer. A
/// call made inside the caller's span through [`TokenSource`]'s interceptor
/// reaches the [`AuthLayer`] of the protected service as a server span of the
/// same trace, child of the caller's span; the handler's own spans nest in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_source_and_auth_layer_carry_the_trace_across_a_call() {
    use m2m_gateway::{
        auth::{AuthLayer, AuthPolicy, TokenSource},
        demo::EchoService,
        jwt::CognitoValidator,
        proto::demo::v1 as demo,
    };
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;
    use tracing::Instrument as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    let (mut spans, otlp_addr) = Spans::receive().await;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(format!("http://{otlp_addr}"))
        .build()
        .unwrap();
    // Sent every 50 ms instead of every 5 s.
    let batches = opentelemetry_sdk::trace::BatchConfigBuilder::default()
        .with_scheduled_delay(Duration::from_millis(50))
        .build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_span_processor(
            opentelemetry_sdk::trace::BatchSpanProcessor::builder(exporter)
                .with_batch_config(batches)
                .build(),
        )
        .build();
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("adopter")));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let emu = emulator(vec![]).await;
    let validator = CognitoValidator::builder()
        .issuer(emu.issuer())
        .clients([CLIENT])
        .build()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(AuthLayer::local(
                validator,
                AuthPolicy::new()
                    .require(["orders/read"])
                    .service("m2m.demo.v1.Echo", ["orders/read"]),
            ))
            .add_service(demo::echo_server::EchoServer::new(EchoService))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let source = TokenSource::from_cognito(
        emu.token_endpoint().parse().unwrap(),
        CLIENT,
        SECRET,
        ["orders/read"],
    )
    .unwrap();
    source.token().await.unwrap();
    let mut client =
        demo::echo_client::EchoClient::with_interceptor(channel, source.bearer_interceptor());

    let caller = tracing::info_span!("caller");
    let caller_id = {
        use opentelemetry::trace::TraceContextExt as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        let cx = caller.context();
        let sc = cx.span().span_context().clone();
        (sc.trace_id().to_bytes(), sc.span_id().to_bytes())
    };
    client
        .echo(demo::EchoRequest {
            message: "traced".into(),
        })
        .instrument(caller.clone())
        .await
        .unwrap();
    drop(caller);
    let (trace, parent) = (caller_id.0.to_vec(), caller_id.1.to_vec());
    spans
        .until("the protected call's server span", |all| {
            all.iter().any(|s| {
                s.trace_id == trace
                    && s.parent_span_id == parent
                    && s.kind == SpanKind::Server as i32
            }) && all.iter().any(|s| s.name == "caller")
        })
        .await;
    let server = spans
        .find(|s| {
            s.trace_id == trace && s.parent_span_id == parent && s.kind == SpanKind::Server as i32
        })
        .unwrap();
    assert_eq!(server.name, "m2m.demo.v1.Echo/Echo");
    assert_eq!(text(server, "rpc.method"), Some("Echo"));

    // A path the policy meets only under its default, made up by a caller
    // with a valid token: its span is `unknown`, the path is nowhere.
    let stranger = [0x44; 8];
    let bearer = format!("Bearer {}", source.token().await.unwrap().expose());
    let answer = raw_call(
        &format!("http://{addr}/made.Up/Path"),
        &format!("00-{}-{}-01", hex(&trace), hex(&stranger)),
        Some(&bearer),
    )
    .await;
    assert_eq!(answer.headers()["grpc-status"], "12", "UNIMPLEMENTED");
    spans
        .until("the made-up path's span", |all| {
            all.iter().any(rpc_of(&trace, &stranger))
        })
        .await;
    assert_eq!(
        spans.find(rpc_of(&trace, &stranger)).unwrap().name,
        "unknown"
    );
    assert!(!format!("{:?}", spans.all).contains("made.Up"));
    let _ = provider.shutdown();
}

/// One gRPC call over raw HTTP/2 to `url` (any path, an empty message) with
/// `traceparent` and, when given, `authorization`.
async fn raw_call(url: &str, traceparent: &str, authorization: Option<&str>) -> reqwest::Response {
    let mut call = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap()
        .post(url)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("traceparent", traceparent);
    if let Some(value) = authorization {
        call = call.header("authorization", value);
    }
    call.body(vec![0u8; 5]).send().await.unwrap()
}
