//! Per-call log lines: a routine success logs at `debug` (counted by the metrics),
//! a failure or a rejected token at `info` with the reason — never the token.

mod support;

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use m2m_gateway::proto::gateway::v1::{GetTokenRequest, ValidateRequest};
use support::*;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn rpc_lines(&self) -> Vec<String> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .filter(|l| l.contains("m2m_gateway::rpc"))
            .map(str::to_owned)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routine_calls_log_at_debug_and_refusals_at_info() {
    let capture = Capture::default();
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
    assert!(capture.rpc_lines().is_empty(), "{:?}", capture.rpc_lines());

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
    gw.stop().await;

    let lines = capture.rpc_lines();
    assert_eq!(lines.len(), 2, "{lines:?}");
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
