//! The `m2m-gateway` command line: parse arguments, load config, call the library.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use m2m_gateway::telemetry::traces::Traces;
use m2m_gateway::{
    emulator::{Emulator, EmulatorClient, EmulatorConfig},
    ops::{self, shutdown_signal},
    server::{App, StartError},
    settings::Settings,
};
use tracing_subscriber::{
    EnvFilter, Layer as _, fmt, layer::SubscriberExt as _, util::SubscriberInitExt as _,
};

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

/// Logs to stderr under `RUST_LOG` (default `info`); the trace pipeline, when
/// there is one, sees this crate's spans only.
fn init_logging(format: LogFormat, traces: Option<&Traces>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a terminal: escape codes cost time and clutter log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = match format {
        LogFormat::Text => fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(traces.map(Traces::layer))
        .init();
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = cli.log_format;
    // Traces only for the commands that serve calls.
    let traces = match cli.command {
        Command::Serve { .. } | Command::Dev { .. } => Traces::from_env(),
        _ => Ok(None),
    };
    let traces = match traces {
        Ok(traces) => traces,
        Err(e) => {
            init_logging(log_format, None);
            return fail(log_format, &anyhow::anyhow!(e));
        }
    };
    init_logging(log_format, traces.as_ref());
    let result = match cli.command {
        Command::CheckConfig { file } => match Settings::load(&file) {
            Ok(settings) => {
                print_or_ignore(&ops::check_config_report(&file, &settings));
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
            m2m_gateway::dev::run(listen, write_config.as_deref(), options, shutdown_signal())
                .await
                .map_err(anyhow::Error::from)
        }
        Command::Probe {
            addr,
            config,
            service,
            timeout_ms,
        } => probe(addr, config, service, timeout_ms).await,
        Command::Emulator {
            listen,
            pool_id,
            clients,
            expires_in,
        } => emulator(listen, pool_id, clients, expires_in).await,
    };
    if let Some(traces) = traces {
        // Blocks until the last batch is sent (or the export timeout).
        let _ = tokio::task::spawn_blocking(move || traces.shutdown()).await;
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(log_format, &e),
    }
}

fn fail(log_format: LogFormat, e: &anyhow::Error) -> ExitCode {
    match log_format {
        // One JSON object like every other line, for log pipelines.
        LogFormat::Json => tracing::error!(error = %format!("{e:#}"), "fatal"),
        LogFormat::Text => eprintln!("error: {e:#}"),
    }
    ExitCode::FAILURE
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
    if settings.fleet.is_none() && settings.revocations.state_file.is_none() {
        tracing::warn!(
            "revocations.state_file is unset and the cache is in memory: revocations made on this replica are forgotten when it restarts"
        );
    }
    let listen = settings.server.listen;
    let gateway = App::from_settings(settings)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| StartError::Bind {
            what: "server.listen",
            addr: listen,
            source,
        })?;
    Ok(gateway.serve(listener, shutdown_signal()).await?)
}

/// `probe`: the configured endpoint (see [`ops::probe_target`]), or `--addr`.
async fn probe(
    addr: SocketAddr,
    config: Option<PathBuf>,
    service: String,
    timeout_ms: u64,
) -> anyhow::Result<()> {
    let target = match config {
        Some(path) => {
            let settings = Settings::load(&path)?;
            ops::probe_target(&settings, &service)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => ops::ProbeTarget::Grpc(addr),
    };
    match ops::probe(&target, &service, Duration::from_millis(timeout_ms)).await {
        Ok(line) => {
            print_or_ignore(&line);
            Ok(())
        }
        Err(e) => {
            if let ops::ProbeError::NotServing { answer } = &e {
                print_or_ignore(answer);
            }
            Err(e.into())
        }
    }
}

/// One line to stdout; a reader that went away (`| head -1`) is not an error.
fn print_or_ignore(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}").and_then(|()| out.flush());
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
