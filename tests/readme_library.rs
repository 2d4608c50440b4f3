//! The README's complete library test, as an adopter writes it (`tests/readme.rs`
//! checks that every line of the README's snippet is here, and `cargo test` runs
//! it): a local Cognito in-process, a validator pointed at it, a protected
//! service, token sources, and the three answers a caller can get.

use m2m_gateway::{
    auth::{AuthLayer, AuthPolicy, TokenSource},
    emulator::{Emulator, EmulatorClient, EmulatorConfig},
    jwt::CognitoValidator,
};
use m2m_gateway::{demo::EchoService, proto::demo::v1 as demo};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{
    Code,
    transport::{Channel, Server},
};

type OrdersServer<T> = demo::echo_server::EchoServer<T>;
type OrdersClient<T> = demo::echo_client::EchoClient<T>;

fn request() -> demo::EchoRequest {
    demo::EchoRequest {
        message: "list orders".into(),
    }
}

#[rustfmt::skip]
#[tokio::test]
async fn orders_needs_a_token_with_orders_read() {
    let orders = EchoService;
    // A local Cognito user pool on a free port, with two app clients.
    let emu = Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorConfig {
        clients: vec![
            EmulatorClient::new("reader", "reader-secret", &["orders/read"]),
            EmulatorClient::new("biller", "biller-secret", &["billing/read"]),
        ],
        ..EmulatorConfig::default()
    }).await.unwrap();
    let validator = CognitoValidator::builder()
        .issuer(emu.issuer())                 // the emulator instead of Cognito
        .clients(["reader", "biller"])
        .build().unwrap();
    // The protected service, on a free port.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(Server::builder()
        .layer(AuthLayer::local(validator, AuthPolicy::new().require(["orders/read"])))
        .add_service(OrdersServer::new(orders))
        .serve_with_incoming(TcpListenerStream::new(listener)));
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();

    // A caller with the scope: OK.
    let endpoint = emu.token_endpoint().parse().unwrap();
    let reader = TokenSource::from_cognito(endpoint, "reader", "reader-secret", ["orders/read"]).unwrap();
    reader.token().await.unwrap();
    let mut client = OrdersClient::with_interceptor(channel.clone(), reader.bearer_interceptor());
    assert!(client.echo(request()).await.is_ok());
    // No token: UNAUTHENTICATED.
    let err = OrdersClient::new(channel.clone()).echo(request()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // A valid token without the scope: PERMISSION_DENIED.
    let endpoint = emu.token_endpoint().parse().unwrap();
    let biller = TokenSource::from_cognito(endpoint, "biller", "biller-secret", ["billing/read"]).unwrap();
    biller.token().await.unwrap();
    let mut client = OrdersClient::with_interceptor(channel, biller.bearer_interceptor());
    assert_eq!(client.echo(request()).await.unwrap_err().code(), Code::PermissionDenied);
}
