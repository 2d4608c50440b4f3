//! The README's "Serve it hardened against strangers" snippet, compiled
//! (`tests/readme.rs` checks that every line of it is here). `OrdersServer` is the
//! demo Echo service under the README's name; `examples/protected_server.rs` is
//! the full program.

use std::time::Duration;

use m2m_gateway::edge::{self, Edge, EdgeLayer, EdgeSettings};
use m2m_gateway::{
    auth::{AuthLayer, AuthPolicy},
    demo::EchoService,
    jwt::CognitoValidator,
    proto,
};
use tokio::net::TcpListener;
use tonic::transport::Server;
use tower::{ServiceBuilder, limit::GlobalConcurrencyLimitLayer};

type OrdersServer<T> = proto::demo::v1::echo_server::EchoServer<T>;

#[rustfmt::skip]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind("127.0.0.1:50052").await?;
    let orders = EchoService;
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let validator = CognitoValidator::builder()
        .region("us-east-1")
        .user_pool_id("us-east-1_AbCdEf123")
        .clients(["1example23456789"])
        .build()?;
    let policy = AuthPolicy::from_descriptors(proto::DEMO_DESCRIPTOR_SET)?;

    let edge = Edge::new(EdgeSettings::default());
    Server::builder()
        .max_concurrent_streams(100)                              // one connection's share
        .http2_keepalive_interval(Some(Duration::from_secs(30)))  // dead peers
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .timeout(Duration::from_secs(10))                         // every call ends
        .layer(ServiceBuilder::new()
            .layer(EdgeLayer::new(edge.clone(), &edge::REFLECTION_PATHS)) // message first
            .load_shed()
            .layer(GlobalConcurrencyLimitLayer::new(1024))        // then a slot of the budget
            .layer(AuthLayer::local(validator, policy)))
        .add_service(OrdersServer::new(orders))
        .serve_with_incoming_shutdown(edge::incoming(listener, edge.clone()), async move {
            shutdown.await;
            edge.begin_shutdown();                                // idle connections close now
        })
        .await?;
    Ok(())
}
