//! The README's "Call a protected service" snippet, compiled (`tests/readme.rs`
//! checks that every line of it is here). Against `cargo run -- dev` and
//! `examples/protected_server` (see the README):
//!
//! ```sh
//! M2M_CLIENT_SECRET=dev-secret cargo run --example readme_client
//! ```

use m2m_gateway::auth::TokenSource;
use m2m_gateway::proto::demo::v1::{EchoRequest, echo_client::EchoClient};
use tonic::transport::Channel;

#[rustfmt::skip]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let secret = std::env::var("M2M_CLIENT_SECRET").unwrap_or_else(|_| "dev-secret".into());
    let gateway_channel = Channel::from_static("http://127.0.0.1:50051").connect().await?;
    let service_channel = Channel::from_static("http://127.0.0.1:50052").connect().await?;

    let tokens = TokenSource::from_gateway(gateway_channel, "dev-client", secret, ["demo/read"]);
    tokens.token().await?;                 // wait for the first token (optional)
    let mut echo = EchoClient::with_interceptor(service_channel, tokens.bearer_interceptor());

    let reply = echo.echo(EchoRequest { message: "hi".into() }).await?.into_inner();
    println!("{} (as {})", reply.message, reply.client_id);
    Ok(())
}
