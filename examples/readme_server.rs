//! The README's "Protect your tonic service" snippets, compiled (`tests/readme.rs`
//! checks that every line of them is here): a validator built in code, the layer,
//! and a policy read from the `.proto` declarations. `OrdersServer` is the demo
//! Echo service under the README's name.
//!
//! ```sh
//! cargo run --example readme_server   # needs a real user pool to accept tokens
//! ```

use std::net::SocketAddr;

use m2m_gateway::{
    auth::{AuthLayer, AuthPolicy},
    jwt::CognitoValidator,
};
use m2m_gateway::{demo::EchoService, proto};
use tonic::transport::Server;

type OrdersServer<T> = proto::demo::v1::echo_server::EchoServer<T>;
const ORDERS_DESCRIPTOR_SET: &[u8] = proto::DEMO_DESCRIPTOR_SET;

#[rustfmt::skip]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = "127.0.0.1:50052".parse()?;
    let orders = EchoService;
    let policy = AuthPolicy::from_descriptors(ORDERS_DESCRIPTOR_SET)?;
    println!("policy from the .proto: {:?}", policy.requirement("/m2m.demo.v1.Echo/Echo"));

    let validator = CognitoValidator::builder()
        .user_pool_id("us-east-1_AbCdEf123")   // its Region comes from the id
        .clients(["1example23456789"])        // the app clients you accept (or .any_client())
        .build()?;                            // loads and refreshes its own keys
    Server::builder()
        .layer(AuthLayer::local(validator, AuthPolicy::new().require(["demo/read"])))
        .add_service(OrdersServer::new(orders))
        .serve(addr)
        .await?;
    Ok(())
}
