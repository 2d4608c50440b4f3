//! The README's "Revocations in your service" snippet, compiled (`tests/readme.rs`
//! checks that every line of it is here): a RevocationWatcher on the gateway,
//! its list given to the validator, and the layer that then refuses revoked
//! tokens in-process.
//!
//! ```sh
//! cargo run --release -- dev &                    # gateway on 127.0.0.1:50051
//! cargo run --example readme_watcher              # protected Echo on 127.0.0.1:50052
//! ```

use std::{net::SocketAddr, time::Duration};

use m2m_gateway::auth::{
    AuthLayer, AuthPolicy, RevocationWatcher, TokenSource, WatchOptions, WhenStale,
};
use m2m_gateway::{demo::EchoService, jwt::CognitoValidator, proto};
use tonic::transport::{Channel, Server};

type OrdersServer<T> = proto::demo::v1::echo_server::EchoServer<T>;

#[rustfmt::skip]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = "127.0.0.1:50052".parse()?;
    let orders = EchoService;
    let policy = AuthPolicy::new().require(["demo/read"]);
    let validator = CognitoValidator::builder()
        .issuer("http://127.0.0.1:9229/us-east-1_DevPool01")   // dev's emulator
        .any_client()
        .build()?;

    let gateway = Channel::from_static("http://127.0.0.1:50051").connect().await?;
    let tokens = TokenSource::from_gateway(gateway.clone(), "dev-client", "dev-secret", ["demo/read"]);
    let watcher = RevocationWatcher::spawn(gateway, tokens, WatchOptions {
        max_staleness: Duration::from_secs(60),   // no word from the gateway for this long: stale
        when_stale: WhenStale::KeepServing,       // or RefuseAll: nothing passes until it is current
        ..WatchOptions::default()
    });
    let validator = validator.with_revocations(watcher.revocations());
    Server::builder()
        .layer(AuthLayer::local(validator, policy))
        .add_service(OrdersServer::new(orders))
        .serve(addr)
        .await?;
    Ok(())
}
