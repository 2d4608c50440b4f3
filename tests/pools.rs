//! Several user pools and issuer migration, end to end: two emulated pools (own
//! keys, own issuer, own token endpoint) behind one gateway.

mod support;

use std::net::SocketAddr;

use m2m_gateway::{
    dev,
    emulator::{Emulator, EmulatorClient, EmulatorConfig},
    proto::gateway::v1::{GetTokenRequest, Rejection as PbRejection, ValidateRequest},
};
use support::*;

const SCOPES: [&str; 1] = ["orders/read"];

async fn pool(pool_id: &str, clients: Vec<EmulatorClient>) -> Emulator {
    Emulator::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        EmulatorConfig {
            pool_id: pool_id.into(),
            clients,
            ..EmulatorConfig::default()
        },
    )
    .await
    .unwrap()
}

fn client(id: &str, secret: &str) -> EmulatorClient {
    EmulatorClient::new(id, secret, &SCOPES)
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

async fn get_token(gw: &TestGateway, id: &str, secret: &str) -> String {
    gw.client()
        .await
        .get_token(GetTokenRequest {
            client_id: id.into(),
            client_secret: secret.into(),
            scopes: vec![],
        })
        .await
        .unwrap_or_else(|e| panic!("GetToken {id}: {e:?}"))
        .into_inner()
        .access_token
}

/// (valid, rejection) of Validate.
async fn validate(gw: &TestGateway, token: &str) -> (bool, PbRejection) {
    let v = gw
        .client()
        .await
        .validate(ValidateRequest {
            token: token.into(),
            required_scopes: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    (v.valid, v.rejection())
}

/// Access-token claims of client-a claiming `issuer`, to be signed by any key.
fn claims_of(issuer: &str) -> serde_json::Value {
    serde_json::json!({
        "iss": issuer, "client_id": "client-a", "token_use": "access",
        "scope": "orders/read", "exp": 4_000_000_000i64, "iat": 1_700_000_000,
    })
}

fn iss(token: &str) -> String {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    let claims: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    claims["iss"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn two_pools_each_client_to_its_own_pool_and_tokens_checked_against_their_issuer() {
    // Pool 2 also knows a "client-a" (a same-named app client there): the gateway
    // registers client-a in pool 1 only.
    let one = pool("us-east-1_PoolOne1", vec![client("client-a", "secret-a")]).await;
    let two = pool(
        "us-east-1_PoolTwo2",
        vec![
            client("client-b", "secret-b"),
            client("client-a", "other-a"),
        ],
    )
    .await;
    let config = dev::config_for_pools(
        &[
            (&one, &[client("client-a", "secret-a")]),
            (&two, &[client("client-b", "secret-b")]),
        ],
        loopback(),
    );
    let gw = TestGateway::start(config).await.ready().await;

    // GetToken goes to each client's own pool's token endpoint.
    let a = get_token(&gw, "client-a", "secret-a").await;
    let b = get_token(&gw, "client-b", "secret-b").await;
    assert_eq!(iss(&a), one.issuer());
    assert_eq!(iss(&b), two.issuer());
    assert_eq!((one.tokens_issued(), two.tokens_issued()), (1, 1));

    // Validate picks the key set by the token's issuer.
    assert_eq!(validate(&gw, &a).await, (true, PbRejection::Unspecified));
    assert_eq!(validate(&gw, &b).await, (true, PbRejection::Unspecified));

    // A genuine pool-2 token issued to client-a, a client registered for pool 1.
    let crossed = two.issue("client-a", &["orders/read".into()]);
    assert_eq!(
        validate(&gw, &crossed).await,
        (false, PbRejection::ClientNotAllowed)
    );
    // Pool 1's issuer, signed with pool 2's key: looked up in pool 1's key set
    // only, where its kid (a thumbprint of pool 2's key) is unknown; with pool
    // 2's key set it would verify.
    assert_eq!(
        validate(&gw, &two.sign(&claims_of(one.issuer()))).await,
        (false, PbRejection::UnknownKey)
    );

    // Metrics carry the pool: per-pool validations, key sets, clients.
    let (_, body) = gw.admin_get("/metrics").await;
    let series = |pool: &str, issuer: &str, result: &str| {
        format!(
            "m2m_gateway_pool_validations_total{{pool=\"{pool}\",issuer=\"{issuer}\",result=\"{result}\"}}"
        )
    };
    assert_eq!(metric(&body, &series("pool1", one.issuer(), "valid")), 1.0);
    assert_eq!(metric(&body, &series("pool2", two.issuer(), "valid")), 1.0);
    assert_eq!(
        metric(&body, &series("pool2", two.issuer(), "client_not_allowed")),
        1.0
    );
    assert_eq!(
        metric(&body, &series("pool1", one.issuer(), "unknown_key")),
        1.0
    );
    for (name, emu) in [("pool1", &one), ("pool2", &two)] {
        assert_eq!(
            metric(
                &body,
                &format!(
                    "m2m_gateway_jwks_keys{{pool=\"{name}\",issuer=\"{}\"}}",
                    emu.issuer()
                )
            ),
            1.0
        );
    }
    assert_eq!(
        metric(
            &body,
            "m2m_gateway_client_upstream_requests_total{client=\"client-b\",pool=\"pool2\"}"
        ),
        1.0
    );
    // The token endpoint calls, each under its pool.
    for pool in ["pool1", "pool2"] {
        assert_eq!(
            metric(
                &body,
                &format!("m2m_gateway_upstream_requests_total{{pool=\"{pool}\",outcome=\"ok\"}}")
            ),
            1.0,
            "{pool}"
        );
        assert_eq!(
            metric(
                &body,
                &format!("m2m_gateway_upstream_duration_seconds_count{{pool=\"{pool}\"}}")
            ),
            1.0,
            "{pool}"
        );
    }
    gw.stop().await;
}

#[tokio::test]
async fn readiness_waits_for_every_pools_first_key_set() {
    let one = pool("us-east-1_PoolOne1", vec![client("client-a", "secret-a")]).await;
    let mut config = {
        let two = pool("us-east-1_PoolTwo2", vec![client("client-b", "secret-b")]).await;
        dev::config_for_pools(
            &[
                (&one, &[client("client-a", "secret-a")]),
                (&two, &[client("client-b", "secret-b")]),
            ],
            loopback(),
        )
        // Pool 2's emulator is gone: its keys never load.
    };
    config.pools[1].connect_timeout_ms = 200;
    let gw = TestGateway::start(config).await;
    let first = gw
        .gateway
        .validator
        .issuers()
        .next()
        .unwrap()
        .0
        .keys()
        .clone();
    tokio::time::timeout(std::time::Duration::from_secs(10), first.wait_loaded())
        .await
        .expect("pool 1's keys load");
    let (status, _) = gw.admin_get("/readyz").await;
    assert_eq!(status, 503, "one pool's keys are not enough");
    // Pool 1 serves meanwhile: its tokens validate.
    let a = get_token(&gw, "client-a", "secret-a").await;
    assert!(validate(&gw, &a).await.0);
    gw.stop().await;
}

/// A pool switching its issuer form: the old issuer's tokens (here from a second
/// emulator standing for the old form) stay valid while `accept_previous_issuer`
/// lists it, and are refused once it is off.
#[tokio::test]
async fn issuer_migration_accepts_both_forms_only_while_on() {
    let old = pool("us-east-1_Switch1", vec![client("client-a", "secret-a")]).await;
    let new = pool("us-east-1_Switch1", vec![client("client-a", "secret-a")]).await;
    let before = old.issue("client-a", &["orders/read".into()]);
    let mut during = dev::config_for(&new, loopback(), &[client("client-a", "secret-a")]);
    during.cognito.as_mut().unwrap().accept_previous_issuer =
        m2m_gateway::config::AcceptPrevious::Issuers(vec![old.issuer().to_owned()]);
    let gw = TestGateway::start(during).await.ready().await;
    let after = get_token(&gw, "client-a", "secret-a").await;
    assert_eq!(iss(&after), new.issuer());
    assert_eq!(
        validate(&gw, &before).await,
        (true, PbRejection::Unspecified)
    );
    assert_eq!(
        validate(&gw, &after).await,
        (true, PbRejection::Unspecified)
    );
    // The old issuer's keys verify the old issuer's tokens only: a token
    // claiming the new issuer signed with the old key is looked up in the new
    // issuer's key set, where that key is unknown.
    assert_eq!(
        validate(&gw, &old.sign(&claims_of(new.issuer()))).await,
        (false, PbRejection::UnknownKey)
    );
    let (_, body) = gw.admin_get("/metrics").await;
    assert_eq!(
        metric(
            &body,
            &format!(
                "m2m_gateway_pool_validations_total{{pool=\"default\",issuer=\"{}\",result=\"valid\"}}",
                old.issuer()
            )
        ),
        1.0,
        "traffic still on the old issuer is visible"
    );
    gw.stop().await;

    // Turned off.
    let gw = TestGateway::start(dev::config_for(
        &new,
        loopback(),
        &[client("client-a", "secret-a")],
    ))
    .await
    .ready()
    .await;
    assert_eq!(
        validate(&gw, &before).await,
        (false, PbRejection::WrongIssuer)
    );
    assert!(validate(&gw, &after).await.0);
    gw.stop().await;
}

#[tokio::test]
async fn dev_runs_two_pools() {
    let dev = DevProcess::start(&["--pools", "2"]).await;
    assert!(
        dev.banner.contains("pool2: Cognito emulator on"),
        "{}",
        dev.banner
    );
    assert!(
        dev.banner.contains("dev-client-2 / dev-secret-2"),
        "{}",
        dev.banner
    );
    let mut client = m2m_gateway::proto::gateway::v1::gateway_client::GatewayClient::connect(
        format!("http://{}", dev.addr),
    )
    .await
    .unwrap();
    let mut issuers = Vec::new();
    for (id, secret) in [
        ("dev-client", "dev-secret"),
        ("dev-client-2", "dev-secret-2"),
    ] {
        let token = client
            .get_token(GetTokenRequest {
                client_id: id.into(),
                client_secret: secret.into(),
                scopes: vec![],
            })
            .await
            .unwrap()
            .into_inner()
            .access_token;
        let v = client
            .validate(ValidateRequest {
                token: token.clone(),
                required_scopes: vec!["demo/read".into()],
            })
            .await
            .unwrap()
            .into_inner();
        assert!(v.valid, "{id}: {}", v.detail);
        issuers.push(iss(&token));
    }
    assert_ne!(issuers[0], issuers[1], "two pools, two issuers");
}
