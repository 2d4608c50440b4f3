//! gRPC interop: a Python grpcio client that discovers the API through server
//! reflection only (what grpcurl does) calls Validate and Health.

mod support;

use std::process::Command;

use support::*;

fn python_has_grpc() -> bool {
    Command::new("python3")
        .args(["-c", "import grpc, grpc_reflection, google.protobuf"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_discovers_and_calls_through_reflection() {
    if !require_tool(
        python_has_grpc(),
        "python3 with grpcio, grpcio-reflection and protobuf",
        "pip install grpcio grpcio-reflection protobuf",
    ) {
        return;
    }
    let emu = emulator(vec![]).await;
    let gw = TestGateway::start(config(&emu, &[client_a()]))
        .await
        .ready()
        .await;
    let token = emu.issue(CLIENT, &["orders/read".into()]);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/reflection_client.py"
    );
    let addr = gw.addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args([script, &addr, &token])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "python client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for (key, own) in [
        (
            "services_v1alpha",
            "grpc.reflection.v1alpha.ServerReflection",
        ),
        ("services_v1", "grpc.reflection.v1.ServerReflection"),
    ] {
        let services: Vec<&str> = report[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        for want in ["m2m.gateway.v1.Gateway", "grpc.health.v1.Health", own] {
            assert!(services.contains(&want), "{key} lacks {want}: {services:?}");
        }
        assert!(
            !services.iter().any(|s| s.starts_with("m2m.demo")),
            "{services:?}"
        );
    }
    assert_eq!(report["valid"]["valid"], true, "{report}");
    assert_eq!(report["valid"]["claims"]["client_id"], CLIENT);
    assert_eq!(report["valid"]["claims"]["all"]["token_use"], "access");
    assert_eq!(report["garbage"]["rejection"], "REJECTION_MALFORMED");
    assert_eq!(report["health"]["status"], "SERVING");
}
