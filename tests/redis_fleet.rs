//! The fleet-wide token cache against a real `redis-server` started on a free
//! loopback port: three gateways share one Cognito call, secrets are checked by
//! every replica, Redis holds nothing readable, and its death costs nothing but
//! the sharing.

mod support;

use m2m_gateway::{
    config::{CacheBackend, Config},
    emulator::{Emulator, EmulatorClient},
    proto::gateway::v1::{GetTokenRequest, gateway_client::GatewayClient},
};
use secrecy::SecretString;
use support::{redis_servers::*, *};
use tonic::Code;

const KEY: &str = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";

fn client_b() -> EmulatorClient {
    EmulatorClient::new("client-b", "secret-b", &["orders/read"])
}

fn fleet_config(emu: &Emulator, redis_port: u16) -> Config {
    let mut cfg = config(emu, &[client_a(), client_b()]);
    cfg.cache.backend = CacheBackend::Redis;
    cfg.cache.redis_url = Some(format!("redis://127.0.0.1:{redis_port}"));
    cfg.cache.encryption_key = Some(SecretString::from(KEY.to_owned()));
    cfg
}

fn request(id: &str, secret: &str) -> GetTokenRequest {
    GetTokenRequest {
        client_id: id.into(),
        client_secret: secret.into(),
        scopes: vec![],
    }
}

async fn redis_dump(port: u16) -> Vec<(String, Vec<u8>, i64)> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut out = Vec::new();
    for k in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .unwrap();
        let v: Option<Vec<u8>> = if kind == "hash" {
            // Proven secrets: every field and value, concatenated.
            let fields: Vec<(Vec<u8>, Vec<u8>)> = redis::cmd("HGETALL")
                .arg(&k)
                .query_async(&mut conn)
                .await
                .unwrap();
            Some(
                fields
                    .into_iter()
                    .flat_map(|(f, v)| [f, v])
                    .flatten()
                    .collect(),
            )
        } else {
            redis::cmd("GET")
                .arg(&k)
                .query_async(&mut conn)
                .await
                .unwrap()
        };
        let ttl: i64 = redis::cmd("TTL")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .unwrap();
        out.push((k, v.unwrap_or_default(), ttl));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_cognito_call_and_survive_redis_dying() {
    if !redis_present() {
        return;
    }
    let redis = RedisNode::plain();
    let emu = emulator(vec![client_b()]).await;
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(
            TestGateway::start(fleet_config(&emu, redis.port))
                .await
                .ready()
                .await,
        );
    }
    let mut clients = Vec::new();
    for r in &replicas {
        clients.push(r.client().await);
    }

    // 300 concurrent first requests spread over the three replicas.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(300));
    let mut calls = Vec::new();
    for i in 0..300 {
        let mut c = clients[i % 3].clone();
        let barrier = barrier.clone();
        calls.push(tokio::spawn(async move {
            barrier.wait().await;
            c.get_token(request(CLIENT, SECRET))
                .await
                .unwrap()
                .into_inner()
                .access_token
        }));
    }
    let mut tokens = Vec::new();
    for c in calls {
        tokens.push(c.await.unwrap());
    }
    assert_eq!(
        emu.token_requests(),
        1,
        "one Cognito call for the whole fleet"
    );
    assert!(tokens.iter().all(|t| *t == tokens[0]), "one token");
    let token = tokens[0].clone();

    // A wrong secret is refused by a replica that did not fetch the token.
    let bystander = replicas
        .iter()
        .position(|r| {
            r.gateway
                .broker
                .fleet()
                .unwrap()
                .stats()
                .snapshot()
                .locks_acquired
                == 0
        })
        .expect("two replicas waited for the third");
    let mut c = clients[bystander].clone();
    let s = c
        .get_token(request(CLIENT, "not-the-secret"))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);

    // Redis holds neither the token nor the secret nor the client id, and entries
    // live as long as the token.
    let dump = redis_dump(redis.port).await;
    assert!(dump.iter().any(|(k, _, _)| k.starts_with("m2m:proven:")));
    assert!(dump.iter().any(|(k, _, _)| k.starts_with("m2m:tok:")));
    for (key, value, ttl) in &dump {
        let text = String::from_utf8_lossy(value);
        for needle in [
            token.as_str(),
            token.split('.').nth(1).unwrap(),
            SECRET,
            CLIENT,
            "orders/read",
        ] {
            assert!(
                !key.contains(needle) && !text.contains(needle),
                "{key} leaks"
            );
        }
        if key.starts_with("m2m:tok:") || key.starts_with("m2m:proven:") {
            assert!((3500..=3600).contains(ttl), "{key} ttl {ttl}");
        }
    }

    // Redis dies: every replica keeps answering, also for a client never cached.
    drop(redis);
    let before = emu.token_requests();
    for c in &mut clients {
        let t = c
            .get_token(request(CLIENT, SECRET))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(t.access_token, token);
        let b = c
            .get_token(request("client-b", "secret-b"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(b.scopes, vec!["orders/read"]);
    }
    assert_eq!(
        emu.token_requests() - before,
        3,
        "each replica fetched client-b itself"
    );
    let down = replicas
        .iter()
        .filter(|r| !r.gateway.broker.fleet().unwrap().is_up())
        .count();
    assert_eq!(down, 3);
    let (_, metrics) = replicas[0].admin_get("/metrics").await;
    assert!(metrics.contains("m2m_gateway_redis_up 0"), "{metrics}");
}

#[tokio::test]
async fn a_redis_that_is_down_at_start_changes_nothing_but_sharing() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let emu = emulator(vec![client_b()]).await;
    let gw = TestGateway::start(fleet_config(&emu, closed))
        .await
        .ready()
        .await;
    let mut c = gw.client().await;
    let t = c
        .get_token(request(CLIENT, SECRET))
        .await
        .unwrap()
        .into_inner();
    let again = c
        .get_token(request(CLIENT, SECRET))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.access_token, again.access_token);
    assert_eq!(emu.token_requests(), 1);
    let (_, metrics) = gw.admin_get("/metrics").await;
    assert_eq!(metric(&metrics, "m2m_gateway_redis_up"), 0.0, "{metrics}");
    assert_eq!(
        metric(&metrics, "m2m_gateway_fleet_shared"),
        0.0,
        "{metrics}"
    );
}

async fn flush(port: u16) {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_upstream_call_per_fleet_ten_cold_starts_in_a_row() {
    if !redis_present() {
        return;
    }
    let redis = RedisNode::plain();
    let emu = emulator(vec![client_b()]).await;
    let cfg = fleet_config(&emu, redis.port);
    for round in 0..10 {
        flush(redis.port).await;
        let (replicas, clients) = start_replicas(&cfg, 3).await;
        let before = emu.token_requests();
        let tokens = burst(&clients, 300, request(CLIENT, SECRET)).await;
        assert_eq!(
            emu.token_requests() - before,
            1,
            "round {round}: one Cognito call for the whole fleet"
        );
        assert!(
            tokens.iter().all(|t| *t == tokens[0]),
            "round {round}: one token"
        );
        for r in replicas {
            r.stop().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_refresh_per_fleet_while_the_others_keep_serving() {
    if !redis_present() {
        return;
    }
    let redis = RedisNode::plain();
    let emu = emulator(vec![]).await;
    emu.set_expires_in(4);
    let mut cfg = fleet_config(&emu, redis.port);
    cfg.cache.refresh_ratio = 0.5;
    cfg.cache.refresh_jitter = 0.0;
    cfg.cache.min_remaining_secs = 1;
    // A loaded test machine (other suites' replicas and Redis servers run
    // alongside): room for each Redis call, so a slow answer is not taken for
    // a Redis that is down (which would make each replica fetch on its own).
    cfg.cache.redis_timeout_ms = 1000;
    let (_replicas, clients) = start_replicas(&cfg, 3).await;
    let first = burst(&clients, 30, request(CLIENT, SECRET)).await;
    assert_eq!(emu.token_requests(), 1);
    // Wait out half of the 4 s lifetime: the entry is due for refresh.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let tokens = burst(&clients, 300, request(CLIENT, SECRET)).await;
    assert_eq!(emu.token_requests(), 2, "one refresh for the fleet");
    for t in &tokens {
        assert!(*t == first[0] || !t.is_empty());
    }
    let fresh: std::collections::HashSet<_> = tokens.iter().filter(|t| **t != first[0]).collect();
    assert!(fresh.len() <= 1, "one new token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proofs_and_revocations_reach_every_replica() {
    if !redis_present() {
        return;
    }
    let redis = RedisNode::plain();
    let emu = emulator(vec![]).await;
    emu.add_secret(CLIENT, "second-secret-for-rotation");
    let cfg = fleet_config(&emu, redis.port);
    let (replicas, mut clients) = start_replicas(&cfg, 2).await;
    let proven = |i: usize| replicas[i].gateway.broker.proven_secrets();

    // Each secret proven on a different replica; both replicas learn both.
    let t1 = clients[0]
        .get_token(request(CLIENT, SECRET))
        .await
        .unwrap()
        .into_inner();
    let t2 = clients[1]
        .get_token(request(CLIENT, "second-secret-for-rotation"))
        .await
        .unwrap()
        .into_inner();
    eventually("both replicas hold both proofs", 5, || {
        proven(0) == 2 && proven(1) == 2
    })
    .await;
    let calls = emu.token_requests();
    assert!(calls <= 2);
    for c in &mut clients {
        for s in [SECRET, "second-secret-for-rotation"] {
            let t = c.get_token(request(CLIENT, s)).await.unwrap().into_inner();
            assert!(t.access_token == t1.access_token || t.access_token == t2.access_token);
        }
    }
    assert_eq!(
        emu.token_requests(),
        calls,
        "rotation costs no upstream call"
    );

    // The first secret is deleted in Cognito; replica 0 presents it upstream (a
    // scope set not cached yet) and is refused: every replica forgets it.
    emu.delete_secret(CLIENT, SECRET);
    let mut narrow = request(CLIENT, SECRET);
    narrow.scopes = vec!["orders/write".into()];
    let s = clients[0].get_token(narrow).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    eventually("the revocation reached replica 1", 5, || proven(1) == 1).await;
    let s = clients[1]
        .get_token(request(CLIENT, SECRET))
        .await
        .unwrap_err();
    assert_eq!(
        s.code(),
        Code::Unauthenticated,
        "no longer served from the cache"
    );
    // The second secret is served on both, without a gap.
    for c in &mut clients {
        let t = c
            .get_token(request(CLIENT, "second-secret-for-rotation"))
            .await
            .unwrap()
            .into_inner();
        assert!(!t.access_token.is_empty());
    }
}

/// `m2m-gateway dev --redis URL`: the dev gateway keeps its tokens in that Redis.
#[tokio::test]
async fn dev_mode_uses_the_redis_it_is_given() {
    if !redis_present() {
        return;
    }
    let redis = RedisNode::plain();
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let dev = DevProcess::start(&["--redis", &url]).await;
    let addr = &dev.addr;
    let mut client = GatewayClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    client
        .get_token(request("dev-client", "dev-secret"))
        .await
        .expect("a token");
    let keys = redis_dump(redis.port).await;
    drop(dev);
    assert!(
        keys.iter().any(|(k, _, _)| k.starts_with("m2m:")),
        "nothing in Redis: {:?}",
        keys.iter().map(|k| &k.0).collect::<Vec<_>>()
    );
}
