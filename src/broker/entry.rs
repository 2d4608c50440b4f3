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

/// The `scope` claim of a JWT access token, read without verification (the token
/// comes straight from the token endpoint over TLS). `None` for opaque tokens.
pub(super) fn token_scopes(token: &str) -> Option<Vec<String>> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let scope = claims.get("scope")?.as_str()?;
    Some(
        scope
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    )
}
