//! `AuthLayer` / `Auth<S>`: the tower middleware.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures_util::future::BoxFuture;
use http::{Request, Response};
use tower::{Layer, Service};

use super::{AuthPolicy, RemoteValidator, Requirement, VerifiedClaims, bearer_token, refusal};
use crate::jwt::{Claims, CognitoValidator, Invalid};

#[derive(Clone)]
enum Verifier {
    Local(CognitoValidator),
    Remote(Box<RemoteValidator>),
}

impl Verifier {
    async fn verify(&self, token: &str, scopes: &[String]) -> Result<Arc<Claims>, Invalid> {
        match self {
            Verifier::Local(v) => v.validate(token, scopes).await,
            Verifier::Remote(v) => v.validate(token, scopes).await,
        }
    }
}

/// A check of the service's own on a verified token: the claims and the
/// method's path; `Err(message)` refuses the call with PERMISSION_DENIED.
type CustomCheck = dyn Fn(&Claims, &str) -> Result<(), String> + Send + Sync;

struct Shared {
    verifier: Verifier,
    policy: AuthPolicy,
    check: Option<Arc<CustomCheck>>,
    /// Refusals are logged at info, a few per kind and interval.
    refusals: crate::refusal_log::RefusalLog,
}

impl Shared {
    /// One info line for a refused call, unless its kind has had its share.
    fn log_refusal(&self, path: &str, reason: &'static str, detail: &str) {
        if let Some(suppressed) = self
            .refusals
            .admit(("AuthLayer", 0, Some(reason)), std::time::Instant::now())
        {
            tracing::info!(path, reason, detail, suppressed, "call refused");
        }
    }
}

/// A tower layer that checks `authorization: Bearer` tokens on every call.
///
/// Missing or invalid token → `UNAUTHENTICATED` with an RFC 6750
/// `www-authenticate` header (`Bearer`, `Bearer error="invalid_request"` or
/// `Bearer error="invalid_token"`); valid but lacking a scope →
/// `PERMISSION_DENIED` with `Bearer error="insufficient_scope", scope="..."`;
/// keys not loadable → `UNAVAILABLE` without a challenge (RFC 6750 has no error
/// for it: the caller's token may be fine). The message names the reason and
/// what was expected where that is safe (never the token). Refusals are logged
/// at info, a few per reason and 10 s. The verified [`Claims`] go into the
/// request extensions (read them with [`super::claims`]). Tokens are never logged.
///
/// ```no_run
/// # async fn demo(validator: m2m_gateway::jwt::CognitoValidator) -> Result<(), Box<dyn std::error::Error>> {
/// use m2m_gateway::auth::{AuthLayer, AuthPolicy};
/// let policy = AuthPolicy::new()
///     .service("orders.v1.Orders", ["orders/read"])
///     .method("/orders.v1.Orders/Cancel", ["orders/write"]);
/// # let (_, health) = tonic_health::server::health_reporter();
/// tonic::transport::Server::builder()
///     .layer(AuthLayer::local(validator, policy))
///     .add_service(health)
///     .serve("127.0.0.1:50052".parse()?)
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AuthLayer {
    shared: Arc<Shared>,
}

impl fmt::Debug for AuthLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.shared.verifier {
            Verifier::Local(_) => "local",
            Verifier::Remote(_) => "remote",
        };
        f.debug_struct("AuthLayer")
            .field("mode", &mode)
            .field("policy", &self.shared.policy)
            .finish()
    }
}

impl AuthLayer {
    /// Validates in-process with `validator` (no network hop per call).
    pub fn local(validator: CognitoValidator, policy: AuthPolicy) -> Self {
        Self::with(Verifier::Local(validator), policy)
    }

    /// Validates through the gateway's Validate RPC, caching answers.
    pub fn remote(validator: RemoteValidator, policy: AuthPolicy) -> Self {
        Self::with(Verifier::Remote(Box::new(validator)), policy)
    }

    /// Adds a check of your own, run on every call whose token the layer
    /// accepted, with the verified claims and the method's path (e.g. a tenant
    /// claim that must match the method's tenant). `Err(message)` refuses the
    /// call with PERMISSION_DENIED and that message (logged like the layer's
    /// own refusals).
    ///
    /// ```no_run
    /// # fn demo(validator: m2m_gateway::jwt::CognitoValidator) {
    /// use m2m_gateway::auth::{AuthLayer, AuthPolicy};
    /// let layer = AuthLayer::local(validator, AuthPolicy::new().require(["orders/read"]))
    ///     .with_check(|claims, method| {
    ///         if method.ends_with("/Cancel") && !claims.client_id().starts_with("ops-") {
    ///             return Err("only operations clients may cancel".into());
    ///         }
    ///         Ok(())
    ///     });
    /// # let _ = layer; }
    /// ```
    pub fn with_check<F>(self, check: F) -> Self
    where
        F: Fn(&Claims, &str) -> Result<(), String> + Send + Sync + 'static,
    {
        Self {
            shared: Arc::new(Shared {
                verifier: self.shared.verifier.clone(),
                policy: self.shared.policy.clone(),
                check: Some(Arc::new(check)),
                refusals: Default::default(),
            }),
        }
    }

    fn with(verifier: Verifier, policy: AuthPolicy) -> Self {
        Self {
            shared: Arc::new(Shared {
                verifier,
                policy,
                check: None,
                refusals: Default::default(),
            }),
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service produced by [`AuthLayer`].
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: fmt::Debug> fmt::Debug for Auth<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S> Auth<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// The future of [`Auth`].
pub struct ResponseFuture<T, E> {
    inner: BoxFuture<'static, Result<T, E>>,
}

impl<T, E> fmt::Debug for ResponseFuture<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl<T, E> Future for ResponseFuture<T, E> {
    type Output = Result<T, E>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Auth<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<Response<ResBody>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        // The clone is not ready; keep the ready one for this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        let span = server_span(&req, &shared.policy);
        ResponseFuture {
            inner: Box::pin(tracing::Instrument::instrument(
                async move {
                    let scopes = match shared.policy.requirement(req.uri().path()) {
                        Requirement::Public => return inner.call(req).await,
                        Requirement::Scopes(scopes) => scopes,
                        Requirement::Denied => {
                            return Ok(tonic::Status::permission_denied(
                            "this method declares no required scopes: it is refused to every caller (declare (m2m.auth.v1.required_scopes) or (m2m.auth.v1.public) in its .proto)",
                        )
                        .into_http());
                        }
                    };
                    let mut values = req.headers().get_all(http::header::AUTHORIZATION).iter();
                    let header = match (values.next(), values.next()) {
                        (Some(v), None) => v.to_str().ok(),
                        (None, _) => None,
                        (Some(_), Some(_)) => Some("multiple authorization headers"),
                    };
                    let token = match bearer_token(header) {
                        Ok(token) => token,
                        Err(status) => {
                            shared.log_refusal(
                                req.uri().path(),
                                "no_bearer_token",
                                status.message(),
                            );
                            return Ok(status.into_http());
                        }
                    };
                    match shared.verifier.verify(token, scopes).await {
                        Ok(claims) => {
                            if let Some(check) = &shared.check {
                                if let Err(message) = check(&claims, req.uri().path()) {
                                    shared.log_refusal(req.uri().path(), "custom_check", &message);
                                    return Ok(
                                        tonic::Status::permission_denied(message).into_http()
                                    );
                                }
                            }
                            req.extensions_mut().insert(VerifiedClaims(claims));
                            inner.call(req).await
                        }
                        Err(invalid) => {
                            shared.log_refusal(
                                req.uri().path(),
                                invalid.rejection.as_str(),
                                &invalid.detail,
                            );
                            Ok(refusal(&invalid, scopes).into_http())
                        }
                    }
                },
                span,
            )),
        }
    }
}

/// The call's server span, joined to the caller's trace (`traceparent`),
/// unless a span is already open around this layer (the gateway's own,
/// tower-http's TraceLayer): then that one is the call's. Named by the method
/// when the policy declares it or its service (as policies from descriptors
/// do), else `unknown`: a caller's made-up path never becomes a span name. One
/// level check while `debug` spans are off.
fn server_span<B>(req: &Request<B>, policy: &AuthPolicy) -> tracing::Span {
    if !tracing::level_enabled!(tracing::Level::DEBUG) || !tracing::Span::current().is_none() {
        return tracing::Span::none();
    }
    let path = req.uri().path();
    crate::trace_context::server_span(policy.declares(path).then_some(path), req.headers())
}
