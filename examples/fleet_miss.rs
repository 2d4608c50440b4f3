//! The GetToken miss path on a Redis fleet: every call is a miss (a new client
//! each time) against an instant in-process token endpoint, so what is measured
//! is the fleet's own work per miss: look in the fleet, take the lock, look
//! again, store the entry, record and announce the proof, release the lock.
//!
//! ```text
//! cargo run --release --example fleet_miss -- rediss://127.0.0.1:7000 [CA_FILE] [MISSES]
//! ```
//! `benches/fleet-miss.sh` starts a single node and a 3-master cluster (TLS,
//! loopback) and runs this against both.

use std::{sync::Arc, time::Duration};

use futures_util::future::BoxFuture;
use hdrhistogram::Histogram;
use m2m_gateway::{
    broker::{
        AccessToken, Broker, BrokerSettings, Credentials, FleetCache, FleetSettings, RedisMode,
        RedisTarget, TokenEndpoint, TokenResponse, UpstreamError,
    },
    config::ClientConfig,
    registry::Registry,
};
use secrecy::SecretString;

struct Instant;

impl TokenEndpoint for Instant {
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
        "instant".into()
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .expect("usage: fleet_miss REDIS_URL [CA_FILE] [MISSES]");
    let ca = args
        .next()
        .filter(|a| !a.is_empty())
        .map(|p| std::fs::read(p).expect("CA file"));
    let misses: usize = args.next().map_or(2000, |n| n.parse().expect("MISSES"));
    let clients: Vec<ClientConfig> = (0..misses)
        .map(|i| ClientConfig {
            client_id: format!("client{i:06}"),
            pool: None,
            name: format!("c{i}"),
            allowed_scopes: vec!["orders/read".into()],
        })
        .collect();
    let registry = Registry::new(&clients, 10);
    let fleet = Arc::new(
        FleetCache::new(
            &FleetSettings {
                redis: RedisTarget {
                    url,
                    mode: RedisMode::Auto,
                    ca_pem: ca,
                    username: None,
                    password: None,
                    iam: None,
                    timeout: Duration::from_secs(1),
                },
                lock_ttl: Duration::from_secs(10),
                lock_wait: Duration::from_secs(3),
            },
            &[7u8; 32],
        )
        .expect("fleet settings"),
    );
    let topology = fleet.connect().await.expect("Redis answers");
    let broker = Broker::with_fleet(
        registry,
        Arc::new(Instant),
        BrokerSettings {
            verifier_key: Some([7u8; 32]),
            upstream_per_second: None,
            max_entries: misses as u64 + 10,
            ..BrokerSettings::default()
        },
        Some(fleet.clone()),
    );
    let mut histogram = Histogram::<u64>::new(3).unwrap();
    let started = std::time::Instant::now();
    for c in &clients {
        let creds = Credentials {
            client_id: c.client_id.clone(),
            secret: SecretString::from("benchmark-secret-0123456789".to_owned()),
        };
        let t = std::time::Instant::now();
        broker.get_token(&creds, &[]).await.expect("a token");
        histogram.record(t.elapsed().as_micros() as u64).unwrap();
    }
    let elapsed = started.elapsed();
    let errors = fleet.stats().snapshot().errors;
    println!(
        "{topology}: {misses} misses in {:.2} s ({:.0}/s, one at a time); per miss µs: p50 {} p90 {} p99 {} max {}; redis errors {errors}",
        elapsed.as_secs_f64(),
        misses as f64 / elapsed.as_secs_f64(),
        histogram.value_at_quantile(0.5),
        histogram.value_at_quantile(0.9),
        histogram.value_at_quantile(0.99),
        histogram.max(),
    );
}
