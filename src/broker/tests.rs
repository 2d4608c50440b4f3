//! Broker tests: invariants 1–6 and the status table.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use futures::future::BoxFuture;
use secrecy::SecretString;
use serde_json::json;

use super::*;
use crate::config::ClientConfig;

#[derive(Clone)]
enum Mode {
    Ok { expires_in: u64 },
    Broad,
    Fail(UpstreamError),
    Hang,
}

/// An in-memory token endpoint: counts calls, checks the secret, scripts faults.
struct FakeEndpoint {
    calls: AtomicU64,
    mode: Mutex<Mode>,
    secret: Mutex<String>,
    delay: Duration,
}

impl FakeEndpoint {
    fn new(expires_in: u64) -> Arc<Self> {
        Arc::new(Self {
            calls: AtomicU64::new(0),
            mode: Mutex::new(Mode::Ok { expires_in }),
            secret: Mutex::new("s3cret".into()),
            delay: Duration::from_millis(20),
        })
    }
    fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }
}

fn fake_jwt(scope: &str, n: u64) -> String {
    format!(
        "eyJhbGciOiJSUzI1NiJ9.{}.c2ln",
        URL_SAFE_NO_PAD.encode(json!({"scope": scope, "n": n}).to_string())
    )
}

impl TokenEndpoint for FakeEndpoint {
    fn client_credentials<'a>(
        &'a self,
        _client_id: &'a str,
        secret: &'a SecretString,
        scope: &'a str,
    ) -> BoxFuture<'a, Result<TokenResponse, UpstreamError>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(self.delay).await;
            let mode = self.mode.lock().unwrap().clone();
            if secret.expose_secret() != *self.secret.lock().unwrap() {
                return Err(UpstreamError::InvalidClient);
            }
            match mode {
                Mode::Ok { expires_in } => Ok(TokenResponse {
                    access_token: AccessToken::new(fake_jwt(scope, n)),
                    expires_in,
                }),
                Mode::Broad => Ok(TokenResponse {
                    access_token: AccessToken::new(fake_jwt(&format!("{scope} admin/all"), n)),
                    expires_in: 3600,
                }),
                Mode::Fail(e) => Err(e),
                Mode::Hang => futures::future::pending().await,
            }
        })
    }
    fn describe(&self) -> String {
        "fake".into()
    }
}

fn registry() -> Registry {
    Registry::new(
        &[ClientConfig {
            client_id: "client-a".into(),
            name: "acme".into(),
            allowed_scopes: vec!["orders/read".into(), "orders/write".into()],
        }],
        10,
    )
}

fn broker(endpoint: Arc<FakeEndpoint>) -> Broker {
    Broker::new(registry(), endpoint, BrokerSettings::default())
}

fn creds(secret: &str) -> Credentials {
    Credentials {
        client_id: "client-a".into(),
        secret: SecretString::from(secret.to_owned()),
    }
}

fn scopes(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn unregistered_client_refused_without_upstream_call() {
    let up = FakeEndpoint::new(3600);
    let b = broker(up.clone());
    let stranger = Credentials {
        client_id: "client-z".into(),
        secret: SecretString::from("s3cret".to_owned()),
    };
    assert_eq!(
        b.get_token(&stranger, &[]).await.unwrap_err(),
        BrokerError::Unauthenticated
    );
    assert_eq!(
        b.get_token(&creds(""), &[]).await.unwrap_err(),
        BrokerError::Unauthenticated
    );
    assert_eq!(up.calls(), 0);
}

#[tokio::test]
async fn scope_outside_registry_refused_without_upstream_call() {
    let up = FakeEndpoint::new(3600);
    let b = broker(up.clone());
    let err = b
        .get_token(&creds("s3cret"), &scopes(&["orders/admin"]))
        .await
        .unwrap_err();
    assert!(matches!(err, BrokerError::PermissionDenied(_)), "{err:?}");
    let err = b
        .get_token(&creds("s3cret"), &scopes(&["orders read"]))
        .await
        .unwrap_err();
    assert!(matches!(err, BrokerError::InvalidArgument(_)), "{err:?}");
    let many = vec!["orders/read".to_string(); 11];
    let err = b.get_token(&creds("s3cret"), &many).await.unwrap_err();
    assert!(matches!(err, BrokerError::InvalidArgument(_)), "{err:?}");
    assert_eq!(up.calls(), 0);
}

#[tokio::test]
async fn cached_token_refused_for_wrong_secret() {
    let up = FakeEndpoint::new(3600);
    let b = broker(up.clone());
    let good = b.get_token(&creds("s3cret"), &[]).await.unwrap();
    let err = b.get_token(&creds("guess"), &[]).await.unwrap_err();
    assert_eq!(err, BrokerError::Unauthenticated);
    // The wrong secret was put to Cognito (it may have been a rotation), which refused it.
    assert_eq!(up.calls(), 2);
    // The right secret still gets the cached token.
    let again = b.get_token(&creds("s3cret"), &[]).await.unwrap();
    assert_eq!(again.access_token, good.access_token);
    assert_eq!(up.calls(), 2);
}

#[tokio::test]
async fn rotated_secret_replaces_the_cached_entry() {
    let up = FakeEndpoint::new(3600);
    let b = broker(up.clone());
    let old = b.get_token(&creds("s3cret"), &[]).await.unwrap();
    *up.secret.lock().unwrap() = "rotated".into();
    let new = b.get_token(&creds("rotated"), &[]).await.unwrap();
    assert_ne!(new.access_token, old.access_token);
    let again = b.get_token(&creds("rotated"), &[]).await.unwrap();
    assert_eq!(again.access_token, new.access_token);
    assert_eq!(up.calls(), 2);
}

#[tokio::test]
async fn wrong_secret_flood_is_rate_limited() {
    let up = FakeEndpoint::new(3600);
    let b = broker(up.clone());
    b.get_token(&creds("s3cret"), &[]).await.unwrap();
    let mut exhausted = 0;
    for i in 0..50 {
        match b.get_token(&creds(&format!("guess-{i}")), &[]).await {
            Err(BrokerError::ResourceExhausted(_)) => exhausted += 1,
            Err(BrokerError::Unauthenticated) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // Default quota: 10 a minute (burst 10).
    assert_eq!(exhausted, 40);
    assert_eq!(up.calls(), 1 + 10);
    assert_eq!(b.stats().snapshot().rate_limited, 40);
}

#[tokio::test]
async fn failures_without_a_cached_entry_are_limited_too() {
    let up = FakeEndpoint::new(3600);
    let b = broker(up.clone());
    let mut exhausted = 0;
    for i in 0..30 {
        if let Err(BrokerError::ResourceExhausted(_)) =
            b.get_token(&creds(&format!("guess-{i}")), &[]).await
        {
            exhausted += 1;
        }
    }
    assert_eq!(up.calls(), 1 + 10, "first failure, then the quota");
    assert_eq!(exhausted, 19);
}

#[tokio::test]
async fn scope_order_duplicates_and_empty_share_one_entry() {
    let up = FakeEndpoint::new(3600);
    let b = broker(up.clone());
    let a = b
        .get_token(&creds("s3cret"), &scopes(&["orders/write", "orders/read"]))
        .await
        .unwrap();
    let c = b
        .get_token(
            &creds("s3cret"),
            &scopes(&["orders/read", "orders/write", "orders/read"]),
        )
        .await
        .unwrap();
    let d = b.get_token(&creds("s3cret"), &[]).await.unwrap();
    assert_eq!(a.access_token, c.access_token);
    assert_eq!(a.access_token, d.access_token);
    assert_eq!(up.calls(), 1);
    assert_eq!(*d.scopes, ["orders/read", "orders/write"]);
    // A narrower request is a different key and never gets the broader token.
    let narrow = b
        .get_token(&creds("s3cret"), &scopes(&["orders/read"]))
        .await
        .unwrap();
    assert_ne!(narrow.access_token, a.access_token);
    assert_eq!(*narrow.scopes, ["orders/read"]);
    assert_eq!(up.calls(), 2);
}

#[tokio::test]
async fn broader_token_from_upstream_is_refused() {
    let up = FakeEndpoint::new(3600);
    up.set(Mode::Broad);
    let b = broker(up.clone());
    let err = b
        .get_token(&creds("s3cret"), &scopes(&["orders/read"]))
        .await
        .unwrap_err();
    assert!(matches!(err, BrokerError::Unavailable(_)), "{err:?}");
    assert_eq!(b.cached_entries(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_make_one_upstream_call() {
    let up = FakeEndpoint::new(3600);
    let b = broker(up.clone());
    let barrier = Arc::new(tokio::sync::Barrier::new(200));
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let b = b.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            b.get_token(&creds("s3cret"), &[])
                .await
                .unwrap()
                .access_token
        }));
    }
    let mut tokens = Vec::new();
    for t in tasks {
        tokens.push(t.await.unwrap());
    }
    assert_eq!(up.calls(), 1);
    assert!(tokens.iter().all(|t| *t == tokens[0]));
    let s = b.stats().snapshot();
    assert_eq!(s.upstream_calls("ok"), 1);
    assert_eq!(s.hits + s.misses, 200);
}

#[tokio::test(start_paused = true)]
async fn token_is_reused_until_75_percent_then_refreshed() {
    let up = FakeEndpoint::new(100);
    let b = broker(up.clone());
    let first = b.get_token(&creds("s3cret"), &[]).await.unwrap();
    assert_eq!(first.expires_in, 99, "the fetch itself took a little time");
    tokio::time::advance(Duration::from_secs(70)).await;
    let hit = b.get_token(&creds("s3cret"), &[]).await.unwrap();
    assert_eq!(hit.access_token, first.access_token);
    assert_eq!(hit.expires_in, 29, "expires_in is the time left");
    tokio::time::advance(Duration::from_secs(6)).await;
    let fresh = b.get_token(&creds("s3cret"), &[]).await.unwrap();
    assert_ne!(fresh.access_token, first.access_token);
    assert_eq!(up.calls(), 2);
    let s = b.stats().snapshot();
    assert_eq!((s.misses, s.hits, s.refreshes), (1, 1, 1));
}

#[tokio::test(start_paused = true)]
async fn failed_refresh_serves_the_old_token_while_it_has_life() {
    let up = FakeEndpoint::new(100);
    let b = broker(up.clone());
    let first = b.get_token(&creds("s3cret"), &[]).await.unwrap();
    up.set(Mode::Fail(UpstreamError::Unavailable("HTTP 503".into())));
    tokio::time::advance(Duration::from_secs(80)).await;
    let stale = b.get_token(&creds("s3cret"), &[]).await.unwrap();
    assert_eq!(stale.access_token, first.access_token);
    assert!(
        stale.expires_in > 0 && stale.expires_in <= 20,
        "{}",
        stale.expires_in
    );
    assert_eq!(b.stats().snapshot().stale_served, 1);
    // Close to expiry the old token is no longer handed out.
    tokio::time::advance(Duration::from_secs(12)).await;
    let err = b.get_token(&creds("s3cret"), &[]).await.unwrap_err();
    assert!(matches!(err, BrokerError::Unavailable(_)), "{err:?}");
    // After expiry, never.
    tokio::time::advance(Duration::from_secs(30)).await;
    assert!(b.get_token(&creds("s3cret"), &[]).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn revoked_secret_during_refresh_is_not_papered_over() {
    let up = FakeEndpoint::new(100);
    let b = broker(up.clone());
    b.get_token(&creds("s3cret"), &[]).await.unwrap();
    *up.secret.lock().unwrap() = "rotated".into();
    tokio::time::advance(Duration::from_secs(80)).await;
    assert_eq!(
        b.get_token(&creds("s3cret"), &[]).await.unwrap_err(),
        BrokerError::Unauthenticated
    );
}

#[tokio::test(start_paused = true)]
async fn hung_upstream_does_not_hold_the_cache_hostage() {
    let up = FakeEndpoint::new(3600);
    up.set(Mode::Hang);
    let b = broker(up.clone());
    let c = creds("s3cret");
    let call = b.get_token(&c, &[]);
    // A caller's deadline (the server's request timeout) ends the wait.
    assert!(
        tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .is_err()
    );
    assert_eq!(up.calls(), 1);
}

mod http {
    //! The real HTTP client against a mock token endpoint on loopback.
    use super::*;
    use wiremock::{
        Mock, MockServer, Request, Respond, ResponseTemplate,
        matchers::{body_string, header, method, path},
    };

    async fn client_for(server: &MockServer, timeout: Duration) -> CognitoClient {
        let url = url::Url::parse(&format!("{}/oauth2/token", server.uri())).unwrap();
        CognitoClient::new(url, Duration::from_millis(500), timeout).unwrap()
    }

    fn http_broker(client: CognitoClient) -> Broker {
        Broker::new(registry(), Arc::new(client), BrokerSettings::default())
    }

    fn ok_body(scope: &str) -> serde_json::Value {
        json!({"access_token": fake_jwt(scope, 1), "expires_in": 3600, "token_type": "Bearer"})
    }

    #[tokio::test]
    async fn request_has_the_cognito_shape() {
        let server = MockServer::start().await;
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("client-a:s3cret")
        );
        Mock::given(method("POST"))
            .and(path("/oauth2/token"))
            .and(header("content-type", "application/x-www-form-urlencoded"))
            .and(header("authorization", basic.as_str()))
            .and(body_string(
                "grant_type=client_credentials&scope=orders%2Fread+orders%2Fwrite",
            ))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(ok_body("orders/read orders/write")),
            )
            .expect(1)
            .mount(&server)
            .await;
        let b = http_broker(client_for(&server, Duration::from_secs(5)).await);
        let t = b.get_token(&creds("s3cret"), &[]).await.unwrap();
        assert_eq!(*t.scopes, ["orders/read", "orders/write"]);
        assert!(t.expires_in >= 3599);
    }

    async fn outcome(status: u16, body: &str) -> (BrokerError, u64) {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(status).set_body_raw(body.to_owned(), "application/json"),
            )
            .mount(&server)
            .await;
        let b = http_broker(client_for(&server, Duration::from_secs(5)).await);
        let err = b.get_token(&creds("s3cret"), &[]).await.unwrap_err();
        let calls = server.received_requests().await.unwrap().len() as u64;
        (err, calls)
    }

    #[tokio::test]
    async fn status_table() {
        let (e, n) = outcome(400, r#"{"error":"invalid_client"}"#).await;
        assert_eq!((e, n), (BrokerError::Unauthenticated, 1));
        let (e, n) = outcome(400, r#"{"error":"invalid_scope"}"#).await;
        assert!(
            matches!(e, BrokerError::PermissionDenied(_)) && n == 1,
            "{e:?}"
        );
        let (e, n) = outcome(400, r#"{"error":"unauthorized_client"}"#).await;
        assert!(
            matches!(e, BrokerError::FailedPrecondition(_)) && n == 1,
            "{e:?}"
        );
        let (e, n) = outcome(429, "slow down").await;
        assert!(
            matches!(e, BrokerError::ResourceExhausted(_)) && n == 1,
            "{e:?}"
        );
        let (e, n) = outcome(400, r#"{"error":"invalid_request"}"#).await;
        assert!(
            matches!(e, BrokerError::Internal(_)) && n == 1,
            "4xx never retried: {e:?}"
        );
        let (e, n) = outcome(503, "<html>down</html>").await;
        assert!(
            matches!(e, BrokerError::Unavailable(_)) && n == 2,
            "5xx retried once: {e:?} {n}"
        );
        let (e, n) = outcome(200, "<html>captive portal</html>").await;
        assert!(matches!(e, BrokerError::Unavailable(_)) && n == 1, "{e:?}");
        let (e, _) = outcome(
            200,
            r#"{"access_token":"x","expires_in":"soon","token_type":"Bearer"}"#,
        )
        .await;
        assert!(matches!(e, BrokerError::Unavailable(_)), "{e:?}");
    }

    #[tokio::test]
    async fn retry_recovers_from_one_5xx() {
        struct FlakyOnce(AtomicU64);
        impl Respond for FlakyOnce {
            fn respond(&self, _: &Request) -> ResponseTemplate {
                if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
                    ResponseTemplate::new(502)
                } else {
                    ResponseTemplate::new(200).set_body_json(ok_body("orders/read orders/write"))
                }
            }
        }
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(FlakyOnce(AtomicU64::new(0)))
            .mount(&server)
            .await;
        let b = http_broker(client_for(&server, Duration::from_secs(5)).await);
        assert!(b.get_token(&creds("s3cret"), &[]).await.is_ok());
        assert_eq!(server.received_requests().await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn hung_upstream_answers_within_the_timeout() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(ok_body("orders/read"))
                    .set_delay(Duration::from_secs(30)),
            )
            .mount(&server)
            .await;
        let b = http_broker(client_for(&server, Duration::from_millis(300)).await);
        let started = std::time::Instant::now();
        let err = b.get_token(&creds("s3cret"), &[]).await.unwrap_err();
        assert!(
            matches!(err, BrokerError::Unavailable(ref m) if m.contains("timeout")),
            "{err:?}"
        );
        // Bounded by the configured total timeout, not by the 30 s hang.
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn unreachable_upstream_is_unavailable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let url = url::Url::parse(&format!("http://127.0.0.1:{port}/oauth2/token")).unwrap();
        let client =
            CognitoClient::new(url, Duration::from_millis(300), Duration::from_secs(2)).unwrap();
        let err = http_broker(client)
            .get_token(&creds("s3cret"), &[])
            .await
            .unwrap_err();
        assert!(matches!(err, BrokerError::Unavailable(_)), "{err:?}");
    }
}
