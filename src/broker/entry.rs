//! A cached token and when it expires: the entry the cache, the fleet and the
//! flights pass around.

use std::{fmt, sync::Arc, time::Duration};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use tokio::time::Instant;

use super::{AccessToken, IssuedToken};

/// (client id, normalised scope set).
pub(super) type CacheKey = (Arc<str>, Arc<str>);

/// A cached token. Whom it is handed to is decided by the client's proven
/// secrets, not by the entry.
pub(super) struct Entry {
    pub(super) token: AccessToken,
    pub(super) scopes: Arc<[String]>,
    pub(super) lifetime: Duration,
    pub(super) refresh_at: Instant,
    pub(super) expires_at: Instant,
    /// When the token was issued, in Unix milliseconds (its `iat`, else when
    /// Cognito answered): a revoked client's tokens issued before the
    /// revocation are never handed out, even after a restore.
    pub(super) issued_ms: u64,
    /// The token's `jti` (empty when it has none): a revoked token is never
    /// handed out again.
    pub(super) jti: Box<str>,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("scopes", &self.scopes)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl Entry {
    /// The token as handed out at `at`.
    pub(super) fn issued(&self, at: Instant) -> IssuedToken {
        IssuedToken {
            access_token: self.token.clone(),
            expires_in: self.expires_at.saturating_duration_since(at).as_secs(),
            scopes: self.scopes.clone(),
        }
    }
}

pub(super) struct EntryExpiry;

impl moka::Expiry<CacheKey, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<Entry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.lifetime)
    }
}

impl Entry {
    /// Whether it has more than `min_remaining` of life left at `now`.
    pub(super) fn usable(&self, now: Instant, min_remaining: Duration) -> bool {
        self.expires_at.saturating_duration_since(now) > min_remaining
    }
}

/// What the broker reads of a JWT access token, without verification (the
/// token comes straight from the token endpoint over TLS).
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Unverified {
    /// The `scope` claim; `None` for opaque tokens or none.
    pub(super) scopes: Option<Vec<String>>,
    /// The `iat` claim, in Unix milliseconds.
    pub(super) issued_ms: Option<u64>,
    /// The `jti` claim.
    pub(super) jti: Option<String>,
}

/// The `scope` and `iat` claims of a JWT access token.
pub(super) fn read_unverified(token: &str) -> Unverified {
    let claims = token
        .split('.')
        .nth(1)
        .and_then(|payload| URL_SAFE_NO_PAD.decode(payload).ok())
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok());
    let Some(claims) = claims else {
        return Unverified::default();
    };
    Unverified {
        scopes: claims.get("scope").and_then(|s| s.as_str()).map(|scope| {
            scope
                .split(' ')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        }),
        issued_ms: claims
            .get("iat")
            .and_then(serde_json::Value::as_u64)
            .map(|s| s.saturating_mul(1000)),
        jti: claims
            .get("jti")
            .and_then(|j| j.as_str())
            .map(str::to_owned),
    }
}
