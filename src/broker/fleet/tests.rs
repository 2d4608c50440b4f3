//! The fleet cache's own tests (no Redis: the protocol's are in
//! `broker::tests` and `tests/`).

use super::*;

fn cache() -> FleetCache {
    FleetCache::new(
        &FleetSettings {
            redis: RedisTarget {
                url: "redis://127.0.0.1:1".into(),
                mode: crate::broker::target::RedisMode::Auto,
                ca_pem: None,
                username: None,
                password: None,
                iam: None,
                timeout: Duration::from_millis(50),
            },
            lock_ttl: Duration::from_secs(10),
            lock_wait: Duration::from_secs(1),
        },
        &[7u8; 32],
    )
    .unwrap()
}

fn entry() -> SharedEntry {
    SharedEntry {
        token: "eyJ.secret-token.sig".into(),
        scopes: vec!["a/b".into()],
        expires_at_ms: now_ms() + 60_000,
        refresh_at_ms: now_ms() + 45_000,
        issued_ms: now_ms(),
    }
}

#[tokio::test]
async fn entries_are_encrypted_and_bound_to_their_key() {
    let c = cache();
    let (key, _) = c.keys("client-a", "a/b");
    let blob = c.seal(&key, &entry()).unwrap();
    assert!(!String::from_utf8_lossy(&blob).contains("secret-token"));
    assert_eq!(
        c.open::<SharedEntry>(&key, blob.clone()).unwrap().token,
        "eyJ.secret-token.sig"
    );
    let (other, _) = c.keys("client-b", "a/b");
    assert!(
        c.open::<SharedEntry>(&other, blob.clone()).is_none(),
        "moved to another key"
    );
    let mut tampered = blob;
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(c.open::<SharedEntry>(&key, tampered).is_none());
}

#[tokio::test]
async fn keys_hide_the_client_and_scopes() {
    let c = cache();
    let (key, lock) = c.keys("client-a", "orders/read");
    assert!(!key.contains("client-a") && !key.contains("orders"));
    assert_ne!(key, c.keys("client-a", "orders/write").0);
    assert!(lock.starts_with("m2m:lock:{") && key.starts_with("m2m:tok:{"));
    // One hash tag for the entry and its lock: one cluster slot.
    let tag = |k: &str| k[k.find('{').unwrap()..=k.find('}').unwrap()].to_owned();
    assert_eq!(tag(&key), tag(&lock));
    assert_ne!(tag(&key), tag(&c.keys("client-b", "orders/read").0));
}

#[tokio::test]
async fn an_unreachable_redis_opens_the_breaker() {
    let c = cache();
    assert!(!c.is_up() && !c.is_shared(), "down until the first answer");
    let (key, _) = c.keys("client-a", "a/b");
    assert!(c.get_entry(&key).await.is_err());
    assert!(!c.is_up());
    assert!(matches!(c.get_entry(&key).await, Err(FleetError::Down)));
    assert_eq!(c.stats().bypassed.load(Relaxed), 1);
}

#[test]
fn wall_clock_round_trip() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let at = Instant::now() + Duration::from_secs(30);
        let back = ms_to_instant(instant_to_ms(at));
        let diff = if back > at { back - at } else { at - back };
        assert!(diff < Duration::from_millis(50), "{diff:?}");
    });
}
