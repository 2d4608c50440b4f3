//! Why GetToken failed, named for what happened, with typed causes.

use std::time::Duration;

use super::MAX_SECRET_LEN;
use crate::{oauth::UpstreamError, registry::ScopeRequestError};

/// Why a client id or secret is refused before any lookup.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    /// Not the shape of an app client id.
    #[error("client_id is not an app client id (1 to 128 letters, digits, '_', '-' or '+')")]
    ClientId,
    /// Not the shape of an app client secret.
    #[error(
        "client_secret is not an app client secret (1 to {MAX_SECRET_LEN} printable ASCII characters)"
    )]
    Secret,
    /// A token endpoint called the request invalid (`invalid_request`), in its
    /// words.
    #[error("{0}")]
    Refused(String),
}

/// Why a scope is refused to a client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeRefusal {
    /// Not among the client's `allowed_scopes`.
    #[error("scope {0:?} is not allowed for this client")]
    NotRegistered(String),
    /// Cognito answered `invalid_scope`.
    #[error("the app client is not allowed a requested scope (invalid_scope)")]
    ByCognito,
}

/// Why GetToken failed, named for what happened; `crate::status` is the one
/// table from these to gRPC statuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// No credentials, an unknown client, a wrong secret, or Cognito's
    /// `invalid_client`: one message for all of them (no client enumeration).
    #[error("invalid client credentials")]
    InvalidClient,
    /// A client id or secret that no Cognito app client can have.
    #[error(transparent)]
    MalformedCredentials(CredentialsError),
    /// Requested scopes that are not scopes, or too many of them.
    #[error(transparent)]
    MalformedScopes(ScopeRequestError),
    /// A scope outside the client's registered scopes, or refused by Cognito
    /// (`invalid_scope`).
    #[error(transparent)]
    ScopeNotAllowed(ScopeRefusal),
    /// The client was revoked with the kill switch (`RevokeClient`) and not
    /// restored.
    #[error("this client is revoked: no token is issued to it until an administrator restores it")]
    ClientRevoked,
    /// The app client may not use the client_credentials grant
    /// (`unauthorized_client` and the like).
    #[error("the app client may not use the client_credentials grant ({0})")]
    GrantNotAllowed(String),
    /// Too many attempts with secrets Cognito has not accepted for this client.
    #[error(
        "too many attempts with unproven secrets for this client; retry in {} s",
        retry_after.as_secs().max(1)
    )]
    TooManyFailedAttempts {
        /// When the next attempt is admitted.
        retry_after: Duration,
    },
    /// The upstream budget (`limits.upstream_per_second`) has no slot within the
    /// longest wait.
    #[error(
        "the token endpoint budget is used up; retry in {} ms",
        retry_after.as_millis().max(1)
    )]
    UpstreamBudget {
        /// When a slot could be free.
        retry_after: Duration,
    },
    /// Cognito throttled the request.
    #[error("Cognito is throttling token requests")]
    Throttled,
    /// Cognito did not answer within `cognito.timeout_ms`.
    #[error("Cognito did not answer in time")]
    UpstreamTimeout,
    /// Cognito unreachable, failing (5xx) or answering garbage.
    #[error("Cognito unavailable: {0}")]
    UpstreamUnavailable(String),
    /// Cognito refused a request the gateway built (`invalid_request` or an
    /// unexpected 4xx): a proxy in the way or a gateway bug, never the caller's.
    #[error("the token endpoint refused the request: {0}")]
    UpstreamRejected(String),
    /// A gateway-side fault.
    #[error("{0}")]
    Internal(String),
}

impl BrokerError {
    /// Stable label for metrics and logs.
    pub const fn label(&self) -> &'static str {
        match self {
            BrokerError::InvalidClient => "invalid_client",
            BrokerError::MalformedCredentials(_) => "malformed_credentials",
            BrokerError::MalformedScopes(_) => "malformed_scopes",
            BrokerError::ScopeNotAllowed(_) => "scope_not_allowed",
            BrokerError::ClientRevoked => "client_revoked",
            BrokerError::GrantNotAllowed(_) => "grant_not_allowed",
            BrokerError::TooManyFailedAttempts { .. } => "failed_auth_limited",
            BrokerError::UpstreamBudget { .. } => "upstream_budget",
            BrokerError::Throttled => "throttled",
            BrokerError::UpstreamTimeout => "upstream_timeout",
            BrokerError::UpstreamUnavailable(_) => "upstream_unavailable",
            BrokerError::UpstreamRejected(_) => "upstream_rejected",
            BrokerError::Internal(_) => "internal",
        }
    }

    /// How long the caller should wait before trying again, when known.
    pub const fn retry_after(&self) -> Option<Duration> {
        match self {
            BrokerError::TooManyFailedAttempts { retry_after }
            | BrokerError::UpstreamBudget { retry_after } => Some(*retry_after),
            _ => None,
        }
    }

    pub(super) fn is_transient(&self) -> bool {
        matches!(
            self,
            BrokerError::UpstreamTimeout
                | BrokerError::UpstreamUnavailable(_)
                | BrokerError::Throttled
                | BrokerError::UpstreamBudget { .. }
                | BrokerError::Internal(_)
        )
    }

    /// One of each variant (tests of the tables).
    #[cfg(test)]
    pub(crate) fn examples() -> Vec<BrokerError> {
        vec![
            BrokerError::InvalidClient,
            BrokerError::MalformedCredentials(CredentialsError::ClientId),
            BrokerError::MalformedCredentials(CredentialsError::Secret),
            BrokerError::MalformedCredentials(CredentialsError::Refused("m".into())),
            BrokerError::MalformedScopes(ScopeRequestError::TooMany { max: 2 }),
            BrokerError::ScopeNotAllowed(ScopeRefusal::NotRegistered("a/b".into())),
            BrokerError::ScopeNotAllowed(ScopeRefusal::ByCognito),
            BrokerError::GrantNotAllowed("unauthorized_client".into()),
            BrokerError::ClientRevoked,
            BrokerError::TooManyFailedAttempts {
                retry_after: Duration::from_secs(6),
            },
            BrokerError::UpstreamBudget {
                retry_after: Duration::from_millis(250),
            },
            BrokerError::Throttled,
            BrokerError::UpstreamTimeout,
            BrokerError::UpstreamUnavailable("HTTP 503".into()),
            BrokerError::UpstreamRejected("invalid_request".into()),
            BrokerError::Internal("m".into()),
        ]
    }
}

impl From<UpstreamError> for BrokerError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::InvalidClient => BrokerError::InvalidClient,
            UpstreamError::InvalidScope => BrokerError::ScopeNotAllowed(ScopeRefusal::ByCognito),
            UpstreamError::InvalidRequest(m) => {
                BrokerError::MalformedCredentials(CredentialsError::Refused(m))
            }
            UpstreamError::NotPermitted(code) => BrokerError::GrantNotAllowed(code),
            UpstreamError::Throttled => BrokerError::Throttled,
            UpstreamError::Rejected(m) => BrokerError::UpstreamRejected(m),
            UpstreamError::Timeout => BrokerError::UpstreamTimeout,
            UpstreamError::Unavailable(m) => BrokerError::UpstreamUnavailable(m),
        }
    }
}
