//! Gateway + emulator over loopback with a real tonic client.

mod support;

use std::time::Duration;

use base64::{Engine as _, engine::general_purpose::STANDARD};
use m2m_gateway::{
    emulator::EmulatorClient,
    proto::gateway::v1::{GetTokenRequest, Rejection, ValidateRequest},
};
use support::*;
use tonic::{Code, Request};

fn get(id: &str, secret: &str, scopes: &[&str]) -> GetTokenRequest {
    GetTokenRequest {
        client_id: id.into(),
        client_secret: secret.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
    }
}

fn validate(token: &str, scopes: &[&str]) -> ValidateRequest {
    ValidateRequest {
        token: token.into(),
        required_scopes: scopes.iter().map(|s| s.to_string()).collect(),
    }
}

#[tokio::test]
async fn get_token_then_validate_round_trip() {
    let emu = emulator(vec![]).await;
    let gw = TestGateway::start(config(&emu, &[client_a()]))
        .await
        .ready()
        .await;
    let mut c = gw.client().await;

    let t = c
        .get_token(get(CLIENT, SECRET, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.token_type, "Bearer");
    assert_eq!(t.scopes, vec!["orders/read", "orders/write"]);
    assert!((3590..=3600).contains(&t.expires_in), "{}", t.expires_in);

    let v = c
        .validate(validate(
            &format!("Bearer {}", t.access_token),
            &["orders/read"],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(v.valid, "{}", v.detail);
    assert_eq!(v.rejection, Rejection::Unspecified as i32);
    let claims = v.claims.unwrap().into_inner();
    assert_eq!(claims.client_id, CLIENT);
    assert_eq!(claims.subject, CLIENT);
    assert_eq!(claims.issuer, emu.issuer());
    assert_eq!(claims.token_use, "access");
    assert!(claims.expires_at > claims.issued_at);
    let all = claims.all.unwrap().fields;
    assert!(
        all.contains_key("version") && all.contains_key("auth_time") && all.contains_key("jti")
    );

    // Cached: the second call makes no upstream request and returns the same token.
    let again = c
        .get_token(get(CLIENT, SECRET, &["orders/write", "orders/read"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.access_token, t.access_token);
    assert_eq!(emu.token_requests(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn basic_metadata_form_works_and_conflicts_are_refused() {
    let emu = emulator(vec![]).await;
    let gw = TestGateway::start(config(&emu, &[client_a()]))
        .await
        .ready()
        .await;
    let mut c = gw.client().await;
    let basic = format!("Basic {}", STANDARD.encode(format!("{CLIENT}:{SECRET}")));

    let mut req = Request::new(get("", "", &["orders/read"]));
    req.metadata_mut()
        .insert("authorization", basic.parse().unwrap());
    let t = c.get_token(req).await.unwrap().into_inner();
    assert_eq!(t.scopes, vec!["orders/read"]);

    let mut req = Request::new(get("someone-else", "x", &[]));
    req.metadata_mut()
        .insert("authorization", basic.parse().unwrap());
    assert_eq!(
        c.get_token(req).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let mut req = Request::new(get("", "", &[]));
    req.metadata_mut()
        .insert("authorization", "Basic %%%".parse().unwrap());
    assert_eq!(
        c.get_token(req).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn each_error_surfaces_with_its_status() {
    // no-grant: registered here, but the grant is disabled in the pool.
    let mut no_grant = EmulatorClient::new("no-grant", "s", &["orders/read"]);
    no_grant.grant_enabled = false;
    // narrow: the gateway allows orders/write, the pool does not assign it.
    let narrow_pool = EmulatorClient::new("narrow", "s", &["orders/read"]);
    let narrow_registry = EmulatorClient::new("narrow", "s", &["orders/read", "orders/write"]);
    let emu = emulator(vec![no_grant.clone(), narrow_pool]).await;
    let gw = TestGateway::start(config(&emu, &[client_a(), no_grant, narrow_registry]))
        .await
        .ready()
        .await;
    let mut c = gw.client().await;

    let unknown = c.get_token(get("nobody", SECRET, &[])).await.unwrap_err();
    let wrong = c.get_token(get(CLIENT, "wrong", &[])).await.unwrap_err();
    let missing = c.get_token(get("", "", &[])).await.unwrap_err();
    for s in [&unknown, &wrong, &missing] {
        assert_eq!(s.code(), Code::Unauthenticated);
        assert_eq!(
            s.message(),
            unknown.message(),
            "one message: no client enumeration"
        );
    }
    let before = emu.token_requests();
    // Before its secret is proven, a scope the client may not ask is refused
    // like an unknown client: nothing is learnt about the client.
    let hidden = c
        .get_token(get(CLIENT, SECRET, &["orders/delete"]))
        .await
        .unwrap_err();
    assert_eq!(hidden.code(), Code::Unauthenticated);
    assert_eq!(hidden.message(), unknown.message());
    c.get_token(get(CLIENT, SECRET, &[])).await.unwrap();
    let before = before + 1;
    assert_eq!(emu.token_requests(), before);
    let denied = c
        .get_token(get(CLIENT, SECRET, &["orders/delete"]))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let bad = c
        .get_token(get(CLIENT, SECRET, &["orders read"]))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(
        emu.token_requests(),
        before,
        "refused without an upstream call"
    );

    let s = c.get_token(get("no-grant", "s", &[])).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    let s = c
        .get_token(get("narrow", "s", &["orders/write"]))
        .await
        .unwrap_err();
    assert_eq!(
        s.code(),
        Code::PermissionDenied,
        "Cognito invalid_scope: {s:?}"
    );

    let s = c.validate(validate("", &[])).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let v = c
        .validate(validate("not.a.jwt", &[]))
        .await
        .unwrap()
        .into_inner();
    assert!(!v.valid);
    assert_eq!(v.rejection, Rejection::Malformed as i32);
    assert!(!v.detail.contains("not.a.jwt"));

    let t = c
        .get_token(get(CLIENT, SECRET, &["orders/read"]))
        .await
        .unwrap()
        .into_inner();
    let v = c
        .validate(validate(&t.access_token, &["orders/write"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.rejection, Rejection::InsufficientScope as i32);
    assert!(v.claims.is_none());

    // A token of a client the gateway does not register.
    let foreign = emu.issue("no-such-client", &["orders/read".into()]);
    let v = c
        .validate(validate(&foreign, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.rejection, Rejection::ClientNotAllowed as i32);

    // Cognito gone: UNAVAILABLE.
    emu.shutdown().await;
    let s = c
        .get_token(get(CLIENT, SECRET, &["orders/write"]))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
}

#[tokio::test]
async fn key_rotation_during_traffic() {
    let emu = emulator(vec![]).await;
    let gw = TestGateway::start(config(&emu, &[client_a()]))
        .await
        .ready()
        .await;
    let c = gw.client().await;
    let old = emu.issue(CLIENT, &["orders/read".into()]);

    // Traffic with the old key keeps flowing while the pool rotates.
    let mut traffic = Vec::new();
    for _ in 0..8 {
        let mut c = c.clone();
        let token = old.clone();
        traffic.push(tokio::spawn(async move {
            for _ in 0..25 {
                let v = c
                    .validate(validate(&token, &[]))
                    .await
                    .unwrap()
                    .into_inner();
                assert!(v.valid, "{}", v.detail);
            }
        }));
    }
    let new_kid = emu.rotate_key();
    let fresh = emu.issue(CLIENT, &["orders/read".into()]);
    let mut c2 = c.clone();
    let v = c2
        .validate(validate(&fresh, &[]))
        .await
        .unwrap()
        .into_inner();
    assert!(
        v.valid,
        "a new kid is picked up by one refetch: {}",
        v.detail
    );
    assert!(gw.gateway.validator.keys().kids().contains(&new_kid));
    for t in traffic {
        t.await.unwrap();
    }
    // A second rotation inside the cool-down is not fetched yet: no refetch storm.
    emu.rotate_key();
    let newest = emu.issue(CLIENT, &[]);
    let v = c2
        .validate(validate(&newest, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.rejection, Rejection::UnknownKey as i32);
    assert_eq!(
        gw.gateway
            .validator
            .keys()
            .stats()
            .snapshot()
            .refetch_suppressed,
        1
    );
}

#[tokio::test]
async fn hung_cognito_answers_the_caller_within_the_timeout() {
    let (addr, _accepted) = silent_upstream().await;
    let emu = emulator(vec![]).await;
    let mut cfg = config(&emu, &[client_a()]);
    cfg.cognito.as_mut().unwrap().token_endpoint = Some(format!("http://{addr}/oauth2/token"));
    cfg.cognito.as_mut().unwrap().timeout_ms = 300;
    let gw = TestGateway::start(cfg).await.ready().await;
    let mut c = gw.client().await;
    let started = std::time::Instant::now();
    let s = c.get_token(get(CLIENT, SECRET, &[])).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn caller_deadline_bounds_a_hung_cognito() {
    let (addr, _accepted) = silent_upstream().await;
    let emu = emulator(vec![]).await;
    let mut cfg = config(&emu, &[client_a()]);
    cfg.cognito.as_mut().unwrap().token_endpoint = Some(format!("http://{addr}/oauth2/token"));
    cfg.cognito.as_mut().unwrap().timeout_ms = 60_000;
    let gw = TestGateway::start(cfg).await.ready().await;
    let mut c = gw.client().await;
    let mut req = Request::new(get(CLIENT, SECRET, &[]));
    req.set_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let s = c.get_token(req).await.unwrap_err();
    assert!(
        matches!(s.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{s:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
