//! What a rollout and a scale-out on Kubernetes need of the listener: after the
//! shutdown signal, readiness fails at once while new calls are still served for
//! `server.drain_delay_ms`, then the listener closes; and with
//! `server.max_connection_age_secs`, a long-lived connection is asked to go away
//! (HTTP/2 GOAWAY) so that its client reconnects, possibly to a new replica.

mod support;

use std::time::Duration;

use m2m_gateway::proto::gateway::v1::{GetTokenRequest, gateway_client::GatewayClient};
use support::*;

fn get() -> GetTokenRequest {
    GetTokenRequest {
        client_id: CLIENT.into(),
        client_secret: SECRET.into(),
        scopes: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_signal_readiness_fails_first_and_calls_are_served_until_the_delay_ends() {
    let emu = emulator(vec![]).await;
    let mut cfg = config(&emu, &[client_a()]);
    cfg.server.drain_delay_ms = 3_000;
    let mut gw = TestGateway::start(cfg).await.ready().await;
    assert_eq!(gw.admin_get("/readyz").await.0, 200);
    gw.signal_stop();
    // Readiness goes first.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while gw.admin_get("/readyz").await.0 != 503 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "readiness never failed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A caller the load balancer still routes here, on a new connection: served.
    let mut late = GatewayClient::connect(format!("http://{}", gw.addr))
        .await
        .expect("still accepting during the drain delay");
    assert!(late.get_token(get()).await.is_ok());
    let addr = gw.addr;
    gw.stop().await;
    // Then the listener is gone.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_older_than_its_maximum_age_is_asked_to_go_away() {
    let emu = emulator(vec![]).await;
    let mut cfg = config(&emu, &[client_a()]);
    cfg.server.max_connection_age_secs = 1;
    cfg.server.max_connection_age_grace_secs = 1;
    let gw = TestGateway::start(cfg).await.ready().await;
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (_send, connection) = h2::client::handshake(tcp).await.unwrap();
    // The idle timeout is 300 s: only the age closes it this soon.
    let ended = tokio::time::timeout(Duration::from_secs(15), connection).await;
    assert!(ended.is_ok(), "the connection outlived its maximum age");
    gw.stop().await;
}
