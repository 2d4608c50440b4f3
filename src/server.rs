//! Assembles the gateway from its configuration and serves it: the Gateway
//! service, `grpc.health.v1.Health`, server reflection v1 and v1alpha, limits,
//! and graceful shutdown.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::{
    admin::{self, AdminService, KillSwitch},
    auth::{AuthLayer, AuthPolicy},
    broker::{Broker, CognitoClient, FleetCache, PoolRoutes, TokenEndpoint},
    calls::CallLayer,
    config::Config,
    edge::{self, Edge, EdgeSettings},
    jwt::{CognitoValidator, JwksFetch, trusted_issuer},
    proto::{self, gateway::v1::gateway_server::GatewayServer},
    registry::Registry,
    service::GatewayService,
    settings::Settings,
    telemetry::{RpcStats, Telemetry, serve_admin},
};

/// Health-check service name that reports SERVING as long as the process serves
/// (for liveness probes); `""` and `m2m.gateway.v1.Gateway` wait for the keys.
pub const LIVENESS_SERVICE: &str = "liveness";
/// How often the key set is refreshed when nothing else triggers it.
pub const JWKS_REFRESH_PERIOD: Duration = crate::jwt::DEFAULT_JWKS_REFRESH_PERIOD;

/// Why a gateway could not be built or served, by what failed: an embedder can
/// tell a failed bind from a bad TLS file or an unreachable Redis set-up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration was refused (the key is named).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A listener could not be bound.
    #[error("{what}: cannot listen on {addr}: {source}")]
    Bind {
        /// The setting or option (`server.admin_listen`, `--listen`).
        what: &'static str,
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A TLS file could not be read or used.
    #[error("server.tls.{key}: {message}")]
    Tls {
        /// `cert`, `key` or `client_ca`.
        key: &'static str,
        /// Why.
        message: String,
    },
    /// A pool's token endpoint or JWKS client could not be made.
    #[error("{what} of pool {pool:?}: {message}")]
    Upstream {
        /// `token endpoint client` or `JWKS client`.
        what: &'static str,
        /// The pool.
        pool: String,
        /// Why.
        message: String,
    },
    /// The trusted issuers do not make a validator.
    #[error(transparent)]
    Keys(#[from] crate::jwt::TrustError),
    /// The fleet's Redis client could not be made.
    #[error(transparent)]
    Redis(#[from] crate::broker::FleetSetupError),
    /// Server reflection could not be built from the descriptor sets.
    #[error("reflection: {0}")]
    Reflection(String),
    /// The gRPC server stopped with an error.
    #[error("gRPC server failed: {0}")]
    Serve(#[source] tonic::transport::Error),
    /// `revocations.state_file` exists but cannot be read or is corrupt.
    #[error(transparent)]
    Revocations(#[from] crate::revocations::StateError),
    /// `dev` could not set up its world (emulators, files, options).
    #[error("{0}")]
    Dev(String),
}

/// The gateway assembled: its parts, built from validated [`Settings`] (the
/// generated `Gateway` trait is the RPC contract, [`GatewayService`] implements it).
#[derive(Debug, Clone)]
pub struct App {
    /// The settings it was built from.
    pub settings: Settings,
    /// Registered clients.
    pub registry: Registry,
    /// The GetToken broker.
    pub broker: Broker,
    /// The access-token validator.
    pub validator: CognitoValidator,
    /// Counters of the Gateway RPCs.
    pub rpc: Arc<RpcStats>,
    /// The kill switch (the admin API's revocations).
    pub kill_switch: Arc<KillSwitch>,
}

impl App {
    /// Checks `config` and builds every part (see [`App::from_settings`]).
    pub fn from_config(config: Config) -> Result<Self, StartError> {
        Self::from_settings(Settings::new(config, "config")?)
    }

    /// Builds every part from checked settings.
    pub fn from_settings(settings: Settings) -> Result<Self, StartError> {
        let registry = settings.registry.clone();
        let upstream = token_endpoints(&settings)?;
        let fleet = match (&settings.fleet, settings.cache_key()) {
            (Some(fleet), Some(key)) => Some(Arc::new(FleetCache::new(fleet, key)?)),
            _ => None,
        };
        let broker = Broker::with_fleet(registry.clone(), upstream, settings.broker.clone(), fleet);
        // A revocation in force is never forgotten: an unreadable state file
        // stops the start.
        broker
            .revocations()
            .publish(admin::load_state(&settings.revocations)?);
        let validator = build_validator(&settings)?.with_revocations(broker.revocations().clone());
        let kill_switch = Arc::new(KillSwitch::new(
            broker.clone(),
            validator.clone(),
            &settings.revocations,
        ));
        Ok(Self {
            settings,
            registry,
            broker,
            validator,
            rpc: Arc::new(RpcStats::default()),
            kill_switch,
        })
    }

    /// Serves on `listener` until `shutdown` resolves, then stops accepting, drains
    /// in-flight calls for up to `server.shutdown_grace_ms`, and returns. Also serves
    /// the admin endpoints when `server.admin_listen` is set.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let admin_listener = match self.settings.server.admin_listen {
            Some(addr) => {
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| StartError::Bind {
                            what: "server.admin_listen",
                            addr,
                            source,
                        })?,
                )
            }
            None => None,
        };
        self.serve_on(listener, admin_listener, shutdown).await
    }

    /// [`App::serve`] with the admin listener already bound (or none).
    pub async fn serve_on(
        self,
        listener: TcpListener,
        admin_listener: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let cfg = self.settings.server.clone();
        // Everything that can fail on configuration fails before serving.
        let transport = transport(&cfg)?;
        let tls = match &cfg.tls {
            Some(files) => {
                let cert = Arc::new(
                    crate::tls::ReloadingCert::load(&files.cert, &files.key).map_err(tls_error)?,
                );
                let acceptor = crate::tls::acceptor(files.client_ca.as_deref(), cert.clone())
                    .map_err(tls_error)?;
                Some((
                    cert,
                    acceptor,
                    Duration::from_secs(files.reload_interval_secs),
                ))
            }
            None => None,
        };
        let (reflection_v1, reflection_v1alpha) = reflection(cfg.edge.max_message_bytes)?;
        let (stop, stopped) = Stopped::new();
        let telemetry = Telemetry::new(
            self.broker.clone(),
            self.validator.clone(),
            self.rpc.clone(),
        );
        let admin = admin_listener.map(|l| spawn_admin(l, telemetry.clone(), stopped.clone()));
        // One loader per key set: every pool's issuer, and any previous issuer.
        let loaders = self.validator.spawn_loaders(JWKS_REFRESH_PERIOD);
        // Redis is connected now, and the fleet's proven secrets followed.
        self.broker.start();
        let (health, readiness) = self.health(cfg.edge.max_message_bytes).await;
        let gateway = GatewayService::new(self.broker.clone(), self.validator.clone())
            .draining(stopped.0.clone())
            .into_server(cfg.edge.max_message_bytes);
        let admin_api =
            AdminService::new(self.kill_switch.clone()).into_server(cfg.edge.max_message_bytes);
        let maintenance = self.kill_switch.spawn_maintenance();
        let auth = AuthLayer::local(self.validator.clone(), admin_policy()?);
        let edge = Edge::new(EdgeSettings {
            max_connections: self.settings.connection_cap(),
            ..cfg.edge.clone()
        });
        telemetry.set_edge(edge.clone());
        let signal = drain_on(
            shutdown,
            cfg.drain_delay,
            edge.clone(),
            telemetry.clone(),
            stop,
        );
        self.log_listening(&listener);
        let layers = tower::ServiceBuilder::new()
            .layer(CallLayer::new(self.rpc.clone()))
            .layer(edge.layers(&edge::REFLECTION_PATHS, cfg.max_concurrent_requests.get()))
            .layer(auth);
        let router = transport
            .layer(layers)
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(gateway)
            .add_service(admin_api);
        let mut reloader = None;
        let serve: std::pin::Pin<Box<dyn Future<Output = _> + Send>> = match tls {
            Some((cert, acceptor, every)) => {
                reloader = Some(cert.spawn_reloader(every));
                let incoming = crate::tls::incoming(
                    listener,
                    edge.clone(),
                    acceptor,
                    cfg.edge.handshake_timeout,
                );
                Box::pin(router.serve_with_incoming_shutdown(incoming, signal))
            }
            None => Box::pin(
                router.serve_with_incoming_shutdown(edge::incoming(listener, edge.clone()), signal),
            ),
        };
        telemetry.set_listening(true);
        let grace = cfg.shutdown_grace;
        let result = tokio::select! {
            r = serve => r.map_err(StartError::Serve),
            () = async {
                stopped.wait().await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!(?grace, "shutdown grace period over; closing remaining calls");
                Ok(())
            }
        };
        loaders.iter().for_each(tokio::task::JoinHandle::abort);
        reloader.iter().for_each(tokio::task::JoinHandle::abort);
        maintenance.abort();
        readiness.abort();
        telemetry.set_listening(false);
        if let Some(mut admin) = admin {
            // The admin listener got the stop signal with the gRPC one, but a scraper's
            // kept-alive connection (or a gRPC failure before any signal) must not keep
            // the process alive: bounded wait, then abort.
            if result.is_err()
                || tokio::time::timeout(Duration::from_secs(2), &mut admin)
                    .await
                    .is_err()
            {
                admin.abort();
            }
        }
        result
    }

    /// grpc.health.v1: alive at once under [`LIVENESS_SERVICE`]; `""` and the
    /// Gateway serving once every pool's first key set is in (the task that
    /// flips them is returned).
    async fn health(
        &self,
        max_message_bytes: usize,
    ) -> (
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
        tokio::task::JoinHandle<()>,
    ) {
        let (reporter, health) = tonic_health::server::health_reporter();
        let health = health.max_decoding_message_size(max_message_bytes);
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        reporter
            .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
            .await;
        reporter
            .set_not_serving::<GatewayServer<GatewayService>>()
            .await;
        let validator = self.validator.clone();
        let readiness = tokio::spawn(async move {
            validator.wait_loaded().await;
            reporter
                .set_serving::<GatewayServer<GatewayService>>()
                .await;
            reporter
                .set_service_status("", ServingStatus::Serving)
                .await;
        });
        (health, readiness)
    }

    fn log_listening(&self, listener: &TcpListener) {
        let addr = listener
            .local_addr()
            .map_or_else(|_| "?".to_owned(), |a| a.to_string());
        let issuers = self
            .validator
            .issuers()
            .map(|(t, _)| format!("{}={}", t.pool(), t.issuer()))
            .collect::<Vec<_>>()
            .join(" ");
        tracing::info!(%addr, %issuers, clients = self.registry.len(), "gateway listening");
    }
}

/// tonic's transport with the listener's limits, and TLS when configured.
/// Who may call what on the gateway's port: the admin API needs the scopes
/// `admin.proto` declares; GetToken and Validate are public (they take
/// credentials or a token as their argument); WatchRevocations needs any valid
/// token of a registered client; health and reflection are public.
/// A TLS file the listener cannot use, by its key under `server.tls`.
fn tls_error((key, message): crate::tls::FileError) -> StartError {
    StartError::Tls {
        key: key.trim_start_matches("server.tls."),
        message,
    }
}

fn admin_policy() -> Result<AuthPolicy, StartError> {
    let policy = AuthPolicy::from_descriptors(proto::GATEWAY_DESCRIPTOR_SET)
        .map_err(|e| StartError::Reflection(e.to_string()))?;
    Ok(policy.public("m2m.gateway.v1.Gateway").method(
        "/m2m.gateway.v1.Gateway/WatchRevocations",
        Vec::<String>::new(),
    ))
}

fn transport(cfg: &crate::settings::ServerSettings) -> Result<Server, StartError> {
    let mut builder = Server::builder()
        .timeout(cfg.request_timeout)
        .http2_keepalive_interval(Some(cfg.keepalive_interval))
        .http2_keepalive_timeout(Some(cfg.keepalive_timeout))
        .max_concurrent_streams(Some(cfg.max_concurrent_streams));
    if let Some(age) = cfg.max_connection_age {
        builder = builder
            .max_connection_age(age)
            .max_connection_age_grace(cfg.max_connection_age_grace);
    }
    // TLS, when configured, is the listener's own (crate::tls): it reloads.
    Ok(builder)
}

/// Server reflection, v1 and v1alpha (grpcurl 1.8 asks v1alpha).
fn reflection(
    max_message_bytes: usize,
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    StartError,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::GATEWAY_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let failed = |e: tonic_reflection::server::Error| StartError::Reflection(e.to_string());
    let v1 = builder()
        .build_v1()
        .map_err(failed)?
        .max_decoding_message_size(max_message_bytes);
    let v1alpha = builder()
        .build_v1alpha()
        .map_err(failed)?
        .max_decoding_message_size(max_message_bytes);
    Ok((v1, v1alpha))
}

/// The moment shutdown begins, as a value every part can wait on.
#[derive(Clone)]
struct Stopped(tokio::sync::watch::Receiver<bool>);

impl Stopped {
    fn new() -> (tokio::sync::watch::Sender<bool>, Self) {
        let (tx, rx) = tokio::sync::watch::channel(false);
        (tx, Self(rx))
    }

    async fn wait(mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// The admin endpoints, until shutdown begins.
fn spawn_admin(
    listener: TcpListener,
    telemetry: Telemetry,
    stopped: Stopped,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let addr = listener
        .local_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    tracing::info!(%addr, "admin endpoints listening (/metrics, /healthz, /readyz)");
    tokio::spawn(serve_admin(listener, telemetry, stopped.wait()))
}

/// What happens when `shutdown` resolves: connections without a call in flight
/// close now (only calls use the grace), readiness goes, shutdown begins.
/// The drain, in order: readiness 503 at once (load balancers stop sending),
/// still accepting for `delay` (calls routed meanwhile are served), then no new
/// connections and the calls in flight finished.
async fn drain_on(
    shutdown: impl Future<Output = ()>,
    delay: Duration,
    edge: Arc<Edge>,
    telemetry: Telemetry,
    stop: tokio::sync::watch::Sender<bool>,
) {
    shutdown.await;
    telemetry.set_listening(false);
    if !delay.is_zero() {
        tracing::info!(
            ?delay,
            "shutting down: not ready; still accepting while load balancers catch up"
        );
        tokio::time::sleep(delay).await;
    }
    tracing::info!("shutting down: no new connections, draining in-flight calls");
    edge.begin_shutdown();
    let _ = stop.send(true);
}

/// Where GetToken goes: the pool's token endpoint, or with several pools each
/// client's own pool's.
fn token_endpoints(settings: &Settings) -> Result<Arc<dyn TokenEndpoint>, StartError> {
    let mut pools: Vec<(Arc<str>, Arc<dyn TokenEndpoint>)> = Vec::new();
    for pool in &settings.pools {
        let client = CognitoClient::new(
            pool.endpoints.token_endpoint.clone(),
            pool.upstream.connect_timeout,
            pool.upstream.token_timeout,
        )
        .map_err(|e| StartError::Upstream {
            what: "token endpoint client",
            pool: pool.endpoints.pool.clone(),
            message: e.to_string(),
        })?;
        pools.push((Arc::from(pool.endpoints.pool.as_str()), Arc::new(client)));
    }
    if let [(_, only)] = pools.as_slice() {
        return Ok(only.clone());
    }
    Ok(Arc::new(PoolRoutes::new(
        pools,
        settings
            .registry
            .clients()
            .map(|c| (&*c.client_id, &*c.pool)),
    )))
}

/// The access-token validator of a configuration: for every pool, its issuer
/// (and any accepted previous issuer), each with its own key set from its own
/// JWKS URI, and the clients registered for that pool. The key sets are empty
/// until loaded ([`CognitoValidator::spawn_loaders`] or [`KeySet::refresh`](crate::jwt::KeySet::refresh)).
pub fn build_validator(settings: &Settings) -> Result<CognitoValidator, StartError> {
    let mut trusted = Vec::new();
    for pool in &settings.pools {
        let e = &pool.endpoints;
        let clients: Vec<String> = settings
            .registry
            .clients()
            .filter(|c| *c.pool == e.pool)
            .map(|c| c.client_id.to_string())
            .collect();
        let fetch = JwksFetch {
            connect_timeout: pool.upstream.connect_timeout,
            fetch_timeout: pool.upstream.jwks_timeout,
            cooldown: pool.upstream.jwks_cooldown,
        };
        for (issuer, jwks_uri) in e.issuers() {
            trusted.push(
                trusted_issuer(
                    &e.pool,
                    issuer.to_owned(),
                    jwks_uri.clone(),
                    Some(&clients),
                    fetch,
                )
                .map_err(|err| StartError::Upstream {
                    what: "JWKS client",
                    pool: e.pool.clone(),
                    message: err.to_string(),
                })?,
            );
        }
    }
    // The settings refused empty and shared issuers.
    Ok(CognitoValidator::for_issuers(
        trusted,
        settings.validator.clone(),
    )?)
}
