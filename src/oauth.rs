//! The OAuth 2.0 client-credentials client: Cognito's `/oauth2/token` over HTTP
//! (Basic client authentication, form body), the parsing of its answers, errors
//! included, and the [`TokenEndpoint`] trait that `TokenSource` and the gateway's
//! broker share.

use std::{fmt, sync::Arc, time::Duration};

use futures_util::future::BoxFuture;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::http::{self, HttpClient, HttpError};

/// TCP/TLS connect timeout of a token request.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Total time of one token request, retry included.
pub(crate) const DEFAULT_TOKEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest token-endpoint answer read.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Longest access token accepted from upstream.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Longest `expires_in` accepted (Cognito's maximum is one day).
const MAX_EXPIRES_IN: u64 = 2 * 86_400;

/// An access token. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken(Arc<str>);

impl AccessToken {
    /// Wraps a token string.
    pub fn new(token: impl Into<Arc<str>>) -> Self {
        Self(token.into())
    }
    /// The token itself; handle with care.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken(...)")
    }
}

/// A successful token-endpoint answer.
#[derive(Debug, Clone)]
pub struct TokenResponse {
    /// The access token.
    pub access_token: AccessToken,
    /// Lifetime in seconds.
    pub expires_in: u64,
}

/// How a token request failed, in the terms of the DESIGN status table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// `invalid_client`: client authentication failed.
    #[error("invalid_client")]
    InvalidClient,
    /// `invalid_scope`.
    #[error("invalid_scope")]
    InvalidScope,
    /// `unauthorized_client`: the grant is not enabled for the app client; also
    /// `unsupported_grant_type` and `invalid_grant`, which mean the same here.
    #[error("{0}")]
    NotPermitted(String),
    /// `invalid_request` or another 4xx the gateway did not expect: a gateway bug or
    /// a proxy in the way, never the caller's fault.
    #[error("upstream rejected the request: {0}")]
    Rejected(String),
    /// The caller's request is malformed (a gateway's INVALID_ARGUMENT, read by
    /// [`crate::auth::TokenSource`]); Cognito's own `invalid_request` is
    /// [`UpstreamError::Rejected`], since the gateway built that request.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// No answer within the total timeout.
    #[error("no answer in time")]
    Timeout,
    /// HTTP 429 or a throttling error.
    #[error("upstream throttled the request")]
    Throttled,
    /// Unreachable, timeout, 5xx, unparsable answer.
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
}

impl UpstreamError {
    /// Stable label for metrics.
    pub const fn label(&self) -> &'static str {
        match self {
            UpstreamError::InvalidClient => "invalid_client",
            UpstreamError::InvalidScope => "invalid_scope",
            UpstreamError::NotPermitted(_) => "unauthorized_client",
            UpstreamError::Rejected(_) => "rejected",
            UpstreamError::InvalidRequest(_) => "invalid_request",
            UpstreamError::Timeout => "timeout",
            UpstreamError::Throttled => "throttled",
            UpstreamError::Unavailable(_) => "unavailable",
        }
    }
}

#[derive(Deserialize)]
struct Success {
    access_token: String,
    expires_in: u64,
    token_type: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
}

/// Something that performs the client_credentials grant: Cognito over HTTP in
/// production, anything in tests.
pub trait TokenEndpoint: Send + Sync + 'static {
    /// One grant request (with whatever retry the implementation does).
    fn client_credentials<'a>(
        &'a self,
        client_id: &'a str,
        secret: &'a SecretString,
        scope: &'a str,
    ) -> BoxFuture<'a, Result<TokenResponse, UpstreamError>>;

    /// Where it goes, for logs.
    fn describe(&self) -> String;
}

impl TokenEndpoint for CognitoClient {
    fn client_credentials<'a>(
        &'a self,
        client_id: &'a str,
        secret: &'a SecretString,
        scope: &'a str,
    ) -> BoxFuture<'a, Result<TokenResponse, UpstreamError>> {
        Box::pin(self.request(client_id, secret, scope))
    }

    fn describe(&self) -> String {
        self.endpoint.to_string()
    }
}

/// Calls the token endpoint. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct CognitoClient {
    http: HttpClient,
    endpoint: ::http::Uri,
    timeout: Duration,
}

impl CognitoClient {
    /// A client for `endpoint` with connect and total timeouts; the total covers
    /// the one retry too.
    pub(crate) fn new(
        endpoint: ::http::Uri,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<Self, http::EndpointError> {
        Ok(Self {
            http: HttpClient::new(connect_timeout, timeout)?,
            endpoint,
            timeout,
        })
    }

    /// `grant_type=client_credentials` with HTTP Basic client authentication and
    /// the space-separated `scope`. Retries once, after a jittered pause, on a
    /// connection error or a 5xx; never on a 4xx; never past the total timeout.
    pub(crate) async fn request(
        &self,
        client_id: &str,
        secret: &SecretString,
        scope: &str,
    ) -> Result<TokenResponse, UpstreamError> {
        let attempt_loop = async {
            let first = self.attempt(client_id, secret, scope).await;
            match first {
                Err(Attempt::Retryable(reason)) => {
                    tracing::debug!(%reason, "token request failed; retrying once");
                    tokio::time::sleep(jitter()).await;
                    self.attempt(client_id, secret, scope)
                        .await
                        .map_err(Attempt::into_error)
                }
                other => other.map_err(Attempt::into_error),
            }
        };
        let span = tracing::debug_span!(
            target: crate::trace_context::TARGET,
            "token endpoint",
            otel.kind = "client",
            http.request.method = "POST",
            // OpenTelemetry's server.address: an IPv6 literal without brackets.
            server.address = self
                .endpoint
                .host()
                .unwrap_or_default()
                .trim_start_matches('[')
                .trim_end_matches(']'),
            http.response.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        let result = tracing::Instrument::instrument(
            tokio::time::timeout(self.timeout, attempt_loop),
            span.clone(),
        )
        .await
        .unwrap_or(Err(UpstreamError::Timeout));
        if let Err(e) = &result {
            span.record("error.type", e.label());
        }
        result
    }

    async fn attempt(
        &self,
        client_id: &str,
        secret: &SecretString,
        scope: &str,
    ) -> Result<TokenResponse, Attempt> {
        let form = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "client_credentials");
            if !scope.is_empty() {
                form.append_pair("scope", scope);
            }
            form.finish()
        };
        let mut request = ::http::Request::post(self.endpoint.clone())
            .header(::http::header::ACCEPT, "application/json")
            .header(
                ::http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(form.into())
            .map_err(|e| Attempt::Final(UpstreamError::Unavailable(e.to_string())))?;
        request
            .headers_mut()
            .insert(::http::header::AUTHORIZATION, basic_auth(client_id, secret));
        // The trace goes on to the token endpoint (`otel` feature).
        crate::trace_context::inject(&tracing::Span::current(), request.headers_mut());
        let answer = self
            .http
            .send(request, MAX_RESPONSE_BYTES)
            .await
            .map_err(|e| match e {
                HttpError::Connect(_) => Attempt::Retryable(e.to_string()),
                HttpError::Timeout => Attempt::Final(UpstreamError::Timeout),
                HttpError::TooLarge(_) | HttpError::Transport(_) => {
                    Attempt::Final(UpstreamError::Unavailable(e.to_string()))
                }
            })?;
        let (status, body) = (answer.status, answer.body);
        tracing::Span::current().record("http.response.status_code", i64::from(status.as_u16()));
        if status.is_success() {
            return parse_success(status.as_u16(), &body).map_err(Attempt::Final);
        }
        if status.is_server_error() {
            return Err(Attempt::Retryable(format!("HTTP {}", status.as_u16())));
        }
        Err(Attempt::Final(parse_failure(status.as_u16(), &body)))
    }
}

/// `Basic base64(id:secret)`, marked sensitive (never logged, never indexed by
/// HPACK).
fn basic_auth(client_id: &str, secret: &SecretString) -> ::http::HeaderValue {
    use base64::{Engine as _, engine::general_purpose::STANDARD};
    let pair = secrecy::zeroize::Zeroizing::new(format!("{client_id}:{}", secret.expose_secret()));
    let encoded = secrecy::zeroize::Zeroizing::new(format!("Basic {}", STANDARD.encode(&*pair)));
    let mut value =
        ::http::HeaderValue::from_str(&encoded).expect("base64 is a valid header value");
    value.set_sensitive(true);
    value
}

enum Attempt {
    Retryable(String),
    Final(UpstreamError),
}

impl Attempt {
    fn into_error(self) -> UpstreamError {
        match self {
            Attempt::Retryable(reason) => UpstreamError::Unavailable(reason),
            Attempt::Final(e) => e,
        }
    }
}

fn jitter() -> Duration {
    Duration::from_millis(50) + Duration::from_millis(100).mul_f64(unit_random())
}

fn parse_success(status: u16, body: &[u8]) -> Result<TokenResponse, UpstreamError> {
    let ok: Success = serde_json::from_slice(body).map_err(|_| {
        UpstreamError::Unavailable(format!("HTTP {status} with an unparsable token answer"))
    })?;
    if !ok.token_type.eq_ignore_ascii_case("bearer") {
        return Err(UpstreamError::Unavailable(format!(
            "unexpected token_type {:?}",
            ok.token_type.chars().take(32).collect::<String>()
        )));
    }
    if ok.access_token.is_empty()
        || ok.access_token.len() > MAX_TOKEN_BYTES
        || !ok.access_token.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(UpstreamError::Unavailable(
            "access_token missing, too long or not printable".into(),
        ));
    }
    if ok.expires_in == 0 || ok.expires_in > MAX_EXPIRES_IN {
        return Err(UpstreamError::Unavailable(format!(
            "implausible expires_in {}",
            ok.expires_in
        )));
    }
    Ok(TokenResponse {
        access_token: AccessToken::new(ok.access_token),
        expires_in: ok.expires_in,
    })
}

fn parse_failure(status: u16, body: &[u8]) -> UpstreamError {
    let code = serde_json::from_slice::<ErrorBody>(body)
        .ok()
        .map(|e| e.error);
    match (status, code.as_deref()) {
        (_, Some("invalid_client")) => UpstreamError::InvalidClient,
        (_, Some("invalid_scope")) => UpstreamError::InvalidScope,
        (_, Some(c @ ("unauthorized_client" | "unsupported_grant_type" | "invalid_grant"))) => {
            UpstreamError::NotPermitted(c.to_owned())
        }
        (429, _) => UpstreamError::Throttled,
        (_, Some(c)) if c.contains("TooManyRequests") || c.contains("throttl") => {
            UpstreamError::Throttled
        }
        (401, None) => UpstreamError::InvalidClient,
        (_, Some("invalid_request")) => UpstreamError::Rejected("invalid_request".into()),
        (_, Some(other)) => UpstreamError::Rejected(format!(
            "HTTP {status} {:?}",
            other.chars().take(64).collect::<String>()
        )),
        (_, None) => UpstreamError::Unavailable(format!("HTTP {status} with a non-JSON body")),
    }
}

/// A uniform random number in [0, 1) (jitter of refresh points and retries).
pub(crate) fn unit_random() -> f64 {
    let mut bytes = [0u8; 4];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        return 0.0;
    }
    f64::from(u32::from_le_bytes(bytes)) / (f64::from(u32::MAX) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_map_to_the_status_table() {
        let cases: [(u16, &str, UpstreamError); 10] = [
            (
                400,
                r#"{"error":"invalid_client"}"#,
                UpstreamError::InvalidClient,
            ),
            (
                401,
                r#"{"error":"invalid_client"}"#,
                UpstreamError::InvalidClient,
            ),
            (401, "", UpstreamError::InvalidClient),
            (
                400,
                r#"{"error":"invalid_scope"}"#,
                UpstreamError::InvalidScope,
            ),
            (
                400,
                r#"{"error":"unauthorized_client"}"#,
                UpstreamError::NotPermitted("unauthorized_client".into()),
            ),
            (
                400,
                r#"{"error":"unsupported_grant_type"}"#,
                UpstreamError::NotPermitted("unsupported_grant_type".into()),
            ),
            (
                400,
                r#"{"error":"invalid_request"}"#,
                UpstreamError::Rejected("invalid_request".into()),
            ),
            (429, "Too Many Requests", UpstreamError::Throttled),
            (
                400,
                r#"{"error":"TooManyRequestsException"}"#,
                UpstreamError::Throttled,
            ),
            (
                403,
                "<html>forbidden</html>",
                UpstreamError::Unavailable("HTTP 403 with a non-JSON body".into()),
            ),
        ];
        for (status, body, want) in cases {
            assert_eq!(
                parse_failure(status, body.as_bytes()),
                want,
                "{status} {body}"
            );
        }
    }

    #[test]
    fn success_bodies_are_checked() {
        let ok = parse_success(
            200,
            br#"{"access_token":"a.b.c","expires_in":3600,"token_type":"Bearer"}"#,
        )
        .unwrap();
        assert_eq!(ok.expires_in, 3600);
        assert_eq!(ok.access_token.expose(), "a.b.c");
        assert_eq!(format!("{:?}", ok.access_token), "AccessToken(...)");
        for bad in [
            &br#"{"access_token":"a.b.c","expires_in":3600,"token_type":"MAC"}"#[..],
            br#"{"access_token":"","expires_in":3600,"token_type":"Bearer"}"#,
            br#"{"access_token":"a b","expires_in":3600,"token_type":"Bearer"}"#,
            br#"{"access_token":"a.b.c","expires_in":0,"token_type":"Bearer"}"#,
            br#"{"access_token":"a.b.c","expires_in":-5,"token_type":"Bearer"}"#,
            br#"{"access_token":"a.b.c","expires_in":"3600","token_type":"Bearer"}"#,
            br#"{"access_token":"a.b.c","expires_in":999999999,"token_type":"Bearer"}"#,
            b"<html>",
        ] {
            assert!(
                matches!(parse_success(200, bad), Err(UpstreamError::Unavailable(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
