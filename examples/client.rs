//! Calls the protected Echo service with a token from the gateway, through
//! `TokenSource` (cached, refreshed in the background at 75% of its life).
//!
//! ```sh
//! cargo run --release -- dev --write-config /tmp/dev.toml &   # gateway on :50051
//! cargo run --example protected_server -- --config /tmp/dev.toml &   # Echo needs demo/read
//! cargo run --example client -- --gateway http://127.0.0.1:50051 --service http://127.0.0.1:50052
//! ```

use clap::Parser;
use m2m_gateway::{
    auth::TokenSource,
    proto::demo::v1::{EchoRequest, echo_client::EchoClient},
};
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    /// The gateway.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    gateway: String,
    /// The protected service.
    #[arg(long, default_value = "http://127.0.0.1:50052")]
    service: String,
    /// App client id.
    #[arg(long, default_value = "dev-client")]
    client_id: String,
    /// App client secret (better: the M2M_CLIENT_SECRET environment variable).
    #[arg(
        long,
        env = "M2M_CLIENT_SECRET",
        default_value = "dev-secret",
        hide_env_values = true
    )]
    client_secret: String,
    /// Scopes to ask for.
    #[arg(long = "scope", default_value = "demo/read")]
    scopes: Vec<String>,
    /// Message to echo.
    #[arg(long, default_value = "hello")]
    message: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let gateway = Channel::from_shared(args.gateway)?.connect().await?;
    let tokens =
        TokenSource::from_gateway(gateway, args.client_id, args.client_secret, args.scopes);
    tokens.token().await?;

    let service = Channel::from_shared(args.service)?.connect().await?;
    let mut echo = EchoClient::with_interceptor(service, tokens.bearer_interceptor());
    let reply = echo
        .echo(EchoRequest {
            message: args.message,
        })
        .await?
        .into_inner();
    println!(
        "echo: {:?} (caller client_id {:?})",
        reply.message, reply.client_id
    );
    Ok(())
}
