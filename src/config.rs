//! The configuration file as written: loading (TOML + `M2M_GATEWAY__SECTION__KEY`
//! environment overrides), the checks (every error names its key), derivation of
//! the Cognito URLs, and a redacted view for `check-config`. What the gateway runs
//! with is [`crate::settings::Settings`], built from it once.

use std::{
    collections::HashSet,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use figment::{
    Figment,
    providers::{Env, Format, Toml},
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};
use url::Url;

use crate::rules::{
    cognito::{DEFAULT_POOL, IssuerType, PoolError, PoolSpec, is_pool_name},
    scope::{ScopeError, is_valid_client_id, validate_scope},
};

/// Prefix of the environment variables that override configuration keys:
/// `M2M_GATEWAY__SERVER__LISTEN=127.0.0.1:6000` sets `[server] listen`.
pub const ENV_PREFIX: &str = "M2M_GATEWAY__";

/// The environment variable that overrides the dotted `key` (`server.listen` →
/// `M2M_GATEWAY__SERVER__LISTEN`).
pub fn env_var(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.replace('.', "__").to_ascii_uppercase()
    )
}

/// The whole gateway configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners.
    #[serde(default)]
    pub server: ServerConfig,
    /// The Cognito user pool the gateway fronts (the one-pool shorthand of
    /// `[[pools]]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cognito: Option<CognitoConfig>,
    /// The user pools the gateway fronts, when there are several.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<CognitoConfig>,
    /// Token validation settings.
    #[serde(default)]
    pub validation: ValidationConfig,
    /// Token cache settings.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Abuse limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The registry of third-party clients.
    #[serde(default)]
    pub clients: Vec<ClientConfig>,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC listen address.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Admin HTTP listener (metrics, health); off when unset.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// TLS on the gRPC listener.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Longest time one RPC may take, in milliseconds (a smaller `grpc-timeout` wins).
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// How long SIGTERM waits for in-flight calls before exiting, in milliseconds.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Calls in flight across all connections; beyond it calls are shed at once
    /// with RESOURCE_EXHAUSTED (never queued).
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: usize,
    /// HTTP/2 streams per connection.
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// Largest decoded request message, in bytes.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// HTTP/2 keepalive ping interval, in seconds.
    #[serde(default = "default_keepalive_interval_secs")]
    pub http2_keepalive_interval_secs: u64,
    /// HTTP/2 keepalive ping timeout, in seconds.
    #[serde(default = "default_keepalive_timeout_secs")]
    pub http2_keepalive_timeout_secs: u64,
    /// Most open gRPC connections; beyond it new ones are closed at once. Also
    /// kept below the process's open-file limit (with room for upstream, Redis
    /// and admin sockets).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Most open gRPC connections from one peer address, so that one stranger
    /// cannot fill the table; 0 = no per-address cap (callers behind a NAT or a
    /// load balancer that hides their addresses share one).
    #[serde(default = "default_max_connections_per_peer")]
    pub max_connections_per_peer: usize,
    /// Time a new connection has to send the HTTP/2 preface, in milliseconds.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Time a connection may stay open with no call in flight, in seconds.
    #[serde(default = "default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// Time a unary call's message has to arrive after its headers, in
    /// milliseconds (independent of `request_timeout_ms`).
    #[serde(default = "default_request_body_timeout_ms")]
    pub request_body_timeout_ms: u64,
    /// Most calls in flight from one peer address; 0 = no per-peer limit (set 0
    /// behind a proxy that makes every caller one address).
    #[serde(default = "default_max_requests_per_peer")]
    pub max_requests_per_peer: usize,
    /// Longest life of a stream (Health/Watch, reflection), in seconds; it then
    /// ends with DEADLINE_EXCEEDED and the client opens a new one.
    #[serde(default = "default_max_stream_secs")]
    pub max_stream_secs: u64,
    /// Most streams open from one peer address, apart from its unary calls; 0 =
    /// no per-peer limit.
    #[serde(default = "default_max_streams_per_peer")]
    pub max_streams_per_peer: usize,
    /// Most streams open on one connection.
    #[serde(default = "default_max_streams_per_connection")]
    pub max_streams_per_connection: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            admin_listen: None,
            tls: None,
            request_timeout_ms: default_request_timeout_ms(),
            shutdown_grace_ms: default_shutdown_grace_ms(),
            max_concurrent_requests: default_max_concurrent_requests(),
            max_concurrent_streams: default_max_concurrent_streams(),
            max_message_bytes: default_max_message_bytes(),
            http2_keepalive_interval_secs: default_keepalive_interval_secs(),
            http2_keepalive_timeout_secs: default_keepalive_timeout_secs(),
            max_connections: default_max_connections(),
            max_connections_per_peer: default_max_connections_per_peer(),
            handshake_timeout_ms: default_handshake_timeout_ms(),
            idle_timeout_secs: default_idle_timeout_secs(),
            request_body_timeout_ms: default_request_body_timeout_ms(),
            max_requests_per_peer: default_max_requests_per_peer(),
            max_stream_secs: default_max_stream_secs(),
            max_streams_per_peer: default_max_streams_per_peer(),
            max_streams_per_connection: default_max_streams_per_connection(),
        }
    }
}

/// `[server.tls]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle; set = client certificates required (mTLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// `[cognito]`, or one `[[pools]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CognitoConfig {
    /// The pool's name in `[[clients]] pool`, metrics and logs (required in
    /// `[[pools]]`; `default` for `[cognito]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// AWS Region of the user pool, e.g. `us-east-1`.
    pub region: String,
    /// The user pool id, e.g. `us-east-1_AbCdEf123`.
    pub user_pool_id: String,
    /// The user pool domain; the token endpoint is `domain + /oauth2/token`.
    #[serde(default)]
    pub domain: Option<String>,
    /// Overrides the derived token endpoint.
    #[serde(default)]
    pub token_endpoint: Option<String>,
    /// The pool's issuer form: `original` (`https://cognito-idp.<region>…`) or
    /// `updated` (`https://issuer-cognito-idp.<region>…`); derives the issuer and
    /// the JWKS URI.
    #[serde(default)]
    pub issuer_type: IssuerType,
    /// Also accept tokens of the pool's other issuer form (`true`), or of the
    /// issuers listed, during an issuer migration; each with its own key set.
    #[serde(default)]
    pub accept_previous_issuer: AcceptPrevious,
    /// Overrides the derived issuer.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Overrides the derived JWKS URI.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// TCP connect timeout for Cognito calls, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Total timeout of one token request (retry included), in milliseconds.
    #[serde(default = "default_total_timeout_ms")]
    pub timeout_ms: u64,
    /// Total timeout of one JWKS fetch, in milliseconds.
    #[serde(default = "default_jwks_timeout_ms")]
    pub jwks_timeout_ms: u64,
}

/// `[validation]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    #[serde(default = "default_leeway_secs")]
    pub leeway_secs: u64,
    /// Tokens longer than this are rejected as malformed before any decoding.
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: usize,
    /// Minimum time between two JWKS refetches caused by unknown `kid`s, in seconds.
    #[serde(default = "default_jwks_cooldown_secs")]
    pub jwks_cooldown_secs: u64,
    /// Verified tokens remembered so a repeat skips the RSA check (0 = off).
    #[serde(default = "default_verified_cache_size")]
    pub verified_cache_size: u64,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self {
            leeway_secs: default_leeway_secs(),
            max_token_bytes: default_max_token_bytes(),
            jwks_cooldown_secs: default_jwks_cooldown_secs(),
            verified_cache_size: default_verified_cache_size(),
        }
    }
}

/// Cache backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CacheBackend {
    /// In-process cache (the default).
    #[default]
    Memory,
    /// Fleet-wide cache on Redis.
    Redis,
}

/// How the gateway authenticates to Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisAuth {
    /// No credentials, or an ACL user and password.
    #[default]
    Password,
    /// An IAM token (ElastiCache, MemoryDB), made from the AWS credential chain.
    Iam,
}

/// `[cache]`.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// `memory` (default) or `redis`.
    #[serde(default)]
    pub backend: CacheBackend,
    /// Redis URL, with `backend = "redis"`: `redis://` or `rediss://` (TLS);
    /// may carry `user:password@`.
    #[serde(default)]
    pub redis_url: Option<String>,
    /// `auto` (default: asks the endpoint), `standalone` or `cluster`.
    #[serde(default)]
    pub redis_mode: crate::broker::RedisMode,
    /// PEM bundle of a private CA for `rediss://`, trusted next to the platform's roots.
    #[serde(default)]
    pub redis_ca_file: Option<std::path::PathBuf>,
    /// ACL user (ElastiCache RBAC, Redis 6+ ACL); overrides the URL's.
    #[serde(default)]
    pub redis_user: Option<String>,
    /// ACL password, usually from `M2M_GATEWAY__CACHE__REDIS_PASSWORD`; overrides the URL's.
    #[serde(default, serialize_with = "redact_opt")]
    pub redis_password: Option<SecretString>,
    /// A file holding the ACL password (a mounted Kubernetes Secret).
    #[serde(default)]
    pub redis_password_file: Option<std::path::PathBuf>,
    /// `password` (default: none or an ACL password) or `iam` (ElastiCache /
    /// MemoryDB IAM authentication; cargo feature `aws`).
    #[serde(default)]
    pub redis_auth: RedisAuth,
    /// With `redis_auth = "iam"`: the cache's name (replication group, serverless
    /// cache or MemoryDB cluster).
    #[serde(default)]
    pub redis_cache_name: Option<String>,
    /// With `redis_auth = "iam"`: an ElastiCache Serverless cache.
    #[serde(default, alias = "serverless")]
    pub redis_serverless: bool,
    /// With `redis_auth = "iam"`: `elasticache` (default) or `memorydb`.
    #[serde(default)]
    pub redis_iam_service: crate::broker::IamService,
    /// With `redis_auth = "iam"`: the cache's Region (default: the AWS chain's).
    #[serde(default)]
    pub redis_region: Option<String>,
    /// Base64 of 32 bytes; encrypts cached tokens and keys the secret verifiers.
    #[serde(default, serialize_with = "redact_opt")]
    pub encryption_key: Option<SecretString>,
    /// Most (client, scope set) entries kept in memory.
    #[serde(default = "default_max_entries")]
    pub max_entries: u64,
    /// Share of a token's lifetime after which it is refreshed (AWS advises 0.75).
    #[serde(default = "default_refresh_ratio")]
    pub refresh_ratio: f64,
    /// Refresh points are spread over `[refresh_ratio - refresh_jitter,
    /// refresh_ratio]` of the lifetime so that tokens obtained together are not
    /// refreshed in the same second.
    #[serde(default = "default_refresh_jitter")]
    pub refresh_jitter: f64,
    /// A token with less life than this is never handed out, in seconds.
    #[serde(default = "default_min_remaining_secs")]
    pub min_remaining_secs: u64,
    /// Timeout of every Redis call, in milliseconds; past it the local cache serves.
    #[serde(default = "default_redis_timeout_ms")]
    pub redis_timeout_ms: u64,
    /// Longest wait for another replica's Cognito call before calling oneself, in ms.
    #[serde(default = "default_lock_wait_ms")]
    pub lock_wait_ms: u64,
}

impl fmt::Debug for CacheConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheConfig")
            .field("backend", &self.backend)
            .field("redis_url", &self.redis_url.as_ref().map(|_| "..."))
            .field("redis_mode", &self.redis_mode)
            .field("redis_ca_file", &self.redis_ca_file)
            .field("redis_user", &self.redis_user)
            .field(
                "redis_password",
                &self.redis_password.as_ref().map(|_| "..."),
            )
            .field("redis_password_file", &self.redis_password_file)
            .field("redis_auth", &self.redis_auth)
            .field("redis_cache_name", &self.redis_cache_name)
            .field("redis_serverless", &self.redis_serverless)
            .field("redis_iam_service", &self.redis_iam_service)
            .field("redis_region", &self.redis_region)
            .field(
                "encryption_key",
                &self.encryption_key.as_ref().map(|_| "..."),
            )
            .field("max_entries", &self.max_entries)
            .field("refresh_ratio", &self.refresh_ratio)
            .field("refresh_jitter", &self.refresh_jitter)
            .field("min_remaining_secs", &self.min_remaining_secs)
            .field("redis_timeout_ms", &self.redis_timeout_ms)
            .field("lock_wait_ms", &self.lock_wait_ms)
            .finish()
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            backend: CacheBackend::Memory,
            redis_url: None,
            redis_mode: crate::broker::RedisMode::Auto,
            redis_ca_file: None,
            redis_user: None,
            redis_password: None,
            redis_password_file: None,
            redis_auth: RedisAuth::Password,
            redis_cache_name: None,
            redis_serverless: false,
            redis_iam_service: crate::broker::IamService::Elasticache,
            redis_region: None,
            encryption_key: None,
            max_entries: default_max_entries(),
            refresh_ratio: default_refresh_ratio(),
            refresh_jitter: default_refresh_jitter(),
            min_remaining_secs: default_min_remaining_secs(),
            redis_timeout_ms: default_redis_timeout_ms(),
            lock_wait_ms: default_lock_wait_ms(),
        }
    }
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Upstream attempts per client and minute with secrets Cognito has not
    /// accepted (proven secrets are never limited); beyond it callers get
    /// RESOURCE_EXHAUSTED with the time to wait.
    #[serde(default = "default_failed_auth_per_minute")]
    pub failed_auth_per_minute: u32,
    /// Token calls per second to Cognito, fleet-wide with Redis; 0 = no cap.
    #[serde(default = "default_upstream_per_second")]
    pub upstream_per_second: u32,
    /// Longest wait of a GetToken miss for a slot of that budget, in ms.
    #[serde(default = "default_upstream_max_wait_ms")]
    pub upstream_max_wait_ms: u64,
    /// Most scopes in one GetToken request.
    #[serde(default = "default_max_scopes")]
    pub max_scopes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            failed_auth_per_minute: default_failed_auth_per_minute(),
            upstream_per_second: default_upstream_per_second(),
            upstream_max_wait_ms: default_upstream_max_wait_ms(),
            max_scopes: default_max_scopes(),
        }
    }
}

/// `accept_previous_issuer`: `false`, `true` (the pool's other issuer form), or
/// a list of issuers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum AcceptPrevious {
    /// `true`: the other form of the pool's issuer (`original` ⇄ `updated`).
    Flag(bool),
    /// These issuers, exactly.
    Issuers(Vec<String>),
}

impl Default for AcceptPrevious {
    fn default() -> Self {
        AcceptPrevious::Flag(false)
    }
}

/// One `[[clients]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The Cognito app client id.
    pub client_id: String,
    /// The `[[pools]]` entry (by name) the client belongs to; required when
    /// there are several pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Name for logs and metrics.
    pub name: String,
    /// Scopes this client may ask for.
    pub allowed_scopes: Vec<String>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 50051))
}
fn default_request_timeout_ms() -> u64 {
    10_000
}
fn default_shutdown_grace_ms() -> u64 {
    10_000
}
fn default_max_concurrent_requests() -> usize {
    1024
}
fn default_max_concurrent_streams() -> u32 {
    100
}
fn default_max_connections() -> usize {
    crate::edge::DEFAULT_MAX_CONNECTIONS
}
fn default_max_connections_per_peer() -> usize {
    crate::edge::DEFAULT_MAX_CONNECTIONS_PER_PEER
}
fn default_max_stream_secs() -> u64 {
    crate::edge::DEFAULT_MAX_STREAM_SECS
}
fn default_max_streams_per_peer() -> usize {
    crate::edge::DEFAULT_MAX_STREAMS_PER_PEER
}
fn default_max_streams_per_connection() -> usize {
    crate::edge::DEFAULT_MAX_STREAMS_PER_CONNECTION
}
fn default_handshake_timeout_ms() -> u64 {
    crate::edge::DEFAULT_HANDSHAKE_TIMEOUT_MS
}
fn default_idle_timeout_secs() -> u64 {
    crate::edge::DEFAULT_IDLE_TIMEOUT_SECS
}
fn default_request_body_timeout_ms() -> u64 {
    crate::edge::DEFAULT_BODY_TIMEOUT_MS
}
fn default_max_requests_per_peer() -> usize {
    crate::edge::DEFAULT_MAX_REQUESTS_PER_PEER
}
fn default_max_message_bytes() -> usize {
    crate::edge::DEFAULT_MAX_MESSAGE_BYTES
}
fn default_keepalive_interval_secs() -> u64 {
    30
}
fn default_keepalive_timeout_secs() -> u64 {
    10
}
fn default_connect_timeout_ms() -> u64 {
    2_000
}
fn default_total_timeout_ms() -> u64 {
    5_000
}
fn default_jwks_timeout_ms() -> u64 {
    5_000
}
fn default_leeway_secs() -> u64 {
    5
}
fn default_max_token_bytes() -> usize {
    8 * 1024
}
fn default_jwks_cooldown_secs() -> u64 {
    10
}
fn default_verified_cache_size() -> u64 {
    100_000
}
fn default_max_entries() -> u64 {
    10_000
}
fn default_refresh_ratio() -> f64 {
    0.75
}
fn default_refresh_jitter() -> f64 {
    0.05
}
fn default_upstream_per_second() -> u32 {
    // Below Cognito's commonly cited default quota of 150/s, which every other
    // app of the account shares.
    100
}
fn default_upstream_max_wait_ms() -> u64 {
    5_000
}
fn default_min_remaining_secs() -> u64 {
    10
}
fn default_redis_timeout_ms() -> u64 {
    100
}
fn default_lock_wait_ms() -> u64 {
    3000
}
fn default_failed_auth_per_minute() -> u32 {
    10
}
fn default_max_scopes() -> usize {
    50
}

fn redact_opt<S: Serializer>(v: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("<redacted>"),
        None => s.serialize_none(),
    }
}

/// A configuration error, with the file and the key it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read config file: {error}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error (in the message, not repeated as a source).
        error: std::io::Error,
    },
    /// Parsing or typing failed.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// Figment's message (names the key).
        message: String,
    },
    /// A value is present but not acceptable.
    #[error("{path}: invalid value for key `{key}`: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// The dotted key.
        key: String,
        /// Why.
        message: String,
    },
}

/// One user pool's Cognito endpoints after derivation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoints {
    /// The pool's name.
    pub pool: String,
    /// `/oauth2/token` URL.
    pub token_endpoint: Url,
    /// Expected `iss`, byte for byte.
    pub issuer: String,
    /// JWKS URL.
    pub jwks_uri: Url,
    /// Other issuers accepted for this pool (`accept_previous_issuer`), each with
    /// the JWKS URL of its own key set.
    pub accepted_issuers: Vec<AcceptedIssuer>,
}

impl Endpoints {
    /// Every issuer this pool's tokens may carry, with its JWKS URL: the pool's
    /// own first, then the accepted ones.
    pub fn issuers(&self) -> impl Iterator<Item = (&str, &Url)> {
        std::iter::once((self.issuer.as_str(), &self.jwks_uri)).chain(
            self.accepted_issuers
                .iter()
                .map(|a| (a.issuer.as_str(), &a.jwks_uri)),
        )
    }
}

/// An issuer accepted besides a pool's own, and where its keys are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AcceptedIssuer {
    /// Expected `iss`, byte for byte.
    pub issuer: String,
    /// JWKS URL.
    pub jwks_uri: Url,
}

impl Config {
    /// Reads `path` (must exist) with environment overrides, unchecked: use
    /// [`Settings::load`](crate::settings::Settings::load).
    pub(crate) fn read(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        std::fs::metadata(path).map_err(|error| ConfigError::Read {
            path: shown.clone(),
            error,
        })?;
        let figment = Figment::new()
            .merge(Toml::file_exact(path))
            .merge(Env::prefixed(ENV_PREFIX).split("__"));
        Self::from_figment(figment, &shown)
    }

    /// Parses a TOML string (no environment), unchecked.
    pub(crate) fn parse_toml(toml: &str, origin: &str) -> Result<Self, ConfigError> {
        Self::from_figment(Figment::new().merge(Toml::string(toml)), origin)
    }

    fn from_figment(figment: Figment, origin: &str) -> Result<Self, ConfigError> {
        figment.extract().map_err(|errors| {
            // The first error decides where it came from (file or variable).
            let described: Vec<(String, String)> = errors
                .into_iter()
                .map(|e| describe_figment_error(&e, origin))
                .collect();
            ConfigError::Parse {
                path: described
                    .first()
                    .map_or_else(|| origin.to_owned(), |(from, _)| from.clone()),
                message: described
                    .into_iter()
                    .map(|(_, m)| m)
                    .collect::<Vec<_>>()
                    .join("; "),
            }
        })
    }

    /// Checks every value (errors name the key) and derives the Cognito
    /// endpoints; run once, by [`Settings::new`](crate::settings::Settings::new).
    pub(crate) fn check(&self, origin: &str) -> Result<Vec<Endpoints>, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: origin.to_owned(),
            key: key.to_owned(),
            message,
        };
        let entries = self.pool_entries();
        if entries.is_empty() {
            return Err(invalid(
                "cognito",
                "missing: describe the user pool in [cognito] (or several in [[pools]])".into(),
            ));
        }
        if self.cognito.is_some() && !self.pools.is_empty() {
            return Err(invalid(
                "pools",
                "give either [cognito] (one pool) or [[pools]] entries, not both".into(),
            ));
        }
        let mut pools: Vec<Endpoints> = Vec::with_capacity(entries.len());
        for (prefix, c) in &entries {
            let endpoints = check_pool(prefix, c, self.cognito.is_some())
                .map_err(|(key, m)| invalid(&key, m))?;
            if pools.iter().any(|p| p.pool == endpoints.pool) {
                return Err(invalid(
                    &format!("{prefix}.name"),
                    format!("pool {:?} is described twice", endpoints.pool),
                ));
            }
            // One issuer, one key set and one set of clients: never two pools.
            for (issuer, _) in endpoints.issuers() {
                if let Some(other) = pools
                    .iter()
                    .find(|p| p.issuers().any(|(claimed, _)| claimed == issuer))
                {
                    return Err(invalid(
                        &format!("{prefix}.issuer"),
                        format!(
                            "issuer {issuer:?} is already pool {:?}'s: a token's issuer must name one pool",
                            other.pool
                        ),
                    ));
                }
            }
            pools.push(endpoints);
        }
        if !(1..=600_000).contains(&self.server.request_timeout_ms) {
            return Err(invalid(
                "server.request_timeout_ms",
                format!("{} is outside 1..=600000", self.server.request_timeout_ms),
            ));
        }
        let server = &self.server;
        if !(1..=1_000_000).contains(&server.max_concurrent_requests) {
            return Err(invalid(
                "server.max_concurrent_requests",
                format!("{} is outside 1..=1000000", server.max_concurrent_requests),
            ));
        }
        for (key, v, range) in [
            (
                "server.max_connections",
                server.max_connections as u64,
                1..=1_000_000,
            ),
            (
                "server.max_connections_per_peer",
                server.max_connections_per_peer as u64,
                0..=1_000_000,
            ),
            ("server.max_stream_secs", server.max_stream_secs, 1..=86_400),
            (
                "server.max_streams_per_peer",
                server.max_streams_per_peer as u64,
                0..=1_000_000,
            ),
            (
                "server.max_streams_per_connection",
                server.max_streams_per_connection as u64,
                1..=1_000,
            ),
            (
                "server.handshake_timeout_ms",
                server.handshake_timeout_ms,
                100..=120_000,
            ),
            (
                "server.idle_timeout_secs",
                server.idle_timeout_secs,
                1..=86_400,
            ),
            (
                "server.request_body_timeout_ms",
                server.request_body_timeout_ms,
                100..=120_000,
            ),
        ] {
            if !range.contains(&v) {
                return Err(invalid(
                    key,
                    format!("{v} is outside {}..={}", range.start(), range.end()),
                ));
            }
        }
        if !(1..=10_000).contains(&server.max_concurrent_streams) {
            return Err(invalid(
                "server.max_concurrent_streams",
                format!("{} is outside 1..=10000", server.max_concurrent_streams),
            ));
        }
        if !(1024..=16 * 1024 * 1024).contains(&server.max_message_bytes) {
            return Err(invalid(
                "server.max_message_bytes",
                format!("{} is outside 1024..=16777216", server.max_message_bytes),
            ));
        }
        for (key, v) in [
            (
                "server.http2_keepalive_interval_secs",
                server.http2_keepalive_interval_secs,
            ),
            (
                "server.http2_keepalive_timeout_secs",
                server.http2_keepalive_timeout_secs,
            ),
        ] {
            if !(1..=3600).contains(&v) {
                return Err(invalid(key, format!("{v} is outside 1..=3600")));
            }
        }
        if self.validation.leeway_secs > 300 {
            return Err(invalid(
                "validation.leeway_secs",
                format!("{} is more than 300 s", self.validation.leeway_secs),
            ));
        }
        if !(512..=65_536).contains(&self.validation.max_token_bytes) {
            return Err(invalid(
                "validation.max_token_bytes",
                format!("{} is outside 512..=65536", self.validation.max_token_bytes),
            ));
        }
        if !(1..=3600).contains(&self.validation.jwks_cooldown_secs) {
            return Err(invalid(
                "validation.jwks_cooldown_secs",
                format!("{} is outside 1..=3600", self.validation.jwks_cooldown_secs),
            ));
        }
        let cache = &self.cache;
        if !(cache.refresh_ratio > 0.0 && cache.refresh_ratio <= 0.95) {
            return Err(invalid(
                "cache.refresh_ratio",
                format!("{} is outside (0, 0.95]", cache.refresh_ratio),
            ));
        }
        if !(cache.refresh_jitter >= 0.0 && cache.refresh_jitter < cache.refresh_ratio) {
            return Err(invalid(
                "cache.refresh_jitter",
                format!(
                    "{} is outside [0, cache.refresh_ratio)",
                    cache.refresh_jitter
                ),
            ));
        }
        if cache.max_entries == 0 {
            return Err(invalid("cache.max_entries", "must be at least 1".into()));
        }
        for (key, v) in [
            ("cache.redis_timeout_ms", cache.redis_timeout_ms),
            ("cache.lock_wait_ms", cache.lock_wait_ms),
        ] {
            if !(1..=60_000).contains(&v) {
                return Err(invalid(key, format!("{v} is outside 1..=60000")));
            }
        }
        if let Some(url) = &cache.redis_url {
            if !(url.starts_with("redis://")
                || url.starts_with("rediss://")
                || url.starts_with("redis+unix://")
                || url.starts_with("unix://"))
            {
                return Err(invalid(
                    "cache.redis_url",
                    "must start with redis://, rediss:// or redis+unix://".into(),
                ));
            }
            if url.ends_with("#insecure") {
                return Err(invalid(
                    "cache.redis_url",
                    "#insecure turns off certificate checks; trust a private CA with cache.redis_ca_file instead".into(),
                ));
            }
            if cache.redis_ca_file.is_some() && !url.starts_with("rediss://") {
                return Err(invalid(
                    "cache.redis_ca_file",
                    "is set but cache.redis_url is not rediss:// (TLS)".into(),
                ));
            }
        }
        if cache.redis_auth == RedisAuth::Iam {
            if cache.redis_password.is_some() || cache.redis_password_file.is_some() {
                return Err(invalid(
                    "cache.redis_auth",
                    "\"iam\" makes its own passwords: remove cache.redis_password(_file)".into(),
                ));
            }
            if cache.redis_user.as_deref().is_none_or(str::is_empty) {
                return Err(invalid(
                    "cache.redis_user",
                    "required with redis_auth = \"iam\" (the IAM-enabled user; its id and name must be equal)".into(),
                ));
            }
            match cache.redis_cache_name.as_deref() {
                Some(name)
                    if !name.is_empty()
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') => {
                }
                _ => {
                    return Err(invalid(
                        "cache.redis_cache_name",
                        "required with redis_auth = \"iam\": the cache's name (lowercase letters, digits, '-')".into(),
                    ));
                }
            }
        }
        if cache.redis_password.is_some() && cache.redis_password_file.is_some() {
            return Err(invalid(
                "cache.redis_password_file",
                "set together with cache.redis_password: keep one".into(),
            ));
        }
        if let Some(key) = &cache.encryption_key {
            decode_key(key).map_err(|m| invalid("cache.encryption_key", m.to_string()))?;
        }
        if cache.backend == CacheBackend::Redis {
            if cache.redis_url.is_none() {
                return Err(invalid(
                    "cache.redis_url",
                    "required with backend = \"redis\"".into(),
                ));
            }
            if cache.encryption_key.is_none() {
                return Err(invalid(
                    "cache.encryption_key",
                    "required with backend = \"redis\" (base64 of 32 bytes)".into(),
                ));
            }
        }
        if self.limits.failed_auth_per_minute == 0 {
            return Err(invalid(
                "limits.failed_auth_per_minute",
                "must be at least 1".into(),
            ));
        }
        if self.limits.upstream_per_second > 1_000_000 {
            return Err(invalid(
                "limits.upstream_per_second",
                format!("{} is outside 0..=1000000", self.limits.upstream_per_second),
            ));
        }
        if self.limits.upstream_max_wait_ms > 60_000 {
            return Err(invalid(
                "limits.upstream_max_wait_ms",
                format!("{} is outside 0..=60000", self.limits.upstream_max_wait_ms),
            ));
        }
        if !(1..=100).contains(&self.limits.max_scopes) {
            return Err(invalid(
                "limits.max_scopes",
                format!("{} is outside 1..=100", self.limits.max_scopes),
            ));
        }
        if self.clients.is_empty() {
            return Err(invalid(
                "clients",
                "at least one [[clients]] entry is required".into(),
            ));
        }
        let mut seen = HashSet::new();
        for (i, client) in self.clients.iter().enumerate() {
            let key = |k: &str| format!("clients[{i}].{k}");
            if !is_valid_client_id(&client.client_id) {
                return Err(invalid(
                    &key("client_id"),
                    "must be 1-128 characters of [A-Za-z0-9_+-]".into(),
                ));
            }
            if !seen.insert(client.client_id.as_str()) {
                return Err(invalid(
                    &key("client_id"),
                    format!("{:?} is registered twice", client.client_id),
                ));
            }
            match &client.pool {
                Some(pool) if !pools.iter().any(|p| &p.pool == pool) => {
                    return Err(invalid(
                        &key("pool"),
                        format!(
                            "{pool:?} is not a pool; pools: {}",
                            pools
                                .iter()
                                .map(|p| format!("{:?}", p.pool))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
                None if pools.len() > 1 => {
                    return Err(invalid(
                        &key("pool"),
                        "missing: with several [[pools]], name the client's pool".into(),
                    ));
                }
                _ => {}
            }
            if client.name.trim().is_empty() || client.name.len() > 128 {
                return Err(invalid(&key("name"), "must be 1-128 characters".into()));
            }
            if client.allowed_scopes.is_empty() {
                return Err(invalid(
                    &key("allowed_scopes"),
                    "must list at least one scope".into(),
                ));
            }
            for scope in &client.allowed_scopes {
                validate_scope(scope)
                    .map_err(|e: ScopeError| invalid(&key("allowed_scopes"), e.to_string()))?;
            }
        }
        Ok(pools)
    }

    /// `[cognito]` or the `[[pools]]` entries, each with the key prefix its
    /// errors name.
    pub(crate) fn pool_entries(&self) -> Vec<(String, &CognitoConfig)> {
        match &self.cognito {
            Some(c) => vec![("cognito".to_owned(), c)],
            None => self
                .pools
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("pools[{i}]"), c))
                .collect(),
        }
    }

    /// The name of the pool `client` belongs to.
    pub(crate) fn pool_of<'a>(&'a self, client: &'a ClientConfig) -> &'a str {
        match (&client.pool, &self.cognito) {
            (Some(pool), _) => pool,
            (None, Some(c)) => c.name.as_deref().unwrap_or(DEFAULT_POOL),
            (None, None) => self
                .pools
                .first()
                .and_then(|p| p.name.as_deref())
                .unwrap_or(DEFAULT_POOL),
        }
    }

    /// The configuration as TOML, secrets redacted (what `dev --write-config` writes).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// The effective settings with the derived `endpoints`, secrets redacted, for
    /// `check-config`.
    pub fn redacted_json(&self, pools: &[Endpoints]) -> String {
        let mut value = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        let entries: Vec<&mut serde_json::Value> = match value.get_mut("cognito") {
            Some(one) => vec![one],
            None => value
                .get_mut("pools")
                .and_then(|p| p.as_array_mut())
                .map(|a| a.iter_mut().collect())
                .unwrap_or_default(),
        };
        for (entry, endpoints) in entries.into_iter().zip(pools) {
            if let Some(map) = entry.as_object_mut() {
                map.insert("name".into(), endpoints.pool.as_str().into());
                map.insert(
                    "token_endpoint".into(),
                    endpoints.token_endpoint.as_str().into(),
                );
                map.insert("issuer".into(), endpoints.issuer.as_str().into());
                map.insert("jwks_uri".into(), endpoints.jwks_uri.as_str().into());
                map.insert(
                    "accepted_issuers".into(),
                    serde_json::to_value(&endpoints.accepted_issuers)
                        .unwrap_or(serde_json::Value::Null),
                );
            }
        }
        if let Some(url) = value.pointer_mut("/cache/redis_url") {
            if let Some(s) = url.as_str() {
                *url = redact_url_password(s).into();
            }
        }
        serde_json::to_string_pretty(&value).unwrap_or_default()
    }
}

/// Checks one pool (`prefix` is `cognito` or `pools[i]`) and derives its
/// endpoints. Errors carry the key they concern.
fn check_pool(
    prefix: &str,
    c: &CognitoConfig,
    shorthand: bool,
) -> Result<Endpoints, (String, String)> {
    let key = |k: &str| format!("{prefix}.{k}");
    let name = match (&c.name, shorthand) {
        (Some(name), _) => name.clone(),
        (None, true) => DEFAULT_POOL.to_owned(),
        (None, false) => {
            return Err((
                key("name"),
                "missing: each [[pools]] entry needs a name (clients name their pool with it)"
                    .into(),
            ));
        }
    };
    if !is_pool_name(&name) {
        return Err((
            key("name"),
            format!("{name:?} must be 1-64 characters of [A-Za-z0-9_.-]"),
        ));
    }
    let (accept_other_form, accept_issuers) = match &c.accept_previous_issuer {
        AcceptPrevious::Flag(flag) => (*flag, &[][..]),
        AcceptPrevious::Issuers(list) => (false, &list[..]),
    };
    let derived = PoolSpec {
        region: Some(&c.region),
        user_pool_id: Some(&c.user_pool_id),
        issuer_type: c.issuer_type,
        issuer: c.issuer.as_deref(),
        jwks_uri: c.jwks_uri.as_deref(),
        accept_other_form,
        accept_issuers,
    }
    .issuers()
    .map_err(|e| {
        let k = key(e.key());
        let message = match e {
            PoolError::PreviousIssuerUnknown => "true derives the other issuer form from region and user_pool_id, but issuer is set by hand: list the previous issuer instead (accept_previous_issuer = [\"https://...\"])".to_owned(),
            e => e.to_string(),
        };
        (k, message)
    })?;
    if let (Some(domain), None) = (&c.domain, &c.token_endpoint) {
        if let Ok(url) = Url::parse(domain) {
            if !matches!(url.path(), "" | "/") {
                return Err((
                    key("domain"),
                    format!(
                        "{:?} has a path: give the domain only (https://<prefix>.auth.<region>.amazoncognito.com); /oauth2/token is appended",
                        redact_userinfo_text(domain)
                    ),
                ));
            }
        }
    }
    if c.issuer.is_some() {
        checked_url(&key("issuer"), &derived.issuer)?;
    }
    let issuer = derived.issuer;
    let jwks_uri = checked_url(&key("jwks_uri"), &derived.jwks_uri)?;
    // Blame the key the user wrote: the token endpoint is derived from the domain.
    let (token_key, token_endpoint) = match (&c.token_endpoint, &c.domain) {
        (Some(t), _) => (
            key("token_endpoint"),
            checked_url(&key("token_endpoint"), t)?,
        ),
        (None, Some(d)) => {
            let base = checked_url(&key("domain"), d)?;
            if base.query().is_some() || base.fragment().is_some() {
                return Err((key("domain"), "must not carry a query or fragment".into()));
            }
            let joined = format!("{}/oauth2/token", base.as_str().trim_end_matches('/'));
            (key("domain"), checked_url(&key("domain"), &joined)?)
        }
        (None, None) => {
            return Err((
                key("domain"),
                "missing: set the user pool domain (or token_endpoint)".into(),
            ));
        }
    };
    check_transport(&token_endpoint).map_err(|m| (token_key, m.to_string()))?;
    check_transport(&jwks_uri).map_err(|m| (key("jwks_uri"), m.to_string()))?;
    let mut accepted_issuers = Vec::new();
    for (other, jwks) in derived.previous {
        checked_url(&key("accept_previous_issuer"), &other)?;
        let jwks = checked_url(&key("accept_previous_issuer"), &jwks)?;
        check_transport(&jwks).map_err(|m| (key("accept_previous_issuer"), m.to_string()))?;
        accepted_issuers.push(AcceptedIssuer {
            issuer: other,
            jwks_uri: jwks,
        });
    }
    for (k, v) in [
        ("connect_timeout_ms", c.connect_timeout_ms),
        ("timeout_ms", c.timeout_ms),
        ("jwks_timeout_ms", c.jwks_timeout_ms),
    ] {
        if !(1..=600_000).contains(&v) {
            return Err((key(k), format!("{v} is outside 1..=600000")));
        }
    }
    Ok(Endpoints {
        pool: name,
        token_endpoint,
        issuer,
        jwks_uri,
        accepted_issuers,
    })
}

/// Why `[cache] encryption_key` is not a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyDecodeError {
    /// Not standard base64.
    #[error("not valid base64")]
    NotBase64,
    /// Base64 of the wrong number of bytes.
    #[error("decodes to {0} bytes, need 32")]
    WrongLength(usize),
}

/// Where a parsing error came from (the file, or the environment variable that
/// set the key) and what it says, naming the key as the user wrote it.
fn describe_figment_error(e: &figment::Error, file: &str) -> (String, String) {
    use figment::error::Kind;
    let from_env = e
        .metadata
        .as_ref()
        .is_some_and(|m| m.name.contains("environment"));
    let key = |path: &[String]| path.join(".").to_ascii_lowercase();
    let from = if from_env {
        format!("environment variable {}", env_var(&e.path.join(".")))
    } else {
        file.to_owned()
    };
    let message = match &e.kind {
        Kind::UnknownField(found, expected) => {
            let mut path = e.path.clone();
            if path.last() != Some(found) {
                path.push(found.clone());
            }
            format!(
                "unknown key `{}` (known here: {})",
                key(&path),
                expected.join(", ")
            )
        }
        Kind::MissingField(field) => {
            let mut path = e.path.clone();
            path.push(field.to_string());
            format!("missing key `{}`", key(&path))
        }
        kind if e.path.is_empty() => kind.to_string(),
        kind => format!("key `{}`: {kind}", key(&e.path)),
    };
    (from, message)
}

/// Decodes `[cache] encryption_key`: base64 of exactly 32 bytes.
pub fn decode_key(key: &SecretString) -> Result<[u8; 32], KeyDecodeError> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(key.expose_secret().trim())
        .map_err(|_| KeyDecodeError::NotBase64)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyDecodeError::WrongLength(bytes.len()))
}

/// Parses a Cognito URL of `key`: never with user-info (Cognito uses none, and a
/// password there would travel and be printed), and never echoing one back.
fn checked_url(key: &str, text: &str) -> Result<Url, (String, String)> {
    let url = Url::parse(text).map_err(|e| {
        let key = key.to_owned();
        let shown = redact_userinfo_text(text);
        match e {
            url::ParseError::RelativeUrlWithoutBase => (
                key,
                format!("{shown:?} has no scheme: write it as https://{shown}"),
            ),
            e => (key, format!("{shown:?}: {e}")),
        }
    })?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err((
            key.to_owned(),
            format!(
                "{:?}: must not carry a user name or password (Cognito uses neither)",
                redact_userinfo_text(text)
            ),
        ));
    }
    Ok(url)
}

/// `text` with anything between `://` and the last `@` of the authority hidden.
fn redact_userinfo_text(text: &str) -> String {
    let Some(start) = text.find("://").map(|i| i + 3) else {
        return text.to_owned();
    };
    let authority_end = text[start..]
        .find(['/', '?', '#'])
        .map_or(text.len(), |i| start + i);
    match text[start..authority_end].rfind('@') {
        Some(at) => format!("{}<redacted>{}", &text[..start], &text[start + at..]),
        None => text.to_owned(),
    }
}

pub use crate::http::check_transport;
pub(crate) use crate::http::redact_url_password;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml: &str, origin: &str) -> Result<Config, ConfigError> {
        crate::settings::Settings::from_toml_str(toml, origin).map(|s| s.config)
    }

    const BASE: &str = r#"
[cognito]
region = "us-east-1"
user_pool_id = "us-east-1_AbCdEf123"
domain = "https://example.auth.us-east-1.amazoncognito.com"

[[clients]]
client_id = "k6h0hnjenh7auvi2as"
name = "acme-billing"
allowed_scopes = ["orders/read", "orders/write"]
"#;

    impl Config {
        /// The first pool's endpoints, checked alone.
        fn endpoints(&self) -> Result<Endpoints, (String, String)> {
            let (prefix, c) = &self.pool_entries()[0];
            check_pool(prefix, c, self.cognito.is_some())
        }
    }

    const TWO_POOLS: &str = r#"
[[pools]]
name = "us"
region = "us-east-1"
user_pool_id = "us-east-1_AbCdEf123"
domain = "https://us.auth.us-east-1.amazoncognito.com"
issuer_type = "updated"
accept_previous_issuer = true

[[pools]]
name = "eu"
region = "eu-west-1"
user_pool_id = "eu-west-1_XyZ987654"
domain = "https://eu.auth.eu-west-1.amazoncognito.com"

[[clients]]
client_id = "usclient1"
name = "us-billing"
pool = "us"
allowed_scopes = ["orders/read"]

[[clients]]
client_id = "euclient1"
name = "eu-billing"
pool = "eu"
allowed_scopes = ["orders/read"]
"#;

    fn check(toml: &str) -> Result<Vec<Endpoints>, ConfigError> {
        let settings = crate::settings::Settings::from_toml_str(toml, "t.toml")?;
        Ok(settings.pools.into_iter().map(|p| p.endpoints).collect())
    }

    fn refused(toml: &str) -> String {
        check(toml).unwrap_err().to_string()
    }

    #[test]
    fn several_pools_each_derive_their_endpoints() {
        let pools = check(TWO_POOLS).unwrap();
        assert_eq!(pools.len(), 2);
        let (us, eu) = (&pools[0], &pools[1]);
        assert_eq!(us.pool, "us");
        assert_eq!(
            us.issuer,
            "https://issuer-cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123"
        );
        assert_eq!(
            us.accepted_issuers,
            [AcceptedIssuer {
                issuer: "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123".into(),
                jwks_uri: Url::parse(
                    "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123/.well-known/jwks.json"
                )
                .unwrap(),
            }]
        );
        assert_eq!(
            us.token_endpoint.as_str(),
            "https://us.auth.us-east-1.amazoncognito.com/oauth2/token"
        );
        assert_eq!(eu.pool, "eu");
        assert_eq!(
            eu.jwks_uri.as_str(),
            "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_XyZ987654/.well-known/jwks.json"
        );
        assert!(eu.accepted_issuers.is_empty());
        let config = parse(TWO_POOLS, "t.toml").unwrap();
        let pools_of: Vec<&str> = config.clients.iter().map(|c| config.pool_of(c)).collect();
        assert_eq!(pools_of, ["us", "eu"]);
        // check-config shows each pool's derived endpoints.
        let shown = config.redacted_json(&pools);
        assert!(shown.contains("\"accepted_issuers\""), "{shown}");
        assert!(
            shown.contains("https://eu.auth.eu-west-1.amazoncognito.com/oauth2/token"),
            "{shown}"
        );
        // The written form reads back the same.
        let again = parse(&config.to_toml(), "again.toml").unwrap();
        assert_eq!(check(&again.to_toml()).unwrap(), pools);
    }

    #[test]
    fn pools_and_clients_that_cannot_work_are_refused_by_key() {
        let cases: [(String, &str); 8] = [
            (
                format!("{BASE}{}", TWO_POOLS.split("[[clients]]").next().unwrap()),
                "`pools`",
            ),
            (TWO_POOLS.replace("name = \"eu\"\n", ""), "`pools[1].name`"),
            (TWO_POOLS.replace("name = \"eu\"", "name = \"us\""), "described twice"),
            (TWO_POOLS.replace("pool = \"eu\"", "pool = \"asia\""), "`clients[1].pool`"),
            (TWO_POOLS.replace("pool = \"eu\"\n", ""), "`clients[1].pool`"),
            (TWO_POOLS.replace("name = \"eu\"", "name = \"e u\""), "`pools[1].name`"),
            (
                // Pool eu claims pool us's previous issuer.
                TWO_POOLS.replace(
                    "domain = \"https://eu.auth",
                    "issuer = \"https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123\"\ndomain = \"https://eu.auth",
                ),
                "is already pool \"us\"'s",
            ),
            (
                TWO_POOLS.replace("region = \"eu-west-1\"", "region = \"us-east-1\""),
                "`pools[1].region`",
            ),
        ];
        for (toml, expected) in cases {
            let err = refused(&toml);
            assert!(err.contains(expected), "{expected}: {err}");
        }
        let none = BASE.replace("[cognito]\nregion = \"us-east-1\"\nuser_pool_id = \"us-east-1_AbCdEf123\"\ndomain = \"https://example.auth.us-east-1.amazoncognito.com\"\n", "");
        assert!(refused(&none).contains("`cognito`"), "{}", refused(&none));
    }

    #[test]
    fn accept_previous_issuer_forms() {
        // An explicit list: those issuers exactly, each with its JWKS.
        let list = BASE.replace(
            "[cognito]",
            "[cognito]\naccept_previous_issuer = [\"https://issuer-cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123\"]",
        );
        let pools = check(&list).unwrap();
        assert_eq!(
            pools[0].accepted_issuers[0].jwks_uri.as_str(),
            "https://issuer-cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123/.well-known/jwks.json"
        );
        assert_eq!(pools[0].pool, "default");
        // Off by default.
        assert!(check(BASE).unwrap()[0].accepted_issuers.is_empty());
        // `true` cannot derive the other form of a hand-set issuer.
        let by_hand = BASE.replace(
            "[cognito]",
            "[cognito]\naccept_previous_issuer = true\nissuer = \"https://idp.example.com/p\"",
        );
        assert!(refused(&by_hand).contains("`cognito.accept_previous_issuer`"));
        // Its own issuer, or clear text, are refused.
        let own = BASE.replace(
            "[cognito]",
            "[cognito]\naccept_previous_issuer = [\"https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123\"]",
        );
        assert!(refused(&own).contains("pool's own issuer"));
        let clear = BASE.replace(
            "[cognito]",
            "[cognito]\naccept_previous_issuer = [\"http://idp.example.com/p\"]",
        );
        assert!(
            refused(&clear).contains("`cognito.accept_previous_issuer`"),
            "{}",
            refused(&clear)
        );
    }

    #[test]
    fn derives_cognito_urls() {
        let c = parse(BASE, "t.toml").unwrap();
        let e = c.endpoints().unwrap();
        assert_eq!(
            e.token_endpoint.as_str(),
            "https://example.auth.us-east-1.amazoncognito.com/oauth2/token"
        );
        assert_eq!(
            e.issuer,
            "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123"
        );
        assert_eq!(
            e.jwks_uri.as_str(),
            "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123/.well-known/jwks.json"
        );
        assert_eq!(c.server.listen.port(), 50051);
        assert_eq!(c.cache.refresh_ratio, 0.75);

        // The updated issuer form (IssuerConfigurationType UPDATED).
        let updated = BASE.replace("[cognito]", "[cognito]\nissuer_type = \"updated\"");
        let e = parse(&updated, "t.toml").unwrap().endpoints().unwrap();
        assert_eq!(
            e.issuer,
            "https://issuer-cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123"
        );
        assert_eq!(
            e.jwks_uri.as_str(),
            "https://issuer-cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123/.well-known/jwks.json"
        );
        let typo = BASE.replace("[cognito]", "[cognito]\nissuer_type = \"new\"");
        let err = parse(&typo, "t.toml").unwrap_err().to_string();
        assert!(
            err.contains("issuer_type") && err.contains("original"),
            "{err}"
        );
    }

    #[test]
    fn bad_listen_names_the_key() {
        let toml = format!("[server]\nlisten = \"not-an-address\"\n{BASE}");
        let err = parse(&toml, "gw.toml").unwrap_err().to_string();
        assert!(err.contains("gw.toml"), "{err}");
        assert!(err.contains("listen"), "{err}");
    }

    #[test]
    fn missing_user_pool_id_names_the_key() {
        let toml = BASE.replace("user_pool_id = \"us-east-1_AbCdEf123\"\n", "");
        let err = parse(&toml, "gw.toml").unwrap_err().to_string();
        assert!(err.contains("user_pool_id"), "{err}");
    }

    #[test]
    fn plain_http_refused_except_loopback() {
        let remote = BASE.replace(
            "domain = \"https://example.auth.us-east-1.amazoncognito.com\"",
            "domain = \"http://example.com\"",
        );
        let err = parse(&remote, "gw.toml").unwrap_err().to_string();
        // Blamed on the key written (the token endpoint is derived from it).
        assert!(
            err.contains("cognito.domain") && err.contains("https"),
            "{err}"
        );

        let jwks = BASE.replace(
            "[cognito]\n",
            "[cognito]\njwks_uri = \"http://10.0.0.1/jwks.json\"\n",
        );
        let err = parse(&jwks, "gw.toml").unwrap_err().to_string();
        assert!(err.contains("cognito.jwks_uri"), "{err}");

        for host in ["127.0.0.1:9000", "localhost:9000", "[::1]:9000"] {
            let local = BASE.replace(
                "domain = \"https://example.auth.us-east-1.amazoncognito.com\"",
                &format!(
                    "domain = \"http://{host}\"\njwks_uri = \"http://{host}/p/.well-known/jwks.json\"\nissuer = \"http://{host}/p\""
                ),
            );
            parse(&local, "gw.toml").unwrap();
        }
    }

    #[test]
    fn unknown_keys_and_bad_scopes_are_refused() {
        let typo = BASE.replace("[cognito]\n", "[cognito]\nregoin = \"x\"\n");
        let err = parse(&typo, "gw.toml").unwrap_err().to_string();
        assert!(err.contains("regoin"), "{err}");

        let bad_scope = BASE.replace("\"orders/write\"", "\"orders write\"");
        let err = parse(&bad_scope, "gw.toml").unwrap_err().to_string();
        assert!(err.contains("clients[0].allowed_scopes"), "{err}");
    }

    #[test]
    fn redis_tls_credentials_and_iam_are_checked() {
        let key = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";
        let cache = |extra: &str| {
            format!("{BASE}\n[cache]\nbackend = \"redis\"\nencryption_key = \"{key}\"\n{extra}\n")
        };
        let err = |extra: &str| parse(&cache(extra), "gw.toml").unwrap_err().to_string();

        let e = err("redis_url = \"rediss://cache.example:6379/#insecure\"");
        assert!(
            e.contains("cache.redis_url") && e.contains("#insecure"),
            "{e}"
        );
        let e = err("redis_url = \"redis://cache.example:6379\"\nredis_ca_file = \"/ca.pem\"");
        assert!(
            e.contains("cache.redis_ca_file") && e.contains("not rediss://"),
            "{e}"
        );
        let e = err(
            "redis_url = \"rediss://cache.example:6379\"\nredis_ca_file = \"/nonexistent/ca.pem\"",
        );
        assert!(
            e.contains("cache.redis_ca_file") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let e = err(&format!(
            "redis_url = \"rediss://cache.example:6379\"\nredis_ca_file = \"{}\"",
            not_pem.display()
        ));
        assert!(e.contains("no PEM certificate"), "{e}");
        let empty = dir.path().join("password");
        std::fs::write(&empty, "\n").unwrap();
        let e = err(&format!(
            "redis_url = \"rediss://cache.example:6379\"\nredis_password_file = \"{}\"",
            empty.display()
        ));
        assert!(
            e.contains("cache.redis_password_file") && e.contains("empty"),
            "{e}"
        );
        let e = err(
            "redis_url = \"rediss://cache.example:6379\"\nredis_password = \"a\"\nredis_password_file = \"/p\"",
        );
        assert!(e.contains("keep one"), "{e}");

        // IAM: a user and a cache name, no password, TLS, and the `aws` feature.
        let iam = "redis_url = \"rediss://cache.example:6379\"\nredis_auth = \"iam\"";
        let e = err(iam);
        assert!(e.contains("cache.redis_user"), "{e}");
        let e = err(&format!("{iam}\nredis_user = \"gw\""));
        assert!(e.contains("cache.redis_cache_name"), "{e}");
        let e = err(&format!(
            "{iam}\nredis_user = \"gw\"\nredis_cache_name = \"c\"\nredis_password = \"x\""
        ));
        assert!(e.contains("makes its own passwords"), "{e}");
        let full = format!(
            "{iam}\nredis_user = \"gw\"\nredis_cache_name = \"my-cache\"\nserverless = true"
        );
        let result = parse(&cache(&full), "gw.toml");
        if cfg!(feature = "aws") {
            let c = result.unwrap();
            assert!(c.cache.redis_serverless);
        } else {
            let e = result.unwrap_err().to_string();
            assert!(e.contains("`aws` cargo feature"), "{e}");
        }
        let plain = full.replace("rediss://", "redis://");
        let e = err(&plain);
        assert!(
            e.contains("needs TLS") || e.contains("`aws` cargo feature"),
            "{e}"
        );

        // The password never shows.
        let ok = parse(
            &cache("redis_url = \"rediss://gw@cache.example:6379\"\nredis_password = \"hunter2-secret\""),
            "gw.toml",
        )
        .unwrap();
        let shown = ok.redacted_json(&[ok.endpoints().unwrap()]);
        assert!(!shown.contains("hunter2-secret"), "{shown}");
        assert!(!format!("{ok:?}").contains("hunter2-secret"));
    }

    #[test]
    fn redis_requires_a_32_byte_key_and_it_is_redacted() {
        let redis = format!(
            "{BASE}\n[cache]\nbackend = \"redis\"\nredis_url = \"redis://:pw@127.0.0.1:6379\"\n"
        );
        let err = parse(&redis, "gw.toml").unwrap_err().to_string();
        assert!(err.contains("cache.encryption_key"), "{err}");

        let short = format!("{redis}encryption_key = \"AAAA\"\n");
        let err = parse(&short, "gw.toml").unwrap_err().to_string();
        assert!(err.contains("need 32"), "{err}");

        let key = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";
        let ok = format!("{redis}encryption_key = \"{key}\"\n");
        let c = parse(&ok, "gw.toml").unwrap();
        let shown = c.redacted_json(&[c.endpoints().unwrap()]);
        assert!(!shown.contains(key), "{shown}");
        assert!(!shown.contains(":pw@"), "{shown}");
        assert!(!format!("{c:?}").contains(key));
    }

    #[test]
    fn urls_with_user_info_are_refused_without_echoing_the_password() {
        let mut c = parse(BASE, "t.toml").unwrap();
        c.cognito.as_mut().unwrap().token_endpoint =
            Some("https://user:hunter2@example.com/oauth2/token".into());
        let (key, message) = c.endpoints().unwrap_err();
        assert_eq!(key, "cognito.token_endpoint");
        assert!(!message.contains("hunter2"), "{message}");
        assert!(message.contains("user name or password"), "{message}");
        c.cognito.as_mut().unwrap().token_endpoint =
            Some("https://user:hunter2@exa mple.com/".into());
        let (_, message) = c.endpoints().unwrap_err();
        assert!(!message.contains("hunter2"), "{message}");
        assert_eq!(
            redact_userinfo_text("https://a:b@host/p@q"),
            "https://<redacted>@host/p@q"
        );
    }

    #[test]
    fn region_must_match_the_pool_and_domain_must_have_no_path() {
        let wrong_region = BASE.replace("region = \"us-east-1\"", "region = \"eu-west-1\"");
        let err = parse(&wrong_region, "t.toml").unwrap_err().to_string();
        assert!(
            err.contains("cognito.region") && err.contains("us-east-1"),
            "{err}"
        );
        let with_path = BASE.replace("amazoncognito.com\"", "amazoncognito.com/oauth2/token\"");
        let err = parse(&with_path, "t.toml").unwrap_err().to_string();
        assert!(
            err.contains("cognito.domain") && err.contains("has a path"),
            "{err}"
        );
        let trailing_slash = BASE.replace("amazoncognito.com\"", "amazoncognito.com/\"");
        assert!(parse(&trailing_slash, "t.toml").is_ok());
    }

    #[test]
    fn duplicate_client_refused() {
        let dup = format!(
            "{BASE}\n[[clients]]\nclient_id = \"k6h0hnjenh7auvi2as\"\nname = \"again\"\nallowed_scopes = [\"a/b\"]\n"
        );
        let err = parse(&dup, "gw.toml").unwrap_err().to_string();
        assert!(
            err.contains("clients[1].client_id") && err.contains("twice"),
            "{err}"
        );
    }
}
