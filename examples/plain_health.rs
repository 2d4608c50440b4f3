//! A plain tonic server serving only `grpc.health.v1.Health` with tonic's default
//! settings: the yardstick the gateway's RPC benchmarks compare against (what a
//! tonic service costs per call before anything the gateway does).
//!
//! ```sh
//! cargo run --release --example plain_health -- 127.0.0.1:50558
//! ```

use std::net::SocketAddr;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:50558".to_owned())
        .parse()?;
    let (_reporter, health) = tonic_health::server::health_reporter();
    println!("plain tonic Health on {addr}");
    tonic::transport::Server::builder()
        .add_service(health)
        .serve(addr)
        .await?;
    Ok(())
}
