//! Broker tests: invariants 1–6 and the status table.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use futures_util::future::BoxFuture;
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::json;

use super::*;
use crate::config::ClientConfig;
use tokio::time::Instant;

#[derive(Clone)]
enum Mode {
    Ok { expires_in: u64 },
    Broad,
    Fail(UpstreamError),
    Hang,
    Panic,
}

/// An in-memory token endpoint: counts calls, checks the secret, scripts faults.
struct FakeEndpoint {
    calls: AtomicU64,
    mode: Mutex<Mode>,
    /// The app client's active secrets (Cognito allows two while rotating).
    secrets: Mutex<Vec<String>>,
    /// When each call arrived.
    times: Mutex<Vec<Instant>>,
    delay: Duration,
}

impl FakeEndpoint {
    fn new(expires_in: u64) -> Arc<Self> {
        Arc::new(Self {
            calls: AtomicU64::new(0),
            mode: Mutex::new(Mode::Ok { expires_in }),
            secrets: Mutex::new(vec!["s3cret".into()]),
            times: Mutex::new(Vec::new()),
            delay: Duration::from_millis(20),
        })
    }
    fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }
    fn set_secrets(&self, secrets: &[&str]) {
        *self.secrets.lock().unwrap() = secrets.iter().map(|s| s.to_string()).collect();
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
            self.times.lock().unwrap().push(Instant::now());
            tokio::time::sleep(self.delay).await;
            let mode = self.mode.lock().unwrap().clone();
            let known = self
                .secrets
                .lock()
                .unwrap()
                .iter()
                .any(|s| s == secret.expose_secret());
            if !known {
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
                Mode::Hang => futures_util::future::pending().await,
                Mode::Panic => panic!("the token endpoint double failed"),
            }
        })
    }
    fn describe(&self) -> String {
        "fake".into()
    }
}

/// One client, `client-a` (`acme`), allowed `orders/read` and `orders/write`.
pub(crate) fn registry() -> Registry {
    Registry::new(
        &[ClientConfig {
            client_id: "client-a".into(),
            pool: None,
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
        BrokerError::InvalidClient
    );
    assert_eq!(
        b.get_token(&creds(""), &[]).await.unwrap_err(),
        BrokerError::InvalidClient
    );
    assert_eq!(up.calls(), 0);
}

#[tokio::test]
async fn scope_outside_registry_refused_without_upstream_call() {
    let up = FakeEndpoint::new(3600);
    let b = broker(up.clone());
    // Unproven: refused like an unknown client (nothing learnt about this one).
    let err = b
        .get_token(&creds("s3cret"), &scopes(&["orders/admin"]))
        .await
        .unwrap_err();
    assert_eq!(err, BrokerError::InvalidClient);
    assert_eq!(up.calls(), 0);
    // Proven: the precise answer.
    b.get_token(&creds("s3cret"), &[]).await.unwrap();
    let calls = up.calls();
    let err = b
        .get_token(&creds("s3cret"), &scopes(&["orders/admin"]))
        .await
        .unwrap_err();
    assert!(matches!(err, BrokerError::ScopeNotAllowed(_)), "{err:?}");
    assert_eq!(up.calls(), calls);
    let err = b
        .get_token(&creds("s3cret"), &scopes(&["orders read"]))
        .await
        .unwrap_err();
    assert!(matches!(err, BrokerError::MalformedScopes(_)), "{err:?}");
    let many = vec!["orders/read".to_string(); 11];
    let err = b.get_token(&creds("s3cret"), &many).await.unwrap_err();
    assert!(matches!(err, BrokerError::MalformedScopes(_)), "{err:?}");
    assert_eq!(up.calls(), calls);
}

#[tokio::test]
async fn an_unproven_secret_learns_nothing_about_the_client() {
    let up = FakeEndpoint::new(3600);
    let b = broker(up.clone());
    let stranger = |id: &str, secret: &str| Credentials {
        client_id: id.into(),
        secret: SecretString::from(secret.to_owned()),
    };
    let answers = [
        b.get_token(&stranger("client-z", "guess"), &[]).await,
        b.get_token(&stranger("client-a", "guess"), &scopes(&["orders/admin"]))
            .await,
        b.get_token(&stranger("client-a", "guess"), &[]).await,
        b.get_token(&stranger("client-z", "guess"), &scopes(&["orders/admin"]))
            .await,
    ];
    for a in &answers {
        let e = a.as_ref().unwrap_err();
        assert_eq!(*e, BrokerError::InvalidClient);
        assert_eq!(e.to_string(), "invalid client credentials");
    }
    // Malformed scopes are malformed whoever asks.
    for id in ["client-z", "client-a"] {
        let e = b
            .get_token(&stranger(id, "guess"), &scopes(&["orders read"]))
            .await
            .unwrap_err();
        assert!(matches!(e, BrokerError::MalformedScopes(_)), "{id}: {e:?}");
    }
}

#[tokio::test]
async fn unknown_client_ids_are_limited_like_known_ones() {
    let up = FakeEndpoint::new(3600);
    let b = broker(up.clone());
    let mut limited = 0;
    for i in 0..30 {
        let c = Credentials {
            client_id: "client-z".into(),
            secret: SecretString::from(format!("guess-{i}")),
        };
        match b.get_token(&c, &[]).await {
            Err(BrokerError::TooManyFailedAttempts { .. }) => limited += 1,
            Err(BrokerError::InvalidClient) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(limited, 20, "ten a minute, as for a registered id");
    assert_eq!(up.calls(), 0);
}

/// Right after a start (nothing proven yet), a stranger floods a known client id
/// from one address; the owner, at another, presents its secret for the first
/// time and is served.
#[tokio::test(start_paused = true)]
async fn a_flood_from_one_address_never_locks_out_an_owner_at_another() {
    let up = FakeEndpoint::new(3600);
    let b = broker(up.clone());
    let attacker = Some(std::net::IpAddr::from([127, 0, 0, 66]));
    let owner = Some(std::net::IpAddr::from([127, 0, 0, 7]));
    let mut limited = 0;
    for i in 0..40 {
        match b
            .get_token_from(&creds(&format!("wrong-secret-{i}")), &[], attacker)
            .await
        {
            Err(BrokerError::TooManyFailedAttempts { .. }) => limited += 1,
            Err(BrokerError::InvalidClient) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(limited, 30, "the attacker's address is limited");
    let t = b
        .get_token_from(&creds("s3cret"), &[], owner)
        .await
        .expect("the owner is served");
    assert!(!t.access_token.expose().is_empty());
    // Many addresses together reach the client's own, looser limit.
    let mut limited = 0;
    for i in 0..120u8 {
        let from = Some(std::net::IpAddr::from([127, 0, 1, i]));
        if let Err(BrokerError::TooManyFailedAttempts { .. }) = b
            .get_token_from(
                &creds(&format!("wrong-{i}")),
                &scopes(&["orders/read"]),
                from,
            )
            .await
        {
            limited += 1;
        }
    }
    assert!(
        limited > 0,
        "the per-client limit still bounds the upstream calls"
    );
    // 10 per source and 100 a minute per client (plus what refills meanwhile).
    assert!(up.calls() <= 115, "{} upstream calls", up.calls());
}

#[tokio::test]
async fn cached_token_refused_for_wrong_secret() {
    let up = FakeEndpoint::new(3600);
    let b = broker(up.clone());
    let good = b.get_token(&creds("s3cret"), &[]).await.unwrap();
    let err = b.get_token(&creds("guess"), &[]).await.unwrap_err();
    assert_eq!(err, BrokerError::InvalidClient);
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
    up.set_secrets(&["rotated"]);
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
            Err(BrokerError::TooManyFailedAttempts { retry_after }) => {
                assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(6));
                exhausted += 1
            }
            Err(BrokerError::InvalidClient) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // Default quota: 10 a minute (burst 10), and proving the owner's secret took one.
    assert_eq!(exhausted, 41);
    assert_eq!(up.calls(), 10);
    assert_eq!(b.stats().snapshot().rate_limited, 41);
    // The owner's proven secret is never limited.
    assert!(b.get_token(&creds("s3cret"), &[]).await.is_ok());
}

#[tokio::test]
async fn failures_without_a_cached_entry_are_limited_too() {
    let up = FakeEndpoint::new(3600);
    let b = broker(up.clone());
    let mut exhausted = 0;
    for i in 0..30 {
        if let Err(BrokerError::TooManyFailedAttempts { .. }) =
            b.get_token(&creds(&format!("guess-{i}")), &[]).await
        {
            exhausted += 1;
        }
    }
    assert_eq!(up.calls(), 10, "the quota, and not one more");
    assert_eq!(exhausted, 20);
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
    assert!(
        matches!(err, BrokerError::UpstreamUnavailable(_)),
        "{err:?}"
    );
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
    // Every call is a hit or a miss (the unproven ones too).
    assert_eq!(s.hits + s.misses, 200);
}

#[tokio::test(start_paused = true)]
async fn token_is_reused_until_75_percent_then_refreshed() {
    let up = FakeEndpoint::new(100);
    let b = broker(up.clone());
    let first = b.get_token(&creds("s3cret"), &[]).await.unwrap();
    assert_eq!(first.expires_in, 99, "the fetch itself took a little time");
    // Refresh points are jittered over 70-75% of the lifetime.
    tokio::time::advance(Duration::from_secs(69)).await;
    let hit = b.get_token(&creds("s3cret"), &[]).await.unwrap();
    assert_eq!(hit.access_token, first.access_token);
    assert_eq!(hit.expires_in, 30, "expires_in is the time left");
    tokio::time::advance(Duration::from_secs(7)).await;
    let fresh = b.get_token(&creds("s3cret"), &[]).await.unwrap();
    assert_ne!(fresh.access_token, first.access_token);
    assert_eq!(up.calls(), 2);
    let s = b.stats().snapshot();
    // The first call proved the secret: a miss too; no miss after it.
    assert_eq!((s.unproven, s.misses, s.hits, s.refreshes), (1, 1, 1, 1));
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
    assert!(
        matches!(err, BrokerError::UpstreamUnavailable(_)),
        "{err:?}"
    );
    // After expiry, never.
    tokio::time::advance(Duration::from_secs(30)).await;
    assert!(b.get_token(&creds("s3cret"), &[]).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn revoked_secret_during_refresh_is_not_papered_over() {
    let up = FakeEndpoint::new(100);
    let b = broker(up.clone());
    b.get_token(&creds("s3cret"), &[]).await.unwrap();
    up.set_secrets(&["rotated"]);
    tokio::time::advance(Duration::from_secs(80)).await;
    assert_eq!(
        b.get_token(&creds("s3cret"), &[]).await.unwrap_err(),
        BrokerError::InvalidClient
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

fn broker_with(
    endpoint: Arc<FakeEndpoint>,
    registry: Registry,
    settings: BrokerSettings,
) -> Broker {
    Broker::new(registry, endpoint, settings)
}

#[tokio::test]
async fn two_live_secrets_share_one_cached_token() {
    let up = FakeEndpoint::new(3600);
    up.set_secrets(&["old-secret", "new-secret"]);
    let b = broker(up.clone());
    let mut tokens = Vec::new();
    for i in 0..40 {
        let secret = if i % 2 == 0 {
            "old-secret"
        } else {
            "new-secret"
        };
        tokens.push(b.get_token(&creds(secret), &[]).await.unwrap().access_token);
    }
    assert!(up.calls() <= 2, "{} upstream calls", up.calls());
    assert!(
        tokens[2..].iter().all(|t| *t == tokens[2]),
        "one token served to both"
    );
    assert_eq!(b.proven_secrets(), 2);
    // A third, wrong secret is still refused.
    assert_eq!(
        b.get_token(&creds("third-secret"), &[]).await.unwrap_err(),
        BrokerError::InvalidClient
    );
    assert_eq!(b.stats().snapshot().rate_limited, 0);
}

#[tokio::test(start_paused = true)]
async fn a_deleted_secret_stops_being_proven_and_the_other_is_served_without_a_gap() {
    let up = FakeEndpoint::new(100);
    up.set_secrets(&["old-secret", "new-secret"]);
    let b = broker(up.clone());
    let first = b.get_token(&creds("old-secret"), &[]).await.unwrap();
    b.get_token(&creds("new-secret"), &[]).await.unwrap();
    // The old secret is deleted in Cognito.
    up.set_secrets(&["new-secret"]);
    tokio::time::advance(Duration::from_secs(80)).await;
    // The next upstream call made with it (a refresh) fails and drops it.
    assert_eq!(
        b.get_token(&creds("old-secret"), &[]).await.unwrap_err(),
        BrokerError::InvalidClient
    );
    assert_eq!(b.proven_secrets(), 1);
    // The new secret keeps being served: the refresh with it succeeds.
    let served = b.get_token(&creds("new-secret"), &[]).await.unwrap();
    assert_ne!(served.access_token, first.access_token);
    for _ in 0..5 {
        assert_eq!(
            b.get_token(&creds("new-secret"), &[])
                .await
                .unwrap()
                .access_token,
            served.access_token
        );
    }
    // The old secret is now unproven: asked of Cognito (refused), never served.
    let calls = up.calls();
    assert_eq!(
        b.get_token(&creds("old-secret"), &[]).await.unwrap_err(),
        BrokerError::InvalidClient
    );
    assert_eq!(up.calls(), calls + 1);
}

#[tokio::test(start_paused = true)]
async fn a_proof_expires_after_one_token_lifetime_without_renewal() {
    let up = FakeEndpoint::new(100);
    up.set_secrets(&["old-secret", "new-secret"]);
    let b = broker(up.clone());
    b.get_token(&creds("old-secret"), &[]).await.unwrap();
    b.get_token(&creds("new-secret"), &[]).await.unwrap();
    // Only the new secret is used from now on; its refreshes keep it proven.
    for _ in 0..4 {
        tokio::time::advance(Duration::from_secs(40)).await;
        b.get_token(&creds("new-secret"), &[]).await.unwrap();
    }
    assert_eq!(b.proven_secrets(), 1, "the old proof lapsed");
    let calls = up.calls();
    b.get_token(&creds("old-secret"), &[]).await.unwrap();
    assert_eq!(
        up.calls(),
        calls + 1,
        "re-proven by Cognito, not served blindly"
    );
}

#[tokio::test]
async fn knowing_a_client_id_cannot_lock_its_owner_out() {
    let up = FakeEndpoint::new(3600);
    let b = broker(up.clone());
    b.get_token(&creds("s3cret"), &scopes(&["orders/read"]))
        .await
        .unwrap();
    let mut limited = 0;
    for i in 0..30 {
        match b.get_token(&creds(&format!("wrong-secret-{i}")), &[]).await {
            Err(BrokerError::TooManyFailedAttempts { .. }) => limited += 1,
            Err(BrokerError::InvalidClient) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(limited > 0, "the flood was limited");
    let calls = up.calls();
    assert!(calls <= 10, "{calls} upstream calls");
    // The owner asks for a scope set not cached yet: served, from Cognito.
    let t = b
        .get_token(&creds("s3cret"), &scopes(&["orders/write"]))
        .await
        .unwrap();
    assert_eq!(*t.scopes, ["orders/write"]);
    assert_eq!(up.calls(), calls + 1);
}

#[tokio::test]
async fn concurrent_first_calls_of_one_unproven_secret_take_one_unit_of_the_limit() {
    let up = FakeEndpoint::new(3600);
    let b = broker(up.clone());
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let b = b.clone();
            tokio::spawn(async move { b.get_token(&creds("s3cret"), &[]).await })
        })
        .collect();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    assert_eq!(up.calls(), 1);
    assert_eq!(b.stats().snapshot().rate_limited, 0);
}

#[tokio::test]
async fn ids_and_secrets_no_cognito_client_has_are_refused_before_any_call() {
    let up = FakeEndpoint::new(3600);
    let b = broker(up.clone());
    let huge = Credentials {
        client_id: "client-a".into(),
        secret: SecretString::from("x".repeat(60 * 1024)),
    };
    for c in [
        huge,
        creds("has space"),
        creds("tab\tsecret"),
        Credentials {
            client_id: "a".repeat(129),
            secret: SecretString::from("s3cret".to_owned()),
        },
        Credentials {
            client_id: "client:a".into(),
            secret: SecretString::from("s3cret".to_owned()),
        },
    ] {
        let e = b.get_token(&c, &[]).await.unwrap_err();
        assert!(matches!(e, BrokerError::MalformedCredentials(_)), "{e:?}");
        assert!(!e.to_string().contains("xxxx"), "never echoed");
    }
    assert_eq!(up.calls(), 0);
    assert_eq!(b.stats().snapshot().rate_limited, 0);
}

#[tokio::test]
async fn a_fetch_task_that_dies_leaves_no_stuck_flight() {
    let up = FakeEndpoint::new(3600);
    up.set(Mode::Panic);
    let b = broker(up.clone());
    let e = b.get_token(&creds("s3cret"), &[]).await.unwrap_err();
    assert!(matches!(e, BrokerError::Internal(_)), "{e:?}");
    assert!(b.inner.inflight.lock().unwrap().is_empty());
    up.set(Mode::Ok { expires_in: 3600 });
    b.get_token(&creds("s3cret"), &[])
        .await
        .expect("a new flight, not the dead one");
    assert_eq!(up.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn refresh_points_are_spread_over_the_jitter_window() {
    let up = FakeEndpoint::new(1000);
    let many: Vec<String> = (0..8).map(|i| format!("s/{i}")).collect();
    let registry = Registry::new(
        &[ClientConfig {
            client_id: "client-a".into(),
            pool: None,
            name: "acme".into(),
            allowed_scopes: many.clone(),
        }],
        10,
    );
    let b = broker_with(up.clone(), registry, BrokerSettings::default());
    let started = Instant::now();
    for s in &many {
        b.get_token(&creds("s3cret"), std::slice::from_ref(s))
            .await
            .unwrap();
    }
    let points: Vec<Duration> = b
        .inner
        .cache
        .iter()
        .map(|(_, e)| e.refresh_at - started)
        .collect();
    assert_eq!(points.len(), 8);
    for p in &points {
        assert!(
            (Duration::from_secs(700)..=Duration::from_millis(750_100)).contains(p),
            "{p:?}"
        );
    }
    let distinct: std::collections::HashSet<_> = points.iter().map(|p| p.as_millis()).collect();
    assert!(distinct.len() > 1, "not all at the same moment: {points:?}");
}

/// A client with nine scopes: 511 distinct scope sets.
fn nine_scope_registry() -> (Registry, Vec<String>) {
    let nine: Vec<String> = (0..9).map(|i| format!("res/s{i}")).collect();
    let registry = Registry::new(
        &[ClientConfig {
            client_id: "client-a".into(),
            pool: None,
            name: "acme".into(),
            allowed_scopes: nine.clone(),
        }],
        10,
    );
    (registry, nine)
}

fn subset(all: &[String], mask: u32) -> Vec<String> {
    all.iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, s)| s.clone())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn five_hundred_misses_reach_cognito_within_the_budget_and_all_succeed() {
    let up = FakeEndpoint::new(3600);
    let (registry, nine) = nine_scope_registry();
    let settings = BrokerSettings {
        upstream_per_second: NonZeroU32::new(50),
        upstream_max_wait: Duration::from_secs(15),
        ..BrokerSettings::default()
    };
    let b = broker_with(up.clone(), registry, settings);
    b.get_token(&creds("s3cret"), &[]).await.unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    up.times.lock().unwrap().clear();
    let started = Instant::now();
    let calls: Vec<_> = (1..=500u32)
        .map(|mask| {
            let b = b.clone();
            let wanted = subset(&nine, mask);
            tokio::spawn(async move {
                // The caller's deadline.
                tokio::time::timeout(
                    Duration::from_secs(20),
                    b.get_token(&creds("s3cret"), &wanted),
                )
                .await
            })
        })
        .collect();
    for c in calls {
        c.await.unwrap().expect("within the deadline").unwrap();
    }
    let times = up.times.lock().unwrap().clone();
    assert_eq!(times.len(), 500);
    // No one-second window holds more than 50 calls.
    for w in times.windows(51) {
        assert!(w[50] - w[0] >= Duration::from_secs(1), "{:?}", w[50] - w[0]);
    }
    let took = Instant::now() - started;
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(11),
        "{took:?}"
    );
    let budget = b.budget_stats();
    assert_eq!(budget.granted_miss.load(Ordering::Relaxed), 501);
    assert!(budget.waits.load(Ordering::Relaxed) >= 490);
}

/// One client asking many new scope sets at once holds only its share of the
/// schedule ahead: another client's first miss waits a few slots, not behind
/// all of them.
#[tokio::test(start_paused = true)]
async fn one_clients_new_scope_sets_cannot_queue_everyone_else_out() {
    let up = FakeEndpoint::new(3600);
    let nine: Vec<String> = (0..9).map(|i| format!("res/s{i}")).collect();
    let registry = Registry::new(
        &[
            ClientConfig {
                client_id: "client-a".into(),
                pool: None,
                name: "greedy".into(),
                allowed_scopes: nine.clone(),
            },
            ClientConfig {
                client_id: "client-b".into(),
                pool: None,
                name: "other".into(),
                allowed_scopes: vec!["res/s0".into(), "res/s1".into()],
            },
        ],
        10,
    );
    let settings = BrokerSettings {
        upstream_per_second: NonZeroU32::new(5),
        upstream_max_wait: Duration::from_secs(5),
        ..BrokerSettings::default()
    };
    let b = broker_with(up.clone(), registry, settings);
    let other = Credentials {
        client_id: "client-b".into(),
        secret: SecretString::from("s3cret".to_owned()),
    };
    b.get_token(&creds("s3cret"), &[]).await.unwrap();
    b.get_token(&other, &scopes(&["res/s0"])).await.unwrap();
    tokio::time::advance(Duration::from_secs(2)).await;
    let greedy: Vec<_> = (1..=62u32)
        .map(|mask| {
            let b = b.clone();
            let wanted = subset(&nine, mask);
            tokio::spawn(async move { b.get_token(&creds("s3cret"), &wanted).await })
        })
        .collect();
    // The greedy client's misses are all queued.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let started = Instant::now();
    b.get_token(&other, &scopes(&["res/s1"]))
        .await
        .expect("the other client is served");
    let waited = started.elapsed();
    assert!(waited <= Duration::from_millis(800), "waited {waited:?}");
    let served = futures_util::future::join_all(greedy)
        .await
        .into_iter()
        .filter(|r| matches!(r, Ok(Ok(_))))
        .count();
    assert!(
        served >= 20,
        "the greedy client is still served within its wait: {served}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_miss_beyond_the_longest_wait_is_refused_with_the_time_to_wait() {
    let up = FakeEndpoint::new(3600);
    let (registry, nine) = nine_scope_registry();
    let settings = BrokerSettings {
        upstream_per_second: NonZeroU32::new(10),
        upstream_max_wait: Duration::from_millis(500),
        ..BrokerSettings::default()
    };
    let b = broker_with(up.clone(), registry, settings);
    b.get_token(&creds("s3cret"), &[]).await.unwrap();
    let calls: Vec<_> = (1..=20u32)
        .map(|mask| {
            let b = b.clone();
            let wanted = subset(&nine, mask);
            tokio::spawn(async move { b.get_token(&creds("s3cret"), &wanted).await })
        })
        .collect();
    let mut refused = 0;
    for c in calls {
        match c.await.unwrap() {
            Ok(_) => {}
            Err(BrokerError::UpstreamBudget { retry_after }) => {
                // At least the next slot away (the wait is spent in the schedule
                // and in the client's own queue of its share of slots).
                assert!(retry_after >= Duration::from_millis(100), "{retry_after:?}");
                refused += 1;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    // 100 ms apart, 500 ms of wait: the first slot was taken by the proof.
    assert!((14..=16).contains(&refused), "{refused}");
    assert_eq!(up.calls(), 1 + 20 - refused);
}

#[tokio::test(start_paused = true)]
async fn refreshes_yield_to_queued_misses_and_serve_the_current_token() {
    let up = FakeEndpoint::new(100);
    let (registry, nine) = nine_scope_registry();
    let settings = BrokerSettings {
        upstream_per_second: NonZeroU32::new(10),
        upstream_max_wait: Duration::from_secs(30),
        refresh_jitter: 0.0,
        ..BrokerSettings::default()
    };
    let b = broker_with(up.clone(), registry, settings);
    let first = b.get_token(&creds("s3cret"), &[]).await.unwrap();
    tokio::time::advance(Duration::from_secs(80)).await;
    // Misses queue for two seconds of budget.
    let misses: Vec<_> = (1..=20u32)
        .map(|mask| {
            let b = b.clone();
            let wanted = subset(&nine, mask);
            tokio::spawn(async move { b.get_token(&creds("s3cret"), &wanted).await })
        })
        .collect();
    tokio::task::yield_now().await;
    // The due refresh finds the schedule busy: the current token is served.
    let calls = up.calls();
    let served = b.get_token(&creds("s3cret"), &[]).await.unwrap();
    assert_eq!(served.access_token, first.access_token);
    assert_eq!(
        b.budget_stats().refreshes_deferred.load(Ordering::Relaxed),
        1
    );
    assert!(up.calls() <= calls + 1);
    for m in misses {
        m.await.unwrap().unwrap();
    }
    // Once the queue is gone the refresh goes through.
    tokio::time::advance(Duration::from_secs(1)).await;
    let fresh = b.get_token(&creds("s3cret"), &[]).await.unwrap();
    assert_ne!(fresh.access_token, first.access_token);
    assert_eq!(b.budget_stats().granted_refresh.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn per_client_counters_by_registered_name() {
    let up = FakeEndpoint::new(3600);
    let b = broker(up.clone());
    b.get_token(&creds("s3cret"), &[]).await.unwrap();
    b.get_token(&creds("s3cret"), &[]).await.unwrap();
    let _ = b.get_token(&creds("wrong-one"), &[]).await;
    let _ = b
        .get_token(&creds("s3cret"), &scopes(&["orders/admin"]))
        .await;
    let snap = b.client_stats().snapshot();
    assert_eq!(snap.len(), 1);
    assert_eq!(&*snap[0].name, "acme");
    assert_eq!((snap[0].hits, snap[0].upstream, snap[0].refused), (1, 2, 2));
}

mod http {
    //! The real HTTP client against a mock token endpoint on loopback.
    use super::*;
    use wiremock::{
        Mock, MockServer, Request, Respond, ResponseTemplate,
        matchers::{body_string, header, method, path},
    };

    async fn client_for(server: &MockServer, timeout: Duration) -> CognitoClient {
        let url = format!("{}/oauth2/token", server.uri())
            .parse::<::http::Uri>()
            .unwrap();
        CognitoClient::new(url, Duration::from_millis(500), timeout).unwrap()
    }

    fn http_broker(client: CognitoClient) -> Broker {
        Broker::new(registry(), Arc::new(client), BrokerSettings::default())
    }

    fn ok_body(scope: &str) -> serde_json::Value {
        json!({"access_token": fake_jwt(scope, 1), "expires_in": 3600, "token_type": "Bearer"})
    }

    /// Invariant 12: a secret never follows a redirect, wherever it points.
    #[tokio::test]
    async fn a_redirect_is_never_followed() {
        let elsewhere = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_json(ok_body("orders/read")))
            .expect(0)
            .mount(&elsewhere)
            .await;
        let server = MockServer::start().await;
        for status in [301, 302, 307, 308] {
            Mock::given(method("POST"))
                .and(path("/oauth2/token"))
                .respond_with(
                    ResponseTemplate::new(status)
                        .insert_header("location", format!("{}/steal", elsewhere.uri())),
                )
                .up_to_n_times(1)
                .mount(&server)
                .await;
            let b = http_broker(client_for(&server, Duration::from_secs(5)).await);
            let e = b.get_token(&creds("s3cret"), &[]).await.unwrap_err();
            assert!(
                matches!(e, BrokerError::UpstreamUnavailable(_)),
                "{status}: {e:?}"
            );
        }
        assert!(elsewhere.received_requests().await.unwrap().is_empty());
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
        assert_eq!((e, n), (BrokerError::InvalidClient, 1));
        let (e, n) = outcome(400, r#"{"error":"invalid_scope"}"#).await;
        assert!(
            matches!(e, BrokerError::ScopeNotAllowed(_)) && n == 1,
            "{e:?}"
        );
        let (e, n) = outcome(400, r#"{"error":"unauthorized_client"}"#).await;
        assert!(
            matches!(e, BrokerError::GrantNotAllowed(_)) && n == 1,
            "{e:?}"
        );
        let (e, n) = outcome(429, "slow down").await;
        assert!(matches!(e, BrokerError::Throttled) && n == 1, "{e:?}");
        let (e, n) = outcome(400, r#"{"error":"invalid_request"}"#).await;
        assert!(
            matches!(e, BrokerError::UpstreamRejected(_)) && n == 1,
            "4xx never retried: {e:?}"
        );
        let (e, n) = outcome(503, "<html>down</html>").await;
        assert!(
            matches!(e, BrokerError::UpstreamUnavailable(_)) && n == 2,
            "5xx retried once: {e:?} {n}"
        );
        let (e, n) = outcome(200, "<html>captive portal</html>").await;
        assert!(
            matches!(e, BrokerError::UpstreamUnavailable(_)) && n == 1,
            "{e:?}"
        );
        let (e, _) = outcome(
            200,
            r#"{"access_token":"x","expires_in":"soon","token_type":"Bearer"}"#,
        )
        .await;
        assert!(matches!(e, BrokerError::UpstreamUnavailable(_)), "{e:?}");
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
        assert!(matches!(err, BrokerError::UpstreamTimeout), "{err:?}");
        // Bounded by the configured total timeout, not by the 30 s hang.
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn unreachable_upstream_is_unavailable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let url = format!("http://127.0.0.1:{port}/oauth2/token")
            .parse::<::http::Uri>()
            .unwrap();
        let client =
            CognitoClient::new(url, Duration::from_millis(300), Duration::from_secs(2)).unwrap();
        let err = http_broker(client)
            .get_token(&creds("s3cret"), &[])
            .await
            .unwrap_err();
        assert!(
            matches!(err, BrokerError::UpstreamUnavailable(_)),
            "{err:?}"
        );
    }
}

mod fleet_lock {
    //! The fleet lock against a real `redis-server` on a free loopback port.
    use std::process::{Child, Command, Stdio};

    use super::*;

    struct Redis(Child, u16);

    impl Drop for Redis {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn redis() -> Option<Redis> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "redis-server is missing; install it with: apt-get install redis-server"
            );
            eprintln!("SKIPPING: redis-server is missing (apt-get install redis-server)");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Some(Redis(child, port))
    }

    async fn fleet_broker(up: Arc<FakeEndpoint>, port: u16) -> Broker {
        let fleet = FleetCache::new(
            &FleetSettings {
                redis: crate::broker::RedisTarget {
                    url: format!("redis://127.0.0.1:{port}"),
                    mode: crate::broker::RedisMode::Auto,
                    ca_pem: None,
                    username: None,
                    password: None,
                    iam: None,
                    timeout: Duration::from_millis(500),
                },
                lock_ttl: Duration::from_secs(10),
                lock_wait: Duration::from_secs(3),
            },
            &[9u8; 32],
        )
        .unwrap();
        // Redis answers before the test goes on (no sleeping on its start).
        for _ in 0..200 {
            if fleet.get_entry("m2m:probe").await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let settings = BrokerSettings {
            verifier_key: Some([9u8; 32]),
            ..BrokerSettings::default()
        };
        Broker::with_fleet(registry(), up, settings, Some(Arc::new(fleet)))
    }

    /// Replica B takes the lock after replica A released it, without having
    /// seen A's entry or A's proof: it must look again and find both.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_lock_holder_looks_again_before_calling_cognito() {
        let Some(redis) = redis() else { return };
        let up = FakeEndpoint::new(3600);
        let a = fleet_broker(up.clone(), redis.1).await;
        let b = fleet_broker(up.clone(), redis.1).await;
        let first = a.get_token(&creds("s3cret"), &[]).await.unwrap();
        assert_eq!(up.calls(), 1);
        // B follows no announcements (not started): to it the secret is unproven
        // and its cache empty, so it goes straight to the lock.
        let second = b.get_token(&creds("s3cret"), &[]).await.unwrap();
        assert_eq!(second.access_token, first.access_token);
        assert_eq!(up.calls(), 1, "no second Cognito call");
        // A wrong secret still gets nothing from the fleet's entry.
        assert_eq!(
            b.get_token(&creds("wrong-secret"), &[]).await.unwrap_err(),
            BrokerError::InvalidClient
        );
    }
}

/// The fleet protocol on the in-memory double of a shared store: several
/// replicas, one process, paused time, no redis-server.
mod fleet_protocol {
    use std::num::NonZeroU32;

    use super::*;
    use crate::broker::memory_fleet::MemoryStore;

    fn settings(per_second: u32) -> BrokerSettings {
        BrokerSettings {
            verifier_key: Some([9u8; 32]),
            upstream_per_second: NonZeroU32::new(per_second),
            upstream_max_wait: Duration::from_millis(100),
            ..BrokerSettings::default()
        }
    }

    /// A replica on `store`; `follow`: it hears the fleet's announcements.
    fn replica(
        store: &Arc<MemoryStore>,
        up: &Arc<FakeEndpoint>,
        per_second: u32,
        follow: bool,
    ) -> Broker {
        let b = Broker::with_seams(
            registry(),
            up.clone(),
            settings(per_second),
            store.seams(),
            None,
        );
        if follow {
            b.start();
        }
        b
    }

    /// Lets the replicas' followers run until `check` holds (bounded).
    async fn settle(what: &str, check: impl Fn() -> bool) {
        for _ in 0..1000 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("never: {what}");
    }

    async fn burst(fleet: &[Broker], calls: usize, secret: &str, scope: &[&str]) -> Vec<String> {
        let tasks: Vec<_> = (0..calls)
            .map(|i| {
                let b = fleet[i % fleet.len()].clone();
                let (secret, scope) = (secret.to_owned(), scopes(scope));
                tokio::spawn(async move {
                    let t = b.get_token(&creds(&secret), &scope).await.unwrap();
                    t.access_token.expose().to_owned()
                })
            })
            .collect();
        let mut tokens = Vec::new();
        for t in tasks {
            tokens.push(t.await.unwrap());
        }
        tokens
    }

    #[tokio::test(start_paused = true)]
    async fn one_upstream_call_per_key_for_the_whole_fleet() {
        let store = MemoryStore::new(0);
        let up = FakeEndpoint::new(3600);
        let fleet: Vec<Broker> = (0..3).map(|_| replica(&store, &up, 0, true)).collect();
        let tokens = burst(&fleet, 60, "s3cret", &[]).await;
        assert_eq!(up.calls(), 1, "one Cognito call for three replicas");
        assert!(tokens.iter().all(|t| *t == tokens[0]));
        let narrow = burst(&fleet, 60, "s3cret", &["orders/read"]).await;
        assert_eq!(up.calls(), 2, "one more for the other key");
        assert!(narrow.iter().all(|t| *t == narrow[0]) && narrow[0] != tokens[0]);
    }

    /// Replica B takes the lock after replica A released it, without having
    /// seen A's entry or A's proof: it must look again and find both.
    #[tokio::test(start_paused = true)]
    async fn the_lock_holder_looks_again_before_calling_cognito() {
        let store = MemoryStore::new(0);
        let up = FakeEndpoint::new(3600);
        let a = replica(&store, &up, 0, false);
        let b = replica(&store, &up, 0, false);
        let first = a.get_token(&creds("s3cret"), &[]).await.unwrap();
        let second = b.get_token(&creds("s3cret"), &[]).await.unwrap();
        assert_eq!(second.access_token.expose(), first.access_token.expose());
        assert_eq!(up.calls(), 1, "no second Cognito call");
        assert_eq!(
            store.locks_taken.load(Ordering::SeqCst),
            2,
            "B took the lock"
        );
        assert_eq!(
            b.get_token(&creds("wrong-secret"), &[]).await.unwrap_err(),
            BrokerError::InvalidClient,
            "a wrong secret gets nothing from the fleet's entry"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn proofs_and_refusals_reach_every_replica() {
        let store = MemoryStore::new(0);
        let up = FakeEndpoint::new(3600);
        let a = replica(&store, &up, 0, true);
        let b = replica(&store, &up, 0, true);
        settle("both subscribed", || true).await;
        a.get_token(&creds("s3cret"), &[]).await.unwrap();
        settle("B learns A's proof", || b.proven_secrets() == 1).await;
        b.get_token(&creds("s3cret"), &[]).await.unwrap();
        assert_eq!(
            up.calls(),
            1,
            "B serves the fleet's entry to the proven secret"
        );

        // Cognito deletes the secret; A presents it upstream and is refused.
        up.set_secrets(&["rotated"]);
        let refused = a
            .get_token(&creds("s3cret"), &scopes(&["orders/write"]))
            .await;
        assert_eq!(refused.unwrap_err(), BrokerError::InvalidClient);
        settle("B learns the refusal", || b.proven_secrets() == 0).await;
        assert_eq!(
            b.get_token(&creds("s3cret"), &[]).await.unwrap_err(),
            BrokerError::InvalidClient,
            "no longer served from the cache"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cache_hit_never_touches_the_store() {
        let store = MemoryStore::new(1);
        let up = FakeEndpoint::new(3600);
        let a = replica(&store, &up, 1, false);
        a.get_token(&creds("s3cret"), &[]).await.unwrap();
        let before = store.calls.load(Ordering::SeqCst);
        for _ in 0..100 {
            a.get_token(&creds("s3cret"), &[]).await.unwrap();
            a.get_token(&creds("s3cret"), &scopes(&["orders/write", "orders/read"]))
                .await
                .unwrap();
        }
        assert_eq!(
            store.calls.load(Ordering::SeqCst),
            before,
            "hits stay in the process"
        );
        assert_eq!(up.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_fleet_keeps_one_upstream_schedule() {
        let store = MemoryStore::new(1);
        let up = FakeEndpoint::new(3600);
        let a = replica(&store, &up, 1, true);
        let b = replica(&store, &up, 1, true);
        a.get_token(&creds("s3cret"), &scopes(&["orders/read"]))
            .await
            .unwrap();
        // B's own schedule would be free; the fleet's next slot is a second away.
        let err = b
            .get_token(&creds("s3cret"), &scopes(&["orders/write"]))
            .await
            .unwrap_err();
        assert!(matches!(err, BrokerError::UpstreamBudget { .. }), "{err:?}");
        assert_eq!(up.calls(), 1);
    }

    /// Strangers cycling wrong secrets over client ids draw on a tenth of the
    /// budget, counted for the whole fleet; proven clients keep the rest.
    #[tokio::test(start_paused = true)]
    async fn strangers_cannot_spend_the_fleets_budget() {
        let store = MemoryStore::new(10);
        let up = FakeEndpoint::new(3600);
        let a = replica(&store, &up, 10, true);
        let b = replica(&store, &up, 10, true);
        a.get_token(&creds("s3cret"), &scopes(&["orders/read"]))
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        let stranger = |i: u8| Some(std::net::IpAddr::from([127, 0, 9, i]));
        // One unproven attempt a second for the fleet: A's takes it, B's waits
        // beyond the longest wait (100 ms) and is refused.
        let first = a
            .get_token_from(&creds("guess-1"), &[], stranger(1))
            .await
            .unwrap_err();
        assert_eq!(first, BrokerError::InvalidClient, "asked of Cognito");
        let second = b
            .get_token_from(&creds("guess-2"), &[], stranger(2))
            .await
            .unwrap_err();
        assert!(
            matches!(second, BrokerError::UpstreamBudget { .. }),
            "{second:?}"
        );
        // The proven owner's new scope set is admitted at once.
        let calls = up.calls();
        b.get_token(&creds("s3cret"), &scopes(&["orders/write"]))
            .await
            .expect("the budget was not spent");
        assert_eq!(up.calls(), calls + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_that_is_down_leaves_each_replica_on_its_own() {
        let store = MemoryStore::new(0);
        store.set_up(false);
        let up = FakeEndpoint::new(3600);
        let fleet: Vec<Broker> = (0..3).map(|_| replica(&store, &up, 0, true)).collect();
        let tokens = burst(&fleet, 30, "s3cret", &[]).await;
        assert_eq!(up.calls(), 3, "one call per replica, none refused");
        assert_eq!(tokens.len(), 30);
    }
}
