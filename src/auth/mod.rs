//! For other services: check the gateway's tokens in your own tonic server, and
//! attach them to your own outgoing calls.
//!
//! - [`AuthLayer`]: a tower layer for `Server::builder().layer(...)`, with a
//!   per-method [`AuthPolicy`]; validates locally with a [`JwtValidator`] (JWKS,
//!   no network hop per call) or remotely through the gateway's Validate RPC.
//! - [`interceptor`]: the same check as a synchronous tonic interceptor.
//! - [`TokenSource`]: obtains, caches and refreshes tokens for callers, with a
//!   client interceptor that adds `authorization: Bearer`.
//!
//! Protect a tonic service in five lines:
//!
//! ```no_run
//! # async fn demo(validator: m2m_gateway::jwt::JwtValidator) -> Result<(), Box<dyn std::error::Error>> {
//! use m2m_gateway::auth::{AuthLayer, AuthPolicy};
//! # let (_, health) = tonic_health::server::health_reporter();
//! tonic::transport::Server::builder()
//!     .layer(AuthLayer::local(validator, AuthPolicy::new().require(["orders/read"])))
//!     .add_service(health)
//!     .serve("127.0.0.1:50052".parse()?)
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Handlers read the verified caller with [`claims`].
//!
//! [`JwtValidator`]: crate::jwt::JwtValidator

mod interceptor;
mod layer;
mod policy;
mod remote;
mod token_source;

use std::sync::Arc;

pub use interceptor::{AuthInterceptor, interceptor};
pub use layer::{Auth, AuthLayer, ResponseFuture};
pub use policy::{AuthPolicy, DEFAULT_PUBLIC, PolicyError, Requirement};
pub use remote::RemoteValidator;
pub use token_source::{BearerInterceptor, GatewayTokenEndpoint, TokenSource};

use tonic::{Code, Status, metadata::MetadataValue};

use crate::jwt::{Claims, Invalid, Rejection};

/// The verified claims the layer or interceptor stored in the request extensions.
#[derive(Debug, Clone)]
pub struct VerifiedClaims(pub Arc<Claims>);

/// The caller's verified claims, when an [`AuthLayer`] or [`interceptor`] let the
/// request through (`None` for public methods).
pub fn claims<T>(request: &tonic::Request<T>) -> Option<&Claims> {
    request
        .extensions()
        .get::<VerifiedClaims>()
        .map(|c| c.0.as_ref())
}

/// Extracts the token from `authorization: Bearer <jwt>` (scheme case-insensitive).
pub(crate) fn bearer_token(value: Option<&str>) -> Result<&str, Status> {
    let Some(value) = value else {
        return Err(challenge(
            Code::Unauthenticated,
            "missing bearer token",
            "Bearer",
        ));
    };
    match value.trim().split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(challenge(
            Code::Unauthenticated,
            "authorization is not a bearer token",
            "Bearer error=\"invalid_request\"",
        )),
    }
}

/// A status with an RFC 6750 style `www-authenticate` challenge.
pub(crate) fn challenge(code: Code, message: &str, www_authenticate: &str) -> Status {
    let mut status = Status::new(code, message.to_owned());
    if let Ok(v) = MetadataValue::try_from(www_authenticate) {
        status.metadata_mut().insert("www-authenticate", v);
    }
    status
}

/// The status for a refused token: UNAUTHENTICATED, PERMISSION_DENIED for a missing
/// scope, UNAVAILABLE when keys cannot be loaded.
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
        r => challenge(
            Code::Unauthenticated,
            &format!("invalid token ({r})"),
            "Bearer error=\"invalid_token\"",
        ),
    }
}
