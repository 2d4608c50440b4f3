//! The fleet's Redis is untrusted input: whoever can PUBLISH or write a key (no
//! encryption key needed) must not be able to revoke an owner's secret, bring
//! back a refused one, stop every upstream call, or turn the fleet off. A real
//! redis-server on loopback; the test plays the attacker with its own client.

mod support;

use futures_util::StreamExt as _;
use m2m_gateway::{
    config::{CacheBackend, Config},
    emulator::{Emulator, EmulatorClient},
    proto::gateway::v1::{GetTokenRequest, gateway_client::GatewayClient},
};
use redis::AsyncCommands as _;
use secrecy::SecretString;
use support::{redis_servers::*, *};
use tonic::{Code, transport::Channel};

const KEY: &str = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";

fn request(id: &str, secret: &str, scopes: &[&str]) -> GetTokenRequest {
    GetTokenRequest {
        client_id: id.into(),
        client_secret: secret.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
    }
}

fn fleet_config(emu: &Emulator, port: u16) -> Config {
    let mut cfg = config(
        emu,
        &[
            client_a(),
            EmulatorClient::new("client-b", "secret-b", &["orders/read"]),
        ],
    );
    cfg.cache.backend = CacheBackend::Redis;
    cfg.cache.redis_url = Some(format!("redis://127.0.0.1:{port}"));
    cfg.cache.encryption_key = Some(SecretString::from(KEY.to_owned()));
    cfg.cache.redis_timeout_ms = 1000;
    cfg
}

async fn replica(cfg: &Config) -> (TestGateway, GatewayClient<Channel>) {
    let r = TestGateway::start(cfg.clone()).await.ready().await;
    let c = r.client().await;
    (r, c)
}

/// Every message published on the proof channel from now on.
async fn capture(node: &RedisNode) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", node.port)).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("m2m:proofs").await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = pubsub.into_on_message();
        while let Some(m) = messages.next().await {
            if tx.send(m.get_payload::<String>().unwrap()).is_err() {
                return;
            }
        }
    });
    rx
}

async fn corrupt_count(r: &TestGateway) -> f64 {
    let (_, metrics) = r.admin_get("/metrics").await;
    metric(&metrics, "m2m_gateway_redis_corrupt_values_total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announcements_cannot_be_forged_changed_or_replayed() {
    if !redis_present() {
        return;
    }
    let node = RedisNode::plain();
    let emu = emulator(vec![EmulatorClient::new(
        "client-b",
        "secret-b",
        &["orders/read"],
    )])
    .await;
    let cfg = fleet_config(&emu, node.port);
    let (a, mut ca) = replica(&cfg).await;
    let (b, mut cb) = replica(&cfg).await;
    eventually("both replicas share the fleet", 10, || {
        [&a, &b]
            .iter()
            .all(|r| r.gateway.broker.fleet().unwrap().is_shared())
    })
    .await;
    let mut heard = capture(&node).await;
    ca.get_token(request(CLIENT, SECRET, &[])).await.unwrap();
    let proof = heard.recv().await.expect("the proof announcement");
    eventually("B learns A's proof", 10, || {
        b.gateway.broker.proven_secrets() == 1
    })
    .await;

    // A changed byte (the kind, the client, anything): not an announcement.
    let mut attacker = node.connect().await;
    let bytes = proof.clone().into_bytes();
    for at in [0, bytes.len() / 2, bytes.len() - 1] {
        let mut changed = bytes.clone();
        changed[at] = if changed[at] == b'A' { b'B' } else { b'A' };
        let _: i64 = attacker.publish("m2m:proofs", changed).await.unwrap();
    }
    // The old, unsealed form of a revocation, and junk.
    let _: i64 = attacker
        .publish("m2m:proofs", "R m2m:proven:{x} field AAAA")
        .await
        .unwrap();
    let _: i64 = attacker
        .publish("m2m:proofs", "x".repeat(100_000))
        .await
        .unwrap();
    eventually("B counted five bad announcements", 10, || {
        b.gateway.broker.fleet().unwrap().stats().snapshot().corrupt >= 5
    })
    .await;
    assert_eq!(b.gateway.broker.proven_secrets(), 1, "nothing revoked");
    cb.get_token(request(CLIENT, SECRET, &[]))
        .await
        .expect("the owner is still served");

    // Cognito deletes the secret; A is refused; B forgets it.
    emu.delete_secret(CLIENT, SECRET);
    let s = ca
        .get_token(request(CLIENT, SECRET, &["orders/write"]))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    eventually("B learns the refusal", 10, || {
        b.gateway.broker.proven_secrets() == 0
    })
    .await;
    // The captured proof, replayed: older than the refusal, it changes nothing.
    let calls = emu.token_requests();
    let _: i64 = attacker.publish("m2m:proofs", &proof).await.unwrap();
    let _: i64 = attacker.publish("m2m:proofs", &proof).await.unwrap();
    // Something B hears after the replays, on the same channel: A's proof of
    // client-b.
    ca.get_token(request("client-b", "secret-b", &[]))
        .await
        .unwrap();
    eventually("B processed the replays", 10, || {
        b.gateway.broker.proven_secrets() == 1
    })
    .await;
    let s = cb
        .get_token(request(CLIENT, SECRET, &[]))
        .await
        .unwrap_err();
    assert_eq!(
        s.code(),
        Code::Unauthenticated,
        "the deleted secret stays refused"
    );
    assert!(
        emu.token_requests() > calls,
        "B asked Cognito rather than its cache"
    );

    // A replica that starts now reads both records from Redis: still refused.
    let (_c, mut cc) = replica(&cfg).await;
    let s = cc
        .get_token(request(CLIENT, SECRET, &[]))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_budget_key_is_reset_not_obeyed() {
    if !redis_present() {
        return;
    }
    let node = RedisNode::plain();
    let emu = emulator(vec![]).await;
    let mut cfg = fleet_config(&emu, node.port);
    cfg.limits.upstream_per_second = 50;
    let (a, mut ca) = replica(&cfg).await;
    let mut attacker = node.connect().await;
    let scopes: [&[&str]; 3] = [&[], &["orders/read"], &["orders/write"]];
    let corrupt: [&dyn Fn(&mut redis::aio::MultiplexedConnection) -> redis::Cmd; 3] = [
        &|_| {
            redis::cmd("SET")
                .arg("m2m:{budget}")
                .arg("9000000000000000")
                .clone()
        },
        &|_| {
            redis::cmd("SET")
                .arg("m2m:{budget}")
                .arg("not a number")
                .clone()
        },
        &|_| {
            redis::cmd("HSET")
                .arg("m2m:{budget}")
                .arg("f")
                .arg("v")
                .clone()
        },
    ];
    for (i, (make, scope)) in corrupt.iter().zip(scopes).enumerate() {
        let _: () = redis::cmd("DEL")
            .arg("m2m:{budget}")
            .query_async(&mut attacker)
            .await
            .unwrap();
        let _: () = make(&mut attacker)
            .query_async(&mut attacker)
            .await
            .unwrap();
        ca.get_token(request(CLIENT, SECRET, scope))
            .await
            .unwrap_or_else(|s| panic!("case {i}: {s:?}"));
        let ttl: i64 = attacker.pttl("m2m:{budget}").await.unwrap();
        assert!(ttl > 0, "case {i}: the schedule key has a TTL ({ttl})");
    }
    assert!(corrupt_count(&a).await >= 3.0);
    assert!(
        a.gateway.broker.fleet().unwrap().is_up(),
        "Redis is not down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_proof_hash_never_turns_the_fleet_off() {
    if !redis_present() {
        return;
    }
    let node = RedisNode::plain();
    let emu = emulator(vec![]).await;
    let cfg = fleet_config(&emu, node.port);
    let (_a, mut ca) = replica(&cfg).await;
    ca.get_token(request(CLIENT, SECRET, &[])).await.unwrap();
    let mut attacker = node.connect().await;
    let keys: Vec<String> = attacker.keys("m2m:proven:*").await.unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let proof_key = keys[0].clone();

    for (case, spoil) in [
        ("a string", "return redis.call('SET', KEYS[1], 'junk')"),
        (
            "50,000 junk fields",
            "for i = 1, 50000 do redis.call('HSET', KEYS[1], 'f' .. i, 'v') end return 1",
        ),
    ] {
        let _: redis::Value = redis::cmd("EVAL")
            .arg(spoil)
            .arg(1)
            .arg(&proof_key)
            .query_async(&mut attacker)
            .await
            .unwrap();
        // A replica that starts now loads the fleet's proofs: it must still
        // share the fleet and serve.
        let (r, mut c) = replica(&cfg).await;
        eventually(case, 10, || r.gateway.broker.fleet().unwrap().is_shared()).await;
        c.get_token(request(CLIENT, SECRET, &[]))
            .await
            .unwrap_or_else(|s| panic!("{case}: {s:?}"));
        assert!(corrupt_count(&r).await >= 1.0, "{case}: counted");
        let (_, metrics) = r.admin_get("/metrics").await;
        assert_eq!(metric(&metrics, "m2m_gateway_redis_up"), 1.0, "{case}");
        assert_eq!(metric(&metrics, "m2m_gateway_fleet_shared"), 1.0, "{case}");
        let _: () = attacker.del(&proof_key).await.unwrap();
    }
}
