//! Per-call log lines: a routine success logs at `debug` (counted by the metrics),
//! a failure or a rejected token at `info` with the reason — never the token.

mod support;

use m2m_gateway::proto::gateway::v1::{GetTokenRequest, ValidateRequest};
use support::*;

/// The per-call lines among everything captured.
fn rpc_lines(capture: &LogCapture) -> Vec<String> {
    capture
        .text()
        .lines()
        .filter(|l| l.contains("m2m_gateway::rpc"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routine_calls_log_at_debug_and_refusals_at_info() {
    let capture = LogCapture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let emu = emulator(vec![]).await;
    let gw = TestGateway::start(config(&emu, &[client_a()]))
        .await
        .ready()
        .await;
    let mut c = gw.client().await;
    let token = c
        .get_token(GetTokenRequest {
            client_id: CLIENT.into(),
            client_secret: SECRET.into(),
            scopes: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .access_token;
    let v = c
        .validate(ValidateRequest {
            token: token.clone(),
            required_scopes: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(v.valid);
    assert!(rpc_lines(&capture).is_empty(), "{:?}", rpc_lines(&capture));

    let v = c
        .validate(ValidateRequest {
            token: token.clone(),
            required_scopes: vec!["orders/admin".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!v.valid);
    let refused = c
        .get_token(GetTokenRequest {
            client_id: "nobody".into(),
            client_secret: "s".into(),
            scopes: vec![],
        })
        .await;
    assert!(refused.is_err());
    // A flood of junk tokens costs a bounded number of lines, whatever its size.
    for _ in 0..300 {
        let v = c
            .validate(ValidateRequest {
                token: "junk.junk.junk".into(),
                required_scopes: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!v.valid);
    }
    let flood: Vec<String> = rpc_lines(&capture)
        .into_iter()
        .filter(|l| l.contains("malformed"))
        .collect();
    assert!(
        (1..=m2m_gateway::telemetry::REFUSALS_LOGGED_PER_INTERVAL as usize).contains(&flood.len()),
        "{} lines for 300 refusals",
        flood.len()
    );
    // A token of an issuer the gateway does not trust: the line names the
    // issuer seen and those trusted (a misconfigured pool shows at once).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let foreign = emu.sign(&serde_json::json!({
        "sub": CLIENT, "client_id": CLIENT, "token_use": "access", "scope": "orders/read",
        "iss": "https://issuer.example/us-east-1_Other", "iat": now, "exp": now + 600,
    }));
    let v = c
        .validate(ValidateRequest {
            token: foreign.clone(),
            required_scopes: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!v.valid);
    let (_, metrics) = gw.admin_get("/metrics").await;
    assert!(
        metrics.contains("m2m_gateway_validations_total{result=\"malformed\"} 300"),
        "every refusal counted"
    );
    gw.stop().await;

    let lines: Vec<String> = rpc_lines(&capture)
        .into_iter()
        .filter(|l| !l.contains("malformed"))
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[2].contains("wrong_issuer"), "{lines:?}");
    assert!(
        lines[2].contains("https://issuer.example/us-east-1_Other"),
        "{lines:?}"
    );
    assert!(
        lines[2].contains(&format!("trusted: {}", emu.issuer())),
        "{lines:?}"
    );
    assert!(
        !lines[2].contains(foreign.rsplit('.').next().unwrap()),
        "{lines:?}"
    );
    assert!(lines[0].contains(" INFO "), "{lines:?}");
    assert!(lines[0].contains("method=\"Validate\""), "{lines:?}");
    assert!(lines[0].contains("insufficient_scope"), "{lines:?}");
    assert!(
        lines[0].contains("client_id=\"-\""),
        "unverified: {lines:?}"
    );
    assert!(lines[1].contains("method=\"GetToken\""), "{lines:?}");
    assert!(lines[1].contains("Unauthenticated"), "{lines:?}");
    let signature = token.rsplit('.').next().unwrap();
    assert!(!lines.concat().contains(signature), "a token in the logs");
}
