//! The validator: structure, header rules, claims rules, signature.

use std::{collections::HashSet, sync::Arc, time::Duration};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::Deserialize;
use serde_json::{Map, Value};

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
}

impl Default for ValidatorSettings {
    fn default() -> Self {
        Self {
            leeway: Duration::from_secs(5),
            max_token_bytes: 8 * 1024,
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

#[derive(Debug)]
struct Inner {
    issuer: String,
    clients: HashSet<String>,
    keys: Arc<KeySet>,
    leeway: i64,
    max_token_bytes: usize,
    clock: Arc<dyn Clock>,
    stats: ValidationStats,
}

#[derive(Deserialize)]
struct Header {
    alg: Option<String>,
    kid: Option<String>,
    crit: Option<Value>,
}

/// A token whose structure and issuer-independent claims have been checked, and
/// whose signature has not.
struct Parsed<'t> {
    kid: String,
    signing_input: &'t str,
    signature: &'t str,
    claims: Map<String, Value>,
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
        let issuer = issuer.into();
        assert_eq!(keys.issuer(), issuer, "a key set is bound to its issuer");
        Self {
            inner: Arc::new(Inner {
                issuer,
                clients: clients.into_iter().collect(),
                keys,
                leeway: settings.leeway.as_secs().min(i64::MAX as u64) as i64,
                max_token_bytes: settings.max_token_bytes,
                clock: Arc::new(SystemClock),
                stats: ValidationStats::default(),
            }),
        }
    }

    /// Replaces the clock (tests).
    pub fn with_clock(self, clock: Arc<dyn Clock>) -> Self {
        let inner = Arc::try_unwrap(self.inner).unwrap_or_else(|arc| Inner {
            issuer: arc.issuer.clone(),
            clients: arc.clients.clone(),
            keys: arc.keys.clone(),
            leeway: arc.leeway,
            max_token_bytes: arc.max_token_bytes,
            clock: arc.clock.clone(),
            stats: ValidationStats::default(),
        });
        Self {
            inner: Arc::new(Inner { clock, ..inner }),
        }
    }

    /// The issuer accepted.
    pub fn issuer(&self) -> &str {
        &self.inner.issuer
    }

    /// The key set used.
    pub fn keys(&self) -> &Arc<KeySet> {
        &self.inner.keys
    }

    /// Full validation. An unknown `kid` triggers a JWKS refetch, at most once per
    /// cool-down across all callers.
    pub async fn validate(
        &self,
        token: &str,
        required_scopes: &[String],
    ) -> Result<Claims, Invalid> {
        let result = self.validate_inner(token, required_scopes).await;
        self.inner.stats.record(&result);
        result
    }

    /// Outcome counters.
    pub fn stats(&self) -> &ValidationStats {
        &self.inner.stats
    }

    async fn validate_inner(
        &self,
        token: &str,
        required_scopes: &[String],
    ) -> Result<Claims, Invalid> {
        let parsed = self.parse(token)?;
        let key = match self.inner.keys.get(&parsed.kid) {
            Some(key) => key,
            None => {
                self.inner.keys.refresh_if_cool().await;
                self.lookup_after_refresh(&parsed.kid)?
            }
        };
        self.finish(parsed, &key, required_scopes)
    }

    /// Validation with the keys already loaded, never waiting (for synchronous
    /// interceptors): an unknown `kid` is UNKNOWN_KEY without a refetch.
    pub fn validate_loaded(
        &self,
        token: &str,
        required_scopes: &[String],
    ) -> Result<Claims, Invalid> {
        let result = self.parse(token).and_then(|parsed| {
            let key = self.lookup_after_refresh(&parsed.kid)?;
            self.finish(parsed, &key, required_scopes)
        });
        self.inner.stats.record(&result);
        result
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
        let header: Header = serde_json::from_slice(&header_bytes)
            .map_err(|_| malformed("header is not a JSON object of the expected types"))?;
        match header.alg.as_deref() {
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
            Some(kid) if !kid.is_empty() && kid.len() <= MAX_KID_LEN => kid,
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
        let claims: Map<String, Value> = serde_json::from_slice(&payload)
            .map_err(|_| malformed("payload is not a JSON object"))?;
        let iss = opt_str(&claims, "iss")?;
        if iss != Some(inner.issuer.as_str()) {
            return Err(Invalid::new(
                Rejection::WrongIssuer,
                "iss is not the configured issuer",
            ));
        }
        match opt_str(&claims, "token_use")? {
            Some("access") => {}
            Some(other) => {
                return Err(Invalid::new(
                    Rejection::WrongTokenUse,
                    format!("token_use is {:?}, need \"access\"", truncate(other)),
                ));
            }
            None => return Err(Invalid::new(Rejection::WrongTokenUse, "no token_use claim")),
        }
        let signing_input = &token[..h.len() + 1 + p.len()];
        Ok(Parsed {
            kid,
            signing_input,
            signature: s,
            claims,
        })
    }

    fn finish(
        &self,
        parsed: Parsed<'_>,
        key: &VerifyingKey,
        required_scopes: &[String],
    ) -> Result<Claims, Invalid> {
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
        let claims = parsed.claims;
        let exp = opt_int(&claims, "exp")?.ok_or_else(|| malformed("no exp claim"))?;
        let nbf = opt_int(&claims, "nbf")?;
        let iat = opt_int(&claims, "iat")?;
        let now = inner.clock.now();
        if exp.saturating_add(inner.leeway) <= now {
            return Err(Invalid::new(Rejection::Expired, "token has expired"));
        }
        if nbf.is_some_and(|nbf| nbf > now.saturating_add(inner.leeway)) {
            return Err(Invalid::new(
                Rejection::NotYetValid,
                "token is not valid yet (nbf)",
            ));
        }
        let client_id = opt_str(&claims, "client_id")?
            .ok_or_else(|| Invalid::new(Rejection::ClientNotAllowed, "no client_id claim"))?;
        if !inner.clients.contains(client_id) {
            return Err(Invalid::new(
                Rejection::ClientNotAllowed,
                "client_id is not a registered client",
            ));
        }
        let scopes: Vec<String> = opt_str(&claims, "scope")?
            .map(|s| {
                s.split(' ')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        if let Some(missing) = required_scopes.iter().find(|r| !scopes.contains(r)) {
            return Err(Invalid::new(
                Rejection::InsufficientScope,
                format!("scope {:?} not granted", truncate(missing)),
            ));
        }
        Ok(Claims {
            client_id: client_id.to_owned(),
            subject: opt_str(&claims, "sub")?.unwrap_or_default().to_owned(),
            issuer: inner.issuer.clone(),
            scopes,
            token_use: "access".to_owned(),
            jti: opt_str(&claims, "jti")?.unwrap_or_default().to_owned(),
            issued_at: iat.unwrap_or(0),
            expires_at: exp,
            all: claims,
        })
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn opt_str<'a>(claims: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, Invalid> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(malformed(format!("claim {name} must be a string"))),
    }
}

fn opt_int(claims: &Map<String, Value>, name: &str) -> Result<Option<i64>, Invalid> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| malformed(format!("claim {name} must be an integer NumericDate"))),
        Some(_) => Err(malformed(format!("claim {name} must be a number"))),
    }
}
