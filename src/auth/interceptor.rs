//! The same check as a synchronous tonic interceptor.

use std::sync::Arc;

use tonic::{Request, Status, service::Interceptor};

use super::{VerifiedClaims, bearer_token, refusal};
use crate::jwt::CognitoValidator;

/// Server side: a tonic [`Interceptor`] that checks the bearer token of every
/// incoming call, requiring `required_scopes` on every method of the service it
/// wraps. (The client side, which attaches tokens, is
/// [`super::TokenSource::bearer_interceptor`].)
///
/// Trade-off against [`super::AuthLayer`]: an interceptor is synchronous and sees
/// neither the method path nor the network, so it has one scope list for the whole
/// service (no per-method policy, no public methods) and validates with the keys
/// already loaded — an unknown `kid` is refused at once instead of triggering a
/// JWKS refetch. Keep the key sets fresh with [`crate::jwt::CognitoValidator::spawn_loaders`],
/// or use the layer.
///
/// ```no_run
/// # fn demo(validator: m2m_gateway::jwt::CognitoValidator) {
/// use m2m_gateway::{proto::demo::v1::echo_server::EchoServer, demo::EchoService};
/// use m2m_gateway::auth::AuthInterceptor;
/// let svc = EchoServer::with_interceptor(EchoService, AuthInterceptor::new(validator, ["demo/read"]));
/// # let _ = svc;
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct AuthInterceptor {
    validator: CognitoValidator,
    required_scopes: Arc<[String]>,
}

impl AuthInterceptor {
    /// Checks calls with `validator`, each needing `required_scopes`.
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(
        validator: CognitoValidator,
        required_scopes: I,
    ) -> Self {
        Self {
            validator,
            required_scopes: required_scopes.into_iter().map(Into::into).collect(),
        }
    }
}

impl Interceptor for AuthInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap_or("non-ascii"));
        let token = bearer_token(header)?;
        let claims = self
            .validator
            .validate_loaded(token, &self.required_scopes)
            .map_err(|invalid| refusal(&invalid, &self.required_scopes))?;
        request.extensions_mut().insert(VerifiedClaims(claims));
        Ok(request)
    }
}
