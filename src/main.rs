//! The `m2m-gateway` command line: parse arguments, load config, call the library.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use m2m_gateway::{
    emulator::{Emulator, EmulatorClient, EmulatorConfig},
    server::Gateway,
    settings::Settings,
};
use tracing_subscriber::{EnvFilter, fmt};

#[derive(Parser)]
#[command(
    name = "m2m-gateway",
    version,
    about = "gRPC machine-to-machine auth gateway in front of Amazon Cognito"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// TOML configuration file (keys overridable by M2M_GATEWAY__SECTION__KEY).
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a configuration and print the effective settings (secrets redacted).
    CheckConfig {
        /// TOML configuration file.
        file: PathBuf,
    },
    /// Connect to the configured Redis (TLS, credentials, cluster) and run the
    /// fleet's commands, scripts and announcements once: the first-day test.
    CheckRedis {
        /// TOML configuration file (with `cache.backend = "redis"`).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a local Cognito emulator and the gateway wired to it (no AWS needed).
    Dev {
        /// gRPC listen address (loopback only; `localhost:PORT` is 127.0.0.1).
        #[arg(long, default_value = "127.0.0.1:50051", value_parser = local_addr)]
        listen: SocketAddr,
        /// Also write the gateway configuration of this session to FILE (for the
        /// examples: `protected_server --config FILE`; in-memory cache, no admin
        /// listener).
        #[arg(long, value_name = "FILE")]
        write_config: Option<PathBuf>,
        /// The emulator's address: fixed by default so that a written
        /// configuration stays valid across runs; port 0 for any free port.
        #[arg(long, default_value = "127.0.0.1:9229", value_parser = local_addr)]
        emulator_listen: SocketAddr,
        /// Serve /metrics, /healthz and /readyz here (loopback).
        #[arg(long, value_parser = local_addr)]
        admin_listen: Option<SocketAddr>,
        /// Use this Redis for the shared cache (e.g. redis://127.0.0.1:6379), with
        /// a fresh encryption key per run.
        #[arg(long, value_name = "URL")]
        redis: Option<String>,
        /// A private CA (PEM) for a `rediss://` --redis URL.
        #[arg(long, value_name = "FILE", requires = "redis")]
        redis_ca: Option<PathBuf>,
        /// Emulate this many user pools (1-4), each with its own keys, issuer and
        /// demo client (`dev-client-2` / `dev-secret-2` in the second, …), its
        /// emulator on the next port after --emulator-listen.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=m2m_gateway::dev::MAX_DEV_POOLS as i64))]
        pools: u8,
    },
    /// Exit 0 when the gateway's health check answers SERVING (container health
    /// checks; plaintext gRPC).
    Probe {
        /// gRPC address of the gateway (`localhost:PORT` is 127.0.0.1).
        #[arg(long, default_value = "127.0.0.1:50051", value_parser = local_addr)]
        addr: SocketAddr,
        /// The gateway's configuration: probe its admin listener over HTTP
        /// (`/healthz` for liveness, `/readyz` otherwise) when it has one, which
        /// works whether the gRPC listener speaks TLS or not; else plaintext
        /// gRPC on its `server.listen` port (on 127.0.0.1 when it listens on all
        /// addresses).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Health service name: "" = ready (keys loaded), "liveness" = alive.
        #[arg(long, default_value = "")]
        service: String,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Run only the Cognito-compatible emulator, for other projects' tests.
    Emulator {
        /// HTTP listen address (`localhost:PORT` is 127.0.0.1).
        #[arg(long, default_value = "127.0.0.1:9229", value_parser = local_addr)]
        listen: SocketAddr,
        /// User pool id used in paths and in `iss`.
        #[arg(long, default_value = "us-east-1_Emulated1")]
        pool_id: String,
        /// An app client, ID:SECRET:SCOPE[,SCOPE...]; repeatable.
        #[arg(long = "client", value_parser = EmulatorClient::parse)]
        clients: Vec<EmulatorClient>,
        /// Access-token lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        expires_in: u64,
    },
}

/// An `IP:PORT` address, or `localhost:PORT` (127.0.0.1): no name resolution.
fn local_addr(text: &str) -> Result<SocketAddr, String> {
    if let Some(port) = text.strip_prefix("localhost:") {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{port:?} is not a port number"))?;
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse()
        .map_err(|_| format!("{text:?} is not IP:PORT (e.g. 127.0.0.1:50051) or localhost:PORT"))
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a terminal: escape codes cost time and clutter log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = cli.log_format;
    init_logging(log_format);
    let result = match cli.command {
        Command::CheckConfig { file } => match Settings::load(&file) {
            Ok(settings) => {
                println!("{}: OK\n{}", file.display(), settings.redacted_json());
                Ok(())
            }
            Err(e) => Err(anyhow::anyhow!(e)),
        },
        Command::Serve { config } => serve(config).await,
        Command::CheckRedis { config } => check_redis(&config).await,
        Command::Dev {
            listen,
            write_config,
            emulator_listen,
            admin_listen,
            redis,
            redis_ca,
            pools,
        } => {
            let options = m2m_gateway::dev::DevOptions {
                emulator_listen,
                admin_listen,
                redis_url: redis,
                redis_ca_file: redis_ca,
                pools: usize::from(pools),
            };
            m2m_gateway::dev::run(listen, write_config.as_deref(), options, shutdown_signal()).await
        }
        Command::Probe {
            addr,
            config,
            service,
            timeout_ms,
        } => match config {
            Some(path) => probe_configured(&path, service, timeout_ms).await,
            None => probe(addr, service, timeout_ms).await,
        },
        Command::Emulator {
            listen,
            pool_id,
            clients,
            expires_in,
        } => emulator(listen, pool_id, clients, expires_in).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match log_format {
                // One JSON object like every other line, for log pipelines.
                LogFormat::Json => tracing::error!(error = %format!("{e:#}"), "fatal"),
                LogFormat::Text => eprintln!("error: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

async fn check_redis(path: &std::path::Path) -> anyhow::Result<()> {
    let settings = Settings::load(path)?;
    let (Some(fleet), Some(key)) = (&settings.fleet, settings.cache_key()) else {
        anyhow::bail!(
            "{}: cache.backend is not \"redis\": nothing to check",
            path.display()
        );
    };
    let cache = m2m_gateway::broker::FleetCache::new(fleet, key)?;
    let report = cache.self_check().await?;
    println!("{report}");
    Ok(())
}

async fn serve(path: PathBuf) -> anyhow::Result<()> {
    let settings = Settings::load(&path)?;
    let listen = settings.server.listen;
    let gateway = Gateway::from_settings(settings)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    gateway.serve(listener, shutdown_signal()).await
}

/// `probe --config`: the admin listener when there is one, else plaintext gRPC.
async fn probe_configured(
    path: &std::path::Path,
    service: String,
    timeout_ms: u64,
) -> anyhow::Result<()> {
    let settings = Settings::load(path)?;
    let local = |a: SocketAddr| {
        if a.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], a.port()))
        } else {
            a
        }
    };
    match (settings.server.admin_listen, &settings.server.tls) {
        (Some(admin), _) => {
            let admin = local(admin);
            let route = if service == m2m_gateway::server::LIVENESS_SERVICE {
                "/healthz"
            } else {
                "/readyz"
            };
            let url = format!("http://{admin}{route}");
            let client = reqwest::Client::builder()
                .timeout(std::time::Duration::from_millis(timeout_ms))
                .build()?;
            let status = client
                .get(&url)
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("{url}: {e}"))?
                .status();
            println!("{url}: {status}");
            anyhow::ensure!(status.is_success(), "not serving");
            Ok(())
        }
        (None, Some(_)) => anyhow::bail!(
            "{}: the gRPC listener speaks TLS and there is no admin listener: set server.admin_listen to probe over HTTP",
            path.display()
        ),
        (None, None) => probe(local(settings.server.listen), service, timeout_ms).await,
    }
}

async fn probe(addr: SocketAddr, service: String, timeout_ms: u64) -> anyhow::Result<()> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let check = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.clone(),
            })
            .await?
            .into_inner()
            .status;
        anyhow::Ok(status)
    };
    let status = tokio::time::timeout(std::time::Duration::from_millis(timeout_ms), check)
        .await
        .map_err(|_| anyhow::anyhow!("{addr}: no answer within {timeout_ms} ms"))??;
    let name = ServingStatus::try_from(status).map_or("UNKNOWN", |s| s.as_str_name());
    println!("{addr} {service:?}: {name}");
    anyhow::ensure!(status == ServingStatus::Serving as i32, "not serving");
    Ok(())
}

async fn emulator(
    listen: SocketAddr,
    pool_id: String,
    clients: Vec<EmulatorClient>,
    expires_in: u64,
) -> anyhow::Result<()> {
    let emu = Emulator::start(
        listen,
        EmulatorConfig {
            pool_id,
            expires_in,
            clients,
        },
    )
    .await
    .map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidInput => anyhow::anyhow!("--pool-id: {e}"),
        _ => anyhow::anyhow!("cannot listen on {listen}: {e}"),
    })?;
    println!(
        "Cognito emulator on {}\n  token endpoint: {}\n  issuer:         {}\n  jwks_uri:       {}",
        emu.addr(),
        emu.token_endpoint(),
        emu.issuer(),
        emu.jwks_uri()
    );
    shutdown_signal().await;
    emu.shutdown().await;
    Ok(())
}
