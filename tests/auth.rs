//! The library half: AuthLayer (local and remote), the interceptor, and
//! TokenSource, in front of real tonic servers on loopback.

mod support;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use m2m_gateway::{
    auth::{AuthInterceptor, AuthLayer, AuthPolicy, RemoteValidator, TokenSource},
    demo::EchoService,
    emulator::Emulator,
    jwt::CognitoValidator,
    proto::demo::v1::{EchoRequest, echo_client::EchoClient, echo_server::EchoServer},
    server::build_validator,
    settings::Settings,
};
use support::*;
use tokio::{net::TcpListener, sync::oneshot};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{
    Code, Request,
    transport::{Channel, Server},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

struct Served {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl Served {
    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }
}

async fn serve_with_layer(layer: AuthLayer) -> Served {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let (_, health) = tonic_health::server::health_reporter();
    let router = Server::builder()
        .layer(layer)
        .add_service(health)
        .add_service(EchoServer::new(EchoService));
    tokio::spawn(
        router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = stopped.await;
        }),
    );
    Served { addr, _stop: stop }
}

async fn serve_with_interceptor(validator: CognitoValidator, scopes: &[&str]) -> Served {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let svc = EchoServer::with_interceptor(
        EchoService,
        AuthInterceptor::new(validator, scopes.to_vec()),
    );
    tokio::spawn(
        Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            }),
    );
    Served { addr, _stop: stop }
}

async fn loaded_validator(emu: &Emulator) -> CognitoValidator {
    let validator =
        build_validator(&Settings::new(config(emu, &[client_a()]), "test").unwrap()).unwrap();
    validator.keys().refresh().await.unwrap();
    validator
}

fn echo(token: Option<&str>) -> Request<EchoRequest> {
    let mut req = Request::new(EchoRequest {
        message: "hello".into(),
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

fn www_authenticate(status: &tonic::Status) -> String {
    status
        .metadata()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// Every outcome of the layer, for a given verifier.
async fn check_every_outcome(served: &Served, emu: &Emulator) {
    let mut client = EchoClient::new(served.channel().await);
    let good = emu.issue(CLIENT, &["orders/read".into(), "orders/write".into()]);
    let reply = client.echo(echo(Some(&good))).await.unwrap().into_inner();
    assert_eq!(reply.message, "hello");
    assert_eq!(reply.client_id, CLIENT, "claims visible to the handler");

    // Scheme is case-insensitive.
    let mut lower = echo(None);
    lower
        .metadata_mut()
        .insert("authorization", format!("bearer {good}").parse().unwrap());
    assert!(client.echo(lower).await.is_ok());

    let missing = client.echo(echo(None)).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert_eq!(www_authenticate(&missing), "Bearer");

    let garbage = client.echo(echo(Some("not-a-token"))).await.unwrap_err();
    assert_eq!(garbage.code(), Code::Unauthenticated);
    assert_eq!(www_authenticate(&garbage), "Bearer error=\"invalid_token\"");

    let mut basic = echo(None);
    basic
        .metadata_mut()
        .insert("authorization", "Basic YTpi".parse().unwrap());
    let s = client.echo(basic).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(www_authenticate(&s).contains("invalid_request"));

    let narrow = emu.issue(CLIENT, &["orders/read".into()]);
    let denied = client.echo(echo(Some(&narrow))).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(
        www_authenticate(&denied),
        "Bearer error=\"insufficient_scope\", scope=\"orders/write\""
    );

    let unregistered = emu.issue("someone-else", &["orders/write".into()]);
    let s = client.echo(echo(Some(&unregistered))).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);

    // Health is public by default.
    let mut health = HealthClient::new(served.channel().await);
    health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn layer_with_local_validator() {
    let emu = emulator(vec![]).await;
    let validator = loaded_validator(&emu).await;
    let served = serve_with_layer(AuthLayer::local(
        validator,
        AuthPolicy::new().service("m2m.demo.v1.Echo", ["orders/write"]),
    ))
    .await;
    check_every_outcome(&served, &emu).await;
}

#[tokio::test]
async fn layer_with_remote_validator_against_a_running_gateway() {
    let emu = emulator(vec![]).await;
    let gw = TestGateway::start(config(&emu, &[client_a()]))
        .await
        .ready()
        .await;
    let remote = RemoteValidator::new(gw.channel().await, 10_000);
    let served = serve_with_layer(AuthLayer::remote(
        remote,
        AuthPolicy::new().method("/m2m.demo.v1.Echo/Echo", ["orders/write"]),
    ))
    .await;
    check_every_outcome(&served, &emu).await;
    let stats = gw.gateway.validator.stats();
    let asked = stats.valid();
    // Repeats of a valid token are answered from the remote cache.
    let good = emu.issue(CLIENT, &["orders/write".into()]);
    let mut client = EchoClient::new(served.channel().await);
    for _ in 0..5 {
        client.echo(echo(Some(&good))).await.unwrap();
    }
    assert_eq!(stats.valid(), asked + 1);
}

#[tokio::test]
async fn keys_not_loadable_is_unavailable() {
    let emu = emulator(vec![]).await;
    let mut cfg = config(&emu, &[client_a()]);
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    cfg.cognito.as_mut().unwrap().jwks_uri = Some(format!("http://127.0.0.1:{port}/jwks.json"));
    cfg.cognito.as_mut().unwrap().connect_timeout_ms = 300;
    let validator = build_validator(&Settings::new(cfg, "test").unwrap()).unwrap();
    let served = serve_with_layer(AuthLayer::local(validator, AuthPolicy::new())).await;
    let mut client = EchoClient::new(served.channel().await);
    let token = emu.issue(CLIENT, &[]);
    let s = client.echo(echo(Some(&token))).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
}

#[tokio::test]
async fn interceptor_variant() {
    let emu = emulator(vec![]).await;
    let validator = loaded_validator(&emu).await;
    let served = serve_with_interceptor(validator, &["orders/read"]).await;
    let mut client = EchoClient::new(served.channel().await);
    let good = emu.issue(CLIENT, &["orders/read".into()]);
    assert_eq!(
        client
            .echo(echo(Some(&good)))
            .await
            .unwrap()
            .into_inner()
            .client_id,
        CLIENT
    );
    assert_eq!(
        client.echo(echo(None)).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let other = emu.issue(CLIENT, &["orders/write".into()]);
    let s = client.echo(echo(Some(&other))).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(www_authenticate(&s).contains("insufficient_scope"));
    // The interceptor never refetches: a rotated key is unknown until the key set
    // is refreshed.
    emu.rotate_key();
    let rotated = emu.issue(CLIENT, &["orders/read".into()]);
    assert_eq!(
        client.echo(echo(Some(&rotated))).await.unwrap_err().code(),
        Code::Unauthenticated
    );
}

#[tokio::test]
async fn token_source_from_the_gateway_calls_a_protected_service() {
    let emu = emulator(vec![]).await;
    let gw = TestGateway::start(config(&emu, &[client_a()]))
        .await
        .ready()
        .await;
    let validator = loaded_validator(&emu).await;
    let served = serve_with_layer(AuthLayer::local(
        validator,
        AuthPolicy::new().require(["orders/read"]),
    ))
    .await;
    let tokens = TokenSource::from_gateway(gw.channel().await, CLIENT, SECRET, ["orders/read"]);
    let mut client =
        EchoClient::with_interceptor(served.channel().await, tokens.bearer_interceptor());
    let s = client.echo(echo(None)).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "no token fetched yet");
    tokens.token().await.unwrap();
    let reply = client.echo(echo(None)).await.unwrap().into_inner();
    assert_eq!(reply.client_id, CLIENT);

    let wrong = TokenSource::from_gateway(gw.channel().await, CLIENT, "wrong", ["orders/read"]);
    assert_eq!(
        wrong.token().await.unwrap_err(),
        m2m_gateway::broker::UpstreamError::InvalidClient
    );
}

mod paused {
    //! TokenSource timing under paused time, with an in-memory endpoint.
    use super::*;
    use futures_util::future::BoxFuture;
    use m2m_gateway::broker::{AccessToken, TokenEndpoint, TokenResponse, UpstreamError};
    use secrecy::SecretString;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    #[derive(Default)]
    struct Counting {
        calls: AtomicU64,
        failing: AtomicBool,
    }

    impl TokenEndpoint for Counting {
        fn client_credentials<'a>(
            &'a self,
            _: &'a str,
            _: &'a SecretString,
            _: &'a str,
        ) -> BoxFuture<'a, Result<TokenResponse, UpstreamError>> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
                if self.failing.load(Ordering::SeqCst) {
                    return Err(UpstreamError::Unavailable("down".into()));
                }
                Ok(TokenResponse {
                    access_token: AccessToken::new(format!("token-{n}")),
                    expires_in: 100,
                })
            })
        }
        fn describe(&self) -> String {
            "counting".into()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn token_source_refreshes_at_75_percent_with_single_flight() {
        let endpoint = Arc::new(Counting::default());
        let tokens = TokenSource::new(endpoint.clone(), "c", "s", ["a/b"]);
        let mut waiting = Vec::new();
        for _ in 0..50 {
            let t = tokens.clone();
            waiting.push(tokio::spawn(async move { t.token().await.unwrap() }));
        }
        for w in waiting {
            assert_eq!(w.await.unwrap().expose(), "token-1");
        }
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 1, "single flight");

        tokio::time::advance(Duration::from_secs(70)).await;
        assert_eq!(tokens.token().await.unwrap().expose(), "token-1");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(tokens.token().await.unwrap().expose(), "token-2");

        // Refresh failing: the current token while it lives, then the error.
        endpoint.failing.store(true, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(80)).await;
        assert_eq!(tokens.token().await.unwrap().expose(), "token-2");
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(tokens.token().await.is_err());
        assert!(tokens.current().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn background_refresher_keeps_a_fresh_token() {
        let endpoint = Arc::new(Counting::default());
        let tokens = TokenSource::new(endpoint.clone(), "c", "s", ["a/b"]);
        // Nothing else to start. Paused time advances only when every task is
        // idle, so each sleep below lets the refresher run exactly to its next timer.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(tokens.current().unwrap().expose(), "token-1");
        tokio::time::sleep(Duration::from_secs(75)).await;
        assert_eq!(tokens.current().unwrap().expose(), "token-2");
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 2);
        // The last clone gone, the refresher stops: no more calls.
        let clone = tokens.clone();
        drop(tokens);
        tokio::time::sleep(Duration::from_secs(75)).await;
        assert_eq!(
            endpoint.calls.load(Ordering::SeqCst),
            3,
            "the clone keeps it"
        );
        drop(clone);
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert_eq!(endpoint.calls.load(Ordering::SeqCst), 3, "stopped");
        assert_eq!(Arc::strong_count(&endpoint), 1, "the endpoint was released");
    }
}

#[tokio::test]
async fn token_source_straight_from_a_cognito_token_endpoint() {
    let emu = emulator(vec![]).await;
    let url = emu.token_endpoint().parse().unwrap();
    let tokens = TokenSource::from_cognito(url, CLIENT, SECRET, ["orders/read"]).unwrap();
    let token = tokens.token().await.unwrap();
    let validator = loaded_validator(&emu).await;
    let claims = validator
        .validate(token.expose(), &["orders/read".into()])
        .await
        .unwrap();
    assert_eq!(claims.client_id(), CLIENT);
    assert_eq!(tokens.token().await.unwrap(), token, "cached");
    assert_eq!(emu.token_requests(), 1);
    // Plain http to a non-loopback host is refused.
    for (remote, refusal) in [
        (
            "http://cognito.example/oauth2/token",
            "uses plain http to a non-loopback host",
        ),
        ("http://localhost.example/oauth2/token", "plain http"),
        ("http://127.0.0.1.example/oauth2/token", "plain http"),
        ("ftp://127.0.0.1/oauth2/token", "unsupported scheme"),
    ] {
        let err = TokenSource::from_cognito(remote.parse().unwrap(), CLIENT, SECRET, ["x"])
            .err()
            .unwrap_or_else(|| panic!("{remote} accepted"));
        assert!(err.to_string().contains(refusal), "{remote}: {err}");
    }
    for loopback in [
        "http://localhost:1/t",
        "http://[::1]:1/t",
        "http://127.0.0.2:1/t",
    ] {
        assert!(
            TokenSource::from_cognito(loopback.parse().unwrap(), CLIENT, SECRET, ["x"]).is_ok(),
            "{loopback}"
        );
    }
}

#[tokio::test]
async fn a_method_declaring_no_scopes_is_refused_to_every_caller() {
    let emu = emulator(vec![]).await;
    let validator = loaded_validator(&emu).await;
    // Echo as a .proto with no (m2m.auth.v1.*) option describes it.
    let set = prost_types::FileDescriptorSet {
        file: vec![prost_types::FileDescriptorProto {
            package: Some("m2m.demo.v1".into()),
            service: vec![prost_types::ServiceDescriptorProto {
                name: Some("Echo".into()),
                method: vec![prost_types::MethodDescriptorProto {
                    name: Some("Echo".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let policy = AuthPolicy::from_descriptors(&prost::Message::encode_to_vec(&set)).unwrap();
    let served = serve_with_layer(AuthLayer::local(validator, policy)).await;
    let mut client = EchoClient::new(served.channel().await);
    let token = emu.issue(
        CLIENT,
        &["orders/read".to_owned(), "orders/write".to_owned()],
    );
    let status = client.echo(echo(Some(&token))).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("declares no required scopes"),
        "{status:?}"
    );
    // Health stays public.
    let mut health = HealthClient::new(served.channel().await);
    assert!(health.check(HealthCheckRequest::default()).await.is_ok());
}

mod built_in_code {
    use m2m_gateway::jwt::PoolError;
    use m2m_gateway::jwt::{BuildError, CognitoValidator, Rejection};

    use super::*;

    #[tokio::test]
    async fn a_code_built_validator_loads_its_own_keys_and_checks_clients() {
        let emu = emulator(vec![]).await;
        // Only the emulator's issuer differs from a real pool's derivation.
        let validator = CognitoValidator::builder()
            .region("us-east-1")
            .user_pool_id(emu.pool_id())
            .issuer(emu.issuer())
            .clients([CLIENT])
            .build()
            .unwrap();
        // No loader to start: the first call waits for the first key set.
        let token = emu.issue(CLIENT, &["orders/read".to_owned()]);
        let claims = validator
            .validate(&token, &["orders/read".to_owned()])
            .await
            .expect("valid on the first call");
        assert_eq!(claims.client_id(), CLIENT);
        // Another app client of the same pool: refused unless asked for.
        let other = emu.issue("other-client", &["orders/read".to_owned()]);
        let err = validator.validate(&other, &[]).await.unwrap_err();
        assert_eq!(err.rejection, Rejection::ClientNotAllowed);
        let open = CognitoValidator::builder()
            .issuer(emu.issuer())
            .any_client()
            .build()
            .unwrap();
        assert!(open.validate(&other, &[]).await.is_ok());
        // The loader holds the key set weakly: gone with the last validator.
        let keys = Arc::downgrade(validator.keys());
        drop(validator);
        tokio::task::yield_now().await;
        assert!(
            keys.upgrade().is_none(),
            "the key set outlived its validator"
        );
    }

    #[tokio::test]
    async fn builder_errors_say_what_to_do() {
        let err = |b: m2m_gateway::jwt::CognitoValidatorBuilder| b.build().unwrap_err();
        let base = || {
            CognitoValidator::builder()
                .region("us-east-1")
                .user_pool_id("us-east-1_AbCdEf123")
        };
        assert!(matches!(err(base()), BuildError::NoClients));
        assert!(err(base()).to_string().contains(".any_client()"));
        assert!(matches!(
            err(base().region("eu-west-1").clients(["c"])),
            BuildError::Pool(PoolError::RegionMismatch { .. })
        ));
        // The pool id alone is enough: its Region is in it.
        let alone = CognitoValidator::builder()
            .user_pool_id("us-east-1_A")
            .clients(["c"])
            .build()
            .unwrap();
        assert_eq!(
            alone.issuer(),
            "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_A"
        );
        assert!(matches!(
            err(CognitoValidator::builder().clients(["c"])),
            BuildError::Pool(PoolError::MissingUserPoolId)
        ));
        assert!(matches!(
            err(base().user_pool_id("pool").clients(["c"])),
            BuildError::Pool(PoolError::BadUserPoolId(_))
        ));
        assert!(matches!(
            err(base().issuer("http://example.com/pool").clients(["c"])),
            BuildError::Endpoint(_)
        ));
        let (issuer, _) = base()
            .issuer_type(m2m_gateway::jwt::IssuerType::Updated)
            .endpoints()
            .unwrap();
        assert_eq!(
            issuer,
            "https://issuer-cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123"
        );
        let (issuer, jwks) = base().endpoints().unwrap();
        assert_eq!(
            issuer,
            "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123"
        );
        assert_eq!(
            jwks.to_string(),
            "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123/.well-known/jwks.json"
        );
    }

    #[tokio::test]
    async fn a_code_built_validator_of_two_pools_binds_keys_and_clients_to_each() {
        use m2m_gateway::jwt::CognitoPool;
        let one = emulator(vec![]).await;
        let two = emulator(vec![m2m_gateway::emulator::EmulatorClient::new(
            "client-b",
            "s",
            &["orders/read"],
        )])
        .await;
        let validator = CognitoValidator::builder()
            .pool(
                CognitoPool::with_issuer(one.issuer())
                    .name("one")
                    .clients([CLIENT]),
            )
            .pool(
                CognitoPool::with_issuer(two.issuer())
                    .name("two")
                    .clients(["client-b"]),
            )
            .build()
            .unwrap();
        let scopes = ["orders/read".to_owned()];
        // Both pools' first key sets are waited for on the first call.
        let a = validator
            .validate(&one.issue(CLIENT, &scopes), &[])
            .await
            .unwrap();
        assert_eq!(a.issuer(), one.issuer());
        let b = validator
            .validate(&two.issue("client-b", &scopes), &[])
            .await
            .unwrap();
        assert_eq!(b.issuer(), two.issuer());
        // client-a is pool one's: a pool-two token issued to it is refused.
        let crossed = validator
            .validate(&two.issue(CLIENT, &scopes), &[])
            .await
            .unwrap_err();
        assert_eq!(crossed.rejection, Rejection::ClientNotAllowed);
        let pools: Vec<(String, u64)> = validator
            .issuers()
            .map(|(t, s)| (t.pool().to_owned(), s.valid()))
            .collect();
        assert_eq!(pools, [("one".into(), 1), ("two".into(), 1)]);
        assert!(validator.is_loaded());
        // Two pools claiming one issuer: refused, not silently merged.
        let twice = CognitoValidator::builder()
            .pool(CognitoPool::with_issuer(one.issuer()).any_client())
            .pool(CognitoPool::with_issuer(one.issuer()).any_client())
            .build()
            .unwrap_err();
        assert!(twice.to_string().contains("trusted twice"), "{twice}");
    }

    #[test]
    fn a_pool_switching_issuer_form_accepts_both_while_asked_to() {
        use m2m_gateway::jwt::{CognitoPool, IssuerType};
        let issuers = |p: CognitoPool| -> Vec<String> {
            p.issuers()
                .unwrap()
                .into_iter()
                .map(|(issuer, jwks)| {
                    assert_eq!(jwks.to_string(), format!("{issuer}/.well-known/jwks.json"));
                    issuer
                })
                .collect()
        };
        let pool = || CognitoPool::new("us-east-1", "us-east-1_AbCdEf123");
        assert_eq!(
            issuers(
                pool()
                    .issuer_type(IssuerType::Updated)
                    .accept_previous_issuer()
            ),
            [
                "https://issuer-cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123",
                "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123",
            ]
        );
        assert_eq!(
            issuers(pool()),
            ["https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123"]
        );
        assert_eq!(
            issuers(pool().accept_issuer("https://idp.example.com/old")),
            [
                "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123",
                "https://idp.example.com/old",
            ]
        );
        // The other form of a hand-set issuer cannot be derived.
        assert!(matches!(
            CognitoPool::with_issuer("https://idp.example.com/p")
                .accept_previous_issuer()
                .issuers()
                .unwrap_err(),
            BuildError::Pool(PoolError::PreviousIssuerUnknown)
        ));
        // One rule with the configuration: an issuer listed twice is refused,
        // not dropped.
        assert!(matches!(
            pool()
                .accept_issuer("https://idp.example.com/old")
                .accept_issuer("https://idp.example.com/old")
                .issuers()
                .unwrap_err(),
            BuildError::Pool(PoolError::IssuerListedTwice(_))
        ));
        assert!(matches!(
            pool()
                .accept_issuer("http://idp.example.com/old")
                .issuers()
                .unwrap_err(),
            BuildError::Endpoint(_)
        ));
    }

    #[test]
    fn build_outside_a_runtime_is_an_error_not_a_panic() {
        let b = CognitoValidator::builder()
            .region("us-east-1")
            .user_pool_id("us-east-1_AbCdEf123")
            .clients(["c"]);
        assert!(matches!(b.build().unwrap_err(), BuildError::NoRuntime));
    }
}

/// A check of the service's own runs on every accepted token, sees the claims
/// (custom ones through a type of the service's own, deserialised once per
/// token) and the method, and refuses with PERMISSION_DENIED.
#[tokio::test]
async fn a_custom_check_sees_typed_claims_and_the_method_and_can_refuse() {
    #[derive(serde::Deserialize)]
    struct Tenant {
        tenant: String,
    }
    let emu = emulator(vec![]).await;
    let validator = loaded_validator(&emu).await;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let layer = AuthLayer::local(
        validator.clone(),
        AuthPolicy::new().require(["orders/read"]),
    )
    .with_check(move |claims, method| {
        let tenant = claims.custom::<Tenant>().map_err(|e| e.to_string())?;
        // Deserialised once: the same claims give the same Arc.
        let again = claims.custom::<Tenant>().unwrap();
        assert!(std::sync::Arc::ptr_eq(&tenant, &again));
        log.lock()
            .unwrap()
            .push((tenant.tenant.clone(), method.to_owned()));
        if tenant.tenant == "acme" {
            Ok(())
        } else {
            Err(format!("tenant {} may not call {method}", tenant.tenant))
        }
    });
    let served = serve_with_layer(layer).await;
    let mut client = EchoClient::new(served.channel().await);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token_for = |tenant: &str| {
        emu.sign(&serde_json::json!({
            "sub": CLIENT, "client_id": CLIENT, "token_use": "access",
            "scope": "orders/read", "iss": emu.issuer(), "iat": now, "exp": now + 600,
            "jti": format!("jti-{tenant}"), "tenant": tenant,
        }))
    };
    assert!(client.echo(echo(Some(&token_for("acme")))).await.is_ok());
    let err = client
        .echo(echo(Some(&token_for("globex"))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.message(),
        "tenant globex may not call /m2m.demo.v1.Echo/Echo"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            ("acme".to_owned(), "/m2m.demo.v1.Echo/Echo".to_owned()),
            ("globex".to_owned(), "/m2m.demo.v1.Echo/Echo".to_owned())
        ]
    );
}
