//! The configuration as the gateway runs with it: the file (and environment) is
//! parsed and checked once ([`Settings::load`]), into typed values — durations,
//! URLs, the derived Cognito endpoints, the decoded cache key, non-zero limits —
//! that `serve`, `dev` and `check-config` share. Nothing downstream re-validates
//! or re-derives.

use std::{
    net::SocketAddr,
    num::{NonZeroU32, NonZeroUsize},
    path::Path,
    time::Duration,
};

use secrecy::SecretString;

use crate::{
    broker::{BrokerSettings, FleetSettings, IamTarget, RedisTarget, check_ca_pem},
    config::{CacheBackend, Config, ConfigError, Endpoints, TlsConfig},
    edge::{self, EdgeSettings},
    jwt::ValidatorSettings,
};

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The configuration as written (printed by `check-config`, written by `dev`).
    pub config: Config,
    /// The user pools: endpoints and how they are called, in configuration
    /// order (`[cognito]` is one pool).
    pub pools: Vec<PoolSettings>,
    /// The gRPC listener and its limits.
    pub server: ServerSettings,
    /// The access-token validator.
    pub validator: ValidatorSettings,
    /// The GetToken broker (its verifier key is the cache key when one is set).
    pub broker: BrokerSettings,
    /// The shared cache on Redis (`cache.backend = "redis"`).
    pub fleet: Option<FleetSettings>,
    /// The decoded `cache.encryption_key`.
    pub cache_key: Option<[u8; 32]>,
}

/// `[server]`, typed.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// gRPC address.
    pub listen: SocketAddr,
    /// Admin HTTP address.
    pub admin_listen: Option<SocketAddr>,
    /// TLS files.
    pub tls: Option<TlsConfig>,
    /// Longest RPC.
    pub request_timeout: Duration,
    /// Drain time after SIGTERM.
    pub shutdown_grace: Duration,
    /// Calls in flight across all connections.
    pub max_concurrent_requests: NonZeroUsize,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 keepalive ping interval.
    pub keepalive_interval: Duration,
    /// HTTP/2 keepalive ping timeout.
    pub keepalive_timeout: Duration,
    /// Connection and request limits (the connection cap as configured; the
    /// listener lowers it below the open-file limit when it starts).
    pub edge: EdgeSettings,
}

/// One user pool.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Name, token endpoint, issuers and JWKS URIs.
    pub endpoints: Endpoints,
    /// How its endpoints are called.
    pub upstream: UpstreamSettings,
}

/// How Cognito is called.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamSettings {
    /// TCP/TLS connect timeout (token endpoint and JWKS).
    pub connect_timeout: Duration,
    /// Total time of one token request, retry included.
    pub token_timeout: Duration,
    /// Total time of one JWKS fetch.
    pub jwks_timeout: Duration,
    /// Least time between two JWKS fetches caused by unknown `kid`s.
    pub jwks_cooldown: Duration,
}

impl Settings {
    /// Loads `path` (must exist) with environment overrides, and checks it.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let origin = path.display().to_string();
        Self::new(Config::read(path)?, &origin).map_err(|e| match e {
            // A value set by an environment variable is blamed on the variable.
            ConfigError::Invalid { key, message, path } => {
                let var = crate::config::env_var(&key);
                let path = if std::env::var_os(&var).is_some() {
                    format!("environment variable {var}")
                } else {
                    path
                };
                ConfigError::Invalid { key, message, path }
            }
            other => other,
        })
    }

    /// Parses a TOML string (no environment) and checks it. `origin` names it
    /// in errors.
    pub fn from_toml_str(toml: &str, origin: &str) -> Result<Self, ConfigError> {
        Self::new(Config::parse_toml(toml, origin)?, origin)
    }

    /// Checks `config` (errors name the key and `origin`) and types its values.
    pub fn new(config: Config, origin: &str) -> Result<Self, ConfigError> {
        let endpoints = config.check(origin)?;
        let pools: Vec<PoolSettings> = config
            .pool_entries()
            .into_iter()
            .zip(endpoints)
            .map(|((_, c), endpoints)| PoolSettings {
                endpoints,
                upstream: UpstreamSettings {
                    connect_timeout: Duration::from_millis(c.connect_timeout_ms),
                    token_timeout: Duration::from_millis(c.timeout_ms),
                    jwks_timeout: Duration::from_millis(c.jwks_timeout_ms),
                    jwks_cooldown: Duration::from_secs(config.validation.jwks_cooldown_secs),
                },
            })
            .collect();
        let longest_token_call = pools
            .iter()
            .map(|p| p.upstream.token_timeout)
            .max()
            .unwrap_or_default();
        if let Some(tls) = &config.server.tls {
            check_tls(tls).map_err(|(key, message)| ConfigError::Invalid {
                path: origin.to_owned(),
                key: key.to_owned(),
                message,
            })?;
        }
        let s = &config.server;
        let cache = &config.cache;
        let limits = &config.limits;
        let ms = Duration::from_millis;
        let secs = Duration::from_secs;
        // `check` refused every zero these need.
        let nonzero_u32 = |v: u32| NonZeroU32::new(v).unwrap_or(NonZeroU32::MIN);
        let cache_key = cache
            .encryption_key
            .as_ref()
            .map(crate::config::decode_key)
            .transpose()
            .map_err(|e| ConfigError::Invalid {
                path: origin.to_owned(),
                key: "cache.encryption_key".into(),
                message: e.to_string(),
            })?;
        let server = ServerSettings {
            listen: s.listen,
            admin_listen: s.admin_listen,
            tls: s.tls.clone(),
            request_timeout: ms(s.request_timeout_ms),
            shutdown_grace: ms(s.shutdown_grace_ms),
            max_concurrent_requests: NonZeroUsize::new(s.max_concurrent_requests)
                .unwrap_or(NonZeroUsize::MIN),
            max_concurrent_streams: s.max_concurrent_streams,
            keepalive_interval: secs(s.http2_keepalive_interval_secs),
            keepalive_timeout: secs(s.http2_keepalive_timeout_secs),
            edge: EdgeSettings {
                max_connections: s.max_connections,
                max_connections_per_peer: match s.max_connections_per_peer {
                    0 => usize::MAX,
                    n => n,
                },
                handshake_timeout: ms(s.handshake_timeout_ms),
                idle_timeout: secs(s.idle_timeout_secs),
                body_timeout: ms(s.request_body_timeout_ms),
                max_message_bytes: s.max_message_bytes,
                max_requests_per_peer: match s.max_requests_per_peer {
                    0 => usize::MAX,
                    n => n,
                },
                response_timeout: ms(s.request_timeout_ms),
                max_stream_lifetime: secs(s.max_stream_secs),
                max_streams_per_peer: match s.max_streams_per_peer {
                    0 => usize::MAX,
                    n => n,
                },
                max_streams_per_connection: s.max_streams_per_connection,
            },
        };
        let validator = ValidatorSettings {
            leeway: secs(config.validation.leeway_secs),
            max_token_bytes: config.validation.max_token_bytes,
            verified_cache_size: config.validation.verified_cache_size,
        };
        let broker = BrokerSettings {
            max_entries: cache.max_entries,
            refresh_ratio: cache.refresh_ratio,
            refresh_jitter: cache.refresh_jitter,
            upstream_per_second: NonZeroU32::new(limits.upstream_per_second),
            upstream_max_wait: ms(limits.upstream_max_wait_ms),
            min_remaining: secs(cache.min_remaining_secs),
            failed_auth_per_minute: nonzero_u32(limits.failed_auth_per_minute),
            verifier_key: cache_key,
        };
        let fleet = match (&cache.backend, &cache.redis_url) {
            (CacheBackend::Redis, Some(url)) => Some(FleetSettings {
                redis: redis_target(cache, url, origin)?,
                // Covers the wait for a budget slot and the call itself.
                lock_ttl: ms(limits.upstream_max_wait_ms + 1000) + longest_token_call,
                lock_wait: ms(cache.lock_wait_ms),
            }),
            _ => None,
        };
        Ok(Self {
            pools,
            server,
            validator,
            broker,
            fleet,
            cache_key,
            config,
        })
    }

    /// The connection cap the listener applies: `server.max_connections`, kept
    /// below the open-file limit.
    pub fn connection_cap(&self) -> usize {
        edge::connection_cap(self.server.edge.max_connections)
    }
}

/// Reads and parses the TLS files, as the listener will: each error names the key
/// and the file (`check-config` and `serve` both stop on it).
fn check_tls(tls: &TlsConfig) -> Result<(), (&'static str, String)> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let read = |key: &'static str, path: &Path| {
        std::fs::read(path).map_err(|e| (key, format!("{}: cannot read: {e}", path.display())))
    };
    let certs = |key: &'static str, path: &Path| {
        let pem = read(key, path)?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|e| {
                (
                    key,
                    format!("{}: not a PEM certificate ({e})", path.display()),
                )
            })?;
        if certs.is_empty() {
            return Err((key, format!("{}: not a PEM certificate", path.display())));
        }
        Ok(certs)
    };
    let chain = certs("server.tls.cert", &tls.cert)?;
    let pem = read("server.tls.key", &tls.key)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
        (
            "server.tls.key",
            format!(
                "{}: no PEM private key (PKCS#8, PKCS#1 or SEC1)",
                tls.key.display()
            ),
        )
    })?;
    let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key).map_err(|e| {
        (
            "server.tls.key",
            format!("{}: unusable private key: {e}", tls.key.display()),
        )
    })?;
    let certified = rustls::sign::CertifiedKey::new(chain, signer);
    if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
        certified.keys_match()
    {
        return Err((
            "server.tls.key",
            format!(
                "{} is not the key of the certificate in {}",
                tls.key.display(),
                tls.cert.display()
            ),
        ));
    }
    if let Some(ca) = &tls.client_ca {
        certs("server.tls.client_ca", ca)?;
    }
    Ok(())
}

/// The Redis endpoint with its TLS material and credentials read and checked:
/// errors name the key and the file.
fn redis_target(
    cache: &crate::config::CacheConfig,
    url: &str,
    origin: &str,
) -> Result<RedisTarget, ConfigError> {
    let invalid = |key: &str, message: String| ConfigError::Invalid {
        path: origin.to_owned(),
        key: key.to_owned(),
        message,
    };
    let read = |key: &str, path: &Path| {
        std::fs::read(path).map_err(|e| invalid(key, format!("{}: {e}", path.display())))
    };
    let ca_pem = match &cache.redis_ca_file {
        Some(path) => {
            let pem = read("cache.redis_ca_file", path)?;
            check_ca_pem(&pem)
                .map_err(|m| invalid("cache.redis_ca_file", format!("{}: {m}", path.display())))?;
            Some(pem)
        }
        None => None,
    };
    let password = match (&cache.redis_password, &cache.redis_password_file) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(path)) => {
            let bytes = read("cache.redis_password_file", path)?;
            let text = String::from_utf8(bytes).map_err(|_| {
                invalid(
                    "cache.redis_password_file",
                    format!("{}: not UTF-8", path.display()),
                )
            })?;
            // A mounted Secret often ends with a newline that is not part of it.
            let text = text.trim_end_matches(['\n', '\r']);
            if text.is_empty() {
                return Err(invalid(
                    "cache.redis_password_file",
                    format!("{} is empty", path.display()),
                ));
            }
            Some(SecretString::from(text.to_owned()))
        }
        (None, None) => None,
    };
    let target = RedisTarget {
        url: url.to_owned(),
        mode: cache.redis_mode,
        ca_pem,
        username: cache.redis_user.clone(),
        password,
        iam: (cache.redis_auth == crate::config::RedisAuth::Iam).then(|| IamTarget {
            user: cache.redis_user.clone().unwrap_or_default(),
            cache_name: cache.redis_cache_name.clone().unwrap_or_default(),
            serverless: cache.redis_serverless,
            service: cache.redis_iam_service,
            region: cache.redis_region.clone(),
        }),
        timeout: Duration::from_millis(cache.redis_timeout_ms),
    };
    // Builds the client once: a URL or TLS material it cannot use is an error now.
    crate::broker::FleetCache::check_target(&target)
        .map_err(|e| invalid("cache.redis_url", e.to_string()))?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[server]
request_timeout_ms = 2500
max_requests_per_peer = 0
[cognito]
region = "eu-west-1"
user_pool_id = "eu-west-1_AbCdEf123"
domain = "https://example.auth.eu-west-1.amazoncognito.com"
timeout_ms = 4000
[cache]
backend = "redis"
redis_url = "redis://127.0.0.1:6379"
encryption_key = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="
[limits]
upstream_per_second = 0
upstream_max_wait_ms = 2000
[[clients]]
client_id = "c1"
name = "one"
allowed_scopes = ["a/read"]
"#;

    #[test]
    fn values_are_typed_once_from_the_checked_file() {
        let s = Settings::from_toml_str(BASE, "t.toml").unwrap();
        assert_eq!(s.server.request_timeout, Duration::from_millis(2500));
        assert_eq!(s.server.edge.max_requests_per_peer, usize::MAX, "0 = off");
        let pool = &s.pools[0];
        assert_eq!(pool.upstream.token_timeout, Duration::from_secs(4));
        assert_eq!(pool.endpoints.pool, "default");
        assert_eq!(
            pool.endpoints.token_endpoint.as_str(),
            "https://example.auth.eu-west-1.amazoncognito.com/oauth2/token"
        );
        assert_eq!(
            pool.endpoints.issuer,
            "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbCdEf123"
        );
        let key: Vec<u8> = (1..=32).collect();
        assert_eq!(s.cache_key.as_ref().map(|k| &k[..]), Some(&key[..]));
        assert_eq!(s.broker.verifier_key, s.cache_key);
        assert_eq!(s.broker.upstream_per_second, None, "0 = off");
        let fleet = s.fleet.as_ref().expect("redis backend");
        // The lock outlives the wait for a budget slot and the call itself.
        assert_eq!(fleet.lock_ttl, Duration::from_millis(2000 + 4000 + 1000));
        // A value `check` refuses never becomes a setting.
        let bad = BASE.replace("timeout_ms = 4000", "timeout_ms = 0");
        let err = Settings::from_toml_str(&bad, "t.toml").unwrap_err();
        assert!(err.to_string().contains("cognito.timeout_ms"), "{err}");
    }
}
