//! The configuration as the gateway runs with it: the file (and environment) is
//! parsed once ([`crate::config`]) and checked and typed here, one function per
//! section, into the values every component is built from — durations, URLs,
//! the derived Cognito endpoints, the clients in their pools, the decoded cache
//! key, non-zero limits — that `serve`, `dev` and `check-config` share. Nothing
//! downstream re-validates or re-derives, and nothing downstream reads the file's
//! types.

mod cache;
mod clients;
mod pools;
pub(crate) mod server;
#[cfg(test)]
pub(crate) mod tests;

use std::path::Path;

pub use cache::{KeyDecodeError, decode_key};
pub use pools::{AcceptedIssuer, Endpoints, PoolSettings, UpstreamSettings};
pub use server::ServerSettings;

use crate::{
    broker::{BrokerSettings, FleetSettings},
    config::{Config, ConfigError},
    edge,
    jwt::ValidatorSettings,
    registry::Registry,
};

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The configuration as written: printed by `check-config` and written by
    /// `dev`, never read by a component.
    pub config: Config,
    /// The user pools: endpoints and how they are called, in configuration
    /// order (`[cognito]` is one pool).
    pub pools: Vec<PoolSettings>,
    /// The gRPC listener and its limits.
    pub server: ServerSettings,
    /// The access-token validator.
    pub validator: ValidatorSettings,
    /// The GetToken broker (its verifier key is the decoded cache key, when one
    /// is set).
    pub broker: BrokerSettings,
    /// The shared cache on Redis (`cache.backend = "redis"`).
    pub fleet: Option<FleetSettings>,
    /// The registered clients, each in its pool.
    pub registry: Registry,
    /// The kill switch.
    pub revocations: RevocationSettings,
}

/// The kill switch's settings (`[revocations]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationSettings {
    /// Where the list persists, if anywhere.
    pub state_file: Option<std::path::PathBuf>,
    /// How long a client's entry is kept after its revocation, in seconds.
    pub max_token_lifetime_secs: u64,
}

/// Where the configuration came from, for errors that name the key.
pub(crate) struct At<'a>(&'a str);

impl At<'_> {
    fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.0.to_owned(),
            key: key.to_owned(),
            message: message.into(),
        }
    }

    fn in_range(
        &self,
        key: &str,
        v: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<(), ConfigError> {
        if range.contains(&v) {
            return Ok(());
        }
        Err(self.invalid(
            key,
            format!("{v} is outside {}..={}", range.start(), range.end()),
        ))
    }
}

/// `[revocations]`: Cognito's access tokens live 5 minutes to 1 day.
fn revocations(
    cfg: &crate::config::RevocationsConfig,
    at: &At<'_>,
) -> Result<RevocationSettings, ConfigError> {
    at.in_range(
        "revocations.max_token_lifetime_secs",
        cfg.max_token_lifetime_secs,
        300..=crate::revocations::DEFAULT_MAX_TOKEN_LIFETIME_SECS,
    )?;
    if let Some(path) = &cfg.state_file {
        if path.as_os_str().is_empty() || path.is_dir() {
            return Err(at.invalid(
                "revocations.state_file",
                format!("{} is not a file path", path.display()),
            ));
        }
    }
    Ok(RevocationSettings {
        state_file: cfg.state_file.clone(),
        max_token_lifetime_secs: cfg.max_token_lifetime_secs,
    })
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

    /// Checks `config` (errors name the key and `origin`) and types its values,
    /// section by section.
    pub fn new(config: Config, origin: &str) -> Result<Self, ConfigError> {
        let at = At(origin);
        let pools = pools::check(&config, &at)?;
        let server = server::check(&config.server, &at)?;
        let validator = cache::validator(&config.validation, &at)?;
        let broker = cache::broker(&config.cache, &config.limits, &at)?;
        let registry = clients::check(&config, &pools, &at)?;
        let fleet = cache::fleet(&config.cache, &config.limits, &pools, &at)?;
        let revocations = revocations(&config.revocations, &at)?;
        Ok(Self {
            revocations,
            pools,
            server,
            validator,
            broker,
            fleet,
            registry,
            config,
        })
    }

    /// The decoded `cache.encryption_key`.
    pub fn cache_key(&self) -> Option<&[u8; 32]> {
        self.broker.verifier_key.as_ref()
    }

    /// The connection cap the listener applies: `server.max_connections`, kept
    /// below the open-file limit.
    pub fn connection_cap(&self) -> usize {
        edge::connection_cap(self.server.edge.max_connections)
    }

    /// The effective configuration with each pool's derived endpoints, secrets
    /// redacted, for `check-config`.
    pub fn redacted_json(&self) -> String {
        let mut value = serde_json::to_value(&self.config).unwrap_or(serde_json::Value::Null);
        let entries: Vec<&mut serde_json::Value> = match value.get_mut("cognito") {
            Some(one) => vec![one],
            None => value
                .get_mut("pools")
                .and_then(|p| p.as_array_mut())
                .map(|a| a.iter_mut().collect())
                .unwrap_or_default(),
        };
        for (entry, endpoints) in entries
            .into_iter()
            .zip(self.pools.iter().map(|p| &p.endpoints))
        {
            if let Some(map) = entry.as_object_mut() {
                map.insert("name".into(), endpoints.pool.as_str().into());
                map.insert(
                    "token_endpoint".into(),
                    endpoints.token_endpoint.to_string().into(),
                );
                map.insert("issuer".into(), endpoints.issuer.as_str().into());
                map.insert("jwks_uri".into(), endpoints.jwks_uri.to_string().into());
                map.insert(
                    "accepted_issuers".into(),
                    serde_json::to_value(&endpoints.accepted_issuers)
                        .unwrap_or(serde_json::Value::Null),
                );
            }
        }
        if let Some(url) = value.pointer_mut("/cache/redis_url") {
            if let Some(s) = url.as_str() {
                *url = crate::http::redact_url_password(s).into();
            }
        }
        serde_json::to_string_pretty(&value).unwrap_or_default()
    }
}
