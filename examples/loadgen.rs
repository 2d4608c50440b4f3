//! A tonic load generator for the gateway and protected services. Every response
//! is checked to be a gRPC success (and `valid=true` for Validate); the run fails
//! if any is not.
//!
//! ```sh
//! cargo run --release --example loadgen -- --target validate --addr http://127.0.0.1:50051 \
//!     --gateway http://127.0.0.1:50051 --concurrency 50 --duration 10
//! ```
//! Targets: `validate`, `get-token`, `health` (gateway), `echo` (protected server).
//! Validate and echo use one warm token obtained from `--gateway` first.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use m2m_gateway::proto::{
    demo::v1::{EchoRequest, echo_client::EchoClient},
    gateway::v1::{GetTokenRequest, ValidateRequest, gateway_client::GatewayClient},
};
use tonic::{Request, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[derive(Clone, Copy, ValueEnum, Debug)]
enum Target {
    Validate,
    GetToken,
    Health,
    Echo,
}

#[derive(Parser)]
struct Args {
    /// What to call.
    #[arg(long, value_enum)]
    target: Target,
    /// Server to load.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Gateway that issues the warm token (validate, echo).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    gateway: String,
    /// Concurrent in-flight calls.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// HTTP/2 connections the calls are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Seconds to run (after one second of warm-up).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Client id for GetToken.
    #[arg(long, default_value = "dev-client")]
    client_id: String,
    /// Client secret for GetToken.
    #[arg(
        long,
        env = "M2M_CLIENT_SECRET",
        default_value = "dev-secret",
        hide_env_values = true
    )]
    client_secret: String,
    /// Scopes for GetToken.
    #[arg(long = "scope")]
    scopes: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(Channel::from_shared(args.addr.clone())?.connect().await?);
    }
    let token = match args.target {
        Target::Validate | Target::Echo => {
            let gw = Channel::from_shared(args.gateway.clone())?
                .connect()
                .await?;
            let t = GatewayClient::new(gw)
                .get_token(get_token_request(&args))
                .await?
                .into_inner();
            Some(Arc::<str>::from(t.access_token))
        }
        _ => None,
    };

    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..args.concurrency {
        let channel = channels[i % channels.len()].clone();
        let (args, token, stop, measuring, failures) = (
            args.clone(),
            token.clone(),
            stop.clone(),
            measuring.clone(),
            failures.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            let mut gateway = GatewayClient::new(channel.clone());
            let mut health = HealthClient::new(channel.clone());
            let mut echo = EchoClient::new(channel);
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let ok = match args.target {
                    Target::Validate => gateway
                        .validate(ValidateRequest {
                            token: token.as_deref().unwrap_or_default().to_owned(),
                            required_scopes: Vec::new(),
                        })
                        .await
                        .is_ok_and(|r| r.get_ref().valid),
                    Target::GetToken => gateway.get_token(get_token_request(&args)).await.is_ok(),
                    Target::Health => health
                        .check(HealthCheckRequest {
                            service: String::new(),
                        })
                        .await
                        .is_ok(),
                    Target::Echo => {
                        let mut req = Request::new(EchoRequest {
                            message: "load".into(),
                        });
                        if let Some(t) = &token {
                            req.metadata_mut().insert(
                                "authorization",
                                format!("Bearer {t}").parse().expect("ascii token"),
                            );
                        }
                        echo.echo(req).await.is_ok()
                    }
                };
                if measuring.load(Ordering::Relaxed) {
                    let micros = started.elapsed().as_micros().max(1) as u64;
                    let _ = hist.record(micros.min(60_000_000));
                    if !ok {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            hist
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for t in tasks {
        total.add(t.await?)?;
    }
    let failed = failures.load(Ordering::Relaxed);
    println!(
        "target={:?} concurrency={} connections={} requests={} failed={} rps={:.0} p50={}us p99={}us p99.9={}us max={}us",
        args.target,
        args.concurrency,
        args.connections,
        total.len(),
        failed,
        total.len() as f64 / elapsed.as_secs_f64(),
        total.value_at_quantile(0.50),
        total.value_at_quantile(0.99),
        total.value_at_quantile(0.999),
        total.max(),
    );
    anyhow::ensure!(failed == 0, "{failed} calls were not a gRPC success");
    Ok(())
}

fn get_token_request(args: &Args) -> GetTokenRequest {
    GetTokenRequest {
        client_id: args.client_id.clone(),
        client_secret: args.client_secret.clone(),
        scopes: args.scopes.clone(),
    }
}
