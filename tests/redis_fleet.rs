//! The fleet-wide token cache against a real `redis-server` started on a free
//! loopback port: three gateways share one Cognito call, secrets are checked by
//! every replica, Redis holds nothing readable, and its death costs nothing but
//! the sharing.

mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::atomic::Ordering,
};

use m2m_gateway::{
    config::{CacheBackend, Config},
    emulator::{Emulator, EmulatorClient},
    proto::gateway::v1::GetTokenRequest,
};
use secrecy::SecretString;
use support::*;
use tonic::Code;

const KEY: &str = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";

struct RedisServer {
    child: Child,
    port: u16,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_redis() -> Option<RedisServer> {
    let present = Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !require_tool(present, "redis-server", "apt-get install redis-server") {
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let line = lines.next().expect("redis-server exited").unwrap();
        if line.contains("Ready to accept connections") {
            break;
        }
    }
    // Keep draining its output so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Some(RedisServer { child, port })
}

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
        let v: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .unwrap();
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
    let Some(redis) = start_redis() else { return };
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
                .locks_acquired
                .load(Ordering::SeqCst)
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
    assert!(!dump.is_empty());
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
        if key.starts_with("m2m:tok:") {
            assert!((3500..=3600).contains(ttl), "ttl {ttl}");
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
}
