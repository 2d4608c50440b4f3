//! For other services: check the gateway's tokens in your own tonic server, and
//! attach them to your own outgoing calls.
//!
//! - [`AuthLayer`]: a tower layer for `Server::builder().layer(...)`, with a
//!   per-method [`AuthPolicy`]; validates locally with a [`CognitoValidator`] (JWKS,
//!   no network hop per call) or remotely through the gateway's Validate RPC.
//! - [`AuthInterceptor`]: the same check as a synchronous tonic interceptor.
//! - [`TokenSource`]: obtains, caches and refreshes tokens for callers, with a
//!   client interceptor ([`TokenSource::bearer_interceptor`]) that adds
//!   `authorization: Bearer`.
//! - [`RevocationWatcher`]: keeps the gateway's revocations (the kill switch)
//!   in-process, so the layer refuses a revoked client's tokens within a
//!   second, with no call to the gateway per request.
//!
//! Protect a tonic service in five lines:
//!
//! ```no_run
//! # async fn demo(validator: m2m_gateway::jwt::CognitoValidator) -> Result<(), Box<dyn std::error::Error>> {
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
//! [`CognitoValidator`]: crate::jwt::CognitoValidator

mod interceptor;
mod layer;
mod policy;
mod remote;
mod token_source;
mod watch;

use std::sync::Arc;

pub use interceptor::AuthInterceptor;
pub use layer::{Auth, AuthLayer, ResponseFuture};
pub use policy::{AuthPolicy, DEFAULT_PUBLIC, PolicyError, Requirement};
pub use remote::{DEFAULT_REVALIDATE_AFTER, RemoteValidator};
pub use token_source::{BearerInterceptor, GatewayTokenEndpoint, TokenSource};
pub use watch::{RevocationWatcher, WatchOptions, WatchState, WhenStale};

use tonic::Status;

pub(crate) use crate::status::refusal;
use crate::{jwt::Claims, status};

/// The verified claims the layer or interceptor stored in the request extensions.
#[derive(Debug, Clone)]
pub struct VerifiedClaims(pub Arc<Claims>);

/// The caller's verified claims, when an [`AuthLayer`] or [`AuthInterceptor`] let the
/// request through (`None` for public methods).
///
/// ```
/// use m2m_gateway::claims;
/// use tonic::{Request, Status};
///
/// fn caller(request: &Request<()>) -> Result<String, Status> {
///     let claims = claims(request).ok_or_else(|| Status::unauthenticated("no token"))?;
///     Ok(claims.client_id().to_owned())
/// }
/// # assert!(caller(&Request::new(())).is_err());
/// ```
pub fn claims<T>(request: &tonic::Request<T>) -> Option<&Claims> {
    request
        .extensions()
        .get::<VerifiedClaims>()
        .map(|c| c.0.as_ref())
}

/// Extracts the token from `authorization: Bearer <jwt>` (scheme case-insensitive).
pub(crate) fn bearer_token(value: Option<&str>) -> Result<&str, Status> {
    let Some(value) = value else {
        return Err(status::missing_bearer());
    };
    match value.trim().split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(status::not_bearer()),
    }
}
