//! `[validation]`, `[cache]` and `[limits]`: the validator's, the broker's and
//! the fleet's settings, checked and typed; the cache key decoded once.

use std::{num::NonZeroU32, path::Path, time::Duration};

use secrecy::{ExposeSecret, SecretString};

use super::{At, PoolSettings};
use crate::{
    broker::{BrokerSettings, FleetCache, FleetSettings, IamTarget, RedisTarget, check_ca_pem},
    config::{CacheBackend, CacheConfig, ConfigError, LimitsConfig, RedisAuth, ValidationConfig},
    jwt::ValidatorSettings,
};

/// Checks `[validation]` and types it.
pub(super) fn validator(
    v: &ValidationConfig,
    at: &At<'_>,
) -> Result<ValidatorSettings, ConfigError> {
    if v.leeway_secs > 300 {
        return Err(at.invalid(
            "validation.leeway_secs",
            format!("{} is more than 300 s", v.leeway_secs),
        ));
    }
    at.in_range(
        "validation.max_token_bytes",
        v.max_token_bytes as u64,
        512..=65_536,
    )?;
    at.in_range(
        "validation.jwks_cooldown_secs",
        v.jwks_cooldown_secs,
        1..=3600,
    )?;
    Ok(ValidatorSettings {
        leeway: Duration::from_secs(v.leeway_secs),
        max_token_bytes: v.max_token_bytes,
        verified_cache_size: v.verified_cache_size,
    })
}

/// Checks `[cache]` and `[limits]`: the broker's settings and the decoded key.
pub(super) fn broker(
    cache: &CacheConfig,
    limits: &LimitsConfig,
    at: &At<'_>,
) -> Result<BrokerSettings, ConfigError> {
    if !(cache.refresh_ratio > 0.0 && cache.refresh_ratio <= 0.95) {
        return Err(at.invalid(
            "cache.refresh_ratio",
            format!("{} is outside (0, 0.95]", cache.refresh_ratio),
        ));
    }
    if !(cache.refresh_jitter >= 0.0 && cache.refresh_jitter < cache.refresh_ratio) {
        return Err(at.invalid(
            "cache.refresh_jitter",
            format!(
                "{} is outside [0, cache.refresh_ratio)",
                cache.refresh_jitter
            ),
        ));
    }
    if cache.max_entries == 0 {
        return Err(at.invalid("cache.max_entries", "must be at least 1"));
    }
    at.in_range("cache.redis_timeout_ms", cache.redis_timeout_ms, 1..=60_000)?;
    at.in_range("cache.lock_wait_ms", cache.lock_wait_ms, 1..=60_000)?;
    check_redis(cache, at)?;
    let verifier_key = cache
        .encryption_key
        .as_ref()
        .map(|key| decode_key(key).map_err(|m| at.invalid("cache.encryption_key", m.to_string())))
        .transpose()?;
    if cache.backend == CacheBackend::Redis {
        if cache.redis_url.is_none() {
            return Err(at.invalid("cache.redis_url", "required with backend = \"redis\""));
        }
        if verifier_key.is_none() {
            return Err(at.invalid(
                "cache.encryption_key",
                "required with backend = \"redis\" (base64 of 32 bytes)",
            ));
        }
    }
    if limits.failed_auth_per_minute == 0 {
        return Err(at.invalid("limits.failed_auth_per_minute", "must be at least 1"));
    }
    at.in_range(
        "limits.upstream_per_second",
        u64::from(limits.upstream_per_second),
        0..=1_000_000,
    )?;
    at.in_range(
        "limits.upstream_max_wait_ms",
        limits.upstream_max_wait_ms,
        0..=60_000,
    )?;
    at.in_range("limits.max_scopes", limits.max_scopes as u64, 1..=100)?;
    Ok(BrokerSettings {
        max_entries: cache.max_entries,
        refresh_ratio: cache.refresh_ratio,
        refresh_jitter: cache.refresh_jitter,
        upstream_per_second: NonZeroU32::new(limits.upstream_per_second),
        upstream_max_wait: Duration::from_millis(limits.upstream_max_wait_ms),
        min_remaining: Duration::from_secs(cache.min_remaining_secs),
        failed_auth_per_minute: NonZeroU32::new(limits.failed_auth_per_minute)
            .unwrap_or(NonZeroU32::MIN),
        verifier_key,
    })
}

/// The fleet on Redis (`backend = "redis"`), its files read and its client
/// built once: a URL or TLS material it cannot use is an error now.
pub(super) fn fleet(
    cache: &CacheConfig,
    limits: &LimitsConfig,
    pools: &[PoolSettings],
    at: &At<'_>,
) -> Result<Option<FleetSettings>, ConfigError> {
    let (CacheBackend::Redis, Some(url)) = (&cache.backend, &cache.redis_url) else {
        return Ok(None);
    };
    let longest_token_call = pools
        .iter()
        .map(|p| p.upstream.token_timeout)
        .max()
        .unwrap_or_default();
    Ok(Some(FleetSettings {
        redis: redis_target(cache, url, at)?,
        // Covers the wait for a budget slot and the call itself.
        lock_ttl: Duration::from_millis(limits.upstream_max_wait_ms + 1000) + longest_token_call,
        lock_wait: Duration::from_millis(cache.lock_wait_ms),
    }))
}

/// The Redis keys that must agree with each other.
fn check_redis(cache: &CacheConfig, at: &At<'_>) -> Result<(), ConfigError> {
    if let Some(url) = &cache.redis_url {
        if !["redis://", "rediss://", "redis+unix://", "unix://"]
            .iter()
            .any(|scheme| url.starts_with(scheme))
        {
            return Err(at.invalid(
                "cache.redis_url",
                "must start with redis://, rediss:// or redis+unix://",
            ));
        }
        if url.ends_with("#insecure") {
            return Err(at.invalid(
                "cache.redis_url",
                "#insecure turns off certificate checks; trust a private CA with cache.redis_ca_file instead",
            ));
        }
        if cache.redis_ca_file.is_some() && !url.starts_with("rediss://") {
            return Err(at.invalid(
                "cache.redis_ca_file",
                "is set but cache.redis_url is not rediss:// (TLS)",
            ));
        }
    }
    if cache.redis_auth == RedisAuth::Iam {
        if cache.redis_password.is_some() || cache.redis_password_file.is_some() {
            return Err(at.invalid(
                "cache.redis_auth",
                "\"iam\" makes its own passwords: remove cache.redis_password(_file)",
            ));
        }
        if cache.redis_user.as_deref().is_none_or(str::is_empty) {
            return Err(at.invalid(
                "cache.redis_user",
                "required with redis_auth = \"iam\" (the IAM-enabled user; its id and name must be equal)",
            ));
        }
        let named = cache.redis_cache_name.as_deref().is_some_and(|name| {
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
        if !named {
            return Err(at.invalid(
                "cache.redis_cache_name",
                "required with redis_auth = \"iam\": the cache's name (lowercase letters, digits, '-')",
            ));
        }
    }
    if cache.redis_password.is_some() && cache.redis_password_file.is_some() {
        return Err(at.invalid(
            "cache.redis_password_file",
            "set together with cache.redis_password: keep one",
        ));
    }
    Ok(())
}

/// Why `[cache] encryption_key` is not a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyDecodeError {
    /// Not standard base64.
    #[error("not valid base64; make a key with: openssl rand -base64 32")]
    NotBase64,
    /// Base64 of the wrong number of bytes (a hex key read as base64, say).
    #[error(
        "decodes to {0} bytes, need 32 (base64 of 32 random bytes, not hex; make one with: openssl rand -base64 32)"
    )]
    WrongLength(usize),
}

/// Decodes `[cache] encryption_key`: base64 of exactly 32 bytes.
pub fn decode_key(key: &SecretString) -> Result<[u8; 32], KeyDecodeError> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(key.expose_secret().trim())
        .map_err(|_| KeyDecodeError::NotBase64)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyDecodeError::WrongLength(bytes.len()))
}

/// The Redis endpoint with its TLS material and credentials read and checked:
/// errors name the key and the file.
fn redis_target(cache: &CacheConfig, url: &str, at: &At<'_>) -> Result<RedisTarget, ConfigError> {
    let invalid = |key: &str, message: String| at.invalid(key, message);
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
        iam: (cache.redis_auth == RedisAuth::Iam).then(|| IamTarget {
            user: cache.redis_user.clone().unwrap_or_default(),
            cache_name: cache.redis_cache_name.clone().unwrap_or_default(),
            serverless: cache.redis_serverless,
            service: cache.redis_iam_service,
            region: cache.redis_region.clone(),
        }),
        timeout: Duration::from_millis(cache.redis_timeout_ms),
    };
    // Builds the client once: a URL or TLS material it cannot use is an error now.
    FleetCache::check_target(&target).map_err(|e| invalid("cache.redis_url", e.to_string()))?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Settings;

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
            pool.endpoints.token_endpoint.to_string(),
            "https://example.auth.eu-west-1.amazoncognito.com/oauth2/token"
        );
        assert_eq!(
            pool.endpoints.issuer,
            "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbCdEf123"
        );
        let key: Vec<u8> = (1..=32).collect();
        assert_eq!(s.cache_key().map(|k| &k[..]), Some(&key[..]));
        assert_eq!(s.broker.verifier_key.as_ref(), s.cache_key());
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
