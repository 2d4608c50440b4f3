//! A validator for one Cognito user pool, configured in code: the issuer and the
//! JWKS URI are derived as the gateway derives them, and the validator loads and
//! refreshes its own keys (from `build`, until its last clone is dropped).

use std::{sync::Arc, time::Duration};

use url::Url;

use super::{HttpFetcher, JwksError, JwtValidator, KeySet, ValidatorSettings};
use crate::http::{EndpointError, check_transport};

/// Which form of issuer a user pool has (its `IssuerConfigurationType`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IssuerType {
    /// `https://cognito-idp.<region>.amazonaws.com/<poolId>` (pools created
    /// before 2026, unless switched).
    #[default]
    Original,
    /// `https://issuer-cognito-idp.<region>.amazonaws.com/<poolId>`: recommended
    /// for every pool and required for multi-Region replication; `<region>` is
    /// the pool's primary Region.
    Updated,
}

impl IssuerType {
    /// The issuer of `user_pool_id` in `region` in this form.
    pub fn issuer(self, region: &str, user_pool_id: &str) -> String {
        match self {
            IssuerType::Original => {
                format!("https://cognito-idp.{region}.amazonaws.com/{user_pool_id}")
            }
            IssuerType::Updated => {
                format!("https://issuer-cognito-idp.{region}.amazonaws.com/{user_pool_id}")
            }
        }
    }
}

/// Builds a [`JwtValidator`] for a Cognito user pool.
///
/// ```no_run
/// # async fn demo() -> Result<(), m2m_gateway::jwt::BuildError> {
/// use m2m_gateway::jwt::CognitoValidator;
///
/// let validator = CognitoValidator::builder()
///     .region("us-east-1")
///     .user_pool_id("us-east-1_AbCdEf123")
///     .clients(["1example23456789"])   // or .any_client()
///     .build()?;
/// # let _ = validator;
/// # Ok(()) }
/// ```
///
/// Keys are fetched at once and every hour; an unknown `kid` refetches them (at
/// most once per cooldown); a call made before the first key set arrives waits for
/// it up to `first_load_wait` (5 s), then answers KEYS_UNAVAILABLE.
#[derive(Debug, Clone, Copy)]
pub struct CognitoValidator;

impl CognitoValidator {
    /// A builder with the gateway's defaults.
    pub fn builder() -> CognitoValidatorBuilder {
        CognitoValidatorBuilder::default()
    }
}

/// The settings of [`CognitoValidator::builder`].
#[derive(Debug, Clone)]
pub struct CognitoValidatorBuilder {
    region: Option<String>,
    user_pool_id: Option<String>,
    issuer_type: IssuerType,
    clients: Option<Vec<String>>,
    any_client: bool,
    issuer: Option<String>,
    jwks_uri: Option<String>,
    settings: ValidatorSettings,
    first_load_wait: Duration,
    refresh_period: Duration,
    cooldown: Duration,
    connect_timeout: Duration,
    fetch_timeout: Duration,
}

impl Default for CognitoValidatorBuilder {
    fn default() -> Self {
        Self {
            region: None,
            user_pool_id: None,
            issuer_type: IssuerType::Original,
            clients: None,
            any_client: false,
            issuer: None,
            jwks_uri: None,
            settings: ValidatorSettings::default(),
            first_load_wait: Duration::from_secs(5),
            refresh_period: Duration::from_secs(3600),
            cooldown: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            fetch_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a [`CognitoValidatorBuilder`] cannot build.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// No `region` (and no explicit `issuer`).
    #[error("region is not set (e.g. .region(\"us-east-1\"))")]
    MissingRegion,
    /// No `user_pool_id` (and no explicit `issuer`).
    #[error("user_pool_id is not set (e.g. .user_pool_id(\"us-east-1_AbCdEf123\"))")]
    MissingUserPoolId,
    /// Not an AWS Region name.
    #[error("{0:?} is not an AWS Region such as us-east-1")]
    BadRegion(String),
    /// Not a user pool id.
    #[error("{0:?} is not a user pool id such as us-east-1_AbCdEf123")]
    BadUserPoolId(String),
    /// The pool id names another Region: every token would be refused.
    #[error("user pool {pool:?} is not in {region:?}: the derived issuer would refuse every token")]
    RegionMismatch {
        /// The Region given.
        region: String,
        /// The pool id given.
        pool: String,
    },
    /// Neither `clients(...)` nor `any_client()`.
    #[error(
        "no app clients: list the accepted ones with .clients([...]) or accept every client of the pool with .any_client()"
    )]
    NoClients,
    /// An issuer or JWKS URI that is not a URL.
    #[error("{what}: {message}")]
    BadUrl {
        /// `issuer` or `jwks_uri`.
        what: &'static str,
        /// Why.
        message: String,
    },
    /// A URL that would carry keys in clear text.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The JWKS client could not be built.
    #[error(transparent)]
    Jwks(#[from] JwksError),
    /// `build` was called outside a tokio runtime (the key loader needs one).
    #[error("build() must run inside a tokio runtime (it starts the key loader)")]
    NoRuntime,
}

impl CognitoValidatorBuilder {
    /// The pool's AWS Region, e.g. `us-east-1`.
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// The user pool id, e.g. `us-east-1_AbCdEf123`.
    pub fn user_pool_id(mut self, id: impl Into<String>) -> Self {
        self.user_pool_id = Some(id.into());
        self
    }

    /// The pool's issuer form (`Original` unless the pool was switched to the
    /// updated issuer).
    pub fn issuer_type(mut self, issuer_type: IssuerType) -> Self {
        self.issuer_type = issuer_type;
        self
    }

    /// The app clients whose tokens are accepted (`client_id` claim).
    pub fn clients<I: IntoIterator<Item = S>, S: Into<String>>(mut self, ids: I) -> Self {
        self.clients = Some(ids.into_iter().map(Into::into).collect());
        self
    }

    /// Accepts tokens of every app client of the pool: an explicit choice, since
    /// any client anyone can create in the pool then gets in.
    pub fn any_client(mut self) -> Self {
        self.any_client = true;
        self
    }

    /// An explicit issuer instead of the derived one (an emulator, a test).
    pub fn issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = Some(issuer.into());
        self
    }

    /// An explicit JWKS URI instead of `<issuer>/.well-known/jwks.json`.
    pub fn jwks_uri(mut self, uri: impl Into<String>) -> Self {
        self.jwks_uri = Some(uri.into());
        self
    }

    /// Clock skew allowed on `exp` and `nbf` (5 s).
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.settings.leeway = leeway;
        self
    }

    /// Verified tokens remembered (100,000; 0 turns the cache off).
    pub fn verified_cache_size(mut self, size: u64) -> Self {
        self.settings.verified_cache_size = size;
        self
    }

    /// How long a call waits for the first key set (5 s).
    pub fn first_load_wait(mut self, wait: Duration) -> Self {
        self.first_load_wait = wait;
        self
    }

    /// How often the key set is refetched when nothing else triggers it (1 h).
    pub fn refresh_period(mut self, period: Duration) -> Self {
        self.refresh_period = period;
        self
    }

    /// The issuer and JWKS URI this builder derives.
    pub fn endpoints(&self) -> Result<(String, Url), BuildError> {
        let issuer = match &self.issuer {
            Some(issuer) => issuer.clone(),
            None => {
                let region = self.region.as_deref().ok_or(BuildError::MissingRegion)?;
                let pool = self
                    .user_pool_id
                    .as_deref()
                    .ok_or(BuildError::MissingUserPoolId)?;
                if !is_region(region) {
                    return Err(BuildError::BadRegion(region.to_owned()));
                }
                if !is_pool_id(pool) {
                    return Err(BuildError::BadUserPoolId(pool.to_owned()));
                }
                if !pool.starts_with(&format!("{region}_")) {
                    return Err(BuildError::RegionMismatch {
                        region: region.to_owned(),
                        pool: pool.to_owned(),
                    });
                }
                self.issuer_type.issuer(region, pool)
            }
        };
        let issuer_url = Url::parse(&issuer).map_err(|e| BuildError::BadUrl {
            what: "issuer",
            message: e.to_string(),
        })?;
        check_transport(&issuer_url)?;
        let jwks = match &self.jwks_uri {
            Some(uri) => uri.clone(),
            None => format!("{}/.well-known/jwks.json", issuer.trim_end_matches('/')),
        };
        let jwks = Url::parse(&jwks).map_err(|e| BuildError::BadUrl {
            what: "jwks_uri",
            message: e.to_string(),
        })?;
        check_transport(&jwks)?;
        Ok((issuer, jwks))
    }

    /// The validator, its key loader started (fetching at once). Must run inside
    /// a tokio runtime.
    pub fn build(self) -> Result<JwtValidator, BuildError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| BuildError::NoRuntime)?;
        let clients = match (&self.clients, self.any_client) {
            (Some(c), _) if !c.is_empty() => Some(c.clone()),
            (_, true) => None,
            _ => return Err(BuildError::NoClients),
        };
        let (issuer, jwks_uri) = self.endpoints()?;
        let fetcher = HttpFetcher::new(jwks_uri, self.connect_timeout, self.fetch_timeout)?;
        let keys = Arc::new(KeySet::new(
            issuer.clone(),
            Arc::new(fetcher),
            self.cooldown,
        ));
        let validator = JwtValidator::for_pool(
            issuer,
            clients.map(|c| c.into_iter().collect()),
            keys.clone(),
            self.settings,
            self.first_load_wait,
        );
        runtime.spawn(super::jwks::load_while_used(
            Arc::downgrade(&keys),
            self.refresh_period,
        ));
        Ok(validator)
    }
}

/// An AWS Region name (`us-east-1`).
pub(crate) fn is_region(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A user pool id (`us-east-1_AbCdEf123`).
pub(crate) fn is_pool_id(s: &str) -> bool {
    match s.split_once('_') {
        Some((region, id)) => {
            is_region(region)
                && !id.is_empty()
                && id.len() <= 64
                && id.bytes().all(|b| b.is_ascii_alphanumeric())
        }
        None => false,
    }
}
