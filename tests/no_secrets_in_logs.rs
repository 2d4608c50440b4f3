//! Captures every log line at TRACE during full GetToken and Validate flows (both
//! credential forms, hits, misses, failures) and checks that no secret and no
//! token appears in them.

mod support;

use base64::{Engine as _, engine::general_purpose::STANDARD};
use m2m_gateway::proto::gateway::v1::{GetTokenRequest, ValidateRequest};
use support::*;
use tonic::Request;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_never_contain_secrets_or_tokens() {
    let capture = LogCapture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_env_filter("trace")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let emu = emulator(vec![]).await;
    let gw = TestGateway::start(config(&emu, &[client_a()]))
        .await
        .ready()
        .await;
    let mut c = gw.client().await;
    let wrong = "wrong-secret-7f3a9";

    let t = c
        .get_token(GetTokenRequest {
            client_id: CLIENT.into(),
            client_secret: SECRET.into(),
            scopes: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let mut basic = Request::new(GetTokenRequest::default());
    basic.metadata_mut().insert(
        "authorization",
        format!("Basic {}", STANDARD.encode(format!("{CLIENT}:{SECRET}")))
            .parse()
            .unwrap(),
    );
    c.get_token(basic).await.unwrap();
    let refused = c
        .get_token(GetTokenRequest {
            client_id: CLIENT.into(),
            client_secret: wrong.into(),
            scopes: vec!["orders/read".into()],
        })
        .await;
    assert!(refused.is_err());
    let v = c
        .validate(ValidateRequest {
            token: t.access_token.clone(),
            required_scopes: vec!["orders/admin".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!v.valid);
    let forged = format!("{}x", t.access_token);
    let v = c
        .validate(ValidateRequest {
            token: forged,
            required_scopes: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!v.valid);
    gw.stop().await;

    let logs = capture.text();
    assert!(
        logs.len() > 1000,
        "trace logging captured too little to mean anything"
    );
    let basic_value = STANDARD.encode(format!("{CLIENT}:{SECRET}"));
    let signature = t.access_token.rsplit('.').next().unwrap();
    let payload = t.access_token.split('.').nth(1).unwrap();
    for (what, needle) in [
        ("secret", SECRET),
        ("wrong secret", wrong),
        ("Basic credentials", basic_value.as_str()),
        ("token signature", signature),
        ("token payload", payload),
    ] {
        assert!(!logs.contains(needle), "{what} found in the logs");
    }
}
