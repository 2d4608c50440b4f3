//! The validator: structure, header rules, claims rules, signature, and the cache
//! of verified tokens.

use std::{borrow::Cow, collections::HashSet, fmt, sync::Arc, time::Duration};

use aws_lc_rs::digest;
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Deserialize, Deserializer, de};

use super::{
    Claims, Clock, Invalid, Rejection, SystemClock, ValidationStats,
    jwks::{KeySet, MAX_KID_LEN, VerifyingKey},
};

/// Tunables of a [`JwtValidator`].
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

/// Verifies Cognito access tokens of one issuer.
///
/// Rules: compact JWS only; `alg` must be `RS256` and equal the JWK's `alg`; `kid`
/// required and looked up only in this issuer's key set; `jku`, `x5u`, `x5c` and
/// `jwk` headers are ignored; any `crit` is refused; `exp` required, `nbf`
/// honoured, both with a small leeway; `iss` equal to the configured issuer;
/// `token_use == "access"`; `client_id` registered; claims of the wrong JSON type
/// are MALFORMED.
///
/// ```no_run
/// # async fn demo(keys: std::sync::Arc<m2m_gateway::jwt::KeySet>) {
/// use m2m_gateway::jwt::{JwtValidator, ValidatorSettings};
/// let validator = JwtValidator::new(
///     "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_AbCdEf123",
///     ["k6h0hnjenh7auvi2as".to_string()],
///     keys,
///     ValidatorSettings::default(),
/// );
/// match validator.validate("eyJ...", &["orders/read".into()]).await {
///     Ok(claims) => println!("caller {}", claims.client_id),
///     Err(invalid) => println!("refused: {}", invalid.rejection),
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct JwtValidator {
    inner: Arc<Inner>,
}

struct Inner {
    issuer: String,
    clients: HashSet<String>,
    keys: Arc<KeySet>,
    leeway: i64,
    max_token_bytes: usize,
    clock: Arc<dyn Clock>,
    stats: ValidationStats,
    verified: Option<moka::sync::Cache<[u8; 32], Arc<Verified>>>,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtValidator")
            .field("issuer", &self.issuer)
            .field("clients", &self.clients.len())
            .field("leeway", &self.leeway)
            .field(
                "verified_cached",
                &self.verified.as_ref().map(|c| c.entry_count()),
            )
            .finish_non_exhaustive()
    }
}

/// A token that passed every check once.
struct Verified {
    claims: Arc<Claims>,
    kid: Box<str>,
}

struct VerifiedExpiry(Arc<dyn Clock>, i64);

impl moka::Expiry<[u8; 32], Arc<Verified>> for VerifiedExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &Arc<Verified>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        let left = value.claims.expires_at.saturating_add(self.1) - self.0.now();
        Some(Duration::from_secs(left.max(0) as u64))
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

/// The registered claims, borrowed from the decoded payload. A present claim of
/// the wrong JSON type (null included) fails the parse: MALFORMED, never coerced.
#[derive(Deserialize)]
struct RawClaims<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    iss: Option<Text<'a>>,
    #[serde(borrow, default, deserialize_with = "present")]
    sub: Option<Text<'a>>,
    #[serde(borrow, default, deserialize_with = "present")]
    token_use: Option<Text<'a>>,
    #[serde(borrow, default, deserialize_with = "present")]
    client_id: Option<Text<'a>>,
    #[serde(borrow, default, deserialize_with = "present")]
    scope: Option<Text<'a>>,
    #[serde(borrow, default, deserialize_with = "present")]
    jti: Option<Text<'a>>,
    #[serde(default, deserialize_with = "present")]
    exp: Option<i64>,
    #[serde(default, deserialize_with = "present")]
    nbf: Option<i64>,
    #[serde(default, deserialize_with = "present")]
    iat: Option<i64>,
}

/// A JSON string, borrowed unless it had escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl Text<'_> {
    fn as_str(&self) -> &str {
        &self.0
    }
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

impl JwtValidator {
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
        Self::build(
            issuer.into(),
            clients.into_iter().collect(),
            keys,
            settings,
            Arc::new(SystemClock),
        )
    }

    fn build(
        issuer: String,
        clients: HashSet<String>,
        keys: Arc<KeySet>,
        settings: ValidatorSettings,
        clock: Arc<dyn Clock>,
    ) -> Self {
        assert_eq!(keys.issuer(), issuer, "a key set is bound to its issuer");
        let leeway = settings.leeway.as_secs().min(i64::MAX as u64) as i64;
        let verified = (settings.verified_cache_size > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(settings.verified_cache_size)
                .expire_after(VerifiedExpiry(clock.clone(), leeway))
                .build()
        });
        Self {
            inner: Arc::new(Inner {
                issuer,
                clients,
                keys,
                leeway,
                max_token_bytes: settings.max_token_bytes,
                clock,
                stats: ValidationStats::default(),
                verified,
            }),
        }
    }

    /// Replaces the clock (tests). Starts with an empty verified-token cache.
    pub fn with_clock(self, clock: Arc<dyn Clock>) -> Self {
        let i = &self.inner;
        let settings = ValidatorSettings {
            leeway: Duration::from_secs(i.leeway as u64),
            max_token_bytes: i.max_token_bytes,
            verified_cache_size: i
                .verified
                .as_ref()
                .map_or(0, |c| c.policy().max_capacity().unwrap_or(0)),
        };
        Self::build(
            i.issuer.clone(),
            i.clients.clone(),
            i.keys.clone(),
            settings,
            clock,
        )
    }

    /// The issuer accepted.
    pub fn issuer(&self) -> &str {
        &self.inner.issuer
    }

    /// The key set used.
    pub fn keys(&self) -> &Arc<KeySet> {
        &self.inner.keys
    }

    /// Outcome counters.
    pub fn stats(&self) -> &ValidationStats {
        &self.inner.stats
    }

    /// Verified tokens currently remembered (approximate).
    pub fn cached_verifications(&self) -> u64 {
        self.inner.verified.as_ref().map_or(0, |c| {
            c.run_pending_tasks();
            c.entry_count()
        })
    }

    /// Full validation. An unknown `kid` triggers a JWKS refetch, at most once per
    /// cool-down across all callers.
    pub async fn validate(
        &self,
        token: &str,
        required_scopes: &[String],
    ) -> Result<Arc<Claims>, Invalid> {
        let result = match self.cached(token, required_scopes) {
            Some(hit) => hit,
            None => self.validate_uncached(token, required_scopes).await,
        };
        self.inner.stats.record(&result);
        result
    }

    /// Validation with the keys already loaded, never waiting (for synchronous
    /// interceptors): an unknown `kid` is UNKNOWN_KEY without a refetch.
    pub fn validate_loaded(
        &self,
        token: &str,
        required_scopes: &[String],
    ) -> Result<Arc<Claims>, Invalid> {
        let result = self.cached(token, required_scopes).unwrap_or_else(|| {
            let parsed = self.parse(token)?;
            let raw = self.issuer_checks(&parsed.payload)?;
            let key = self.lookup_after_refresh(&parsed.kid)?;
            self.finish(token, &parsed, raw, &key, required_scopes)
        });
        self.inner.stats.record(&result);
        result
    }

    async fn validate_uncached(
        &self,
        token: &str,
        required_scopes: &[String],
    ) -> Result<Arc<Claims>, Invalid> {
        let parsed = self.parse(token)?;
        let raw = self.issuer_checks(&parsed.payload)?;
        let key = match self.inner.keys.get(&parsed.kid) {
            Some(key) => key,
            None => {
                self.inner.keys.refresh_if_cool().await;
                self.lookup_after_refresh(&parsed.kid)?
            }
        };
        self.finish(token, &parsed, raw, &key, required_scopes)
    }

    /// A token verified before: re-check what can change (time, the key still
    /// being published, the scopes asked for). `None` = not cached, verify fully.
    fn cached(
        &self,
        token: &str,
        required_scopes: &[String],
    ) -> Option<Result<Arc<Claims>, Invalid>> {
        let cache = self.inner.verified.as_ref()?;
        if token.len() > self.inner.max_token_bytes {
            return None;
        }
        let digest = token_digest(token);
        let hit = cache.get(&digest)?;
        if self.inner.keys.get(&hit.kid).is_none() {
            cache.invalidate(&digest);
            return None;
        }
        Some(
            self.check_time_and_scopes(&hit.claims, None, required_scopes)
                .map(|()| hit.claims.clone()),
        )
    }

    fn check_time_and_scopes(
        &self,
        claims: &Claims,
        nbf: Option<i64>,
        required_scopes: &[String],
    ) -> Result<(), Invalid> {
        let now = self.inner.clock.now();
        let leeway = self.inner.leeway;
        if claims.expires_at.saturating_add(leeway) <= now {
            return Err(Invalid::new(Rejection::Expired, "token has expired"));
        }
        if nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
            return Err(Invalid::new(
                Rejection::NotYetValid,
                "token is not valid yet (nbf)",
            ));
        }
        if let Some(missing) = required_scopes.iter().find(|r| !claims.has_scope(r)) {
            return Err(Invalid::new(
                Rejection::InsufficientScope,
                format!("scope {:?} not granted", truncate(missing)),
            ));
        }
        Ok(())
    }

    fn lookup_after_refresh(&self, kid: &str) -> Result<Arc<VerifyingKey>, Invalid> {
        match self.inner.keys.get(kid) {
            Some(key) => Ok(key),
            None if !self.inner.keys.is_loaded() => Err(Invalid::new(
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
    /// that tokens of other issuers never cause a JWKS refetch).
    fn issuer_checks<'p>(&self, payload: &'p [u8]) -> Result<RawClaims<'p>, Invalid> {
        let claims = parse_claims(payload)?;
        if claims.iss.as_ref().map(Text::as_str) != Some(self.inner.issuer.as_str()) {
            return Err(Invalid::new(
                Rejection::WrongIssuer,
                "iss is not the configured issuer",
            ));
        }
        match claims.token_use.as_ref().map(Text::as_str) {
            Some("access") => Ok(claims),
            Some(other) => Err(Invalid::new(
                Rejection::WrongTokenUse,
                format!("token_use is {:?}, need \"access\"", truncate(other)),
            )),
            None => Err(Invalid::new(Rejection::WrongTokenUse, "no token_use claim")),
        }
    }

    fn finish(
        &self,
        token: &str,
        parsed: &Parsed<'_>,
        raw: RawClaims<'_>,
        key: &VerifyingKey,
        required_scopes: &[String],
    ) -> Result<Arc<Claims>, Invalid> {
        let inner = &self.inner;
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
        let text = |t: &Option<Text<'_>>| {
            t.as_ref()
                .map_or_else(String::new, |t| t.as_str().to_owned())
        };
        let claims = Claims {
            client_id: client_id.to_owned(),
            subject: text(&raw.sub),
            issuer: inner.issuer.clone(),
            scopes: raw
                .scope
                .as_ref()
                .map(|s| {
                    s.as_str()
                        .split(' ')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
            token_use: "access".to_owned(),
            jti: text(&raw.jti),
            issued_at: raw.iat.unwrap_or(0),
            expires_at: exp,
            raw: String::from_utf8_lossy(&parsed.payload).into(),
        };
        // Time first: an expired token is EXPIRED whoever it was issued to.
        self.check_time_and_scopes(&claims, raw.nbf, &[])?;
        if !inner.clients.contains(client_id) {
            return Err(Invalid::new(
                Rejection::ClientNotAllowed,
                "client_id is not a registered client",
            ));
        }
        let claims = Arc::new(claims);
        if let Some(cache) = &inner.verified {
            cache.insert(
                token_digest(token),
                Arc::new(Verified {
                    claims: claims.clone(),
                    kid: key.kid().into(),
                }),
            );
        }
        self.check_time_and_scopes(&claims, None, required_scopes)?;
        Ok(claims)
    }
}

fn parse_claims(payload: &[u8]) -> Result<RawClaims<'_>, Invalid> {
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

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
