//! How long a revocation takes to reach every place a token is checked: three
//! gateway replicas sharing one Redis, and two services whose validators are
//! fed by a RevocationWatcher (each watching a different replica). Each trial
//! revokes the client on replica 1 through the Admin API and measures, from
//! the moment RevokeClient returns OK, until all five refuse the client's
//! token (the replicas' Validate code and the services' AuthLayer check, run
//! in this process). Then the client is restored and a fresh token taken.
//!
//!   cargo run --release --example kill_switch_latency -- redis://127.0.0.1:6379 [TRIALS]
//!
//! `benches/kill-switch.sh` starts a throwaway redis-server on loopback and
//! runs it. Loopback only.

use std::{net::SocketAddr, time::Duration};

use m2m_gateway::{
    auth::{RevocationWatcher, TokenSource, WatchOptions, WatchState},
    config::CacheBackend,
    dev,
    emulator::{Emulator, EmulatorClient, EmulatorConfig},
    jwt::CognitoValidator,
    proto::gateway::{
        admin::v1::{RestoreClientRequest, RevokeClientRequest, admin_client::AdminClient},
        v1::{GetTokenRequest, gateway_client::GatewayClient},
    },
    server::App,
};
use tokio::net::TcpListener;
use tonic::{Request, transport::Channel};

const KEY: &str = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";

fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut req = Request::new(message);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

async fn token(channel: &Channel, id: &str, secret: &str) -> String {
    GatewayClient::new(channel.clone())
        .get_token(GetTokenRequest {
            client_id: id.into(),
            client_secret: secret.into(),
            scopes: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .access_token
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let redis = args
        .next()
        .expect("usage: kill_switch_latency REDIS_URL [TRIALS]");
    let trials: usize = args.next().map_or(50, |n| n.parse().expect("TRIALS"));
    assert!(
        redis.contains("127.0.0.1") || redis.contains("localhost"),
        "loopback Redis only"
    );
    let clients = vec![
        EmulatorClient::new("leaky", "leaky-secret", &["orders/read"]),
        EmulatorClient::new("ops-admin", "ops-admin-secret", &["m2m-gateway/admin"]),
        EmulatorClient::new("orders-svc", "orders-svc-secret", &["orders/read"]),
    ];
    let emu = Emulator::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        EmulatorConfig {
            clients: clients.clone(),
            ..EmulatorConfig::default()
        },
    )
    .await
    .unwrap();
    let mut cfg = dev::config_for(&emu, SocketAddr::from(([127, 0, 0, 1], 0)), &clients);
    cfg.cache.backend = CacheBackend::Redis;
    cfg.cache.redis_url = Some(redis);
    cfg.cache.encryption_key = Some(KEY.to_owned().into());
    // Each restore drops the client's proofs, so each trial's first GetToken
    // is an unproven attempt (a real incident rotates the secret instead).
    cfg.limits.failed_auth_per_minute = 10_000;
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let app = App::from_config(cfg.clone()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(app.clone().serve_on(listener, None, std::future::pending()));
        app.validator.wait_loaded().await;
        replicas.push((app, channel(addr).await));
    }
    eprintln!("replicas up");
    // Two services, each watching its own replica.
    let mut services: Vec<(RevocationWatcher, CognitoValidator)> = Vec::new();
    for (_, ch) in &replicas[1..] {
        let tokens = TokenSource::from_gateway(
            ch.clone(),
            "orders-svc",
            "orders-svc-secret",
            Vec::<String>::new(),
        );
        let watcher = RevocationWatcher::spawn(ch.clone(), tokens, WatchOptions::default());
        watcher.wait_for(|s| s == WatchState::Current).await;
        let validator = CognitoValidator::builder()
            .user_pool_id(emu.pool_id())
            .region("us-east-1")
            .issuer(emu.issuer())
            .clients(["leaky", "orders-svc"])
            .build()
            .unwrap()
            .with_revocations(watcher.revocations());
        validator.wait_loaded().await;
        services.push((watcher, validator));
    }
    eprintln!("services watching");
    // Every replica subscribed to the fleet's announcements.
    for (app, _) in &replicas {
        while !app.broker.fleet().is_some_and(|f| f.is_shared()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    eprintln!("fleet shared");
    let first = &replicas[0].1;
    let admin_token = token(first, "ops-admin", "ops-admin-secret").await;
    let mut admin = AdminClient::new(first.clone());
    let mut micros = Vec::with_capacity(trials);
    for trial in 0..trials {
        let leaked = token(first, "leaky", "leaky-secret").await;
        for (app, _) in &replicas {
            assert!(app.validator.validate(&leaked, &[]).await.is_ok());
        }
        admin
            .revoke_client(bearer(
                RevokeClientRequest {
                    client_id: "leaky".into(),
                    reason: format!("trial {trial}"),
                },
                &admin_token,
            ))
            .await
            .unwrap();
        let started = std::time::Instant::now();
        loop {
            let mut refused = 0;
            for (app, _) in &replicas {
                refused += usize::from(app.validator.validate(&leaked, &[]).await.is_err());
            }
            for (_, v) in &services {
                refused += usize::from(v.validate(&leaked, &[]).await.is_err());
            }
            if refused == 5 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "trial {trial}: never refused everywhere"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        micros.push(started.elapsed().as_micros() as u64);
        admin
            .restore_client(bearer(
                RestoreClientRequest {
                    client_id: "leaky".into(),
                    reason: format!("trial {trial} over"),
                },
                &admin_token,
            ))
            .await
            .unwrap();
    }
    micros.sort_unstable();
    let pct =
        |p: f64| micros[((micros.len() as f64 * p).ceil() as usize).clamp(1, micros.len()) - 1];
    println!(
        "{trials} trials, RevokeClient OK -> refused by 3 replicas and 2 watching services: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        pct(0.50) as f64 / 1000.0,
        pct(0.90) as f64 / 1000.0,
        pct(0.99) as f64 / 1000.0,
        *micros.last().unwrap() as f64 / 1000.0,
    );
}
