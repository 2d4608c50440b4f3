//! GetToken cache-hit path: registry lookup, scope normalisation, secret verifier
//! (HMAC-SHA-256, constant-time compare), cache lookup.

use std::{hint::black_box, sync::Arc};

use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::future::BoxFuture;
use m2m_gateway::{
    broker::{
        AccessToken, Broker, BrokerSettings, Credentials, TokenEndpoint, TokenResponse,
        UpstreamError,
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
    let broker = Broker::new(registry, Arc::new(Fixed), BrokerSettings::default());
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
}

criterion_group!(benches, bench);
criterion_main!(benches);
