//! `m2m-gateway dev`: the emulator and the gateway wired together on loopback.

use std::{future::Future, net::SocketAddr, path::Path};

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::{
    config::Config,
    emulator::{Emulator, EmulatorClient, EmulatorConfig},
    server::Gateway,
    settings::Settings,
};

/// The demo client's id.
pub const DEV_CLIENT_ID: &str = "dev-client";
/// The demo client's secret.
pub const DEV_CLIENT_SECRET: &str = "dev-secret";
/// The demo client's scopes.
pub const DEV_SCOPES: [&str; 2] = ["demo/read", "demo/write"];

/// A gateway configuration pointing at a running emulator, listening on `listen`,
/// with one registered client per emulator client given (at least one).
pub fn config_for(emulator: &Emulator, listen: SocketAddr, clients: &[EmulatorClient]) -> Config {
    let mut toml = format!(
        "[server]\nlisten = {listen:?}\n\n[cognito]\nregion = \"us-east-1\"\nuser_pool_id = {pool:?}\n\
         token_endpoint = {te:?}\nissuer = {iss:?}\njwks_uri = {jwks:?}\n",
        listen = listen.to_string(),
        pool = emulator.pool_id(),
        te = emulator.token_endpoint(),
        iss = emulator.issuer(),
        jwks = emulator.jwks_uri(),
    );
    for c in clients {
        toml.push_str(&format!(
            "\n[[clients]]\nclient_id = {id:?}\nname = {id:?}\nallowed_scopes = {scopes}\n",
            id = c.client_id,
            scopes = serde_json::to_string(&c.scopes).unwrap_or_default(),
        ));
    }
    Settings::from_toml_str(&toml, "dev")
        .expect("the dev configuration is valid")
        .config
}

/// Runs the emulator and the gateway until `shutdown` resolves. `listen` must be a
/// loopback address.
pub async fn run(
    listen: SocketAddr,
    write_config: Option<&Path>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        listen.ip().is_loopback(),
        "dev mode listens on loopback only; {listen} is not a loopback address"
    );
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let listen = listener.local_addr()?;
    let client = EmulatorClient::new(DEV_CLIENT_ID, DEV_CLIENT_SECRET, &DEV_SCOPES);
    let emulator = Emulator::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        EmulatorConfig {
            pool_id: "us-east-1_DevPool01".into(),
            clients: vec![client.clone()],
            ..EmulatorConfig::default()
        },
    )
    .await
    .context("starting the Cognito emulator")?;
    let config = config_for(&emulator, listen, &[client]);
    if let Some(path) = write_config {
        // Written whole, then renamed: a reader never sees half a file.
        let partial = path.with_extension("partial");
        std::fs::write(&partial, config.to_toml())
            .and_then(|()| std::fs::rename(&partial, path))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let gateway = Gateway::from_config(config)?;
    let keys = gateway.validator.keys().clone();
    let server = tokio::spawn(gateway.serve(listener, shutdown));
    keys.wait_loaded().await;
    println!("{}", banner(listen, &emulator));
    let result = server.await.context("gateway task")?;
    emulator.shutdown().await;
    result
}

fn banner(addr: SocketAddr, emulator: &Emulator) -> String {
    let get_token = format!(
        "grpcurl -plaintext -d '{{\"client_id\":\"{DEV_CLIENT_ID}\",\"client_secret\":\"{DEV_CLIENT_SECRET}\"}}' {addr} m2m.gateway.v1.Gateway/GetToken"
    );
    format!(
        "m2m-gateway dev: gateway on {addr}, Cognito emulator on {emu} (issuer {iss})\n\
         demo client: {DEV_CLIENT_ID} / {DEV_CLIENT_SECRET}, scopes {scopes}\n\
         \n\
         # what the gateway serves (reflection)\n\
         grpcurl -plaintext {addr} list\n\
         \n\
         # get a token\n\
         {get_token}\n\
         \n\
         # validate it (needs jq)\n\
         TOKEN=$({get_token} | jq -r .accessToken)\n\
         grpcurl -plaintext -d \"{{\\\"token\\\":\\\"$TOKEN\\\",\\\"required_scopes\\\":[\\\"demo/read\\\"]}}\" {addr} m2m.gateway.v1.Gateway/Validate\n\
         \n\
         # health\n\
         grpcurl -plaintext {addr} grpc.health.v1.Health/Check\n\
         \n\
         Ctrl-C stops.",
        emu = emulator.addr(),
        iss = emulator.issuer(),
        scopes = DEV_SCOPES.join(" "),
    )
}
