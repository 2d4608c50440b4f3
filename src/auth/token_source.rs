//! `TokenSource`: tokens for callers, cached and refreshed at 75% of their life.

use std::{
    fmt,
    sync::{Arc, RwLock},
    time::Duration,
};

use futures_util::future::BoxFuture;
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;
use tonic::{Request, Status, metadata::MetadataValue, service::Interceptor, transport::Channel};

use crate::{
    oauth::{AccessToken, CognitoClient, TokenEndpoint, TokenResponse, UpstreamError},
    proto::gateway::v1::{GetTokenRequest, gateway_client::GatewayClient},
};

/// The gateway's GetToken RPC as a [`TokenEndpoint`].
#[derive(Debug, Clone)]
pub struct GatewayTokenEndpoint {
    client: GatewayClient<Channel>,
}

impl GatewayTokenEndpoint {
    /// Calls the gateway on `channel`.
    pub fn new(channel: Channel) -> Self {
        Self {
            client: GatewayClient::new(channel),
        }
    }
}

impl TokenEndpoint for GatewayTokenEndpoint {
    fn client_credentials<'a>(
        &'a self,
        client_id: &'a str,
        secret: &'a SecretString,
        scope: &'a str,
    ) -> BoxFuture<'a, Result<TokenResponse, UpstreamError>> {
        Box::pin(async move {
            let response = self
                .client
                .clone()
                .get_token(GetTokenRequest {
                    client_id: client_id.to_owned(),
                    client_secret: secret.expose_secret().to_owned(),
                    scopes: scope
                        .split(' ')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect(),
                })
                .await
                .map_err(|s| crate::status::upstream_error(&s))?
                .into_inner();
            let expires_in = u64::try_from(response.expires_in)
                .ok()
                .filter(|e| *e > 0)
                .ok_or_else(|| UpstreamError::Unavailable("gateway returned no lifetime".into()))?;
            Ok(TokenResponse {
                access_token: AccessToken::new(response.access_token),
                expires_in,
            })
        })
    }

    fn describe(&self) -> String {
        "m2m.gateway.v1.Gateway/GetToken".into()
    }
}

struct Cached {
    token: AccessToken,
    refresh_at: Instant,
    expires_at: Instant,
}

struct Inner {
    endpoint: Arc<dyn TokenEndpoint>,
    client_id: String,
    secret: SecretString,
    scope: String,
    refresh_ratio: f64,
    current: RwLock<Option<Cached>>,
    fetching: tokio::sync::Mutex<()>,
}

/// Obtains tokens for a caller from the gateway (or straight from a Cognito token
/// endpoint), caches them, refreshes at 75% of their lifetime, and makes one
/// request at a time however many tasks ask. Built inside a tokio runtime, it
/// starts its own refresher: the first token is fetched at once and each next one
/// at its refresh point, until the last clone is dropped. Nothing to spawn or
/// keep alive.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use m2m_gateway::{auth::TokenSource, proto::demo::v1::echo_client::EchoClient};
/// let gateway = tonic::transport::Channel::from_static("http://127.0.0.1:50051").connect().await?;
/// let tokens = TokenSource::from_gateway(gateway, "dev-client", "dev-secret", ["demo/read"]);
/// tokens.token().await?;          // optional: wait for the first token
/// let service = tonic::transport::Channel::from_static("http://127.0.0.1:50052").connect().await?;
/// let mut echo = EchoClient::with_interceptor(service, tokens.bearer_interceptor());
/// # let _ = &mut echo;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TokenSource {
    inner: Arc<Inner>,
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSource")
            .field("client_id", &self.inner.client_id)
            .field("scope", &self.inner.scope)
            .field("endpoint", &self.inner.endpoint.describe())
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    /// A source over any token endpoint.
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(
        endpoint: Arc<dyn TokenEndpoint>,
        client_id: impl Into<String>,
        secret: impl Into<String>,
        scopes: I,
    ) -> Self {
        let scopes: Vec<String> = scopes.into_iter().map(Into::into).collect();
        Self {
            inner: Arc::new(Inner {
                endpoint,
                client_id: client_id.into(),
                secret: SecretString::from(secret.into()),
                scope: scopes.join(" "),
                refresh_ratio: 0.75,
                current: RwLock::new(None),
                fetching: tokio::sync::Mutex::new(()),
            }),
        }
        .refreshing()
    }

    /// Starts the background refresher (when a tokio runtime is running): it
    /// fetches the first token at once, then each one at its refresh point,
    /// retrying with backoff; it holds only a weak reference and ends when the
    /// last clone of the source is dropped.
    fn refreshing(self) -> Self {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return self;
        };
        let weak = Arc::downgrade(&self.inner);
        runtime.spawn(async move {
            let mut backoff = Duration::from_millis(500);
            loop {
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                let this = TokenSource { inner };
                let wait = match this.token().await {
                    Ok(_) => {
                        backoff = Duration::from_millis(500);
                        let next = this
                            .inner
                            .current
                            .read()
                            .unwrap_or_else(|p| p.into_inner())
                            .as_ref()
                            .map(|c| c.refresh_at);
                        match next {
                            Some(at) if at > Instant::now() => at - Instant::now(),
                            _ => backoff,
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, ?backoff, "token fetch failed; retrying");
                        let wait = backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        wait
                    }
                };
                // No strong reference while waiting: dropping every clone ends it.
                drop(this);
                tokio::time::sleep(wait).await;
            }
        });
        self
    }

    /// Tokens from the gateway's GetToken.
    pub fn from_gateway<I: IntoIterator<Item = S>, S: Into<String>>(
        channel: Channel,
        client_id: impl Into<String>,
        secret: impl Into<String>,
        scopes: I,
    ) -> Self {
        Self::new(
            Arc::new(GatewayTokenEndpoint::new(channel)),
            client_id,
            secret,
            scopes,
        )
    }

    /// Tokens straight from a Cognito token endpoint (`https://<domain>/oauth2/token`).
    pub fn from_cognito<I: IntoIterator<Item = S>, S: Into<String>>(
        token_endpoint: http::Uri,
        client_id: impl Into<String>,
        secret: impl Into<String>,
        scopes: I,
    ) -> Result<Self, crate::http::EndpointError> {
        crate::http::check_transport(&token_endpoint)?;
        let client = CognitoClient::new(
            token_endpoint,
            crate::oauth::DEFAULT_CONNECT_TIMEOUT,
            crate::oauth::DEFAULT_TOKEN_TIMEOUT,
        )?;
        Ok(Self::new(Arc::new(client), client_id, secret, scopes))
    }

    /// A token with life left: the cached one until its refresh point, else a new
    /// one (one request however many callers wait). If the request fails and the
    /// cached token has not expired, the cached token.
    pub async fn token(&self) -> Result<AccessToken, UpstreamError> {
        if let Some(token) = self.cached(|c| Instant::now() < c.refresh_at) {
            return Ok(token);
        }
        let _fetching = self.inner.fetching.lock().await;
        if let Some(token) = self.cached(|c| Instant::now() < c.refresh_at) {
            return Ok(token);
        }
        let started = Instant::now();
        let inner = &self.inner;
        match inner
            .endpoint
            .client_credentials(&inner.client_id, &inner.secret, &inner.scope)
            .await
        {
            Ok(response) => {
                let lifetime = Duration::from_secs(response.expires_in);
                let token = response.access_token;
                *inner.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Cached {
                    token: token.clone(),
                    refresh_at: started + lifetime.mul_f64(inner.refresh_ratio),
                    expires_at: started + lifetime,
                });
                Ok(token)
            }
            Err(e) => match self.current() {
                Some(old) => {
                    tracing::warn!(error = %e, "token refresh failed; using the current token");
                    Ok(old)
                }
                None => Err(e),
            },
        }
    }

    /// The cached token if it has not expired; never waits.
    pub fn current(&self) -> Option<AccessToken> {
        self.cached(|c| Instant::now() < c.expires_at)
    }

    fn cached(&self, usable: impl Fn(&Cached) -> bool) -> Option<AccessToken> {
        let guard = self.inner.current.read().unwrap_or_else(|p| p.into_inner());
        guard
            .as_ref()
            .filter(|c| usable(c))
            .map(|c| c.token.clone())
    }

    /// Client side: an interceptor adding `authorization: Bearer <token>` from
    /// the cache to every outgoing call. (The server side, which checks tokens, is
    /// [`crate::auth::AuthLayer`] or [`crate::auth::AuthInterceptor`].)
    pub fn bearer_interceptor(&self) -> BearerInterceptor {
        BearerInterceptor(self.clone())
    }
}

/// Adds the [`TokenSource`]'s current token to outgoing calls. Synchronous: it
/// uses the cached token (kept fresh by the source's refresher); until the first
/// token arrives calls fail UNAUTHENTICATED, so await [`TokenSource::token`] once
/// where that matters.
#[derive(Debug, Clone)]
pub struct BearerInterceptor(TokenSource);

impl Interceptor for BearerInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let token = self.0.current().ok_or_else(|| {
            Status::unauthenticated(
                "no token yet: await TokenSource::token() once before the first call",
            )
        })?;
        let value = MetadataValue::try_from(format!("Bearer {}", token.expose()))
            .map_err(|_| Status::internal("token is not valid metadata"))?;
        request.metadata_mut().insert("authorization", value);
        // The caller's trace goes on with the call (`otel` feature).
        crate::trace_context::inject_metadata(request.metadata_mut());
        Ok(request)
    }
}
