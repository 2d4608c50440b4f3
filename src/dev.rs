//! `m2m-gateway dev`: the emulator and the gateway wired together on loopback.

use std::{future::Future, net::SocketAddr, path::Path};

use tokio::net::TcpListener;

use crate::{
    config::Config,
    emulator::{Emulator, EmulatorClient, EmulatorConfig},
    server::{App, StartError},
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
    config_for_pools(&[(emulator, clients)], listen)
}

/// A gateway configuration fronting several running emulators, one user pool
/// each (`[cognito]` for one, `[[pools]]` named `pool1`, `pool2`, … for more),
/// with the given clients registered in each.
pub fn config_for_pools(pools: &[(&Emulator, &[EmulatorClient])], listen: SocketAddr) -> Config {
    let mut toml = format!("[server]\nlisten = {:?}\n", listen.to_string());
    let several = pools.len() > 1;
    for (i, (emulator, _)) in pools.iter().enumerate() {
        let header = if several {
            format!("[[pools]]\nname = \"pool{}\"\n", i + 1)
        } else {
            "[cognito]\n".to_owned()
        };
        toml.push_str(&format!(
            "\n{header}region = \"us-east-1\"\nuser_pool_id = {pool:?}\n\
             token_endpoint = {te:?}\nissuer = {iss:?}\njwks_uri = {jwks:?}\n",
            pool = emulator.pool_id(),
            te = emulator.token_endpoint(),
            iss = emulator.issuer(),
            jwks = emulator.jwks_uri(),
        ));
    }
    for (i, (_, clients)) in pools.iter().enumerate() {
        for c in *clients {
            toml.push_str(&format!(
                "\n[[clients]]\nclient_id = {id:?}\nname = {id:?}\nallowed_scopes = {scopes}\n",
                id = c.client_id,
                scopes = serde_json::to_string(&c.scopes).unwrap_or_default(),
            ));
            if several {
                toml.push_str(&format!("pool = \"pool{}\"\n", i + 1));
            }
        }
    }
    Settings::from_toml_str(&toml, "dev")
        .expect("the dev configuration is valid")
        .config
}

/// The demo client of pool `n` (1-based): `dev-client` / `dev-secret` in the
/// first, `dev-client-2` / `dev-secret-2` in the second, and so on.
pub fn dev_client(n: usize) -> EmulatorClient {
    if n == 1 {
        EmulatorClient::new(DEV_CLIENT_ID, DEV_CLIENT_SECRET, &DEV_SCOPES)
    } else {
        EmulatorClient::new(
            &format!("{DEV_CLIENT_ID}-{n}"),
            &format!("{DEV_CLIENT_SECRET}-{n}"),
            &DEV_SCOPES,
        )
    }
}

/// The admin client of `dev`: calls the kill switch's admin API.
pub const DEV_ADMIN_ID: &str = "dev-admin";
/// Its secret.
pub const DEV_ADMIN_SECRET: &str = "dev-admin-secret";

/// The admin client of the first pool: allowed only `m2m-gateway/admin`.
pub fn dev_admin() -> EmulatorClient {
    EmulatorClient::new(DEV_ADMIN_ID, DEV_ADMIN_SECRET, &[crate::admin::ADMIN_SCOPE])
}

/// Most user pools `dev --pools` runs.
pub const MAX_DEV_POOLS: usize = 4;

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
    /// A private CA for a `rediss://` Redis (`cache.redis_ca_file`).
    pub redis_ca_file: Option<std::path::PathBuf>,
    /// User pools to emulate (1..=[`MAX_DEV_POOLS`]); each gets its own
    /// emulator (own keys, own issuer) on the next port.
    pub pools: usize,
}

impl std::fmt::Debug for DevOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevOptions")
            .field("emulator_listen", &self.emulator_listen)
            .field("admin_listen", &self.admin_listen)
            .field("pools", &self.pools)
            .field("redis_ca_file", &self.redis_ca_file)
            // A Redis URL may carry a password.
            .field(
                "redis_url",
                &self
                    .redis_url
                    .as_deref()
                    .map(crate::http::redact_url_password),
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
            redis_ca_file: None,
            pools: 1,
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
) -> Result<(), StartError> {
    let dev = |message: String| StartError::Dev(message);
    for (what, addr) in [
        ("--listen", Some(listen)),
        ("--emulator-listen", Some(options.emulator_listen)),
        ("--admin-listen", options.admin_listen),
    ] {
        if let Some(addr) = addr {
            if !addr.ip().is_loopback() {
                return Err(dev(format!(
                    "dev mode listens on loopback only; {what} {addr} is not a loopback address"
                )));
            }
        }
    }
    let bind = |source| StartError::Bind {
        what: "--listen",
        addr: listen,
        source,
    };
    let listener = TcpListener::bind(listen).await.map_err(bind)?;
    let listen = listener.local_addr().map_err(bind)?;
    if !(1..=MAX_DEV_POOLS).contains(&options.pools) {
        return Err(dev(format!(
            "--pools {} is outside 1..={MAX_DEV_POOLS}",
            options.pools
        )));
    }
    let mut emulators = Vec::with_capacity(options.pools);
    for n in 1..=options.pools {
        // Pool n listens on the next port (any free port when the first is 0).
        let mut addr = options.emulator_listen;
        if addr.port() != 0 {
            let port = addr
                .port()
                .checked_add(n as u16 - 1)
                .ok_or_else(|| dev("--emulator-listen port too high".into()))?;
            addr.set_port(port);
        }
        let emulator = Emulator::start(
            addr,
            EmulatorConfig {
                pool_id: format!("us-east-1_DevPool{n:02}"),
                clients: dev_clients(n),
                ..EmulatorConfig::default()
            },
        )
        .await
        .map_err(|e| {
            dev(format!(
                "starting the Cognito emulator on {addr} (another dev or emulator running? choose another with --emulator-listen, port 0 for any): {e}"
            ))
        })?;
        emulators.push((emulator, dev_clients(n)));
    }
    let pools: Vec<(&Emulator, &[EmulatorClient])> =
        emulators.iter().map(|(e, c)| (e, c.as_slice())).collect();
    let mut config = config_for_pools(&pools, listen);
    // The written file is for the examples and check-config: no admin listener
    // (it would clash with this one) and the in-memory cache (its key stays here).
    let written = config.clone();
    config.server.admin_listen = options.admin_listen;
    if let Some(url) = &options.redis_url {
        use base64::Engine as _;
        let mut key = [0u8; 32];
        aws_lc_rs::rand::fill(&mut key).map_err(|_| dev("no randomness".into()))?;
        config.cache.backend = crate::config::CacheBackend::Redis;
        config.cache.redis_url = Some(url.clone());
        config.cache.redis_ca_file = options.redis_ca_file.clone();
        config.cache.encryption_key = Some(secrecy::SecretString::from(
            base64::engine::general_purpose::STANDARD.encode(key),
        ));
    }
    if let Some(path) = write_config {
        // Written whole, then renamed: a reader never sees half a file.
        let partial = path.with_extension("partial");
        std::fs::write(&partial, written.to_toml())
            .and_then(|()| std::fs::rename(&partial, path))
            .map_err(|e| dev(format!("writing {}: {e}", path.display())))?;
    }
    let gateway = App::from_config(config)?;
    let validator = gateway.validator.clone();
    let server = tokio::spawn(gateway.serve(listener, shutdown));
    validator.wait_loaded().await;
    let mut text = banner(listen, &emulators[0].0);
    for (n, (emulator, _)) in emulators.iter().enumerate().skip(1) {
        let client = dev_client(n + 1);
        text.push_str(&format!(
            "pool{p}: Cognito emulator on {addr} (issuer {iss}), client {id} / {secret}\n",
            p = n + 1,
            addr = emulator.addr(),
            iss = emulator.issuer(),
            id = client.client_id,
            secret = client.secret,
        ));
    }
    if let Some(admin) = options.admin_listen {
        text.push_str(&format!(
            "admin: http://{admin}/metrics, /healthz, /readyz\n"
        ));
    }
    if let Some(url) = &options.redis_url {
        text.push_str(&format!(
            "shared cache on {}\n",
            crate::http::redact_url_password(url)
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
    let result = server
        .await
        .map_err(|e| dev(format!("gateway task: {e}")))?;
    for (emulator, _) in emulators {
        emulator.shutdown().await;
    }
    result
}

/// The clients of pool `n`: its demo client, and the admin client in the first.
fn dev_clients(n: usize) -> Vec<EmulatorClient> {
    let mut clients = vec![dev_client(n)];
    if n == 1 {
        clients.push(dev_admin());
    }
    clients
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
         # the kill switch: cut {DEV_CLIENT_ID} off (its tokens are refused at once), list, restore\n\
         ADMIN=$(grpcurl -plaintext -d '{{\"client_id\":\"{DEV_ADMIN_ID}\",\"client_secret\":\"{DEV_ADMIN_SECRET}\"}}' {addr} m2m.gateway.v1.Gateway/GetToken | jq -r .accessToken)\n\
         grpcurl -plaintext -H \"authorization: Bearer $ADMIN\" -d '{{\"client_id\":\"{DEV_CLIENT_ID}\",\"reason\":\"secret leaked\"}}' {addr} m2m.gateway.admin.v1.Admin/RevokeClient\n\
         grpcurl -plaintext -H \"authorization: Bearer $ADMIN\" {addr} m2m.gateway.admin.v1.Admin/ListRevocations\n\
         grpcurl -plaintext -H \"authorization: Bearer $ADMIN\" -d '{{\"client_id\":\"{DEV_CLIENT_ID}\",\"reason\":\"secret rotated\"}}' {addr} m2m.gateway.admin.v1.Admin/RestoreClient\n",
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
