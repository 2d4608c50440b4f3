//! Access-token validation for Cognito-shaped RS256 JWTs, following AWS's
//! verification steps and RFC 8725. Nothing here knows gRPC: the result is verified
//! [`Claims`] or an [`Invalid`] carrying a stable [`Rejection`].

// The plumbing is crate-private in the library alone (`gateway_pub!`): its
// `pub` methods are then unreachable, and some unused, by design.
#![cfg_attr(not(feature = "gateway"), allow(unreachable_pub, dead_code))]

mod claims;
mod cognito;
mod jwks;
#[cfg(feature = "gateway")]
mod metrics;
mod validator;

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

pub use crate::rules::cognito::DEFAULT_POOL;
pub use claims::Claims;
pub use cognito::{
    BuildError, CognitoPool, CognitoValidatorBuilder, DEFAULT_FIRST_LOAD_WAIT,
    DEFAULT_JWKS_CONNECT_TIMEOUT, DEFAULT_JWKS_COOLDOWN, DEFAULT_JWKS_FETCH_TIMEOUT,
    DEFAULT_JWKS_REFRESH_PERIOD, IssuerType, PoolError,
};
pub use validator::CognitoValidator;
pub(crate) use validator::not_revoked;

// The validator's plumbing (key sets, fetchers, clocks, per-issuer trust),
// which the gateway assembles by hand and its tests and benches drive: not an
// adopter's API, so crate-private in the library alone.
gateway_pub! {
    pub use cognito::{JwksFetch, jwks_uri_of, trusted_issuer};
}
gateway_pub! {
    pub use jwks::{
        HttpFetcher, JwksFetcher, JwksStats, JwksStatsSnapshot, KeyError, KeySet, MAX_JWKS_BYTES,
        MAX_KID_LEN, StaticJwks, VerifyingKey, parse_jwks,
    };
}
gateway_pub! {
    pub use validator::{TrustedIssuer, ValidatorSettings};
}
// The errors of a builder's failure (BuildError::Jwks, BuildError::Trust).
pub use jwks::JwksError;
pub use validator::TrustError;

/// Why a token was refused. Maps 1:1 onto the proto `Rejection` enum; the
/// [`Rejection::as_str`] names are stable labels for metrics and alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// Not a 3-part compact JWS, bad base64/JSON/types, too large.
    Malformed,
    /// Anything but RS256, or alg != the JWK's alg.
    UnsupportedAlgorithm,
    /// No kid, or kid not in the issuer's JWKS after a refresh.
    UnknownKey,
    /// The signature does not verify.
    BadSignature,
    /// `exp` has passed (beyond the leeway).
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    NotYetValid,
    /// `iss` is none of the trusted issuers.
    WrongIssuer,
    /// `token_use` is not `access` (e.g. an ID token).
    WrongTokenUse,
    /// `client_id` is not a registered client.
    ClientNotAllowed,
    /// A required scope is not granted.
    InsufficientScope,
    /// The JWKS was never loaded and is unreachable.
    KeysUnavailable,
    /// Its client, or the token itself, was revoked (the kill switch).
    Revoked,
}

impl Rejection {
    /// Every variant, for metrics initialisation and exhaustive tests.
    pub const ALL: [Rejection; 12] = [
        Rejection::Malformed,
        Rejection::UnsupportedAlgorithm,
        Rejection::UnknownKey,
        Rejection::BadSignature,
        Rejection::Expired,
        Rejection::NotYetValid,
        Rejection::WrongIssuer,
        Rejection::WrongTokenUse,
        Rejection::ClientNotAllowed,
        Rejection::InsufficientScope,
        Rejection::KeysUnavailable,
        Rejection::Revoked,
    ];

    /// Stable snake_case label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::UnsupportedAlgorithm => "unsupported_algorithm",
            Rejection::UnknownKey => "unknown_key",
            Rejection::BadSignature => "bad_signature",
            Rejection::Expired => "expired",
            Rejection::NotYetValid => "not_yet_valid",
            Rejection::WrongIssuer => "wrong_issuer",
            Rejection::WrongTokenUse => "wrong_token_use",
            Rejection::ClientNotAllowed => "client_not_allowed",
            Rejection::InsufficientScope => "insufficient_scope",
            Rejection::KeysUnavailable => "keys_unavailable",
            Rejection::Revoked => "revoked",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

gateway_pub! {
    /// Counters of validation outcomes, by [`Rejection`].
    #[derive(Debug, Default)]
    pub struct ValidationStats {
        valid: std::sync::atomic::AtomicU64,
        rejected: [std::sync::atomic::AtomicU64; Rejection::ALL.len()],
    }
}

impl ValidationStats {
    pub(crate) fn record(&self, result: &Result<Arc<Claims>, Invalid>) {
        let counter = match result {
            Ok(_) => &self.valid,
            Err(e) => &self.rejected[e.rejection as usize],
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Tokens accepted.
    pub fn valid(&self) -> u64 {
        self.valid.load(Ordering::Relaxed)
    }

    /// Tokens refused for `rejection`.
    pub fn rejected(&self, rejection: Rejection) -> u64 {
        self.rejected[rejection as usize].load(Ordering::Relaxed)
    }
}

/// A refused token: the reason and a human detail that never echoes the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{rejection}: {detail}")]
pub struct Invalid {
    /// Machine-readable reason.
    pub rejection: Rejection,
    /// For humans.
    pub detail: String,
}

impl Invalid {
    pub(crate) fn new(rejection: Rejection, detail: impl Into<String>) -> Self {
        Self {
            rejection,
            detail: detail.into(),
        }
    }
}

gateway_pub! {
    /// Wall-clock source for `exp`/`nbf` checks; injectable for tests.
    pub trait Clock: Send + Sync + fmt::Debug + 'static {
        /// Now, in unix seconds.
        fn now(&self) -> i64;
    }
}

gateway_pub! {
    /// The system clock.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct SystemClock;
}

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }
}

gateway_pub! {
    /// A clock set by hand, for tests.
    #[derive(Debug, Clone, Default)]
    pub struct ManualClock(Arc<AtomicI64>);
}

impl ManualClock {
    /// A clock reading `now`.
    pub fn new(now: i64) -> Self {
        Self(Arc::new(AtomicI64::new(now)))
    }
    /// Sets the time.
    pub fn set(&self, now: i64) {
        self.0.store(now, Ordering::SeqCst);
    }
    /// Moves the time forward.
    pub fn advance(&self, secs: i64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
pub(crate) mod tests;

/// At most 64 characters of a client-supplied string, for details and logs.
pub(crate) fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
