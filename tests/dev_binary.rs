//! Drives the built `m2m-gateway dev` binary as a newcomer would: spawn it, call
//! it with a tonic client, stop it with SIGTERM, expect a clean exit.

mod support;

use std::{process::Command, time::Duration};

use m2m_gateway::proto::gateway::v1::{
    GetTokenRequest, ValidateRequest, gateway_client::GatewayClient,
};
use support::DevProcess;

#[tokio::test]
async fn dev_binary_serves_and_stops_cleanly() {
    // A free loopback port for the admin listener.
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    // The banner is printed once the gateway is ready; it names the address.
    let dev = DevProcess::start(&["--admin-listen", &admin]).await;
    let banner = &dev.banner;
    assert!(banner.contains("grpcurl -plaintext"), "{banner}");
    assert!(
        banner.contains("m2m.gateway.v1.Gateway/GetToken"),
        "{banner}"
    );
    let addr = dev.addr.clone();

    let mut client = GatewayClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let token = client
        .get_token(GetTokenRequest {
            client_id: "dev-client".into(),
            client_secret: "dev-secret".into(),
            scopes: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(token.scopes, vec!["demo/read", "demo/write"]);
    let v = client
        .validate(ValidateRequest {
            token: token.access_token,
            required_scopes: vec!["demo/write".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(v.valid, "{}", v.detail);
    drop(client);

    // dev --admin-listen: the operations endpoints, with the calls just made.
    let metrics = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            "grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"m2m.gateway.v1.Gateway\",grpc_method=\"Validate\",grpc_code=\"OK\"} 1"
        ),
        "{metrics}"
    );
    let ready = reqwest::get(format!("http://{admin}/readyz"))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    let probe = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_m2m-gateway"))
            .arg("probe")
            .args(args)
            .output()
            .unwrap()
    };
    let ok = probe(&["--addr", &addr]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("SERVING"));
    assert!(
        probe(&["--addr", &addr, "--service", "liveness"])
            .status
            .success()
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    assert!(
        !probe(&["--addr", &closed_addr, "--timeout-ms", "500"])
            .status
            .success()
    );

    let stderr = dev.stderr.clone();
    let mut child = dev.into_child();
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap());
    let status = tokio::time::timeout(Duration::from_secs(20), status)
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(
        status.success(),
        "exit status {status:?}; stderr:\n{}",
        stderr.lock().unwrap()
    );
}

/// The kill switch as `dev`'s banner shows it, run as printed (bash, grpcurl, jq):
/// a token taken before the revocation is refused by Validate, the list shows
/// the revocation, and the restore answers.
#[tokio::test]
async fn the_banners_kill_switch_lines_work_as_printed() {
    let have = |bin: &str| {
        Command::new(bin).arg("--version").output().is_ok()
            || Command::new(bin).arg("-version").output().is_ok()
    };
    if !support::require_tool(
        have("grpcurl") && have("jq"),
        "grpcurl and jq",
        "pip install -r tests/interop/requirements.txt; apt-get install jq",
    ) {
        return;
    }
    let dev = DevProcess::start(&[]).await;
    let lines: Vec<&str> = dev.banner.lines().collect();
    let token_line = lines
        .iter()
        .find(|l| l.starts_with("TOKEN=$("))
        .expect("the banner takes a token");
    let validate_line = lines
        .iter()
        .find(|l| l.contains("Gateway/Validate"))
        .expect("the banner validates it");
    let start = lines
        .iter()
        .position(|l| l.starts_with("# the kill switch"))
        .expect("the banner shows the kill switch");
    let kill: Vec<&str> = lines[start + 1..]
        .iter()
        .take_while(|l| !l.trim().is_empty())
        .copied()
        .collect();
    assert_eq!(
        kill.len(),
        4,
        "admin token, revoke, list, restore: {kill:?}"
    );
    let script = format!(
        "set -euo pipefail\n{token_line}\n{admin}\n{revoke}\necho '== validate'\n{validate_line}\n{list}\n{restore}\n",
        admin = kill[0],
        revoke = kill[1],
        list = kill[2],
        restore = kill[3],
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new("bash").arg("-c").arg(script).output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (before, after) = stdout.split_once("== validate").unwrap();
    assert!(before.contains("\"blocked\": true"), "{stdout}");
    assert!(after.contains("REJECTION_REVOKED"), "{stdout}");
    assert!(after.contains("\"by\": \"dev-admin\""), "{stdout}");
    assert!(after.contains("secret rotated"), "{stdout}");
}
