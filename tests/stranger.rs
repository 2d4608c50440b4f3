//! What a stranger without credentials can hold, tried against a running gateway
//! on loopback with bounded counts and times: silent connections, idle ones, more
//! connections than the cap, streams that send headers and never their message,
//! and what the edge refuses (content type, two messages, oversized Health).

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use m2m_gateway::{
    config::Config,
    proto::gateway::v1::{ValidateRequest, gateway_client::GatewayClient},
};
use support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame.
const SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// A Validate call any stranger could make (answered `valid: false`).
fn junk_validate() -> ValidateRequest {
    ValidateRequest {
        token: "x.y.z".into(),
        required_scopes: vec![],
    }
}

async fn gateway(tune: impl FnOnce(&mut Config)) -> (TestGateway, m2m_gateway::emulator::Emulator) {
    let emu = emulator(vec![]).await;
    let mut cfg = config(&emu, &[client_a()]);
    tune(&mut cfg);
    let gw = TestGateway::start(cfg).await.ready().await;
    (gw, emu)
}

/// Reads until the server closes the connection (EOF or reset); false if it is
/// still open after `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_and_others_still_served() {
    let (gw, _emu) = gateway(|c| c.server.handshake_timeout_ms = 300).await;
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    let mut c = gw.client().await;
    c.validate(junk_validate())
        .await
        .expect("served while strangers wait");
    for s in &mut silent {
        assert!(
            closed_within(s, Duration::from_secs(5)).await,
            "a silent connection stayed open"
        );
    }
    let (_, metrics) = gw.admin_get("/metrics").await;
    assert!(
        metrics.contains("m2m_gateway_connections_handshake_timeouts_total 200"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_calls_is_closed_after_the_idle_time() {
    let (gw, _emu) = gateway(|c| c.server.idle_timeout_secs = 1).await;
    let mut idle = TcpStream::connect(gw.addr).await.unwrap();
    idle.write_all(&[PREFACE, SETTINGS].concat()).await.unwrap();
    // A connection that made a call stays open while the call runs, then idles too.
    let mut c = gw.client().await;
    c.validate(junk_validate()).await.unwrap();
    assert!(closed_within(&mut idle, Duration::from_secs(5)).await);
    let (_, metrics) = gw.admin_get("/metrics").await;
    assert!(
        metrics.contains("m2m_gateway_connections_idle_closed_total"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_connection_cap_new_connections_are_refused_and_old_ones_kept() {
    let (gw, _emu) = gateway(|c| {
        c.server.max_connections = 20;
        c.server.max_connections_per_peer = 0;
    })
    .await;
    let mut c = gw.client().await;
    let mut held = Vec::new();
    for _ in 0..19 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(&[PREFACE, SETTINGS].concat()).await.unwrap();
        held.push(s);
    }
    let mut extra = TcpStream::connect(gw.addr).await.unwrap();
    assert!(
        closed_within(&mut extra, Duration::from_secs(2)).await,
        "the 21st was kept"
    );
    let (status, _) = gw.admin_get("/readyz").await;
    assert_eq!(
        status, 200,
        "a full table (which a stranger can cause) does not take the pod out of rotation"
    );
    // The established connection is not disturbed.
    c.validate(junk_validate()).await.unwrap();
    drop(held);
    let (_, metrics) = gw.admin_get("/metrics").await;
    assert!(
        metrics.contains("m2m_gateway_connections_refused_total 1"),
        "{metrics}"
    );
}

fn grpc_request(addr: std::net::SocketAddr, path: &str, content_type: &str) -> http::Request<()> {
    http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", content_type)
        .header("te", "trailers")
        .body(())
        .unwrap()
}

async fn raw_h2(addr: std::net::SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_only_streams_do_not_starve_legitimate_callers() {
    let (gw, _emu) = gateway(|c| {
        c.server.max_concurrent_requests = 64;
        c.server.request_body_timeout_ms = 1000;
    })
    .await;
    let open = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut attackers = Vec::new();
    for _ in 0..8 {
        let client = raw_h2(gw.addr).await;
        let (open, stop, addr) = (open.clone(), stop.clone(), gw.addr);
        attackers.push(tokio::spawn(async move {
            // Keep the connection's 100 streams open; never send a message.
            let slots = Arc::new(tokio::sync::Semaphore::new(100));
            while !stop.load(Ordering::Relaxed) {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    break;
                };
                let Ok(mut ready) = client.clone().ready().await else {
                    break;
                };
                let req =
                    grpc_request(addr, "/m2m.gateway.v1.Gateway/GetToken", "application/grpc");
                let Ok((response, body)) = ready.send_request(req, false) else {
                    break;
                };
                open.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let _held = (body, slot);
                    let _ = tokio::time::timeout(Duration::from_secs(5), response).await;
                });
            }
        }));
    }
    // The attack is in full swing before the legitimate calls start.
    tokio::time::timeout(Duration::from_secs(10), async {
        while open.load(Ordering::Relaxed) < 600 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the attack opened its streams");
    let mut c = gw.client().await;
    let mut ok = 0;
    for _ in 0..48 {
        if c.validate(junk_validate()).await.is_ok() {
            ok += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.abort();
    }
    assert!(ok >= 44, "{ok} of 48 legitimate calls succeeded");
}

/// Sends one request with `body` on a raw HTTP/2 connection; the HTTP status and
/// the `grpc-status` (headers or trailers).
async fn raw_call(
    addr: std::net::SocketAddr,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, Option<String>) {
    let client = raw_h2(addr).await;
    let mut ready = client.ready().await.unwrap();
    let (response, mut send) = ready
        .send_request(grpc_request(addr, path, content_type), false)
        .unwrap();
    // The server may answer (and end the stream) from the headers alone, e.g.
    // 415, before the body is sent: then sending it fails, and that is fine.
    let _ = send.send_data(Bytes::from(body), true);
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("answered")
        .unwrap();
    let status = response.status().as_u16();
    let mut grpc_status = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned());
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let _ = chunk;
    }
    if let Ok(Some(trailers)) = body.trailers().await {
        if let Some(v) = trailers.get("grpc-status") {
            grpc_status = Some(v.to_str().unwrap().to_owned());
        }
    }
    (status, grpc_status)
}

fn frame(message: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8];
    f.extend_from_slice(&(message.len() as u32).to_be_bytes());
    f.extend_from_slice(message);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_refuses_what_grpc_does_not_allow() {
    let (gw, _emu) = gateway(|_| {}).await;
    // 415 for a content type that is not gRPC.
    for ct in ["text/plain", "application/json"] {
        let (status, _) = raw_call(gw.addr, "/grpc.health.v1.Health/Check", ct, frame(b"")).await;
        assert_eq!(status, 415, "{ct}");
    }
    // A unary call carries exactly one message.
    let two = [frame(b""), frame(b"")].concat();
    let (status, grpc) = raw_call(
        gw.addr,
        "/grpc.health.v1.Health/Check",
        "application/grpc",
        two,
    )
    .await;
    assert_eq!(
        (status, grpc.as_deref()),
        (200, Some("3")),
        "INVALID_ARGUMENT"
    );
    // The message limit holds for Health too, answered RESOURCE_EXHAUSTED.
    let big = frame(&vec![b'a'; 200 * 1024]);
    let (status, grpc) = raw_call(
        gw.addr,
        "/grpc.health.v1.Health/Check",
        "application/grpc",
        big,
    )
    .await;
    assert_eq!(
        (status, grpc.as_deref()),
        (200, Some("8")),
        "RESOURCE_EXHAUSTED"
    );
    // A well-formed call still works.
    let (status, grpc) = raw_call(
        gw.addr,
        "/grpc.health.v1.Health/Check",
        "application/grpc",
        frame(b""),
    )
    .await;
    assert_eq!((status, grpc.as_deref()), (200, Some("0")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_idle_or_silent_connections() {
    let (gw, _emu) = gateway(|c| c.server.shutdown_grace_ms = 10_000).await;
    let mut idle = TcpStream::connect(gw.addr).await.unwrap();
    idle.write_all(&[PREFACE, SETTINGS].concat()).await.unwrap();
    let _silent = TcpStream::connect(gw.addr).await.unwrap();
    // Both are accepted before the stop.
    let mut c = gw.client().await;
    c.validate(junk_validate()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), gw.stop())
        .await
        .expect("stopped without waiting out the 10 s grace");
}

/// A connection from `from` (a loopback address standing in for a peer),
/// preface and SETTINGS sent.
async fn held_from(from: [u8; 4], to: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::from((from, 0))).unwrap();
    let mut s = socket.connect(to).await.unwrap();
    s.write_all(&[PREFACE, SETTINGS].concat()).await.unwrap();
    s
}

/// One address cannot fill the connection table: past its cap its new
/// connections are closed at once, while other addresses are served and the
/// pod stays ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_fill_the_connection_table() {
    let (gw, _emu) = gateway(|c| {
        c.server.max_connections = 12;
        c.server.max_connections_per_peer = 4;
        c.server.handshake_timeout_ms = 30_000;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(held_from([127, 0, 0, 1], gw.addr).await);
    }
    for i in 0..3 {
        let mut extra = held_from([127, 0, 0, 1], gw.addr).await;
        assert!(
            closed_within(&mut extra, Duration::from_secs(2)).await,
            "connection {} of one address was kept",
            5 + i
        );
    }
    // Another address is served.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", gw.addr))
        .unwrap()
        .local_address(Some(std::net::IpAddr::from([127, 0, 0, 2])))
        .connect()
        .await
        .unwrap();
    let mut other = GatewayClient::new(channel);
    other.validate(junk_validate()).await.unwrap();
    // Fill the rest of the table from two more addresses: still ready.
    for from in [[127, 0, 0, 3], [127, 0, 0, 4]] {
        for _ in 0..4 {
            held.push(held_from(from, gw.addr).await);
        }
    }
    let (status, _) = gw.admin_get("/readyz").await;
    assert_eq!(status, 200);
    let (_, metrics) = gw.admin_get("/metrics").await;
    assert_eq!(
        metric(&metrics, "m2m_gateway_connections_peer_refused_total"),
        3.0,
        "{metrics}"
    );
    // A closed connection gives its address's slot back.
    held.truncate(3);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut again = held_from([127, 0, 0, 1], gw.addr).await;
        if !closed_within(&mut again, Duration::from_millis(200)).await {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slot never came back"
        );
    }
}

/// A Health/Watch stream lives at most `max_stream_secs`, then ends with
/// DEADLINE_EXCEEDED (the client opens a new one): it cannot hold its
/// connection open past every idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_at_its_lifetime() {
    let (gw, _emu) = gateway(|c| c.server.max_stream_secs = 1).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(gw.channel().await);
    let started = std::time::Instant::now();
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(watch.message().await.unwrap().is_some(), "the first status");
    let end = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("the stream ended");
    let status = end.unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    let (_, metrics) = gw.admin_get("/metrics").await;
    assert_eq!(metric(&metrics, "m2m_gateway_streams_expired_total"), 1.0);
}

/// A caller that never opens its flow-control window (the answer can never be
/// sent) loses its connection shortly after the call's deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_cannot_leave_closes_its_connection() {
    let (gw, _emu) = gateway(|c| c.server.request_timeout_ms = 1000).await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (mut client, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = conn.await;
        let _ = closed_tx.send(());
    });
    let request = grpc_request(gw.addr, "/grpc.health.v1.Health/Check", "application/grpc");
    let (_response, mut body) = client.send_request(request, false).unwrap();
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(8), closed_rx)
        .await
        .expect("the stalled connection was closed")
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "not before the deadline"
    );
    let (_, metrics) = gw.admin_get("/metrics").await;
    assert_eq!(
        metric(&metrics, "m2m_gateway_connections_stalled_closed_total"),
        1.0,
        "{metrics}"
    );
}

/// Streams have their own per-address slots: one address's Watch streams never
/// take the unary share of other callers behind the same address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_do_not_take_the_unary_share_of_an_address() {
    let (gw, _emu) = gateway(|c| {
        c.server.max_requests_per_peer = 2;
        c.server.max_streams_per_peer = 3;
        c.server.max_streams_per_connection = 3;
    })
    .await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(gw.channel().await);
    let request = || tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    };
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut s = health.watch(request()).await.unwrap().into_inner();
        assert!(s.message().await.unwrap().is_some());
        streams.push(s);
    }
    // A fourth stream from the address is refused, its unary calls are not.
    let refused = match health.watch(request()).await {
        Err(status) => status,
        Ok(r) => r.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    for _ in 0..5 {
        health
            .check(request())
            .await
            .expect("a unary call is served");
    }
    let mut c = gw.client().await;
    c.validate(junk_validate()).await.unwrap();
}

/// One connection holds at most `max_streams_per_connection` streams; another
/// connection from the same address still opens its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_holds_a_bounded_number_of_streams() {
    let (gw, _emu) = gateway(|c| c.server.max_streams_per_connection = 2).await;
    let request = || tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    };
    let mut one = tonic_health::pb::health_client::HealthClient::new(gw.channel().await);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = one.watch(request()).await.unwrap().into_inner();
        assert!(s.message().await.unwrap().is_some());
        held.push(s);
    }
    let refused = match one.watch(request()).await {
        Err(status) => status,
        Ok(r) => r.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(refused.message().contains("connection"), "{refused:?}");
    let mut other = tonic_health::pb::health_client::HealthClient::new(gw.channel().await);
    let mut s = other.watch(request()).await.unwrap().into_inner();
    assert!(
        s.message().await.unwrap().is_some(),
        "another connection opens one"
    );
}
