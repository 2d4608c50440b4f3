//! Resident memory with 100,000 cached verifications and 10,000 cached GetToken
//! entries (1,000 clients × 10 scope sets, Cognito-sized tokens), then with the
//! gRPC service's kept answers full, read from /proc/self/status (Linux).
//!
//! ```sh
//! cargo run --release --example memory
//! ```

use std::{sync::Arc, time::Duration};

use futures_util::future::BoxFuture;
use m2m_gateway::{
    broker::{
        AccessToken, Broker, BrokerSettings, Credentials, TokenEndpoint, TokenResponse,
        UpstreamError,
    },
    config::ClientConfig,
    emulator::SigningKey,
    jwt::{CognitoValidator, KeySet, StaticJwks, ValidatorSettings},
    proto::gateway::v1::{GetTokenRequest, ValidateRequest, gateway_server::Gateway as _},
    registry::Registry,
    service::GatewayService,
};
use secrecy::SecretString;
use serde_json::json;

const ISS: &str = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Memory001";
const VERIFICATIONS: usize = 100_000;
/// 1,000 clients × 10 scope sets = 10,000 GetToken entries.
const CLIENTS: usize = 1_000;
const SCOPE_SETS: [&[&str]; 10] = [
    &["s/a"],
    &["s/b"],
    &["s/c"],
    &["s/d"],
    &["s/a", "s/b"],
    &["s/a", "s/c"],
    &["s/a", "s/d"],
    &["s/b", "s/c"],
    &["s/b", "s/d"],
    &["s/a", "s/b", "s/c", "s/d"],
];

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Answers every grant with a distinct Cognito-sized (~850-byte) JWT-shaped token.
struct SizedTokens(SigningKey);
impl TokenEndpoint for SizedTokens {
    fn client_credentials<'a>(
        &'a self,
        client_id: &'a str,
        _: &'a SecretString,
        scope: &'a str,
    ) -> BoxFuture<'a, Result<TokenResponse, UpstreamError>> {
        let token = format!(
            "eyJraWQiOiJtZW1vcnkta2V5IiwiYWxnIjoiUlMyNTYifQ.{}.{}",
            base64_json(
                &json!({"sub": client_id, "client_id": client_id, "scope": scope, "token_use": "access", "iss": ISS, "version": 2, "jti": "00000000-0000-4000-8000-000000000000", "exp": 1, "iat": 1, "auth_time": 1})
            ),
            "A".repeat(342)
        );
        let _ = &self.0;
        Box::pin(async move {
            Ok(TokenResponse {
                access_token: AccessToken::new(token),
                expires_in: 3600,
            })
        })
    }
    fn describe(&self) -> String {
        "sized".into()
    }
}

fn base64_json(v: &serde_json::Value) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let key = SigningKey::generate("memory-key");
    let keys = Arc::new(KeySet::new(
        ISS,
        Arc::new(StaticJwks::new(
            json!({"keys": [key.jwk()]}).to_string().into_bytes(),
        )),
        Duration::from_secs(10),
    ));
    rt.block_on(keys.refresh())?;
    let validator = CognitoValidator::new(
        ISS,
        ["k6h0hnjenh7auvi2as".to_string()],
        keys,
        ValidatorSettings::default(),
    );
    let start = rss_mib();
    println!("baseline: {start:.1} MiB");

    // Distinct tokens, each validated once (cached) and dropped; signing is the
    // slow part, so two threads share it.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    std::thread::scope(|s| {
        for t in 0..2 {
            let (validator, key) = (&validator, &key);
            s.spawn(move || {
                for i in (t..VERIFICATIONS).step_by(2) {
                    let token = key.sign(&json!({
                        "sub": "k6h0hnjenh7auvi2as", "token_use": "access", "scope": "orders/read orders/write",
                        "auth_time": now, "iss": ISS, "exp": now + 3600, "iat": now, "version": 2,
                        "jti": format!("7f9c1a2e-9d3b-4c55-8a1e-{i:012}"), "client_id": "k6h0hnjenh7auvi2as",
                    }));
                    validator.validate_loaded(&token, &[]).expect("valid");
                }
            });
        }
    });
    let cached = validator.cached_verifications();
    let after_verify = rss_mib();
    println!(
        "after {cached} cached verifications: {after_verify:.1} MiB (+{:.1} MiB, {:.0} bytes each)",
        after_verify - start,
        (after_verify - start) * 1048576.0 / cached as f64
    );

    let clients: Vec<ClientConfig> = (0..CLIENTS)
        .map(|i| ClientConfig {
            client_id: format!("client{i:05}abcdefghijk"),
            pool: None,
            name: format!("client {i}"),
            allowed_scopes: ["s/a", "s/b", "s/c", "s/d"].map(String::from).to_vec(),
        })
        .collect();
    let broker = Broker::new(
        Registry::new(&clients, 50),
        Arc::new(SizedTokens(SigningKey::generate("broker-key"))),
        BrokerSettings::default(),
    );
    let before_broker = rss_mib();
    rt.block_on(async {
        for c in &clients {
            let creds = Credentials {
                client_id: c.client_id.clone(),
                secret: SecretString::from(
                    "1example23456789abcdefghijklmnopqrstuvwxyz0123456".to_owned(),
                ),
            };
            for set in SCOPE_SETS {
                let scopes: Vec<String> = set.iter().map(|s| s.to_string()).collect();
                broker.get_token(&creds, &scopes).await.expect("token");
            }
        }
    });
    let after_broker = rss_mib();
    let entries = (CLIENTS * SCOPE_SETS.len()) as u64;
    assert!(
        broker.cached_entries() > entries * 9 / 10,
        "entries were cached"
    );
    println!(
        "after {entries} cached GetToken entries: {after_broker:.1} MiB (+{:.1} MiB, {:.0} bytes each)",
        after_broker - before_broker,
        (after_broker - before_broker) * 1048576.0 / entries as f64
    );

    // The service keeps encoded answers for recent tokens (512 per
    // method): fill both with calls through the gRPC service.
    let service = GatewayService::new(broker.clone(), validator.clone());
    rt.block_on(async {
        for i in 0..2_000 {
            let token = key.sign(&json!({
                "sub": "k6h0hnjenh7auvi2as", "token_use": "access", "scope": "orders/read orders/write",
                "auth_time": now, "iss": ISS, "exp": now + 3600, "iat": now, "version": 2,
                "jti": format!("0d3c5b7a-1e2f-4a6b-9c8d-{i:012}"), "client_id": "k6h0hnjenh7auvi2as",
            }));
            let answer = service
                .validate(tonic::Request::new(ValidateRequest {
                    token,
                    required_scopes: vec![],
                }))
                .await
                .expect("answer");
            assert!(answer.get_ref().valid);
        }
        for c in clients.iter().take(200) {
            for set in SCOPE_SETS {
                service
                    .get_token(tonic::Request::new(GetTokenRequest {
                        client_id: c.client_id.clone(),
                        client_secret: "1example23456789abcdefghijklmnopqrstuvwxyz0123456".into(),
                        scopes: set.iter().map(|s| s.to_string()).collect(),
                    }))
                    .await
                    .expect("token");
            }
        }
    });
    let after_service = rss_mib();
    println!(
        "with the service's kept answers full: {after_service:.1} MiB (+{:.1} MiB, incl. 2,000 more verifications)",
        after_service - after_broker
    );
    println!("total resident: {after_service:.1} MiB");
    Ok(())
}
