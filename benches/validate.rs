//! Validation hot path: full verification of a Cognito-shaped RS256 access token,
//! against the bare RSA check and jsonwebtoken's `decode` on the same token.

use std::{hint::black_box, sync::Arc, time::Duration};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use criterion::{Criterion, criterion_group, criterion_main};
use m2m_gateway::{
    emulator::SigningKey,
    jwt::{CognitoValidator, KeySet, StaticJwks, ValidatorSettings, VerifyingKey},
    proto::gateway::v1 as pb,
    revocations::{RevocationList, Revocations},
};
use serde_json::json;

const ISS: &str = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Bench0001";

fn cognito_claims() -> serde_json::Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    json!({
        "sub": "k6h0hnjenh7auvi2as",
        "token_use": "access",
        "scope": "orders/read orders/write",
        "auth_time": now,
        "iss": ISS,
        "exp": now + 3600,
        "iat": now,
        "version": 2,
        "jti": "7f9c1a2e-9d3b-4c55-8a1e-2f6b3c4d5e6f",
        "client_id": "k6h0hnjenh7auvi2as",
    })
}

fn bench(c: &mut Criterion) {
    let key = SigningKey::generate("bench-key");
    let token = key.sign(&cognito_claims());
    let jwk = key.jwk();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let keys = Arc::new(KeySet::new(
        ISS,
        Arc::new(StaticJwks::new(
            json!({"keys": [jwk.clone()]}).to_string().into_bytes(),
        )),
        Duration::from_secs(10),
    ));
    rt.block_on(keys.refresh()).unwrap();
    // First-seen: the verified-token cache off, so every call does the full check.
    let validator = CognitoValidator::new(
        ISS,
        ["k6h0hnjenh7auvi2as".to_string()],
        keys.clone(),
        ValidatorSettings {
            verified_cache_size: 0,
            ..ValidatorSettings::default()
        },
    );
    let cached = CognitoValidator::new(
        ISS,
        ["k6h0hnjenh7auvi2as".to_string()],
        keys,
        ValidatorSettings::default(),
    );
    // The kill switch: the same cache hit with a shared revocation list, empty
    // (the common case: one atomic load) and holding 1,000 other clients and
    // 1,000 other tokens (a map lookup of each).
    let revocations = Revocations::default();
    let watched_empty = cached.clone().with_revocations(revocations);
    let mut many = RevocationList::new();
    for i in 0..1000 {
        many.revoke_client(&format!("other-client-{i}"), 1, 86_400, "bench", "bench");
        many.revoke_token(&format!("other-jti-{i}"), 1, u64::MAX, "bench", "bench");
    }
    let watched_many = cached.clone().with_revocations(Revocations::new(many));
    let required = vec!["orders/read".to_string()];
    assert!(validator.validate_loaded(&token, &required).is_ok());
    assert!(watched_empty.validate_loaded(&token, &required).is_ok());
    assert!(watched_many.validate_loaded(&token, &required).is_ok());
    assert!(cached.validate_loaded(&token, &required).is_ok());

    let mut g = c.benchmark_group("validate");
    g.bench_function("full_first_seen", |b| {
        b.iter(|| validator.validate_loaded(black_box(&token), black_box(&required)))
    });
    g.bench_function("seen_before", |b| {
        b.iter(|| cached.validate_loaded(black_box(&token), black_box(&required)))
    });
    g.bench_function("seen_before_revocations_empty", |b| {
        b.iter(|| watched_empty.validate_loaded(black_box(&token), black_box(&required)))
    });
    g.bench_function("seen_before_revocations_2000", |b| {
        b.iter(|| watched_many.validate_loaded(black_box(&token), black_box(&required)))
    });

    let (input, sig) = token.rsplit_once('.').unwrap();
    let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
    let n = URL_SAFE_NO_PAD.decode(jwk["n"].as_str().unwrap()).unwrap();
    let e = URL_SAFE_NO_PAD.decode(jwk["e"].as_str().unwrap()).unwrap();
    let vk = VerifyingKey::from_components("bench-key", Some("RS256"), &n, &e).unwrap();
    g.bench_function("rsa_verify_only", |b| {
        b.iter(|| assert!(vk.verify(black_box(input.as_bytes()), black_box(&sig))))
    });

    let dk = jsonwebtoken::DecodingKey::from_rsa_components(
        jwk["n"].as_str().unwrap(),
        jwk["e"].as_str().unwrap(),
    )
    .unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.set_issuer(&[ISS]);
    v.validate_aud = false;
    g.bench_function("jsonwebtoken_decode", |b| {
        b.iter(|| jsonwebtoken::decode::<serde_json::Value>(black_box(&token), &dk, &v).unwrap())
    });
    g.finish();

    // Validate's answer for a verified token: the claims as the proto answer
    // (converted once per token) and prost's encoding of the whole answer, as the
    // generated server does it for every call.
    let claims = cached.validate_loaded(&token, &required).unwrap();
    let mut g = c.benchmark_group("answer");
    let mut buf = Vec::with_capacity(1024);
    g.bench_function("validate_build_and_encode", |b| {
        b.iter(|| {
            use prost::Message as _;
            let answer = pb::ValidateResponse {
                valid: true,
                rejection: pb::Rejection::Unspecified as i32,
                detail: String::new(),
                claims: Some(black_box(&claims).to_proto()),
            };
            buf.clear();
            answer.encode(&mut buf).unwrap();
            black_box(buf.len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
