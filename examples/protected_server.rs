//! A tonic server protected by the gateway's tokens.
//!
//! ```sh
//! cargo run --example protected_server -- --config gateway.toml --listen 127.0.0.1:50052 --require-scope demo/read
//! ```
//!
//! Reads the `[cognito]` and `[[clients]]` sections of a gateway config to build the
//! validator, and serves `grpc.health.v1.Health` (public), server reflection v1
//! and v1alpha (public) and `m2m.demo.v1.Echo` (token with `--require-scope`
//! needed; the reply carries the caller's `client_id` from the verified claims).
//!
//! It is served the way the README recommends for any service facing callers it
//! does not know: [`edge::incoming`] closes connections that never send the
//! HTTP/2 preface or stay idle and caps their number; [`EdgeLayer`] gives each
//! call's message 3 s to arrive and bounds its size; tonic's own settings bound
//! streams per connection, calls in flight and call time.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use tokio::net::TcpListener;
use tower::limit::GlobalConcurrencyLimitLayer;

use clap::Parser;
use m2m_gateway::{
    auth::{AuthLayer, AuthPolicy},
    demo::EchoService,
    edge::{self, Edge, EdgeLayer, EdgeSettings},
    proto::{self, demo::v1::echo_server::EchoServer},
    server::build_validator,
    settings::Settings,
};

#[derive(Parser)]
struct Args {
    /// Gateway configuration file (its [cognito] and [[clients]] are used).
    #[arg(long)]
    config: PathBuf,
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:50052")]
    listen: SocketAddr,
    /// Scope every Echo call needs (repeatable); overrides the scopes declared
    /// in echo.proto (demo/read).
    #[arg(long = "require-scope")]
    require_scope: Vec<String>,
    /// Serve without the AuthLayer (baseline for benchmarks).
    #[arg(long)]
    no_auth: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let settings = Settings::load(&args.config)?;
    let validator = build_validator(&settings)?;
    // One loader per key set (every pool, every accepted issuer).
    let _loaders = validator.spawn_loaders(Duration::from_secs(3600));

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_not_serving::<EchoServer<EchoService>>().await;
    {
        let validator = validator.clone();
        tokio::spawn(async move {
            validator.wait_loaded().await;
            reporter.set_serving::<EchoServer<EchoService>>().await;
        });
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::DEMO_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // grpcurl before 1.8.8 and other older tools speak only v1alpha.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::DEMO_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    // The scopes declared in echo.proto ((m2m.auth.v1.required_scopes)); the
    // flag, when given, overrides them.
    let mut policy = AuthPolicy::from_descriptors(proto::DEMO_DESCRIPTOR_SET)?;
    if !args.require_scope.is_empty() {
        policy = policy.method("/m2m.demo.v1.Echo/Echo", args.require_scope.clone());
    }
    let listener = TcpListener::bind(args.listen).await?;
    let listen = listener.local_addr()?;
    if args.no_auth {
        println!("UNPROTECTED Echo on {listen} (--no-auth)");
    } else {
        println!(
            "protected Echo on {listen} (requires {:?}); health and reflection are public",
            args.require_scope
        );
    }
    let edge = Edge::new(EdgeSettings::default());
    let shutdown = {
        let edge = edge.clone();
        async move {
            let _ = tokio::signal::ctrl_c().await;
            // Connections without a call in flight close now.
            edge.begin_shutdown();
        }
    };
    let auth = (!args.no_auth).then(|| AuthLayer::local(validator, policy));
    tonic::transport::Server::builder()
        .max_concurrent_streams(100)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .timeout(Duration::from_secs(10))
        .layer(
            tower::ServiceBuilder::new()
                // The message first (bounded in time and size), then a slot.
                .layer(EdgeLayer::new(edge.clone(), &edge::REFLECTION_PATHS))
                .load_shed()
                .layer(GlobalConcurrencyLimitLayer::new(1024))
                .option_layer(auth),
        )
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(EchoServer::new(EchoService))
        .serve_with_incoming_shutdown(edge::incoming(listener, edge), shutdown)
        .await?;
    Ok(())
}
