//! Validator and key-set tests: every Rejection and the RFC 8725 attack classes.

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use proptest::prelude::*;
use serde_json::{Value, json};

use super::{
    CognitoValidator, JwksError, KeySet, ManualClock, Rejection, ValidatorSettings,
    jwks::tests::ScriptedFetcher,
};
use crate::emulator::SigningKey;

const ISS: &str = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Test123";
const NOW: i64 = 1_800_000_000;

fn key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::generate("key-1"))
}

fn other_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::generate("key-2"))
}

fn jwks(keys: &[&SigningKey]) -> Vec<u8> {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()})
        .to_string()
        .into_bytes()
}

fn claims() -> Value {
    json!({
        "sub": "client-a",
        "token_use": "access",
        "scope": "orders/read orders/write",
        "auth_time": NOW - 10,
        "iss": ISS,
        "exp": NOW + 3600,
        "iat": NOW - 10,
        "version": 2,
        "jti": "4b7e0f6e-0000-4000-8000-000000000001",
        "client_id": "client-a",
        "custom": {"tenant": "t1"}
    })
}

fn with(mut base: Value, name: &str, value: Value) -> Value {
    base[name] = value;
    base
}

fn without(mut base: Value, name: &str) -> Value {
    base.as_object_mut().unwrap().remove(name);
    base
}

struct Fixture {
    validator: CognitoValidator,
    fetcher: Arc<ScriptedFetcher>,
    clock: ManualClock,
}

/// A validator for ISS over `keys`, accepting client-a, at NOW.
fn validator_at_now(keys: Arc<KeySet>) -> CognitoValidator {
    CognitoValidator::new(
        ISS,
        ["client-a".to_string()],
        keys,
        ValidatorSettings::default(),
    )
    .with_clock(Arc::new(ManualClock::new(NOW)))
}

/// A validator of `ISS` trusting `client-a`, its keys loaded from `fetcher`,
/// reading `clock`.
pub(crate) async fn loaded_validator(
    fetcher: Arc<dyn crate::jwt::JwksFetcher>,
    clock: &ManualClock,
) -> CognitoValidator {
    let keys = Arc::new(KeySet::new(ISS, fetcher, Duration::from_secs(10)));
    keys.refresh().await.unwrap();
    CognitoValidator::new(
        ISS,
        ["client-a".to_string()],
        keys,
        ValidatorSettings::default(),
    )
    .with_clock(Arc::new(clock.clone()))
}

async fn fixture() -> Fixture {
    let fetcher = ScriptedFetcher::new(Ok(jwks(&[key()])));
    let clock = ManualClock::new(NOW);
    let validator = loaded_validator(fetcher.clone(), &clock).await;
    Fixture {
        validator,
        fetcher,
        clock,
    }
}

async fn rejection(f: &Fixture, token: &str) -> Rejection {
    match f.validator.validate(token, &[]).await {
        Ok(_) => panic!("token accepted"),
        Err(e) => {
            assert!(
                token.len() < 8 || !e.detail.contains(token),
                "detail echoes the token"
            );
            e.rejection
        }
    }
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test]
async fn valid_token_yields_claims() {
    let f = fixture().await;
    let token = key().sign(&claims());
    let c = f
        .validator
        .validate(&token, &["orders/read".into()])
        .await
        .unwrap();
    assert_eq!(c.client_id(), "client-a");
    assert_eq!(c.subject(), "client-a");
    assert_eq!(c.issuer(), ISS);
    assert_eq!(
        c.scopes().collect::<Vec<_>>(),
        vec!["orders/read", "orders/write"]
    );
    assert_eq!(c.token_use(), "access");
    assert_eq!(c.expires_at(), NOW + 3600);
    assert_eq!(c.issued_at(), NOW - 10);
    assert_eq!(c.jti(), "4b7e0f6e-0000-4000-8000-000000000001");
    let all = c.all();
    assert_eq!(all["custom"]["tenant"], "t1");
    assert_eq!(all["version"], 2);
}

#[tokio::test]
async fn alg_none_and_other_algs_are_unsupported() {
    let f = fixture().await;
    let body = b64(&claims());
    for alg in ["none", "None", "HS256", "RS384", "PS256", "ES256", ""] {
        let header = json!({"alg": alg, "kid": "key-1"});
        let token = format!("{}.{body}.c2ln", b64(&header));
        assert_eq!(
            rejection(&f, &token).await,
            Rejection::UnsupportedAlgorithm,
            "{alg}"
        );
    }
    let no_alg = format!("{}.{body}.c2ln", b64(&json!({"kid": "key-1"})));
    assert_eq!(
        rejection(&f, &no_alg).await,
        Rejection::UnsupportedAlgorithm
    );
}

#[tokio::test]
async fn hs256_keyed_with_the_rsa_public_key_is_refused() {
    use aws_lc_rs::hmac;
    let f = fixture().await;
    // The classic confusion attack: HMAC keyed with the public key material.
    let jwk = key().jwk();
    let secret = jwk["n"].as_str().unwrap().as_bytes().to_vec();
    let input = format!(
        "{}.{}",
        b64(&json!({"alg": "HS256", "kid": "key-1"})),
        b64(&claims())
    );
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, &secret),
        input.as_bytes(),
    );
    let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()));
    assert_eq!(rejection(&f, &token).await, Rejection::UnsupportedAlgorithm);
}

#[tokio::test]
async fn header_alg_must_equal_the_jwks_alg() {
    let mut jwk = key().jwk();
    jwk["alg"] = json!("RS512");
    let fetcher = ScriptedFetcher::new(Ok(json!({"keys": [jwk]}).to_string().into_bytes()));
    let keys = Arc::new(KeySet::new(ISS, fetcher, Duration::from_secs(10)));
    keys.refresh().await.unwrap();
    let v = validator_at_now(keys);
    let err = v.validate(&key().sign(&claims()), &[]).await.unwrap_err();
    assert_eq!(err.rejection, Rejection::UnsupportedAlgorithm);
}

#[tokio::test]
async fn missing_unknown_and_hostile_kids_are_unknown_key() {
    let f = fixture().await;
    let no_kid = key().sign_with_header(&json!({"alg": "RS256"}), &claims());
    assert_eq!(rejection(&f, &no_kid).await, Rejection::UnknownKey);
    let unknown = other_key().sign(&claims());
    assert_eq!(rejection(&f, &unknown).await, Rejection::UnknownKey);
    for kid in [
        "".to_string(),
        "../../etc/passwd".into(),
        "key-1\0".into(),
        "' OR 1=1 --".into(),
        "k".repeat(10_000),
    ] {
        let token = key().sign_with_header(&json!({"alg": "RS256", "kid": kid}), &claims());
        let r = rejection(&f, &token).await;
        // A 10k kid makes the token exceed the size limit first.
        assert!(
            matches!(r, Rejection::UnknownKey | Rejection::Malformed),
            "{r:?}"
        );
    }
    let numeric = key().sign_with_header(&json!({"alg": "RS256", "kid": 1}), &claims());
    assert_eq!(rejection(&f, &numeric).await, Rejection::Malformed);
}

#[tokio::test]
async fn jku_x5u_x5c_and_embedded_jwk_are_ignored() {
    let f = fixture().await;
    // Signed by a key the issuer never published, pointing at it by every header.
    let attacker = other_key();
    let header = json!({
        "alg": "RS256",
        "kid": "key-2",
        "jku": "https://attacker.example/jwks.json",
        "x5u": "https://attacker.example/cert.pem",
        "x5c": ["MIIB"],
        "jwk": attacker.jwk(),
    });
    let token = attacker.sign_with_header(&header, &claims());
    assert_eq!(rejection(&f, &token).await, Rejection::UnknownKey);
    // The same headers on a token signed by the real key change nothing.
    let mut header = header;
    header["kid"] = json!("key-1");
    let token = key().sign_with_header(&header, &claims());
    assert!(f.validator.validate(&token, &[]).await.is_ok());
}

#[tokio::test]
async fn unknown_crit_is_refused() {
    let f = fixture().await;
    for crit in [json!(["exp"]), json!(["b64"]), json!([]), json!("x")] {
        let token = key().sign_with_header(
            &json!({"alg": "RS256", "kid": "key-1", "crit": crit, "b64": false}),
            &claims(),
        );
        assert_eq!(rejection(&f, &token).await, Rejection::Malformed);
    }
}

#[tokio::test]
async fn tampered_payload_and_truncated_signature_are_bad_signature() {
    let f = fixture().await;
    let token = key().sign(&claims());
    let (input, sig) = token.rsplit_once('.').unwrap();
    let (header, _) = input.split_once('.').unwrap();
    let forged = format!(
        "{header}.{}.{sig}",
        b64(&with(
            claims(),
            "scope",
            json!("orders/read orders/write admin/all")
        ))
    );
    assert_eq!(rejection(&f, &forged).await, Rejection::BadSignature);
    // 340 base64 characters decode cleanly to 255 bytes: a short, not a garbled, signature.
    let truncated = format!("{input}.{}", &sig[..sig.len() - 2]);
    assert_eq!(rejection(&f, &truncated).await, Rejection::BadSignature);
    let other = other_key().sign(&claims());
    let swapped = format!("{input}.{}", other.rsplit_once('.').unwrap().1);
    assert_eq!(rejection(&f, &swapped).await, Rejection::BadSignature);
}

#[tokio::test]
async fn issuer_token_use_and_client_rules() {
    let f = fixture().await;
    let cases = [
        (
            with(claims(), "iss", json!(format!("{ISS}/"))),
            Rejection::WrongIssuer,
        ),
        (
            with(
                claims(),
                "iss",
                json!("https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Attacker"),
            ),
            Rejection::WrongIssuer,
        ),
        (without(claims(), "iss"), Rejection::WrongIssuer),
        (
            with(claims(), "token_use", json!("id")),
            Rejection::WrongTokenUse,
        ),
        (without(claims(), "token_use"), Rejection::WrongTokenUse),
        (
            with(claims(), "client_id", json!("client-b")),
            Rejection::ClientNotAllowed,
        ),
        (without(claims(), "client_id"), Rejection::ClientNotAllowed),
    ];
    for (c, want) in cases {
        assert_eq!(rejection(&f, &key().sign(&c)).await, want, "{c}");
    }
    // A wrong issuer says which was seen (cut short) and which are trusted.
    let long = format!("https://evil.example/{}", "x".repeat(200));
    let err = f
        .validator
        .validate(&key().sign(&with(claims(), "iss", json!(long))), &[])
        .await
        .unwrap_err();
    assert!(
        err.detail.contains("https://evil.example/xxx"),
        "{}",
        err.detail
    );
    assert!(!err.detail.contains(&long), "the seen issuer is cut short");
    assert!(
        err.detail.contains(&format!("trusted: {ISS}")),
        "{}",
        err.detail
    );
}

#[tokio::test]
async fn expiry_not_before_and_leeway() {
    let f = fixture().await;
    let exp_now = with(claims(), "exp", json!(NOW));
    // Within the 5 s leeway.
    assert!(
        f.validator
            .validate(&key().sign(&exp_now), &[])
            .await
            .is_ok()
    );
    f.clock.advance(5);
    assert_eq!(
        rejection(&f, &key().sign(&exp_now)).await,
        Rejection::Expired
    );
    f.clock.set(NOW);
    let nbf = with(claims(), "nbf", json!(NOW + 60));
    assert_eq!(
        rejection(&f, &key().sign(&nbf)).await,
        Rejection::NotYetValid
    );
    let nbf_in_leeway = with(claims(), "nbf", json!(NOW + 5));
    assert!(
        f.validator
            .validate(&key().sign(&nbf_in_leeway), &[])
            .await
            .is_ok()
    );
    assert_eq!(
        rejection(&f, &key().sign(&without(claims(), "exp"))).await,
        Rejection::Malformed
    );
}

#[tokio::test]
async fn wrong_claim_types_are_malformed_never_coerced() {
    let f = fixture().await;
    for (name, value) in [
        ("exp", json!("1900000000")),
        ("exp", json!(1.9e9)),
        ("nbf", json!(true)),
        ("iat", json!([1])),
        ("iss", json!(1)),
        ("client_id", json!(["client-a"])),
        ("scope", json!(["orders/read"])),
        ("token_use", json!(null)),
    ] {
        assert_eq!(
            rejection(&f, &key().sign(&with(claims(), name, value.clone()))).await,
            Rejection::Malformed,
            "{name}={value}"
        );
    }
}

#[tokio::test]
async fn structural_garbage_is_malformed() {
    let f = fixture().await;
    let good = key().sign(&claims());
    let (h, rest) = good.split_once('.').unwrap();
    let (p, s) = rest.split_once('.').unwrap();
    let cases = [
        String::new(),
        "abc".into(),
        format!("{h}.{p}"),
        format!("{h}.{p}.{s}.{s}"),
        format!("{h}..{s}"),
        format!("{h}.{p}."),
        format!("{h}!.{p}.{s}"),
        format!("{h}.{p}=.{s}"),
        format!("{h}.{p}.{s}*"),
        format!("{}.{p}.{s}", URL_SAFE_NO_PAD.encode("{not json")),
        format!("{}.{p}.{s}", URL_SAFE_NO_PAD.encode("[]")),
        format!("{h}.{}.{s}", URL_SAFE_NO_PAD.encode("[1,2]")),
        format!("{h}.{}.{s}", URL_SAFE_NO_PAD.encode("{\"iss\":")),
        format!(
            "{}.{p}.{s}",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","alg":"none","kid":"key-1"}"#)
        ),
        format!("{good}{}", "A".repeat(9000)),
    ];
    for token in cases {
        assert_eq!(
            rejection(&f, &token).await,
            Rejection::Malformed,
            "{token:.60}"
        );
    }
}

#[tokio::test]
async fn required_scopes_must_all_be_granted() {
    let f = fixture().await;
    let token = key().sign(&claims());
    assert!(
        f.validator
            .validate(&token, &["orders/read".into(), "orders/write".into()])
            .await
            .is_ok()
    );
    let err = f
        .validator
        .validate(&token, &["orders/read".into(), "orders/delete".into()])
        .await
        .unwrap_err();
    assert_eq!(err.rejection, Rejection::InsufficientScope);
    let no_scope = key().sign(&without(claims(), "scope"));
    let err = f
        .validator
        .validate(&no_scope, &["orders/read".into()])
        .await
        .unwrap_err();
    assert_eq!(err.rejection, Rejection::InsufficientScope);
}

#[tokio::test]
async fn keys_never_loaded_are_keys_unavailable() {
    let fetcher = ScriptedFetcher::new(Err(JwksError::Fetch("connection refused".into())));
    let keys = Arc::new(KeySet::new(ISS, fetcher, Duration::from_secs(10)));
    let v = validator_at_now(keys);
    let err = v.validate(&key().sign(&claims()), &[]).await.unwrap_err();
    assert_eq!(err.rejection, Rejection::KeysUnavailable);
}

#[tokio::test]
#[should_panic(expected = "bound to its issuer")]
async fn keys_are_bound_to_their_issuer() {
    let fetcher = ScriptedFetcher::new(Ok(jwks(&[key()])));
    let keys = Arc::new(KeySet::new(
        "https://other.example/pool",
        fetcher,
        Duration::from_secs(10),
    ));
    let _ = CognitoValidator::new(
        ISS,
        ["client-a".to_string()],
        keys,
        ValidatorSettings::default(),
    );
}

#[tokio::test(start_paused = true)]
async fn unknown_kids_refetch_at_most_once_per_cooldown() {
    let f = fixture().await;
    assert_eq!(f.fetcher.calls(), 1);
    // Start-up and periodic loads do not start the cool-down: the first unknown kid
    // after start refetches at once.
    let stranger = other_key().sign(&claims());
    let mut handles = Vec::new();
    for _ in 0..200 {
        let v = f.validator.clone();
        let t = stranger.clone();
        handles.push(tokio::spawn(async move { v.validate(&t, &[]).await }));
    }
    for h in handles {
        assert_eq!(
            h.await.unwrap().unwrap_err().rejection,
            Rejection::UnknownKey
        );
    }
    assert_eq!(
        f.fetcher.calls(),
        2,
        "one refetch for 200 unknown-kid tokens"
    );
    tokio::time::advance(Duration::from_secs(5)).await;
    let _ = f.validator.validate(&stranger, &[]).await;
    assert_eq!(f.fetcher.calls(), 2, "still inside the cool-down");
    tokio::time::advance(Duration::from_secs(6)).await;
    let _ = f.validator.validate(&stranger, &[]).await;
    assert_eq!(f.fetcher.calls(), 3, "cool-down over");
}

#[tokio::test(start_paused = true)]
async fn rotation_is_picked_up_after_the_cooldown() {
    let f = fixture().await;
    // A refetch for some unknown kid has just happened.
    let _ = f
        .validator
        .validate(
            &other_key().sign_with_header(&json!({"alg":"RS256","kid":"nope"}), &claims()),
            &[],
        )
        .await;
    assert_eq!(f.fetcher.calls(), 2);
    // The issuer rotates to key-2.
    f.fetcher.set(Ok(jwks(&[key(), other_key()])));
    let rotated = other_key().sign(&claims());
    assert_eq!(rejection(&f, &rotated).await, Rejection::UnknownKey);
    tokio::time::advance(Duration::from_secs(10)).await;
    let c = f.validator.validate(&rotated, &[]).await.unwrap();
    assert_eq!(c.client_id(), "client-a");
    assert_eq!(f.fetcher.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn failed_or_garbage_jwks_keeps_the_last_good_set() {
    let f = fixture().await;
    let token = key().sign(&claims());
    for bad in [
        Err(JwksError::Fetch("HTTP 503".into())),
        Ok(b"<html>oops</html>".to_vec()),
        Ok(b"{\"keys\":[]}".to_vec()),
    ] {
        f.fetcher.set(bad);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(f.validator.keys().refresh().await.is_err());
        assert!(f.validator.validate(&token, &[]).await.is_ok());
        assert_eq!(f.validator.keys().kids(), vec!["key-1"]);
    }
}

#[tokio::test]
async fn validate_loaded_never_refetches() {
    let f = fixture().await;
    let stranger = other_key().sign(&claims());
    assert_eq!(
        f.validator
            .validate_loaded(&stranger, &[])
            .unwrap_err()
            .rejection,
        Rejection::UnknownKey
    );
    assert_eq!(f.fetcher.calls(), 1);
    assert!(
        f.validator
            .validate_loaded(&key().sign(&claims()), &[])
            .is_ok()
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn valid_token() -> &'static String {
    static TOKEN: OnceLock<String> = OnceLock::new();
    TOKEN.get_or_init(|| key().sign(&claims()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn mutated_tokens_are_never_accepted(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..4)
    ) {
        let rt = runtime();
        let f = rt.block_on(fixture());
        let mut bytes = valid_token().as_bytes().to_vec();
        for (at, byte, op) in edits {
            let i = at.index(bytes.len().max(1));
            match op {
                0 if !bytes.is_empty() => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                _ if !bytes.is_empty() => { bytes.remove(i); }
                _ => {}
            }
        }
        prop_assume!(bytes != valid_token().as_bytes());
        let token = String::from_utf8_lossy(&bytes).into_owned();
        // A mutation that only touches unused base64 bits could decode to the
        // same bytes; anything else must be refused, and nothing may panic.
        let result = rt.block_on(f.validator.validate(&token, &[]));
        if let Ok(claims) = result {
            let decoded = |t: &str| t.split('.').map(|s| URL_SAFE_NO_PAD.decode(s).ok()).collect::<Vec<_>>();
            prop_assert_eq!(decoded(&token), decoded(valid_token()));
            prop_assert_eq!(claims.client_id(), "client-a");
        }
    }
}

#[tokio::test]
async fn verified_cache_hits_still_run_every_rejection_that_can_change() {
    let f = fixture().await;
    let token = key().sign(&with(claims(), "exp", json!(NOW + 60)));
    f.validator.validate(&token, &[]).await.unwrap();
    assert_eq!(f.validator.cached_verifications(), 1);
    // A hit with a scope the token lacks.
    let err = f
        .validator
        .validate(&token, &["orders/admin".into()])
        .await
        .unwrap_err();
    assert_eq!(err.rejection, Rejection::InsufficientScope);
    // A hit that expired since it was cached.
    f.clock.advance(66);
    assert_eq!(rejection(&f, &token).await, Rejection::Expired);
    assert_eq!(
        f.validator
            .validate_loaded(&token, &[])
            .unwrap_err()
            .rejection,
        Rejection::Expired
    );
}

#[tokio::test]
async fn verified_cache_drops_tokens_whose_key_is_withdrawn() {
    let f = fixture().await;
    let token = key().sign(&claims());
    f.validator.validate(&token, &[]).await.unwrap();
    f.fetcher.set(Ok(jwks(&[other_key()])));
    f.validator.keys().refresh().await.unwrap();
    assert_eq!(rejection(&f, &token).await, Rejection::UnknownKey);
}

#[tokio::test]
async fn only_successes_are_cached() {
    let f = fixture().await;
    for t in [
        other_key().sign(&claims()),
        key().sign(&with(claims(), "client_id", json!("client-b"))),
        key().sign(&with(claims(), "exp", json!(NOW - 100))),
    ] {
        assert!(f.validator.validate(&t, &[]).await.is_err());
    }
    assert_eq!(f.validator.cached_verifications(), 0);
    let stats = f.validator.stats();
    assert_eq!(stats.rejected(Rejection::UnknownKey), 1);
    assert_eq!(stats.rejected(Rejection::ClientNotAllowed), 1);
    assert_eq!(stats.rejected(Rejection::Expired), 1);
    assert_eq!(stats.valid(), 0);
}

#[test]
fn only_usable_rsa_signing_keys_are_read_from_a_jwks() {
    let base = key().jwk();
    let with = |changes: Value| {
        let mut jwk = base.clone();
        for (k, v) in changes.as_object().unwrap() {
            if v.is_null() {
                jwk.as_object_mut().unwrap().remove(k);
            } else {
                jwk[k] = v.clone();
            }
        }
        jwk
    };
    let doc = json!({"keys": [
        with(json!({"kid": "good"})),
        with(json!({"kid": "good", "n": other_key().jwk()["n"]})),   // duplicate kid: first kept
        with(json!({"kid": "enc", "use": "enc"})),
        with(json!({"kid": "ops", "key_ops": ["encrypt"]})),
        with(json!({"kid": "verify-op", "use": null, "key_ops": ["verify"]})),
        with(json!({"kid": null})),
        with(json!({"kid": 5})),                                       // wrong member type
        with(json!({"kid": "short", "n": "AQAB"})),                    // 17-bit modulus
        with(json!({"kid": "bad-b64", "n": "!!!"})),
        with(json!({"kid": "rs512", "alg": "RS512"})),
        {"kty": "EC", "kid": "ec", "crv": "P-256", "x": "AAAA", "y": "AAAA"},
    ]});
    let keys = crate::jwt::parse_jwks(doc.to_string().as_bytes()).unwrap();
    let mut kids: Vec<&str> = keys.keys().map(String::as_str).collect();
    kids.sort_unstable();
    assert_eq!(kids, ["good", "rs512", "verify-op"]);
    // The first of the duplicates (it verifies `key()`'s signatures), and a key
    // of another algorithm keeps its name.
    let token = key().sign(&claims());
    let (input, sig) = token.rsplit_once('.').unwrap();
    let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
    assert!(keys["good"].verify(input.as_bytes(), &sig));
    assert_eq!(keys["good"].alg(), Some("RS256"));
    assert_eq!(keys["rs512"].alg(), Some("RS512"));
    // Nothing usable at all is an error.
    let none = json!({"keys": [with(json!({"use": "enc"}))]});
    assert!(crate::jwt::parse_jwks(none.to_string().as_bytes()).is_err());
    assert!(crate::jwt::parse_jwks(b"{\"keys\": 5}").is_err());
}

/// Several trusted issuers: user pools, and both issuer forms of one pool.
mod several_issuers {
    use super::*;
    use crate::jwt::{IssuerType, StaticJwks, TrustError, TrustedIssuer};

    const POOL_A: &str = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_PoolA";
    const POOL_B: &str = "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_PoolB";

    /// The loaded key set of `issuer`, named `pool`.
    async fn key_set(pool: &str, issuer: &str, keys: &[&SigningKey]) -> Arc<KeySet> {
        let set = Arc::new(
            KeySet::new(
                issuer,
                Arc::new(StaticJwks::new(jwks(keys))),
                Duration::from_secs(10),
            )
            .with_pool(pool),
        );
        set.refresh().await.unwrap();
        set
    }

    fn token(issuer: &str, client: &str, signer: &SigningKey) -> String {
        let c = with(
            with(claims(), "iss", json!(issuer)),
            "client_id",
            json!(client),
        );
        signer.sign(&c)
    }

    /// Pool A (key-1, client-a) and pool B (key-2, client-b).
    async fn two_pools() -> CognitoValidator {
        CognitoValidator::for_issuers(
            [
                TrustedIssuer::new(key_set("a", POOL_A, &[key()]).await, ["client-a".into()]),
                TrustedIssuer::new(
                    key_set("b", POOL_B, &[other_key()]).await,
                    ["client-b".into()],
                ),
            ],
            ValidatorSettings::default(),
        )
        .unwrap()
        .with_clock(Arc::new(ManualClock::new(NOW)))
    }

    async fn outcome(v: &CognitoValidator, token: &str) -> Result<String, Rejection> {
        v.validate(token, &[])
            .await
            .map(|c| c.issuer().to_owned())
            .map_err(|e| e.rejection)
    }

    #[tokio::test]
    async fn each_pool_accepts_its_own_tokens_and_counts_them() {
        let v = two_pools().await;
        assert_eq!(
            outcome(&v, &token(POOL_A, "client-a", key()))
                .await
                .unwrap(),
            POOL_A
        );
        assert_eq!(
            outcome(&v, &token(POOL_B, "client-b", other_key()))
                .await
                .unwrap(),
            POOL_B
        );
        // A repeat is a cache hit and still counted for its pool.
        assert!(
            outcome(&v, &token(POOL_B, "client-b", other_key()))
                .await
                .is_ok()
        );
        let counts: Vec<(String, u64)> = v
            .issuers()
            .map(|(t, s)| (t.pool().to_owned(), s.valid()))
            .collect();
        assert_eq!(counts, [("a".into(), 1), ("b".into(), 2)]);
        assert!(v.is_loaded());
    }

    #[tokio::test]
    async fn a_key_of_one_pool_never_verifies_a_token_claiming_the_other() {
        let v = two_pools().await;
        // Claims pool A, signed with (and naming) pool B's key: looked up in A's
        // key set only.
        assert_eq!(
            outcome(&v, &token(POOL_A, "client-a", other_key())).await,
            Err(Rejection::UnknownKey)
        );
        assert_eq!(
            outcome(&v, &token(POOL_B, "client-b", key())).await,
            Err(Rejection::UnknownKey)
        );
        // An issuer no pool has: refused before any key is looked at.
        let stranger = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Other";
        assert_eq!(
            outcome(&v, &token(stranger, "client-a", key())).await,
            Err(Rejection::WrongIssuer)
        );
        // Issuers are compared byte for byte: no trailing slash, no case folding.
        for near in [format!("{POOL_A}/"), POOL_A.to_uppercase()] {
            assert_eq!(
                outcome(&v, &token(&near, "client-a", key())).await,
                Err(Rejection::WrongIssuer),
                "{near}"
            );
        }
    }

    #[tokio::test]
    async fn a_client_of_one_pool_is_refused_with_a_token_of_the_other() {
        let v = two_pools().await;
        // A correctly signed pool-B token issued to client-a (a client of pool A).
        assert_eq!(
            outcome(&v, &token(POOL_B, "client-a", other_key())).await,
            Err(Rejection::ClientNotAllowed)
        );
        let refused: Vec<u64> = v
            .issuers()
            .map(|(_, s)| s.rejected(Rejection::ClientNotAllowed))
            .collect();
        assert_eq!(refused, [0, 1], "counted for pool B");
    }

    #[tokio::test]
    async fn migration_accepts_both_forms_while_on_and_one_form_after() {
        let pool = "us-east-1_Switch1";
        let original = IssuerType::Original.issuer("us-east-1", pool);
        let updated = IssuerType::Updated.issuer("us-east-1", pool);
        // Both issuers serve the same JWKS document here, as Cognito may.
        let same_doc = [key()];
        let during = CognitoValidator::for_issuers(
            [
                TrustedIssuer::new(key_set("p", &updated, &same_doc).await, ["client-a".into()]),
                TrustedIssuer::new(
                    key_set("p", &original, &same_doc).await,
                    ["client-a".into()],
                ),
            ],
            ValidatorSettings::default(),
        )
        .unwrap()
        .with_clock(Arc::new(ManualClock::new(NOW)));
        let old = token(&original, "client-a", key());
        let new = token(&updated, "client-a", key());
        assert_eq!(outcome(&during, &old).await.unwrap(), original);
        assert_eq!(outcome(&during, &new).await.unwrap(), updated);

        // Turned off: the updated form only.
        let after = CognitoValidator::for_issuers(
            [TrustedIssuer::new(
                key_set("p", &updated, &same_doc).await,
                ["client-a".into()],
            )],
            ValidatorSettings::default(),
        )
        .unwrap()
        .with_clock(Arc::new(ManualClock::new(NOW)));
        assert_eq!(outcome(&after, &old).await, Err(Rejection::WrongIssuer));
        assert!(outcome(&after, &new).await.is_ok());
    }

    #[tokio::test]
    async fn during_a_migration_each_form_is_checked_against_its_own_keys() {
        let pool = "us-east-1_Switch2";
        let original = IssuerType::Original.issuer("us-east-1", pool);
        let updated = IssuerType::Updated.issuer("us-east-1", pool);
        let v = CognitoValidator::for_issuers(
            [
                TrustedIssuer::new(
                    key_set("p", &updated, &[other_key()]).await,
                    ["client-a".into()],
                ),
                TrustedIssuer::new(key_set("p", &original, &[key()]).await, ["client-a".into()]),
            ],
            ValidatorSettings::default(),
        )
        .unwrap()
        .with_clock(Arc::new(ManualClock::new(NOW)));
        assert!(
            outcome(&v, &token(&original, "client-a", key()))
                .await
                .is_ok()
        );
        assert!(
            outcome(&v, &token(&updated, "client-a", other_key()))
                .await
                .is_ok()
        );
        // A key published under one issuer only never verifies the other's tokens.
        assert_eq!(
            outcome(&v, &token(&updated, "client-a", key())).await,
            Err(Rejection::UnknownKey)
        );
        // Nor does the verified-token cache carry a token across issuers: a cached
        // token is re-checked against the key set it was verified with.
        let cached = token(&original, "client-a", key());
        assert!(outcome(&v, &cached).await.is_ok());
        assert!(outcome(&v, &cached).await.is_ok());
    }

    #[tokio::test]
    async fn an_empty_or_ambiguous_trust_set_is_refused() {
        assert_eq!(
            CognitoValidator::for_issuers([], ValidatorSettings::default()).unwrap_err(),
            TrustError::Empty
        );
        let twice = CognitoValidator::for_issuers(
            [
                TrustedIssuer::any_client(key_set("a", POOL_A, &[key()]).await),
                TrustedIssuer::new(key_set("b", POOL_A, &[other_key()]).await, ["x".into()]),
            ],
            ValidatorSettings::default(),
        );
        assert_eq!(twice.unwrap_err(), TrustError::Duplicate(POOL_A.into()));
    }

    #[tokio::test]
    async fn readiness_waits_for_every_issuer() {
        let loaded = key_set("a", POOL_A, &[key()]).await;
        let pending = Arc::new(
            KeySet::new(
                POOL_B,
                Arc::new(StaticJwks::new(jwks(&[other_key()]))),
                Duration::from_secs(10),
            )
            .with_pool("b"),
        );
        let v = CognitoValidator::for_issuers(
            [
                TrustedIssuer::any_client(loaded),
                TrustedIssuer::any_client(pending.clone()),
            ],
            ValidatorSettings::default(),
        )
        .unwrap();
        assert!(!v.is_loaded());
        assert!(
            tokio::time::timeout(Duration::from_millis(50), v.wait_loaded())
                .await
                .is_err()
        );
        pending.refresh().await.unwrap();
        assert!(v.is_loaded());
        tokio::time::timeout(Duration::from_secs(1), v.wait_loaded())
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn the_builder_takes_the_region_from_the_user_pool_id() {
    use super::CognitoValidator;
    let (issuer, jwks) = CognitoValidator::builder()
        .user_pool_id("eu-west-1_AbCdEf123")
        .any_client()
        .endpoints()
        .unwrap();
    assert_eq!(
        issuer,
        "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbCdEf123"
    );
    assert_eq!(
        jwks.to_string(),
        "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbCdEf123/.well-known/jwks.json"
    );
    // A Region given must be the pool's.
    let err = CognitoValidator::builder()
        .region("us-east-1")
        .user_pool_id("eu-west-1_AbCdEf123")
        .any_client()
        .endpoints()
        .unwrap_err();
    assert!(err.to_string().contains("not the Region"), "{err}");
    // Nothing to derive from: the pool id is what is missing.
    let err = CognitoValidator::builder()
        .any_client()
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("user_pool_id is not set"), "{err}");
}

/// The first call waits `first_load_wait` for a key set that never comes; the
/// calls after it answer KEYS_UNAVAILABLE at once instead of each waiting again
/// (virtual time: the waits are measured, not slept).
#[tokio::test(start_paused = true)]
async fn after_one_wait_in_vain_calls_fail_fast_until_the_keys_load() {
    let fetcher = ScriptedFetcher::new(Err(JwksError::Fetch("connection refused".into())));
    let keys = Arc::new(KeySet::new(ISS, fetcher, Duration::from_secs(10)));
    let wait = Duration::from_secs(5);
    let v = CognitoValidator::checked(
        [super::TrustedIssuer::new(keys, ["client-a".to_string()])],
        ValidatorSettings::default(),
        wait,
    )
    .unwrap()
    .with_clock(Arc::new(ManualClock::new(NOW)));
    let token = key().sign(&claims());
    let started = tokio::time::Instant::now();
    let err = v.validate(&token, &[]).await.unwrap_err();
    assert_eq!(err.rejection, Rejection::KeysUnavailable);
    assert_eq!(started.elapsed(), wait, "the first call waits once");
    let again = tokio::time::Instant::now();
    let err = v.validate(&token, &[]).await.unwrap_err();
    assert_eq!(err.rejection, Rejection::KeysUnavailable);
    assert_eq!(again.elapsed(), Duration::ZERO, "the next one does not");
}
