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

/// Default address of the emulator in dev mode: fixed, so that a written
/// configuration stays valid across runs (the `emulator` command's default too).
pub const DEV_EMULATOR_LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    9229,
));

/// What `dev` runs besides the gateway's own listener.
#[derive(Clone)]
pub struct DevOptions {
    /// Where the emulator listens (port 0: any free port).
    pub emulator_listen: SocketAddr,
    /// An admin listener (`/metrics`, `/healthz`, `/readyz`).
    pub admin_listen: Option<SocketAddr>,
    /// The shared cache on this Redis (a fresh encryption key per run).
    pub redis_url: Option<String>,
}

impl std::fmt::Debug for DevOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevOptions")
            .field("emulator_listen", &self.emulator_listen)
            .field("admin_listen", &self.admin_listen)
            // A Redis URL may carry a password.
            .field(
                "redis_url",
                &self
                    .redis_url
                    .as_deref()
                    .map(crate::config::redact_url_password),
            )
            .finish()
    }
}

impl Default for DevOptions {
    fn default() -> Self {
        Self {
            emulator_listen: DEV_EMULATOR_LISTEN,
            admin_listen: None,
            redis_url: None,
        }
    }
}

/// Runs the emulator and the gateway until `shutdown` resolves. Every address
/// must be a loopback address.
pub async fn run(
    listen: SocketAddr,
    write_config: Option<&Path>,
    options: DevOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    for (what, addr) in [
        ("--listen", Some(listen)),
        ("--emulator-listen", Some(options.emulator_listen)),
        ("--admin-listen", options.admin_listen),
    ] {
        if let Some(addr) = addr {
            anyhow::ensure!(
                addr.ip().is_loopback(),
                "dev mode listens on loopback only; {what} {addr} is not a loopback address"
            );
        }
    }
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let listen = listener.local_addr()?;
    let client = EmulatorClient::new(DEV_CLIENT_ID, DEV_CLIENT_SECRET, &DEV_SCOPES);
    let emulator = Emulator::start(
        options.emulator_listen,
        EmulatorConfig {
            pool_id: "us-east-1_DevPool01".into(),
            clients: vec![client.clone()],
            ..EmulatorConfig::default()
        },
    )
    .await
    .with_context(|| {
        format!(
            "starting the Cognito emulator on {} (another dev or emulator running? choose another with --emulator-listen, port 0 for any)",
            options.emulator_listen
        )
    })?;
    let mut config = config_for(&emulator, listen, &[client]);
    // The written file is for the examples and check-config: no admin listener
    // (it would clash with this one) and the in-memory cache (its key stays here).
    let written = config.clone();
    config.server.admin_listen = options.admin_listen;
    if let Some(url) = &options.redis_url {
        use base64::Engine as _;
        let mut key = [0u8; 32];
        aws_lc_rs::rand::fill(&mut key).map_err(|_| anyhow::anyhow!("no randomness"))?;
        config.cache.backend = crate::config::CacheBackend::Redis;
        config.cache.redis_url = Some(url.clone());
        config.cache.encryption_key = Some(secrecy::SecretString::from(
            base64::engine::general_purpose::STANDARD.encode(key),
        ));
    }
    if let Some(path) = write_config {
        // Written whole, then renamed: a reader never sees half a file.
        let partial = path.with_extension("partial");
        std::fs::write(&partial, written.to_toml())
            .and_then(|()| std::fs::rename(&partial, path))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let gateway = Gateway::from_config(config)?;
    let keys = gateway.validator.keys().clone();
    let server = tokio::spawn(gateway.serve(listener, shutdown));
    keys.wait_loaded().await;
    let mut text = banner(listen, &emulator);
    if let Some(admin) = options.admin_listen {
        text.push_str(&format!(
            "admin: http://{admin}/metrics, /healthz, /readyz\n"
        ));
    }
    if let Some(url) = &options.redis_url {
        text.push_str(&format!(
            "shared cache on {}\n",
            crate::config::redact_url_password(url)
        ));
    }
    text.push_str("\nCtrl-C stops.\n");
    // One write; a reader that went away (`dev | head`) must not stop the gateway,
    // so a failed write is ignored instead of panicking as `println!` would.
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    }
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
         grpcurl -plaintext {addr} grpc.health.v1.Health/Check\n",
        emu = emulator.addr(),
        iss = emulator.issuer(),
        scopes = DEV_SCOPES.join(" "),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn options_never_show_a_redis_password() {
        let options = super::DevOptions {
            redis_url: Some("redis://user:hunter2@127.0.0.1:6379".into()),
            ..Default::default()
        };
        let shown = format!("{options:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("127.0.0.1:6379"),
            "{shown}"
        );
    }
}
