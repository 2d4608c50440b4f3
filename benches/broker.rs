//! GetToken cache-hit path: registry lookup, scope normalisation, secret verifier
//! (HMAC-SHA-256, constant-time compare), cache lookup.

use std::{hint::black_box, sync::Arc, time::Duration};

use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::future::BoxFuture;
use m2m_gateway::{
    broker::{
        AccessToken, Broker, BrokerSettings, Credentials, FleetCache, FleetSettings, RedisMode,
        RedisTarget, TokenEndpoint, TokenResponse, UpstreamError,
    },
    config::ClientConfig,
    registry::Registry,
};
use secrecy::SecretString;

struct Fixed;

impl TokenEndpoint for Fixed {
    fn client_credentials<'a>(
        &'a self,
        _: &'a str,
        _: &'a SecretString,
        _: &'a str,
    ) -> BoxFuture<'a, Result<TokenResponse, UpstreamError>> {
        Box::pin(async {
            Ok(TokenResponse {
                access_token: AccessToken::new("opaque-token-for-the-benchmark"),
                expires_in: 3600,
            })
        })
    }
    fn describe(&self) -> String {
        "fixed".into()
    }
}

fn bench(c: &mut Criterion) {
    let registry = Registry::new(
        &[ClientConfig {
            client_id: "k6h0hnjenh7auvi2as".into(),
            pool: None,
            name: "acme".into(),
            allowed_scopes: vec!["orders/read".into(), "orders/write".into()],
        }],
        50,
    );
    let broker = Broker::new(registry.clone(), Arc::new(Fixed), BrokerSettings::default());
    let creds = Credentials {
        client_id: "k6h0hnjenh7auvi2as".into(),
        secret: SecretString::from("1example23456789abcdefghijklmnopqrstuvwxyz0123456".to_owned()),
    };
    let scopes = vec!["orders/write".to_string(), "orders/read".to_string()];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(broker.get_token(&creds, &scopes)).unwrap();
    c.bench_function("broker/cache_hit", |b| {
        b.to_async(&rt)
            .iter(|| broker.get_token(black_box(&creds), black_box(&scopes)))
    });
    c.bench_function("broker/cache_hit_all_scopes", |b| {
        b.to_async(&rt)
            .iter(|| broker.get_token(black_box(&creds), &[]))
    });

    // The same hit on a replica of a Redis fleet: a hit never touches Redis (this
    // one points at a closed port; a Redis call would show as a timeout).
    let fleet = FleetCache::new(
        &FleetSettings {
            redis: RedisTarget {
                url: "redis://127.0.0.1:1".into(),
                mode: RedisMode::Standalone,
                ca_pem: None,
                username: None,
                password: None,
                iam: None,
                timeout: Duration::from_millis(100),
            },
            lock_ttl: Duration::from_secs(10),
            lock_wait: Duration::from_secs(1),
        },
        &[7u8; 32],
    )
    .unwrap();
    let fleet_broker = Broker::with_fleet(
        registry.clone(),
        Arc::new(Fixed),
        BrokerSettings {
            verifier_key: Some([7u8; 32]),
            ..BrokerSettings::default()
        },
        Some(Arc::new(fleet)),
    );
    rt.block_on(fleet_broker.get_token(&creds, &scopes))
        .unwrap();
    c.bench_function("broker/cache_hit_fleet", |b| {
        b.to_async(&rt)
            .iter(|| fleet_broker.get_token(black_box(&creds), black_box(&scopes)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
