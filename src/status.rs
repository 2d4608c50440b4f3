//! The one table between the crate's domain errors and gRPC statuses: GetToken's
//! `BrokerError`s, Validate's rejections, the
//! refusals of [`AuthLayer`](crate::auth::AuthLayer) and its interceptor, and the
//! statuses a [`TokenSource`](crate::auth::TokenSource) reads back from a
//! gateway. The domains know no tonic; this module is where their errors meet
//! it, so the two directions are written (and tested) side by side.

use tonic::{Code, Status, metadata::MetadataValue};

#[cfg(feature = "gateway")]
use crate::broker::BrokerError;
use crate::{
    jwt::{Invalid, Rejection},
    oauth::UpstreamError,
    proto::gateway::v1 as pb,
};

// --- Validate's rejections -------------------------------------------------

/// The proto value of a [`Rejection`].
pub fn rejection_to_proto(r: Rejection) -> pb::Rejection {
    match r {
        Rejection::Malformed => pb::Rejection::Malformed,
        Rejection::UnsupportedAlgorithm => pb::Rejection::UnsupportedAlgorithm,
        Rejection::UnknownKey => pb::Rejection::UnknownKey,
        Rejection::BadSignature => pb::Rejection::BadSignature,
        Rejection::Expired => pb::Rejection::Expired,
        Rejection::NotYetValid => pb::Rejection::NotYetValid,
        Rejection::WrongIssuer => pb::Rejection::WrongIssuer,
        Rejection::WrongTokenUse => pb::Rejection::WrongTokenUse,
        Rejection::ClientNotAllowed => pb::Rejection::ClientNotAllowed,
        Rejection::InsufficientScope => pb::Rejection::InsufficientScope,
        Rejection::KeysUnavailable => pb::Rejection::KeysUnavailable,
        Rejection::Revoked => pb::Rejection::Revoked,
    }
}

/// The [`Rejection`] of a proto value (`None` for UNSPECIFIED or unknown values).
pub fn rejection_from_proto(value: i32) -> Option<Rejection> {
    Rejection::ALL
        .into_iter()
        .find(|r| rejection_to_proto(*r) as i32 == value)
}

// --- The layer's refusals ---------------------------------------------------

/// A status with an RFC 6750 style `www-authenticate` challenge.
pub(crate) fn challenge(code: Code, message: &str, www_authenticate: &str) -> Status {
    let mut status = Status::new(code, message.to_owned());
    if let Ok(v) = MetadataValue::try_from(www_authenticate) {
        status.metadata_mut().insert("www-authenticate", v);
    }
    status
}

/// No `authorization` metadata on a protected method.
pub(crate) fn missing_bearer() -> Status {
    challenge(Code::Unauthenticated, "missing bearer token", "Bearer")
}

/// `authorization` metadata that is not `Bearer <token>`.
pub(crate) fn not_bearer() -> Status {
    challenge(
        Code::Unauthenticated,
        "authorization is not a bearer token",
        "Bearer error=\"invalid_request\"",
    )
}

/// The status for a refused token: UNAUTHENTICATED, PERMISSION_DENIED for a
/// missing scope, UNAVAILABLE when keys cannot be loaded.
pub(crate) fn refusal(invalid: &Invalid, required_scopes: &[String]) -> Status {
    match invalid.rejection {
        Rejection::InsufficientScope => challenge(
            Code::PermissionDenied,
            &invalid.detail,
            &format!(
                "Bearer error=\"insufficient_scope\", scope=\"{}\"",
                required_scopes.join(" ")
            ),
        ),
        Rejection::KeysUnavailable => {
            Status::unavailable("token verification keys are not available")
        }
        // The reason and the validator's detail (which never echoes the
        // token, and names what was expected where that is safe to say).
        r => challenge(
            Code::Unauthenticated,
            &format!("invalid token ({r}): {}", invalid.detail),
            "Bearer error=\"invalid_token\"",
        ),
    }
}

// --- GetToken ---------------------------------------------------------------

/// The gRPC code of each broker error (DESIGN's status table).
#[cfg(feature = "gateway")]
pub const fn broker_code(e: &BrokerError) -> Code {
    match e {
        BrokerError::InvalidClient => Code::Unauthenticated,
        BrokerError::MalformedCredentials(_) | BrokerError::MalformedScopes(_) => {
            Code::InvalidArgument
        }
        BrokerError::ScopeNotAllowed(_) | BrokerError::ClientRevoked => Code::PermissionDenied,
        BrokerError::GrantNotAllowed(_) => Code::FailedPrecondition,
        BrokerError::TooManyFailedAttempts { .. }
        | BrokerError::UpstreamBudget { .. }
        | BrokerError::Throttled => Code::ResourceExhausted,
        BrokerError::UpstreamTimeout | BrokerError::UpstreamUnavailable(_) => Code::Unavailable,
        BrokerError::UpstreamRejected(_) | BrokerError::Internal(_) => Code::Internal,
    }
}

/// The gateway's status for a broker error: [`broker_code`] with the error's
/// sentence (one sentence for every credential failure: no client enumeration),
/// and `google.rpc.RetryInfo` when the wait is known.
#[cfg(feature = "gateway")]
pub fn broker_status(e: &BrokerError) -> Status {
    use tonic_types::{ErrorDetails, StatusExt as _};
    match e.retry_after() {
        Some(wait) => Status::with_error_details(
            broker_code(e),
            e.to_string(),
            ErrorDetails::with_retry_info(Some(wait)),
        ),
        None => Status::new(broker_code(e), e.to_string()),
    }
}

/// What a gateway's GetToken status means to its caller: the inverse of
/// `broker_code`, so that a token source in front of a gateway sees the
/// error the gateway's broker saw (tested both ways).
pub fn upstream_error(status: &Status) -> UpstreamError {
    let message = || status.message().to_owned();
    match status.code() {
        Code::Unauthenticated => UpstreamError::InvalidClient,
        Code::InvalidArgument => UpstreamError::InvalidRequest(message()),
        Code::PermissionDenied => UpstreamError::InvalidScope,
        Code::FailedPrecondition => UpstreamError::NotPermitted(message()),
        Code::ResourceExhausted => UpstreamError::Throttled,
        Code::DeadlineExceeded => UpstreamError::Timeout,
        Code::Internal => UpstreamError::Rejected(message()),
        code => UpstreamError::Unavailable(format!("{code:?}: {}", status.message())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "gateway")]
    const BAD_CREDENTIALS: &str = "invalid client credentials";

    #[test]
    fn refusals_carry_their_challenge() {
        let invalid = Invalid::new(Rejection::InsufficientScope, "missing orders/write");
        let s = refusal(&invalid, &["orders/write".to_owned()]);
        assert_eq!(s.code(), Code::PermissionDenied);
        assert_eq!(
            s.metadata().get("www-authenticate").unwrap(),
            "Bearer error=\"insufficient_scope\", scope=\"orders/write\""
        );
        let s = refusal(&Invalid::new(Rejection::Expired, "old"), &[]);
        assert_eq!(s.code(), Code::Unauthenticated);
        assert_eq!(s.message(), "invalid token (expired): old");
        let s = refusal(&Invalid::new(Rejection::KeysUnavailable, "x"), &[]);
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(
            missing_bearer().metadata().get("www-authenticate").unwrap(),
            "Bearer"
        );
        assert_eq!(not_bearer().code(), Code::Unauthenticated);
    }

    #[test]
    #[cfg(feature = "gateway")]
    fn limit_refusals_carry_retry_info() {
        use tonic_types::StatusExt as _;
        for e in [
            BrokerError::TooManyFailedAttempts {
                retry_after: std::time::Duration::from_secs(6),
            },
            BrokerError::UpstreamBudget {
                retry_after: std::time::Duration::from_millis(250),
            },
        ] {
            let status = broker_status(&e);
            assert_eq!(status.code(), Code::ResourceExhausted);
            let info = status.get_details_retry_info().expect("RetryInfo");
            assert_eq!(info.retry_delay, e.retry_after());
            assert!(
                status.message().contains("retry in"),
                "{}",
                status.message()
            );
        }
        let plain = broker_status(&BrokerError::Throttled);
        assert!(plain.get_details_retry_info().is_none());
    }

    #[test]
    #[cfg(feature = "gateway")]
    fn every_broker_error_round_trips_through_a_gateway_status() {
        for e in BrokerError::examples() {
            let status = broker_status(&e);
            assert_eq!(status.code(), broker_code(&e), "{e:?}");
            // A token source reading this status, in front of another broker,
            // ends with the same code (and the same transience).
            let seen = upstream_error(&status);
            let again = BrokerError::from(seen.clone());
            assert_eq!(
                broker_code(&again),
                broker_code(&e),
                "{e:?} -> {seen:?} -> {again:?}"
            );
            assert_eq!(
                again.retry_after().is_some() || broker_code(&again) == Code::ResourceExhausted,
                broker_code(&e) == Code::ResourceExhausted,
            );
        }
        // Every credential failure reads the same.
        assert_eq!(
            broker_status(&BrokerError::InvalidClient).message(),
            BAD_CREDENTIALS
        );
    }

    #[test]
    fn every_rejection_maps_to_a_distinct_proto_value() {
        let mut seen = std::collections::HashSet::new();
        for r in Rejection::ALL {
            let p = rejection_to_proto(r);
            assert_ne!(p, pb::Rejection::Unspecified);
            assert!(seen.insert(p as i32));
            // Same order as the proto enum: the snake-case names agree.
            assert_eq!(
                p.as_str_name().to_ascii_lowercase(),
                format!("rejection_{}", r.as_str())
            );
        }
    }
}
