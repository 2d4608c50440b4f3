//! Interop with an OAuth 2.0 server nobody here wrote: `oauth2-mock-server` from
//! the npm registry, its tokens shaped like Cognito's by a small hook script. The
//! gateway gets and validates its tokens by configuration alone.

mod support;

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
};

use m2m_gateway::{
    proto::gateway::v1::{GetTokenRequest, ValidateRequest},
    settings::Settings,
};
use support::*;

struct NodeServer(Child);

impl Drop for NodeServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn available() -> bool {
    let node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let module = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/interop/node_modules/oauth2-mock-server/package.json")
        .exists();
    node && module
}

#[tokio::test]
async fn gateway_gets_and_validates_third_party_tokens() {
    if !require_tool(
        available(),
        "node with oauth2-mock-server",
        "apt-get install nodejs npm && npm ci --prefix tests/interop",
    ) {
        return;
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/oauth2_mock_server.mjs"
    );
    let mut child = Command::new("node")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let guard = NodeServer(child);
    let first_line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    let info: serde_json::Value =
        serde_json::from_str(&first_line).expect("server announces itself");
    let issuer = info["issuer"].as_str().unwrap();
    let port = info["port"].as_u64().unwrap();

    let config = Settings::from_toml_str(
        &format!(
            r#"
[cognito]
region = "us-east-1"
user_pool_id = "us-east-1_Interop1"
token_endpoint = "http://127.0.0.1:{port}/token"
issuer = "{issuer}"
jwks_uri = "http://127.0.0.1:{port}/jwks"

[[clients]]
client_id = "interop-client"
name = "interop"
allowed_scopes = ["orders/read", "orders/write"]
"#
        ),
        "interop.toml",
    )
    .unwrap()
    .config;
    let gw = TestGateway::start(config).await.ready().await;
    let mut c = gw.client().await;
    let t = c
        .get_token(GetTokenRequest {
            client_id: "interop-client".into(),
            client_secret: "anything".into(),
            scopes: vec!["orders/read".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.scopes, vec!["orders/read"]);
    assert!(t.expires_in > 3000);
    let v = c
        .validate(ValidateRequest {
            token: t.access_token.clone(),
            required_scopes: vec!["orders/read".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(v.valid, "{}", v.detail);
    let claims = v.claims.unwrap();
    assert_eq!(claims.client_id, "interop-client");
    assert_eq!(claims.issuer, issuer);
    // Cached: a second call is served without going back to the server.
    let again = c
        .get_token(GetTokenRequest {
            client_id: "interop-client".into(),
            client_secret: "anything".into(),
            scopes: vec!["orders/read".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.access_token, t.access_token);
    assert_eq!(gw.gateway.broker.stats().snapshot().upstream_calls("ok"), 1);
    drop(guard);
}
