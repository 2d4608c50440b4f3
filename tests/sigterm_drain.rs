//! SIGTERM on `m2m-gateway serve`: new connections stop, the call in flight
//! completes, the process exits 0.

mod support;

use std::{process::Command, sync::Arc, time::Duration};

use axum::{Json, Router, extract::State, routing::post};
use m2m_gateway::proto::gateway::v1::{GetTokenRequest, gateway_client::GatewayClient};
use serde_json::json;
use support::*;
use tokio::sync::{Notify, mpsc};

#[derive(Clone)]
struct Gate {
    arrived: mpsc::Sender<()>,
    release: Arc<Notify>,
}

async fn token(State(gate): State<Gate>) -> Json<serde_json::Value> {
    let _ = gate.arrived.send(()).await;
    gate.release.notified().await;
    Json(json!({"access_token": "opaque-drain-token", "expires_in": 3600, "token_type": "Bearer"}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_calls_then_exits_zero() {
    let emu = emulator(vec![]).await;
    let (arrived_tx, mut arrived) = mpsc::channel(1);
    let release = Arc::new(Notify::new());
    let gate = Gate {
        arrived: arrived_tx,
        release: release.clone(),
    };
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            upstream,
            Router::new()
                .route("/oauth2/token", post(token))
                .with_state(gate),
        )
        .await
    });

    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("gateway.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace_ms = 20000\n\n[cognito]\nregion = \"us-east-1\"\n\
             user_pool_id = \"us-east-1_Drain0001\"\ntoken_endpoint = \"http://{upstream_addr}/oauth2/token\"\n\
             issuer = \"{iss}\"\njwks_uri = \"{jwks}\"\n\n[[clients]]\nclient_id = \"{CLIENT}\"\nname = \"a\"\n\
             allowed_scopes = [\"orders/read\"]\n",
            iss = emu.issuer(),
            jwks = emu.jwks_uri(),
        ),
    )
    .unwrap();
    let (mut child, mut lines, addr) = serve_process(&cfg_path, &[]).await;

    let mut client = GatewayClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let in_flight = tokio::spawn(async move {
        client
            .get_token(GetTokenRequest {
                client_id: CLIENT.into(),
                client_secret: SECRET.into(),
                scopes: vec![],
            })
            .await
    });
    arrived.recv().await.unwrap();

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    tokio::time::timeout(
        Duration::from_secs(20),
        wait_for_line(&mut lines, "shutting down"),
    )
    .await
    .expect("shutdown begins");
    release.notify_one();
    let token = in_flight
        .await
        .unwrap()
        .expect("the in-flight call completes")
        .into_inner();
    assert_eq!(token.access_token, "opaque-drain-token");

    let status = tokio::task::spawn_blocking(move || child.wait().unwrap());
    let status = tokio::time::timeout(Duration::from_secs(20), status)
        .await
        .expect("exits")
        .unwrap();
    assert!(status.success(), "{status:?}");
}
