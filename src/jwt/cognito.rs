//! A validator for Cognito user pools, configured in code: issuers and JWKS URIs
//! are derived as the gateway derives them, and the validator loads and refreshes
//! its own keys (from `build`, until its last clone is dropped).

use std::{sync::Arc, time::Duration};

use http::Uri;

use super::{CognitoValidator, HttpFetcher, JwksError, KeySet, TrustedIssuer, ValidatorSettings};
use crate::http::{EndpointError, check_transport};

use crate::rules::cognito::{DEFAULT_POOL, PoolSpec, region_of_pool_id};
pub use crate::rules::cognito::{IssuerType, PoolError, jwks_uri_of};

/// How long a call waits for the first key set.
pub const DEFAULT_FIRST_LOAD_WAIT: Duration = Duration::from_secs(5);
/// How often a key set is refetched when nothing else triggers it.
pub const DEFAULT_JWKS_REFRESH_PERIOD: Duration = Duration::from_secs(3600);
/// Least time between two JWKS fetches caused by unknown `kid`s.
pub const DEFAULT_JWKS_COOLDOWN: Duration = Duration::from_secs(10);
/// TCP/TLS connect timeout of a JWKS fetch.
pub const DEFAULT_JWKS_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Total time of one JWKS fetch.
pub const DEFAULT_JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

impl CognitoValidator {
    /// A builder for one Cognito user pool or several, with the gateway's defaults.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), m2m_gateway::jwt::BuildError> {
    /// use m2m_gateway::jwt::{CognitoPool, CognitoValidator, IssuerType};
    ///
    /// // One pool.
    /// let validator = CognitoValidator::builder()
    ///     .user_pool_id("us-east-1_AbCdEf123")   // its Region comes from the id
    ///     .clients(["1example23456789"])   // or .any_client()
    ///     .build()?;
    ///
    /// // Several pools; the first one switching to the updated issuer form.
    /// let validator = CognitoValidator::builder()
    ///     .pool(
    ///         CognitoPool::new("us-east-1", "us-east-1_AbCdEf123")
    ///             .issuer_type(IssuerType::Updated)
    ///             .accept_previous_issuer()
    ///             .clients(["1example23456789"]),
    ///     )
    ///     .pool(CognitoPool::new("eu-west-1", "eu-west-1_XyZ987654").clients(["2example"]))
    ///     .build()?;
    /// # let _ = validator;
    /// # Ok(()) }
    /// ```
    ///
    /// Each issuer has its own key set: a token is checked against the keys of the
    /// issuer it claims (matched exactly) and the clients of that issuer's pool.
    /// Keys are fetched at once and every hour; an unknown `kid` refetches them (at
    /// most once per cooldown); a call made before the first key set arrives waits for
    /// it up to `first_load_wait` (5 s), then answers KEYS_UNAVAILABLE.
    pub fn builder() -> CognitoValidatorBuilder {
        CognitoValidatorBuilder::default()
    }
}

/// One user pool whose tokens a validator accepts
/// ([`CognitoValidatorBuilder::pool`]).
#[derive(Debug, Clone, Default)]
pub struct CognitoPool {
    name: Option<String>,
    region: Option<String>,
    user_pool_id: Option<String>,
    issuer_type: IssuerType,
    clients: Option<Vec<String>>,
    any_client: bool,
    issuer: Option<String>,
    jwks_uri: Option<String>,
    accept_previous_issuer: bool,
    also_accept: Vec<String>,
}

impl CognitoPool {
    /// The pool `user_pool_id` in `region` (e.g. `us-east-1`,
    /// `us-east-1_AbCdEf123`).
    pub fn new(region: impl Into<String>, user_pool_id: impl Into<String>) -> Self {
        Self {
            region: Some(region.into()),
            user_pool_id: Some(user_pool_id.into()),
            ..Self::default()
        }
    }

    /// A pool known by its issuer only (an emulator, a test); its JWKS is
    /// `<issuer>/.well-known/jwks.json` unless [`CognitoPool::jwks_uri`] says
    /// otherwise.
    pub fn with_issuer(issuer: impl Into<String>) -> Self {
        Self {
            issuer: Some(issuer.into()),
            ..Self::default()
        }
    }

    /// Its name in metrics and logs (default: the user pool id).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
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

    /// An explicit issuer instead of the derived one.
    pub fn issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = Some(issuer.into());
        self
    }

    /// An explicit JWKS URI for the issuer instead of
    /// `<issuer>/.well-known/jwks.json`.
    pub fn jwks_uri(mut self, uri: impl Into<String>) -> Self {
        self.jwks_uri = Some(uri.into());
        self
    }

    /// Also accepts tokens carrying the pool's other issuer form (tokens issued
    /// before a switch of issuer type live up to a day), each checked against the
    /// keys published under that issuer. Turn it off once they have expired.
    pub fn accept_previous_issuer(mut self) -> Self {
        self.accept_previous_issuer = true;
        self
    }

    /// Also accepts tokens of `issuer` (keys from `<issuer>/.well-known/jwks.json`)
    /// for this pool's clients: an explicit form of
    /// [`CognitoPool::accept_previous_issuer`].
    pub fn accept_issuer(mut self, issuer: impl Into<String>) -> Self {
        self.also_accept.push(issuer.into());
        self
    }

    fn is_set(&self) -> bool {
        self.region.is_some()
            || self.user_pool_id.is_some()
            || self.issuer.is_some()
            || self.clients.is_some()
            || self.any_client
    }

    fn display_name(&self) -> String {
        self.name
            .clone()
            .or_else(|| self.user_pool_id.clone())
            .unwrap_or_else(|| DEFAULT_POOL.to_owned())
    }

    /// Every issuer this pool's tokens may carry, with its JWKS URI: the pool's
    /// issuer first, then the accepted previous ones.
    pub fn issuers(&self) -> Result<Vec<(String, Uri)>, BuildError> {
        if self.issuer.is_none() && self.user_pool_id.is_none() {
            return Err(PoolError::MissingUserPoolId.into());
        }
        // The pool id names its Region (`us-east-1_AbCdEf123`): `region` is
        // needed only to check it.
        let region = self
            .region
            .as_deref()
            .or_else(|| self.user_pool_id.as_deref().and_then(region_of_pool_id));
        let derived = PoolSpec {
            region,
            user_pool_id: self.user_pool_id.as_deref(),
            issuer_type: self.issuer_type,
            issuer: self.issuer.as_deref(),
            jwks_uri: self.jwks_uri.as_deref(),
            accept_other_form: self.accept_previous_issuer,
            accept_issuers: &self.also_accept,
        }
        .issuers()?;
        checked("issuer", derived.issuer.clone())?;
        let mut out = vec![(derived.issuer, checked("jwks_uri", derived.jwks_uri)?)];
        for (issuer, jwks) in derived.previous {
            checked("accept_issuer", issuer.clone())?;
            out.push((issuer, checked("accept_issuer", jwks)?));
        }
        Ok(out)
    }

    fn clients_accepted(&self) -> Result<Option<Vec<String>>, BuildError> {
        match (&self.clients, self.any_client) {
            (Some(c), _) if !c.is_empty() => Ok(Some(c.clone())),
            (_, true) => Ok(None),
            _ => Err(BuildError::NoClients),
        }
    }
}

/// An absolute URL without user-info that keeps keys off clear text.
fn checked(what: &'static str, url: String) -> Result<Uri, BuildError> {
    let bad = |message: &str| BuildError::BadUrl {
        what,
        message: message.to_owned(),
    };
    let parsed = Uri::try_from(url.as_str()).map_err(|e| bad(&e.to_string()))?;
    let Some(authority) = parsed.authority() else {
        return Err(bad("not an absolute URL (scheme://host/path)"));
    };
    if authority.as_str().contains('@') {
        return Err(bad("user-info (user:password@) is not allowed"));
    }
    if parsed.host().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    check_transport(&parsed)?;
    Ok(parsed)
}

/// The settings of [`CognitoValidator::builder`]: the pool-level methods
/// (`region`, `user_pool_id`, `clients`, …) describe one pool; [`Self::pool`]
/// adds more.
#[derive(Debug, Clone)]
pub struct CognitoValidatorBuilder {
    first: CognitoPool,
    more: Vec<CognitoPool>,
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
            first: CognitoPool::default(),
            more: Vec::new(),
            settings: ValidatorSettings::default(),
            first_load_wait: DEFAULT_FIRST_LOAD_WAIT,
            refresh_period: DEFAULT_JWKS_REFRESH_PERIOD,
            cooldown: DEFAULT_JWKS_COOLDOWN,
            connect_timeout: DEFAULT_JWKS_CONNECT_TIMEOUT,
            fetch_timeout: DEFAULT_JWKS_FETCH_TIMEOUT,
        }
    }
}

/// Why a [`CognitoValidatorBuilder`] cannot build.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The Region, the pool id or the issuers do not fit (the same rules as
    /// the gateway's configuration).
    #[error(transparent)]
    Pool(#[from] PoolError),
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
    /// Two pools (or a pool and its previous issuer) claim the same issuer.
    #[error(transparent)]
    Trust(#[from] super::TrustError),
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
    /// The pool's AWS Region, e.g. `us-east-1`. Optional: the user pool id
    /// names it; when given, it must be the pool's.
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.first.region = Some(region.into());
        self
    }

    /// The user pool id, e.g. `us-east-1_AbCdEf123` (its Region, `us-east-1`,
    /// is taken from it).
    pub fn user_pool_id(mut self, id: impl Into<String>) -> Self {
        self.first.user_pool_id = Some(id.into());
        self
    }

    /// The pool's issuer form (`Original` unless the pool was switched to the
    /// updated issuer).
    pub fn issuer_type(mut self, issuer_type: IssuerType) -> Self {
        self.first = self.first.issuer_type(issuer_type);
        self
    }

    /// Also accepts the pool's other issuer form (see
    /// [`CognitoPool::accept_previous_issuer`]).
    pub fn accept_previous_issuer(mut self) -> Self {
        self.first = self.first.accept_previous_issuer();
        self
    }

    /// The app clients whose tokens are accepted (`client_id` claim).
    pub fn clients<I: IntoIterator<Item = S>, S: Into<String>>(mut self, ids: I) -> Self {
        self.first = self.first.clients(ids);
        self
    }

    /// Accepts tokens of every app client of the pool: an explicit choice, since
    /// any client anyone can create in the pool then gets in.
    pub fn any_client(mut self) -> Self {
        self.first = self.first.any_client();
        self
    }

    /// An explicit issuer instead of the derived one (an emulator, a test).
    pub fn issuer(mut self, issuer: impl Into<String>) -> Self {
        self.first = self.first.issuer(issuer);
        self
    }

    /// An explicit JWKS URI instead of `<issuer>/.well-known/jwks.json`.
    pub fn jwks_uri(mut self, uri: impl Into<String>) -> Self {
        self.first = self.first.jwks_uri(uri);
        self
    }

    /// Another user pool whose tokens are accepted.
    pub fn pool(mut self, pool: CognitoPool) -> Self {
        self.more.push(pool);
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

    /// The issuer and JWKS URI this builder derives for its (first) pool.
    pub fn endpoints(&self) -> Result<(String, Uri), BuildError> {
        let pool = self.pools().next().unwrap_or(&self.first);
        let mut issuers = pool.issuers()?;
        Ok(issuers.swap_remove(0))
    }

    fn pools(&self) -> impl Iterator<Item = &CognitoPool> {
        std::iter::once(&self.first)
            .filter(|p| p.is_set())
            .chain(&self.more)
    }

    /// The validator, its key loaders started (fetching at once). Must run inside
    /// a tokio runtime.
    pub fn build(self) -> Result<CognitoValidator, BuildError> {
        // The loaders need one (`spawn_loaders` would panic without it).
        tokio::runtime::Handle::try_current().map_err(|_| BuildError::NoRuntime)?;
        if self.pools().next().is_none() {
            return Err(PoolError::MissingUserPoolId.into());
        }
        let fetch = JwksFetch {
            connect_timeout: self.connect_timeout,
            fetch_timeout: self.fetch_timeout,
            cooldown: self.cooldown,
        };
        let mut trusted = Vec::new();
        for pool in self.pools() {
            let clients = pool.clients_accepted()?;
            let name = pool.display_name();
            for (issuer, jwks_uri) in pool.issuers()? {
                trusted.push(trusted_issuer(
                    &name,
                    issuer,
                    jwks_uri,
                    clients.as_deref(),
                    fetch,
                )?);
            }
        }
        let validator = CognitoValidator::checked(trusted, self.settings, self.first_load_wait)?;
        // Detached: each loader holds its key set weakly and ends with the validator.
        let _ = validator.spawn_loaders(self.refresh_period);
        Ok(validator)
    }
}

/// How a key set is fetched.
#[derive(Debug, Clone, Copy)]
pub struct JwksFetch {
    /// TCP/TLS connect timeout.
    pub connect_timeout: Duration,
    /// Total time of one fetch.
    pub fetch_timeout: Duration,
    /// Least time between two fetches caused by unknown `kid`s.
    pub cooldown: Duration,
}

/// One trusted issuer of pool `pool`, with its own key set fetched from
/// `jwks_uri` (empty until loaded), accepting `clients` (every client of the
/// pool when `None`). The builder and the gateway make their issuers here.
pub fn trusted_issuer(
    pool: &str,
    issuer: String,
    jwks_uri: Uri,
    clients: Option<&[String]>,
    fetch: JwksFetch,
) -> Result<TrustedIssuer, JwksError> {
    let fetcher = HttpFetcher::new(jwks_uri, fetch.connect_timeout, fetch.fetch_timeout)?;
    let keys = Arc::new(KeySet::new(issuer, Arc::new(fetcher), fetch.cooldown).with_pool(pool));
    Ok(match clients {
        Some(c) => TrustedIssuer::new(keys, c.iter().cloned()),
        None => TrustedIssuer::any_client(keys),
    })
}
