//! The validator: structure, header rules, claims rules, signature, and the cache
//! of verified tokens.

use std::{
    collections::HashSet,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aws_lc_rs::digest;
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Deserialize, Deserializer, de};

use crate::revocations::Revocations;

use super::{
    Claims, Clock, Invalid, Rejection, SystemClock, ValidationStats,
    claims::{Payload, Text},
    jwks::{KeySet, MAX_KID_LEN, VerifyingKey},
    truncate,
};

/// A verified token: its claims, the `kid` of the key that signed it, and the
/// trusted issuer (index) whose key set holds that key.
type Verified = (Arc<Claims>, Arc<str>, usize);

/// One issuer a [`CognitoValidator`] trusts: the key set bound to it (a token
/// claiming this issuer is checked against these keys only) and the app clients
/// whose tokens are accepted from it. Its name in metrics and logs is the key
/// set's pool ([`KeySet::with_pool`]).
#[derive(Clone)]
pub struct TrustedIssuer {
    keys: Arc<KeySet>,
    /// `None`: every app client of the pool.
    clients: Option<Arc<HashSet<String>>>,
}

impl fmt::Debug for TrustedIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustedIssuer")
            .field("pool", &self.keys.pool())
            .field("issuer", &self.keys.issuer())
            .field("clients", &self.clients.as_ref().map(|c| c.len()))
            .finish()
    }
}

impl TrustedIssuer {
    /// The issuer of `keys` (its [`KeySet::issuer`]), accepting tokens of the
    /// given app clients only.
    pub fn new(keys: Arc<KeySet>, clients: impl IntoIterator<Item = String>) -> Self {
        Self {
            keys,
            clients: Some(Arc::new(clients.into_iter().collect())),
        }
    }

    /// The issuer of `keys`, accepting tokens of every app client of the pool: an
    /// explicit choice, since any client created in the pool then gets in.
    pub fn any_client(keys: Arc<KeySet>) -> Self {
        Self {
            keys,
            clients: None,
        }
    }

    /// The `iss` value accepted, byte for byte.
    pub fn issuer(&self) -> &str {
        self.keys.issuer()
    }

    /// The pool's name (metrics and logs): its key set's.
    pub fn pool(&self) -> &str {
        self.keys.pool()
    }

    /// The key set bound to this issuer.
    pub fn keys(&self) -> &Arc<KeySet> {
        &self.keys
    }

    /// Whether tokens of `client_id` are accepted from this issuer.
    pub fn accepts_client(&self, client_id: &str) -> bool {
        self.clients
            .as_ref()
            .is_none_or(|clients| clients.contains(client_id))
    }
}

/// Why the trusted issuers given cannot make a validator
/// ([`BuildError::Trust`](super::BuildError::Trust)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    /// No issuer at all: every token would be refused.
    #[error("no trusted issuer")]
    Empty,
    /// Two entries for one issuer: which key set and clients apply would be
    /// ambiguous.
    #[error("issuer {0:?} is trusted twice")]
    Duplicate(String),
}

/// Expired entries are swept from the verified-token cache every this many inserts
/// (they are refused, and dropped, on any access before that).
const SWEEP_EVERY: u64 = 4096;

/// Tunables of a [`CognitoValidator`].
#[derive(Debug, Clone)]
pub struct ValidatorSettings {
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway: Duration,
    /// Tokens longer than this are MALFORMED before any decoding.
    pub max_token_bytes: usize,
    /// Verified tokens remembered (keyed by SHA-256 of the token) so that a token
    /// seen before skips the signature check; 0 turns the cache off. Expiry, key
    /// presence and scopes are re-checked on every hit.
    pub verified_cache_size: u64,
}

impl Default for ValidatorSettings {
    fn default() -> Self {
        Self {
            leeway: Duration::from_secs(5),
            max_token_bytes: 8 * 1024,
            verified_cache_size: 100_000,
        }
    }
}

/// Verifies Cognito access tokens of one issuer, or of several (user pools, or
/// both issuer forms of a pool during a migration: [`CognitoValidatorBuilder::pool`](super::CognitoValidatorBuilder::pool)).
///
/// Rules: compact JWS only; `alg` must be `RS256` and equal the JWK's `alg`; `iss`
/// must equal a trusted issuer exactly (checked before any key lookup: trust is
/// never derived from the token); `kid` required and looked up only in that
/// issuer's key set; `jku`, `x5u`, `x5c` and
/// `jwk` headers are ignored; any `crit` is refused; `exp` required, `nbf`
/// honoured, both with a small leeway; `token_use == "access"`; `client_id`
/// registered for that issuer; claims of the wrong JSON type
/// are MALFORMED.
///
/// Built with [`CognitoValidator::builder`]:
///
/// ```no_run
/// # async fn demo() -> Result<(), m2m_gateway::jwt::BuildError> {
/// use m2m_gateway::CognitoValidator;
/// let validator = CognitoValidator::builder()
///     .user_pool_id("us-east-1_AbCdEf123")
///     .clients(["k6h0hnjenh7auvi2as"])
///     .build()?;
/// match validator.validate("eyJ...", &["orders/read".into()]).await {
///     Ok(claims) => println!("caller {}", claims.client_id()),
///     Err(invalid) => println!("refused: {}", invalid.rejection),
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct CognitoValidator {
    inner: Arc<Inner>,
}

struct Inner {
    /// Never empty; issuers distinct.
    issuers: Box<[Trusted]>,
    /// How long a call waits for the first key set (0: not at all).
    first_load_wait: Duration,
    leeway: i64,
    max_token_bytes: usize,
    clock: Arc<dyn Clock>,
    stats: ValidationStats,
    /// quick_cache rather than moka here: ~100 bytes of overhead per entry instead
    /// of ~400, which matters at 100,000 entries (see BENCHMARKS.md).
    verified: Option<quick_cache::sync::Cache<[u8; 32], Verified>>,
    verified_capacity: u64,
    inserts: AtomicU64,
    /// Revoked clients and tokens, refused after every other check passed.
    revocations: Option<Revocations>,
}

/// A trusted issuer and the outcomes of the tokens that claimed it.
struct Trusted {
    trusted: TrustedIssuer,
    stats: ValidationStats,
    /// A call waited `first_load_wait` for this issuer's first key set in
    /// vain: later calls answer KEYS_UNAVAILABLE at once until it loads.
    waited_out: std::sync::atomic::AtomicBool,
}

impl Inner {
    fn settings(&self) -> ValidatorSettings {
        ValidatorSettings {
            leeway: Duration::from_secs(self.leeway as u64),
            max_token_bytes: self.max_token_bytes,
            verified_cache_size: self.verified_capacity,
        }
    }
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CognitoValidator")
            .field(
                "issuers",
                &self.issuers.iter().map(|t| &t.trusted).collect::<Vec<_>>(),
            )
            .field("leeway", &self.leeway)
            .field("verified_cached", &self.verified.as_ref().map(|c| c.len()))
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Header<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    alg: Option<Text<'a>>,
    #[serde(borrow, default, deserialize_with = "present")]
    kid: Option<Text<'a>>,
    #[serde(default, deserialize_with = "present")]
    crit: Option<de::IgnoredAny>,
}

/// `Some(T)` when present; a present `null` is an error (as is any wrong type).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A token whose structure and header have been checked, and whose claims and
/// signature have not.
struct Parsed<'t> {
    kid: String,
    signing_input: &'t str,
    signature: &'t str,
    payload: Vec<u8>,
}

fn malformed(detail: impl Into<String>) -> Invalid {
    Invalid::new(Rejection::Malformed, detail)
}

impl CognitoValidator {
    gateway_pub! {
        /// A validator for tokens of `issuer` signed by `keys`, accepted only for the
        /// given client ids.
        ///
        /// # Panics
        /// If `keys` belongs to another issuer: keys are bound to their issuer.
        pub fn new(
            issuer: impl Into<String>,
            clients: impl IntoIterator<Item = String>,
            keys: Arc<KeySet>,
            settings: ValidatorSettings,
        ) -> Self {
            assert_eq!(
                keys.issuer(),
                issuer.into(),
                "a key set is bound to its issuer"
            );
            Self::build(
                vec![TrustedIssuer::new(keys, clients)],
                settings,
                Arc::new(SystemClock),
                Duration::ZERO,
                None,
            )
        }
    }

    gateway_pub! {
        /// A validator for tokens of any of `issuers`, each checked against its own
        /// key set and its own clients.
        pub fn for_issuers(
            issuers: impl IntoIterator<Item = TrustedIssuer>,
            settings: ValidatorSettings,
        ) -> Result<Self, TrustError> {
            Self::checked(issuers, settings, Duration::ZERO)
        }
    }

    /// [`CognitoValidator::for_issuers`] where a call waits up to `first_load_wait`
    /// for its issuer's first key set instead of answering KEYS_UNAVAILABLE at
    /// once ([`super::CognitoValidator`], the gateway).
    pub(crate) fn checked(
        issuers: impl IntoIterator<Item = TrustedIssuer>,
        settings: ValidatorSettings,
        first_load_wait: Duration,
    ) -> Result<Self, TrustError> {
        let issuers: Vec<TrustedIssuer> = issuers.into_iter().collect();
        if issuers.is_empty() {
            return Err(TrustError::Empty);
        }
        let mut seen = HashSet::new();
        if let Some(dup) = issuers.iter().find(|t| !seen.insert(t.issuer())) {
            return Err(TrustError::Duplicate(dup.issuer().to_owned()));
        }
        Ok(Self::build(
            issuers,
            settings,
            Arc::new(SystemClock),
            first_load_wait,
            None,
        ))
    }

    fn build(
        issuers: Vec<TrustedIssuer>,
        settings: ValidatorSettings,
        clock: Arc<dyn Clock>,
        first_load_wait: Duration,
        revocations: Option<Revocations>,
    ) -> Self {
        let leeway = settings.leeway.as_secs().min(i64::MAX as u64) as i64;
        let verified = (settings.verified_cache_size > 0).then(|| {
            quick_cache::sync::Cache::new(
                usize::try_from(settings.verified_cache_size).unwrap_or(usize::MAX),
            )
        });
        Self {
            inner: Arc::new(Inner {
                issuers: issuers
                    .into_iter()
                    .map(|trusted| Trusted {
                        trusted,
                        stats: ValidationStats::default(),
                        waited_out: Default::default(),
                    })
                    .collect(),
                first_load_wait,
                leeway,
                max_token_bytes: settings.max_token_bytes,
                clock,
                stats: ValidationStats::default(),
                verified,
                verified_capacity: settings.verified_cache_size,
                inserts: AtomicU64::new(0),
                revocations,
            }),
        }
    }

    gateway_pub! {
        /// Replaces the clock (tests). Starts with an empty verified-token cache.
        pub fn with_clock(self, clock: Arc<dyn Clock>) -> Self {
            let i = &self.inner;
            Self::build(
                i.issuers.iter().map(|t| t.trusted.clone()).collect(),
                i.settings(),
                clock,
                i.first_load_wait,
                i.revocations.clone(),
            )
        }
    }

    /// Refuses revoked clients' and tokens' tokens (REVOKED) from the shared
    /// list: the gateway's own, or one a
    /// [`RevocationWatcher`](crate::auth::RevocationWatcher) keeps current.
    /// Starts with an empty verified-token cache.
    pub fn with_revocations(self, revocations: Revocations) -> Self {
        let i = &self.inner;
        Self::build(
            i.issuers.iter().map(|t| t.trusted.clone()).collect(),
            i.settings(),
            i.clock.clone(),
            i.first_load_wait,
            Some(revocations),
        )
    }

    /// The revocations this validator refuses, if any.
    pub fn revocations(&self) -> Option<&Revocations> {
        self.inner.revocations.as_ref()
    }

    /// A valid token whose client or `jti` is revoked is REVOKED.
    #[inline]
    fn unrevoked(&self, result: Result<Arc<Claims>, Invalid>) -> Result<Arc<Claims>, Invalid> {
        match (result, &self.inner.revocations) {
            (Ok(claims), Some(revocations)) => {
                not_revoked(revocations, &claims)?;
                Ok(claims)
            }
            (result, _) => result,
        }
    }

    gateway_pub! {
        /// The trusted issuers, in order, each with the outcomes of the tokens that
        /// claimed it.
        pub fn issuers(&self) -> impl Iterator<Item = (&TrustedIssuer, &ValidationStats)> {
            self.inner.issuers.iter().map(|t| (&t.trusted, &t.stats))
        }
    }

    /// Whether every trusted issuer's first key set has been loaded.
    pub fn is_loaded(&self) -> bool {
        self.inner
            .issuers
            .iter()
            .all(|t| t.trusted.keys.is_loaded())
    }

    /// Starts one loader per trusted issuer's key set:
    /// the first key set with backoff, then a refresh every `period`. Each ends
    /// once its key set is gone (or when its handle is aborted).
    pub fn spawn_loaders(&self, period: Duration) -> Vec<tokio::task::JoinHandle<()>> {
        self.inner
            .issuers
            .iter()
            .map(|t| t.trusted.keys.spawn_loader(period))
            .collect()
    }

    /// Waits until every trusted issuer's first key set has been loaded.
    pub async fn wait_loaded(&self) {
        for t in self.inner.issuers.iter() {
            t.trusted.keys.wait_loaded().await;
        }
    }

    /// The (first) issuer accepted.
    pub fn issuer(&self) -> &str {
        self.inner.issuers[0].trusted.issuer()
    }

    gateway_pub! {
        /// The (first) issuer's key set.
        pub fn keys(&self) -> &Arc<KeySet> {
            &self.inner.issuers[0].trusted.keys
        }
    }

    gateway_pub! {
        /// Outcome counters, all issuers together.
        pub fn stats(&self) -> &ValidationStats {
            &self.inner.stats
        }
    }

    gateway_pub! {
        /// Verified tokens currently remembered (approximate).
        pub fn cached_verifications(&self) -> u64 {
            self.inner.verified.as_ref().map_or(0, |c| c.len() as u64)
        }
    }

    /// Full validation. An unknown `kid` triggers a JWKS refetch of the token's
    /// issuer, at most once per cool-down across all callers.
    pub async fn validate(
        &self,
        token: &str,
        required_scopes: &[String],
    ) -> Result<Arc<Claims>, Invalid> {
        let digest = self.cache_key(token);
        let mut issuer = None;
        let result = match self.cached(digest.as_ref(), required_scopes, &mut issuer) {
            Some(hit) => hit,
            // Boxed: the rare path keeps its state out of every call's future.
            None => {
                Box::pin(self.validate_uncached(token, digest, required_scopes, &mut issuer)).await
            }
        };
        let result = self.unrevoked(result);
        self.record(issuer, &result);
        result
    }

    gateway_pub! {
        /// Validation with the keys already loaded, never waiting (for synchronous
        /// interceptors): an unknown `kid` is UNKNOWN_KEY without a refetch.
        pub fn validate_loaded(
            &self,
            token: &str,
            required_scopes: &[String],
        ) -> Result<Arc<Claims>, Invalid> {
            let digest = self.cache_key(token);
            let mut issuer = None;
            let result = self
                .cached(digest.as_ref(), required_scopes, &mut issuer)
                .unwrap_or_else(|| {
                    let parsed = self.parse(token)?;
                    let (raw, i) = self.issuer_checks(&parsed.payload)?;
                    issuer = Some(i);
                    let key = self.lookup_after_refresh(i, &parsed.kid)?;
                    self.finish(digest, &parsed, raw, i, &key, required_scopes)
                });
            let result = self.unrevoked(result);
            self.record(issuer, &result);
            result
        }
    }

    fn record(&self, issuer: Option<usize>, result: &Result<Arc<Claims>, Invalid>) {
        self.inner.stats.record(result);
        if let Some(i) = issuer {
            self.inner.issuers[i].stats.record(result);
        }
    }

    async fn validate_uncached(
        &self,
        token: &str,
        digest: Option<[u8; 32]>,
        required_scopes: &[String],
        issuer: &mut Option<usize>,
    ) -> Result<Arc<Claims>, Invalid> {
        let parsed = self.parse(token)?;
        let (raw, i) = self.issuer_checks(&parsed.payload)?;
        *issuer = Some(i);
        let trusted = &self.inner.issuers[i];
        let keys = &trusted.trusted.keys;
        if !keys.is_loaded()
            && !self.inner.first_load_wait.is_zero()
            && !trusted.waited_out.load(Ordering::Relaxed)
        {
            // Right after start: the loader is fetching; wait for it, bounded,
            // once: when it did not arrive in time, later calls fail fast
            // instead of each waiting again.
            if tokio::time::timeout(self.inner.first_load_wait, keys.wait_loaded())
                .await
                .is_err()
            {
                trusted.waited_out.store(true, Ordering::Relaxed);
            }
        }
        let key = match keys.get(&parsed.kid) {
            Some(key) => key,
            None => {
                keys.refresh_if_cool().await;
                self.lookup_after_refresh(i, &parsed.kid)?
            }
        };
        self.finish(digest, &parsed, raw, i, &key, required_scopes)
    }

    /// The verified-token cache key: SHA-256 of the token, computed once per call;
    /// `None` when the cache is off or the token too long to be valid.
    fn cache_key(&self, token: &str) -> Option<[u8; 32]> {
        (self.inner.verified.is_some() && token.len() <= self.inner.max_token_bytes)
            .then(|| token_digest(token))
    }

    /// A token verified before: re-check what can change (time, the key still
    /// being published, the scopes asked for). `None` = not cached, verify fully.
    fn cached(
        &self,
        digest: Option<&[u8; 32]>,
        required_scopes: &[String],
        issuer: &mut Option<usize>,
    ) -> Option<Result<Arc<Claims>, Invalid>> {
        let (cache, digest) = (self.inner.verified.as_ref()?, digest?);
        let (claims, kid, i) = cache.get(digest)?;
        if self.inner.issuers[i].trusted.keys.get(&kid).is_none() {
            cache.remove(digest);
            return None;
        }
        *issuer = Some(i);
        let checked = claims.check_use(
            self.inner.clock.now(),
            self.inner.leeway,
            None,
            required_scopes,
        );
        if checked
            .as_ref()
            .is_err_and(|e| e.rejection == Rejection::Expired)
        {
            cache.remove(digest);
        }
        Some(checked.map(|()| claims))
    }

    fn lookup_after_refresh(&self, issuer: usize, kid: &str) -> Result<Arc<VerifyingKey>, Invalid> {
        let keys = &self.inner.issuers[issuer].trusted.keys;
        match keys.get(kid) {
            Some(key) => Ok(key),
            None if !keys.is_loaded() => Err(Invalid::new(
                Rejection::KeysUnavailable,
                "the issuer's key set has not been loaded",
            )),
            None => Err(Invalid::new(
                Rejection::UnknownKey,
                "kid not found in the issuer's key set",
            )),
        }
    }

    fn parse<'t>(&self, token: &'t str) -> Result<Parsed<'t>, Invalid> {
        let inner = &self.inner;
        if token.len() > inner.max_token_bytes {
            return Err(malformed(format!(
                "token longer than {} bytes",
                inner.max_token_bytes
            )));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("not a compact JWS of three dot-separated parts"));
        };
        if h.is_empty() || p.is_empty() || s.is_empty() {
            return Err(malformed("empty JWS segment"));
        }
        let header_bytes = URL_SAFE_NO_PAD
            .decode(h)
            .map_err(|_| malformed("header is not base64url"))?;
        let header: Header<'_> = json_object(
            &header_bytes,
            "header is not a JSON object of the expected types",
        )?;
        match header.alg.as_ref().map(Text::as_str) {
            Some("RS256") => {}
            Some(_) => {
                return Err(Invalid::new(
                    Rejection::UnsupportedAlgorithm,
                    "only RS256 is accepted",
                ));
            }
            None => {
                return Err(Invalid::new(
                    Rejection::UnsupportedAlgorithm,
                    "header has no alg",
                ));
            }
        }
        if header.crit.is_some() {
            return Err(malformed("critical header extensions are not supported"));
        }
        let kid = match header.kid {
            Some(kid) if !kid.as_str().is_empty() && kid.as_str().len() <= MAX_KID_LEN => {
                kid.0.into_owned()
            }
            Some(_) => {
                return Err(Invalid::new(
                    Rejection::UnknownKey,
                    "kid is empty or too long",
                ));
            }
            None => return Err(Invalid::new(Rejection::UnknownKey, "header has no kid")),
        };
        let payload = URL_SAFE_NO_PAD
            .decode(p)
            .map_err(|_| malformed("payload is not base64url"))?;
        Ok(Parsed {
            kid,
            signing_input: &token[..h.len() + 1 + p.len()],
            signature: s,
            payload,
        })
    }

    /// Parses the claims and checks what needs no key: issuer and token_use (so
    /// that tokens of other issuers never cause a JWKS refetch). Returns the
    /// trusted issuer the token claims: an exact match, never derived from it.
    fn issuer_checks<'p>(&self, payload: &'p [u8]) -> Result<(Payload<'p>, usize), Invalid> {
        let claims = parse_claims(payload)?;
        let iss = claims.iss.as_ref().map(Text::as_str);
        let Some(i) = self
            .inner
            .issuers
            .iter()
            .position(|t| Some(t.trusted.issuer()) == iss)
        else {
            // The issuer seen (cut short: it comes from the token) and those
            // trusted: a misconfigured issuer type or pool shows at once.
            let trusted: Vec<&str> = self
                .inner
                .issuers
                .iter()
                .map(|t| t.trusted.issuer())
                .collect();
            return Err(Invalid::new(
                Rejection::WrongIssuer,
                match iss {
                    Some(iss) => format!(
                        "iss {:?} is not a trusted issuer (trusted: {})",
                        truncate(iss),
                        trusted.join(", ")
                    ),
                    None => format!("no iss claim (trusted: {})", trusted.join(", ")),
                },
            ));
        };
        match claims.token_use.as_ref().map(Text::as_str) {
            Some("access") => Ok((claims, i)),
            Some(other) => Err(Invalid::new(
                Rejection::WrongTokenUse,
                format!("token_use is {:?}, need \"access\"", truncate(other)),
            )),
            None => Err(Invalid::new(Rejection::WrongTokenUse, "no token_use claim")),
        }
    }

    fn finish(
        &self,
        digest: Option<[u8; 32]>,
        parsed: &Parsed<'_>,
        raw: Payload<'_>,
        issuer: usize,
        key: &VerifyingKey,
        required_scopes: &[String],
    ) -> Result<Arc<Claims>, Invalid> {
        let inner = &self.inner;
        let trusted = &inner.issuers[issuer].trusted;
        if key.alg().is_some_and(|alg| alg != "RS256") {
            return Err(Invalid::new(
                Rejection::UnsupportedAlgorithm,
                "header alg differs from the key's alg",
            ));
        }
        let signature = URL_SAFE_NO_PAD
            .decode(parsed.signature)
            .map_err(|_| malformed("signature is not base64url"))?;
        if !key.verify(parsed.signing_input.as_bytes(), &signature) {
            return Err(Invalid::new(
                Rejection::BadSignature,
                "signature does not verify",
            ));
        }
        let exp = raw.exp.ok_or_else(|| malformed("no exp claim"))?;
        let client_id = raw
            .client_id
            .as_ref()
            .map(Text::as_str)
            .ok_or_else(|| Invalid::new(Rejection::ClientNotAllowed, "no client_id claim"))?;
        let claims = Claims::from_payload(&raw, client_id, exp, trusted.keys.issuer_shared());
        // Time first: an expired token is EXPIRED whoever it was issued to.
        claims.check_use(self.inner.clock.now(), self.inner.leeway, raw.nbf, &[])?;
        if !trusted.accepts_client(client_id) {
            return Err(Invalid::new(
                Rejection::ClientNotAllowed,
                "client_id is not a registered client of the token's issuer",
            ));
        }
        let claims = Arc::new(claims);
        if let (Some(cache), Some(digest)) = (&inner.verified, digest) {
            cache.insert(digest, (claims.clone(), key.kid_shared(), issuer));
            if inner.inserts.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
                let now = inner.clock.now();
                cache.retain(|_, (c, _, _)| c.expires_at().saturating_add(inner.leeway) > now);
            }
        }
        claims.check_use(
            self.inner.clock.now(),
            self.inner.leeway,
            None,
            required_scopes,
        )?;
        Ok(claims)
    }
}

/// REVOKED when `revocations` refuses the verified `claims`: the one check the
/// validator and [`RemoteValidator`](crate::auth::RemoteValidator) make.
#[inline]
pub(crate) fn not_revoked(revocations: &Revocations, claims: &Claims) -> Result<(), Invalid> {
    match revocations.check(claims.client_id(), claims.issued_at(), claims.jti()) {
        Some(verdict) => Err(Invalid::new(Rejection::Revoked, verdict.detail())),
        None => Ok(()),
    }
}

fn parse_claims(payload: &[u8]) -> Result<Payload<'_>, Invalid> {
    json_object(
        payload,
        "payload is not a JSON object of the expected claim types",
    )
}

/// Serde also maps a JSON array onto a struct; a JOSE header or a claims set must
/// be an object.
fn json_object<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
    detail: &'static str,
) -> Result<T, Invalid> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(malformed(detail));
    }
    serde_json::from_slice(bytes).map_err(|_| malformed(detail))
}

fn token_digest(token: &str) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, token.as_bytes());
    <[u8; 32]>::try_from(d.as_ref()).expect("SHA-256 is 32 bytes")
}
