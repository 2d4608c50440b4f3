//! Mints one Cognito-shaped RS256 access token with a fresh key and prints it with
//! its JWKS as JSON: the input of `benches/aws-jwt-verify.sh`, which verifies the
//! same token with AWS's Node verifier and with this crate.
//!
//! ```sh
//! cargo run --release --example mint_token > /tmp/token.json
//! ```

use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant},
};

use m2m_gateway::{
    emulator::SigningKey,
    jwt::{CognitoValidator, KeySet, StaticJwks, ValidatorSettings},
};
use serde_json::json;

const POOL: &str = "us-east-1_Bench0001";
const CLIENT: &str = "k6h0hnjenh7auvi2as";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let issuer = format!("https://cognito-idp.us-east-1.amazonaws.com/{POOL}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let key = SigningKey::generate("bench-key");
    let token = key.sign(&json!({
        "sub": CLIENT, "token_use": "access", "scope": "orders/read orders/write",
        "auth_time": now, "iss": issuer, "exp": now + 3600, "iat": now, "version": 2,
        "jti": "7f9c1a2e-9d3b-4c55-8a1e-2f6b3c4d5e6f", "client_id": CLIENT,
    }));
    let jwks = json!({"keys": [key.jwk()]});

    // The same token through this crate, first-seen path (verified-token cache off),
    // timed the same way as the Node script: median of rounds of 2,000.
    let keys = Arc::new(KeySet::new(
        &issuer,
        Arc::new(StaticJwks::new(jwks.to_string().into_bytes())),
        Duration::from_secs(10),
    ));
    keys.refresh().await?;
    let validator = CognitoValidator::new(
        issuer.clone(),
        [CLIENT.to_string()],
        keys,
        ValidatorSettings {
            verified_cache_size: 0,
            ..ValidatorSettings::default()
        },
    );
    let required = vec!["orders/read".to_string()];
    validator.validate_loaded(&token, &required)?;
    let mut rounds = Vec::new();
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        let start = Instant::now();
        for _ in 0..2000 {
            black_box(validator.validate_loaded(black_box(&token), &required))?;
        }
        rounds.push(start.elapsed().as_secs_f64() * 1e6 / 2000.0);
    }
    rounds.sort_by(f64::total_cmp);
    let median = rounds[rounds.len() / 2];
    eprintln!(
        "{}",
        json!({"verifier": "m2m-gateway CognitoValidator", "median_us": (median * 100.0).round() / 100.0, "ops_per_sec": (1e6 / median).round(), "rounds": rounds.len()})
    );
    println!(
        "{}",
        json!({"token": token, "jwks": jwks, "user_pool_id": POOL, "client_id": CLIENT})
    );
    Ok(())
}
