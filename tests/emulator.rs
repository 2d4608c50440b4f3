//! The emulator's token endpoint, JWKS and discovery document behave like a
//! Cognito user pool's, errors included.

mod support;

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use m2m_gateway::emulator::EmulatorClient;
use serde_json::Value;
use support::*;

async fn post(
    url: &str,
    auth: Option<(&str, &str)>,
    content_type: &str,
    body: &str,
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(url)
        .header("content-type", content_type)
        .body(body.to_owned());
    if let Some((id, secret)) = auth {
        req = req.basic_auth(id, Some(secret));
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

const FORM: &str = "application/x-www-form-urlencoded";

#[tokio::test]
async fn token_endpoint_follows_cognito() {
    let mut no_grant = EmulatorClient::new("no-grant", "s", &["orders/read"]);
    no_grant.grant_enabled = false;
    let emu = emulator(vec![no_grant]).await;
    let url = emu.token_endpoint();
    let basic = Some((CLIENT, SECRET));

    let (status, ok) = post(&url, basic, FORM, "grant_type=client_credentials").await;
    assert_eq!(status, 200);
    let token = ok["access_token"].as_str().unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    assert_eq!(header["alg"], "RS256");
    assert!(header["kid"].is_string());
    let mut names: Vec<&str> = claims
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "auth_time",
            "client_id",
            "exp",
            "iat",
            "iss",
            "jti",
            "scope",
            "sub",
            "token_use",
            "version"
        ]
    );
    assert_eq!(
        claims["scope"], "orders/read orders/write",
        "absent scope = all of the client's"
    );
    assert_eq!(claims["sub"], CLIENT);
    assert_eq!(claims["token_use"], "access");
    assert_eq!(claims["version"], 2);
    assert_eq!(claims["iss"], emu.issuer());

    // Credentials in the body work too.
    let body = format!(
        "grant_type=client_credentials&client_id={CLIENT}&client_secret={SECRET}&scope=orders%2Fread"
    );
    let (status, ok) = post(&url, None, FORM, &body).await;
    assert_eq!(status, 200, "{ok}");

    for (auth, content_type, body, want) in [
        (basic, "application/json", "{}", "invalid_request"),
        (basic, FORM, "scope=orders%2Fread", "invalid_request"),
        (basic, FORM, "grant_type=password", "unsupported_grant_type"),
        (
            Some((CLIENT, "wrong")),
            FORM,
            "grant_type=client_credentials",
            "invalid_client",
        ),
        (
            None,
            FORM,
            "grant_type=client_credentials",
            "invalid_client",
        ),
        (
            Some(("no-grant", "s")),
            FORM,
            "grant_type=client_credentials",
            "unauthorized_client",
        ),
        (
            basic,
            FORM,
            "grant_type=client_credentials&scope=orders%2Fadmin",
            "invalid_scope",
        ),
    ] {
        let (status, err) = post(&url, auth, content_type, body).await;
        assert_eq!((status, err["error"].as_str()), (400, Some(want)), "{body}");
    }
}

#[tokio::test]
async fn jwks_and_discovery() {
    let emu = emulator(vec![]).await;
    let jwks: Value = reqwest::get(emu.jwks_uri())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = &jwks["keys"][0];
    assert_eq!(
        (
            key["kty"].as_str(),
            key["alg"].as_str(),
            key["use"].as_str()
        ),
        (Some("RSA"), Some("RS256"), Some("sig"))
    );
    let discovery: Value =
        reqwest::get(format!("{}/.well-known/openid-configuration", emu.issuer()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(discovery["issuer"], emu.issuer());
    assert_eq!(discovery["jwks_uri"], emu.jwks_uri());
    assert_eq!(discovery["token_endpoint"], emu.token_endpoint());
    let other = reqwest::get(emu.jwks_uri().replace(emu.pool_id(), "us-east-1_Other"))
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    // Rotation publishes the new key beside the old one.
    let kid = emu.rotate_key();
    let jwks: Value = reqwest::get(emu.jwks_uri())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids.len(), 2);
    assert!(kids.contains(&kid.as_str()));
}

/// Each key is named by its RFC 7638 thumbprint: a restarted emulator (a new
/// key) is picked up by a running validator through the unknown-kid refetch,
/// instead of its tokens failing as bad signatures under the old key's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_emulator_is_picked_up_by_a_running_validator() {
    use m2m_gateway::{
        emulator::{Emulator, EmulatorConfig},
        jwt::CognitoValidator,
    };
    let first = emulator(vec![]).await;
    let addr = first.addr();
    let jwks: Value = reqwest::get(first.jwks_uri())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = &jwks["keys"][0];
    // The kid is the thumbprint of (e, kty, n), recomputed here by hand.
    let canonical = format!(
        r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
        key["e"].as_str().unwrap(),
        key["n"].as_str().unwrap()
    );
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.as_bytes());
    assert_eq!(key["kid"], URL_SAFE_NO_PAD.encode(digest));
    let validator = CognitoValidator::builder()
        .issuer(first.issuer())
        .clients([CLIENT])
        .build()
        .unwrap();
    let scopes = ["orders/read".to_owned()];
    let before = first.issue(CLIENT, &scopes);
    validator.validate(&before, &[]).await.unwrap();
    let pool_id = first.pool_id().to_owned();
    first.shutdown().await;

    let second = Emulator::start(
        addr,
        EmulatorConfig {
            pool_id,
            clients: vec![client_a()],
            ..EmulatorConfig::default()
        },
    )
    .await
    .unwrap();
    let after = second.issue(CLIENT, &scopes);
    let claims = validator.validate(&after, &[]).await.unwrap();
    assert_eq!(claims.client_id(), CLIENT);
    // A rotation inside one run gets a new name too.
    let rotated = second.rotate_key();
    assert_ne!(rotated, key["kid"].as_str().unwrap());
    second.shutdown().await;
}
