//! The configuration file as written: its sections as serde types (each default
//! taken from the component that owns it), loading (TOML +
//! `M2M_GATEWAY__SECTION__KEY` environment overrides) and parse errors that name
//! the key. Checking and typing is [`crate::settings`]'s, done once.

use std::{
    fmt,
    net::SocketAddr,
    num::NonZeroU32,
    path::{Path, PathBuf},
};

use figment::{
    Figment,
    providers::{Env, Format, Toml},
};
use secrecy::SecretString;
use serde::{Deserialize, Serialize, Serializer};

use crate::{
    broker::{self, BrokerSettings},
    edge,
    jwt::{self, ValidatorSettings},
    oauth, registry,
    rules::cognito::IssuerType,
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
    /// The kill switch's list of revocations.
    #[serde(default)]
    pub revocations: RevocationsConfig,
    /// The registry of third-party clients.
    #[serde(default)]
    pub clients: Vec<ClientConfig>,
}

/// `[revocations]`: where the kill switch's list persists and how long an
/// entry is kept.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RevocationsConfig {
    /// Where the list persists (written atomically on every change, read at
    /// start; a missing file is an empty list, an unreadable or corrupt one
    /// stops the start). With Redis the list also lives in the fleet's store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_file: Option<std::path::PathBuf>,
    /// The longest access-token lifetime of the pools' app clients, in
    /// seconds: a client's entry is kept this long after its revocation (then
    /// no token it covers can still be valid).
    pub max_token_lifetime_secs: u64,
}

impl Default for RevocationsConfig {
    fn default() -> Self {
        Self {
            state_file: None,
            max_token_lifetime_secs: crate::revocations::DEFAULT_MAX_TOKEN_LIFETIME_SECS,
        }
    }
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Admin HTTP listener (metrics, health); off when unset.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// TLS on the gRPC listener.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Longest time one RPC may take, in milliseconds (a smaller `grpc-timeout` wins).
    pub request_timeout_ms: u64,
    /// How long SIGTERM waits for in-flight calls before exiting, in milliseconds.
    pub shutdown_grace_ms: u64,
    /// Calls in flight across all connections; beyond it calls are shed at once
    /// with RESOURCE_EXHAUSTED (never queued).
    pub max_concurrent_requests: usize,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// Largest decoded request message, in bytes.
    pub max_message_bytes: usize,
    /// HTTP/2 keepalive ping interval, in seconds.
    pub http2_keepalive_interval_secs: u64,
    /// HTTP/2 keepalive ping timeout, in seconds.
    pub http2_keepalive_timeout_secs: u64,
    /// Most open gRPC connections; beyond it new ones are closed at once. Also
    /// kept below the process's open-file limit (with room for upstream, Redis
    /// and admin sockets).
    pub max_connections: usize,
    /// Most open gRPC connections from one peer address, so that one stranger
    /// cannot fill the table; 0 = no per-address cap (callers behind a NAT or a
    /// load balancer that hides their addresses share one).
    pub max_connections_per_peer: usize,
    /// Time a new connection has to send the HTTP/2 preface, in milliseconds.
    pub handshake_timeout_ms: u64,
    /// Time a connection may stay open with no call in flight, in seconds.
    pub idle_timeout_secs: u64,
    /// Time a unary call's message has to arrive after its headers, in
    /// milliseconds (independent of `request_timeout_ms`).
    pub request_body_timeout_ms: u64,
    /// Most calls in flight from one peer address; 0 = no per-peer limit (set 0
    /// behind a proxy that makes every caller one address).
    pub max_requests_per_peer: usize,
    /// Longest life of a stream (Health/Watch, reflection), in seconds; it then
    /// ends with DEADLINE_EXCEEDED and the client opens a new one.
    pub max_stream_secs: u64,
    /// Most streams open from one peer address, apart from its unary calls; 0 =
    /// no per-peer limit.
    pub max_streams_per_peer: usize,
    /// Most streams open on one connection.
    pub max_streams_per_connection: usize,
    /// Oldest a connection gets, in seconds, before the gateway asks its client
    /// to reconnect (HTTP/2 GOAWAY), so that long-lived clients spread over new
    /// replicas after a scale-out; 0 = no limit.
    pub max_connection_age_secs: u64,
    /// Time a connection past its age has to finish its calls before it is
    /// closed, in seconds.
    pub max_connection_age_grace_secs: u64,
    /// After SIGTERM, how long the gateway keeps accepting while `/readyz`
    /// already answers 503 (so load balancers stop sending before the listener
    /// closes), in milliseconds; then it stops accepting and drains.
    pub drain_delay_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 50051)),
            admin_listen: None,
            tls: None,
            request_timeout_ms: edge::DEFAULT_RESPONSE_TIMEOUT_MS,
            shutdown_grace_ms: 10_000,
            max_concurrent_requests: 1024,
            max_concurrent_streams: 100,
            max_message_bytes: edge::DEFAULT_MAX_MESSAGE_BYTES,
            http2_keepalive_interval_secs: 30,
            http2_keepalive_timeout_secs: 10,
            max_connections: edge::DEFAULT_MAX_CONNECTIONS,
            max_connections_per_peer: edge::DEFAULT_MAX_CONNECTIONS_PER_PEER,
            handshake_timeout_ms: edge::DEFAULT_HANDSHAKE_TIMEOUT_MS,
            idle_timeout_secs: edge::DEFAULT_IDLE_TIMEOUT_SECS,
            request_body_timeout_ms: edge::DEFAULT_BODY_TIMEOUT_MS,
            max_requests_per_peer: edge::DEFAULT_MAX_REQUESTS_PER_PEER,
            max_stream_secs: edge::DEFAULT_MAX_STREAM_SECS,
            max_streams_per_peer: edge::DEFAULT_MAX_STREAMS_PER_PEER,
            max_streams_per_connection: edge::DEFAULT_MAX_STREAMS_PER_CONNECTION,
            max_connection_age_secs: 0,
            max_connection_age_grace_secs: 30,
            drain_delay_ms: 0,
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
    /// PEM CA bundle; set = client certificates required (mTLS). Read at start.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// How often `cert` and `key` are read again: new contents that parse and
    /// belong together serve the next handshakes (a cert-manager renewal needs
    /// no restart); anything else keeps the current pair and is logged.
    #[serde(default = "default_tls_reload_interval_secs")]
    pub reload_interval_secs: u64,
}

fn default_tls_reload_interval_secs() -> u64 {
    crate::tls::DEFAULT_RELOAD_INTERVAL.as_secs()
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
#[serde(default, deny_unknown_fields)]
pub struct ValidationConfig {
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// Tokens longer than this are rejected as malformed before any decoding.
    pub max_token_bytes: usize,
    /// Minimum time between two JWKS refetches caused by unknown `kid`s, in seconds.
    pub jwks_cooldown_secs: u64,
    /// Verified tokens remembered so a repeat skips the RSA check (0 = off).
    pub verified_cache_size: u64,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        let v = ValidatorSettings::default();
        Self {
            leeway_secs: v.leeway.as_secs(),
            max_token_bytes: v.max_token_bytes,
            jwks_cooldown_secs: jwt::DEFAULT_JWKS_COOLDOWN.as_secs(),
            verified_cache_size: v.verified_cache_size,
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
#[serde(default, deny_unknown_fields)]
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
    pub max_entries: u64,
    /// Share of a token's lifetime after which it is refreshed (AWS advises 0.75).
    pub refresh_ratio: f64,
    /// Refresh points are spread over `[refresh_ratio - refresh_jitter,
    /// refresh_ratio]` of the lifetime so that tokens obtained together are not
    /// refreshed in the same second.
    pub refresh_jitter: f64,
    /// A token with less life than this is never handed out, in seconds.
    pub min_remaining_secs: u64,
    /// Timeout of every Redis call, in milliseconds; past it the local cache serves.
    pub redis_timeout_ms: u64,
    /// Longest wait for another replica's Cognito call before calling oneself, in ms.
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
        let b = BrokerSettings::default();
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
            max_entries: b.max_entries,
            refresh_ratio: b.refresh_ratio,
            refresh_jitter: b.refresh_jitter,
            min_remaining_secs: b.min_remaining.as_secs(),
            redis_timeout_ms: millis(broker::DEFAULT_REDIS_TIMEOUT),
            lock_wait_ms: millis(broker::DEFAULT_LOCK_WAIT),
        }
    }
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Upstream attempts per client and minute with secrets Cognito has not
    /// accepted (proven secrets are never limited); beyond it callers get
    /// RESOURCE_EXHAUSTED with the time to wait.
    pub failed_auth_per_minute: u32,
    /// Token calls per second to Cognito, fleet-wide with Redis; 0 = no cap.
    pub upstream_per_second: u32,
    /// Longest wait of a GetToken miss for a slot of that budget, in ms.
    pub upstream_max_wait_ms: u64,
    /// Most scopes in one GetToken request.
    pub max_scopes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let b = BrokerSettings::default();
        Self {
            failed_auth_per_minute: b.failed_auth_per_minute.get(),
            upstream_per_second: b.upstream_per_second.map_or(0, NonZeroU32::get),
            upstream_max_wait_ms: millis(b.upstream_max_wait),
            max_scopes: registry::DEFAULT_MAX_SCOPES,
        }
    }
}

pub use crate::registry::ClientConfig;

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

fn default_connect_timeout_ms() -> u64 {
    millis(oauth::DEFAULT_CONNECT_TIMEOUT)
}
fn default_total_timeout_ms() -> u64 {
    millis(oauth::DEFAULT_TOKEN_TIMEOUT)
}
fn default_jwks_timeout_ms() -> u64 {
    millis(jwt::DEFAULT_JWKS_FETCH_TIMEOUT)
}
fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
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

    /// The configuration as TOML, secrets redacted (what `dev --write-config` writes).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
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
            let hint = match found.as_str() {
                "client_secret" | "secret" => {
                    "; the gateway stores no client secret: each caller presents its own in GetToken, and Cognito checks it"
                }
                _ => "",
            };
            format!(
                "unknown key `{}` (known here: {}){hint}",
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
