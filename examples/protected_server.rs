//! A tonic server protected by the gateway's tokens.
//!
//! ```sh
//! cargo run --example protected_server -- --config gateway.toml --listen 127.0.0.1:50052 --require-scope demo/read
//! ```
//!
//! Reads the `[cognito]` and `[[clients]]` sections of a gateway config to build the
//! validator, and serves `grpc.health.v1.Health` (public), server reflection
//! (public) and `m2m.demo.v1.Echo` (token with `--require-scope` needed; the reply
//! carries the caller's `client_id` from the verified claims).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use m2m_gateway::{
    auth::{AuthLayer, AuthPolicy},
    config::Config,
    demo::EchoService,
    proto::{self, demo::v1::echo_server::EchoServer},
    server::build_validator,
};

#[derive(Parser)]
struct Args {
    /// Gateway configuration file (its [cognito] and [[clients]] are used).
    #[arg(long)]
    config: PathBuf,
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:50052")]
    listen: SocketAddr,
    /// Scope every Echo call needs (repeatable).
    #[arg(long = "require-scope")]
    require_scope: Vec<String>,
    /// Serve without the AuthLayer (baseline for benchmarks).
    #[arg(long)]
    no_auth: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let config = Config::load(&args.config)?;
    let validator = build_validator(&config)?;
    let _loader = validator.keys().spawn_loader(Duration::from_secs(3600));

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_not_serving::<EchoServer<EchoService>>().await;
    {
        let keys = validator.keys().clone();
        tokio::spawn(async move {
            keys.wait_loaded().await;
            reporter.set_serving::<EchoServer<EchoService>>().await;
        });
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::DEMO_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let policy = AuthPolicy::new().service("m2m.demo.v1.Echo", args.require_scope.clone());
    if args.no_auth {
        println!("UNPROTECTED Echo on {} (--no-auth)", args.listen);
    } else {
        println!(
            "protected Echo on {} (requires {:?}); health and reflection are public",
            args.listen, args.require_scope
        );
    }
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let mut builder = tonic::transport::Server::builder();
    if args.no_auth {
        builder
            .add_service(health)
            .add_service(reflection)
            .add_service(EchoServer::new(EchoService))
            .serve_with_shutdown(args.listen, shutdown)
            .await?;
    } else {
        builder
            .layer(AuthLayer::local(validator, policy))
            .add_service(health)
            .add_service(reflection)
            .add_service(EchoServer::new(EchoService))
            .serve_with_shutdown(args.listen, shutdown)
            .await?;
    }
    Ok(())
}
