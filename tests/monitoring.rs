//! The dashboard and the alert rules in `deploy/monitoring/` use only metrics a
//! running gateway exports: every metric name in them is looked up in a real
//! scrape of a gateway on a real redis-server (the fleet's series included),
//! after the traffic that makes its labelled series appear.

mod support;

use std::collections::BTreeSet;

use m2m_gateway::{
    config::CacheBackend,
    proto::gateway::v1::{GetTokenRequest, ValidateRequest},
};
use secrecy::SecretString;
use support::{redis_servers::*, *};

/// Metric names a file refers to: ours, gRPC's and the process's.
fn names_used(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    for prefix in ["m2m_gateway_", "grpc_server_", "process_"] {
        let mut from = 0;
        while let Some(i) = text[from..].find(prefix) {
            let start = from + i;
            let before = start.checked_sub(1).map(|j| bytes[j]);
            let end = text[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(text.len(), |n| start + n);
            // A whole identifier, not a recording rule's `m2m_gateway:` name.
            if !before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_') {
                names.insert(text[start..end].to_owned());
            }
            from = end;
        }
    }
    names
}

/// Every series name the scrape can be queried by (histograms by their parts).
fn names_scraped(body: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        names.insert(name.to_owned());
        if kind == "histogram" {
            for part in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{part}"));
            }
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_of_the_dashboard_and_the_alerts_is_in_a_real_scrape() {
    if !redis_present() {
        return;
    }
    let redis = RedisNode::plain();
    let emu = emulator(vec![]).await;
    let mut cfg = config(&emu, &[client_a()]);
    cfg.cache.backend = CacheBackend::Redis;
    cfg.cache.redis_url = Some(format!("redis://127.0.0.1:{}", redis.port));
    cfg.cache.encryption_key = Some(SecretString::from(
        "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=".to_owned(),
    ));
    let gw = TestGateway::start(cfg).await.ready().await;
    let mut client = gw.client().await;
    let token = client
        .get_token(GetTokenRequest {
            client_id: CLIENT.into(),
            client_secret: SECRET.into(),
            scopes: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .access_token;
    client
        .validate(ValidateRequest {
            token,
            required_scopes: vec![],
        })
        .await
        .unwrap();
    let (status, body) = gw.admin_get("/metrics").await;
    assert_eq!(status, 200);
    let scraped = names_scraped(&body);
    let root = env!("CARGO_MANIFEST_DIR");
    for file in [
        "deploy/monitoring/grafana-dashboard.json",
        "deploy/monitoring/prometheusrule.yaml",
    ] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        let used = names_used(&text);
        assert!(used.len() >= 5, "{file}: only {used:?}");
        let missing: Vec<_> = used.difference(&scraped).collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics no gateway exports: {missing:?}"
        );
    }
    // The dashboard is JSON Grafana can import: panels with queries.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/deploy/monitoring/grafana-dashboard.json"))
            .unwrap(),
    )
    .unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(
        panels
            .iter()
            .all(|p| !p["targets"].as_array().unwrap().is_empty())
    );
    gw.stop().await;
}
