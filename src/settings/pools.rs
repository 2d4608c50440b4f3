//! `[cognito]` / `[[pools]]`: each pool checked (errors name the key, e.g.
//! `pools[1].region`) and its endpoints derived with the shared Cognito rules.

use std::time::Duration;

use http::Uri;
use serde::Serialize;
use url::Url;

use super::At;
use crate::{
    config::{AcceptPrevious, CognitoConfig, Config, ConfigError},
    http::check_transport,
    rules::cognito::{DEFAULT_POOL, PoolError, PoolSpec, is_pool_name},
};

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

/// One user pool's Cognito endpoints after derivation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoints {
    /// The pool's name.
    pub pool: String,
    /// `/oauth2/token` URL.
    #[serde(serialize_with = "display")]
    pub token_endpoint: Uri,
    /// Expected `iss`, byte for byte.
    pub issuer: String,
    /// JWKS URL.
    #[serde(serialize_with = "display")]
    pub jwks_uri: Uri,
    /// Other issuers accepted for this pool (`accept_previous_issuer`), each with
    /// the JWKS URL of its own key set.
    pub accepted_issuers: Vec<AcceptedIssuer>,
}

impl Endpoints {
    /// Every issuer this pool's tokens may carry, with its JWKS URL: the pool's
    /// own first, then the accepted ones.
    pub fn issuers(&self) -> impl Iterator<Item = (&str, &Uri)> {
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
    #[serde(serialize_with = "display")]
    pub jwks_uri: Uri,
}

fn display<S: serde::Serializer>(uri: &Uri, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(uri)
}

/// `[cognito]` or the `[[pools]]` entries, each with the key prefix its
/// errors name.
pub(super) fn entries(config: &Config) -> Vec<(String, &CognitoConfig)> {
    match &config.cognito {
        Some(c) => vec![("cognito".to_owned(), c)],
        None => config
            .pools
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("pools[{i}]"), c))
            .collect(),
    }
}

/// Every pool checked, named once and claiming its own issuers, in
/// configuration order.
pub(super) fn check(config: &Config, at: &At<'_>) -> Result<Vec<PoolSettings>, ConfigError> {
    let entries = entries(config);
    if entries.is_empty() {
        return Err(at.invalid(
            "cognito",
            "missing: describe the user pool in [cognito] (or several in [[pools]])",
        ));
    }
    if config.cognito.is_some() && !config.pools.is_empty() {
        return Err(at.invalid(
            "pools",
            "give either [cognito] (one pool) or [[pools]] entries, not both",
        ));
    }
    let cooldown = Duration::from_secs(config.validation.jwks_cooldown_secs);
    let mut pools: Vec<PoolSettings> = Vec::with_capacity(entries.len());
    for (prefix, c) in &entries {
        let endpoints = check_pool(prefix, c, config.cognito.is_some())
            .map_err(|(key, m)| at.invalid(&key, m))?;
        if pools.iter().any(|p| p.endpoints.pool == endpoints.pool) {
            return Err(at.invalid(
                &format!("{prefix}.name"),
                format!("pool {:?} is described twice", endpoints.pool),
            ));
        }
        // One issuer, one key set and one set of clients: never two pools.
        for (issuer, _) in endpoints.issuers() {
            if let Some(other) = pools
                .iter()
                .find(|p| p.endpoints.issuers().any(|(claimed, _)| claimed == issuer))
            {
                return Err(at.invalid(
                    &format!("{prefix}.issuer"),
                    format!(
                        "issuer {issuer:?} is already pool {:?}'s: a token's issuer must name one pool",
                        other.endpoints.pool
                    ),
                ));
            }
        }
        pools.push(PoolSettings {
            endpoints,
            upstream: UpstreamSettings {
                connect_timeout: Duration::from_millis(c.connect_timeout_ms),
                token_timeout: Duration::from_millis(c.timeout_ms),
                jwks_timeout: Duration::from_millis(c.jwks_timeout_ms),
                jwks_cooldown: cooldown,
            },
        });
    }
    Ok(pools)
}

/// Checks one pool (`prefix` is `cognito` or `pools[i]`) and derives its
/// endpoints. Errors carry the key they concern.
pub(super) fn check_pool(
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
            // A Cognito prefix domain names its Region: it must be the pool's
            // (the pool would refuse every client of the other one).
            let domain_region = url
                .host_str()
                .and_then(|h| h.strip_suffix(".amazoncognito.com"))
                .and_then(|h| h.rsplit_once(".auth."))
                .map(|(_, region)| region);
            let pool_region = crate::rules::cognito::region_of_pool_id(&c.user_pool_id);
            if let (Some(domain_region), Some(pool_region)) = (domain_region, pool_region) {
                if domain_region != pool_region {
                    return Err((
                        key("domain"),
                        format!(
                            "{:?} is a domain in {domain_region}, but user pool {:?} is in {pool_region}: use the pool's own domain (Cognito console, App integration, Domain)",
                            redact_userinfo_text(domain),
                            c.user_pool_id
                        ),
                    ));
                }
            }
        }
    }
    if c.issuer.is_some() {
        checked_url(&key("issuer"), &derived.issuer)?;
    }
    let issuer = derived.issuer;
    let jwks_uri = endpoint_uri(&key("jwks_uri"), &derived.jwks_uri)?;
    // Blame the key the user wrote: the token endpoint is derived from the domain.
    let (token_key, token_endpoint) = match (&c.token_endpoint, &c.domain) {
        (Some(t), _) => (
            key("token_endpoint"),
            endpoint_uri(&key("token_endpoint"), t)?,
        ),
        (None, Some(d)) => {
            let base = checked_url(&key("domain"), d)?;
            if base.query().is_some() || base.fragment().is_some() {
                return Err((key("domain"), "must not carry a query or fragment".into()));
            }
            let joined = format!("{}/oauth2/token", base.as_str().trim_end_matches('/'));
            (key("domain"), endpoint_uri(&key("domain"), &joined)?)
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
        let jwks = endpoint_uri(&key("accept_previous_issuer"), &jwks)?;
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

/// [`checked_url`] as the `http::Uri` the outbound client takes.
fn endpoint_uri(key: &str, text: &str) -> Result<Uri, (String, String)> {
    let url = checked_url(key, text)?;
    Uri::try_from(url.as_str()).map_err(|e| {
        (
            key.to_owned(),
            format!("{:?}: {e}", redact_userinfo_text(text)),
        )
    })
}

/// `text` with anything between `://` and the last `@` of the authority hidden.
pub(super) fn redact_userinfo_text(text: &str) -> String {
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
