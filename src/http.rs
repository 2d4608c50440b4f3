//! The outbound HTTP client (JWKS and token endpoint) and the rules on where
//! secrets and keys may travel.

use std::{
    fmt,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderValue, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper_util::{
    client::{
        legacy::{
            Client,
            connect::{HttpConnector, proxy::Tunnel},
        },
        proxy::matcher::Matcher,
    },
    rt::{TokioExecutor, TokioTimer},
};
use tower::ServiceExt as _;

/// Decodes the credentials of an HTTP Basic authorization value (the part after
/// the scheme): `base64(id:secret)`, split at the first colon.
#[cfg(feature = "emulator")]
pub(crate) fn decode_basic(encoded: &str) -> Option<(String, String)> {
    use base64::{Engine as _, engine::general_purpose::STANDARD};
    let text = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

/// Why an exchange with an outbound endpoint did not produce an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HttpError {
    /// No connection: refused, unreachable, DNS, the TLS handshake, the proxy.
    #[error("connect error: {0}")]
    Connect(String),
    /// The total timeout passed (connect, request and body together).
    #[error("timeout")]
    Timeout,
    /// The answer's body is larger than the caller accepts.
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    /// The connection failed after it was made.
    #[error("transport error: {0}")]
    Transport(String),
}

/// An answer: its status and its whole body.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) body: Bytes,
}

type Connector = hyper_rustls::HttpsConnector<ProxyConnector>;

/// The outbound HTTP(S) client of the token endpoint and JWKS fetches:
/// hyper-util's pooled client (HTTP/1.1, HTTP/2 by ALPN) over rustls on
/// aws-lc-rs, trusting the platform's roots. No redirects are followed
/// (credentials must never follow one); every exchange is bounded by the connect
/// and total timeouts; `HTTPS_PROXY` / `NO_PROXY` are honoured for `https`
/// (a CONNECT tunnel); plain `http` (loopback only) and loopback hosts always go
/// direct.
#[derive(Clone)]
pub(crate) struct HttpClient {
    inner: Client<Connector, Full<Bytes>>,
    timeout: Duration,
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClient")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

const USER_AGENT: &str = concat!("m2m-gateway/", env!("CARGO_PKG_VERSION"));

impl HttpClient {
    /// A client with a TCP connect timeout and a total timeout per exchange.
    pub(crate) fn new(connect_timeout: Duration, timeout: Duration) -> Result<Self, EndpointError> {
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_connect_timeout(Some(connect_timeout));
        tcp.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config()?)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(ProxyConnector {
                tcp,
                proxy: proxy_from_env(),
            });
        let inner = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(Self { inner, timeout })
    }

    /// Sends `request` and reads the whole answer, refusing a body over
    /// `max_body` bytes; all within the total timeout.
    pub(crate) async fn send(
        &self,
        mut request: Request<Full<Bytes>>,
        max_body: usize,
    ) -> Result<Answer, HttpError> {
        request
            .headers_mut()
            .insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
        let exchange = async {
            let resp = self.inner.request(request).await.map_err(|e| {
                if e.is_connect() {
                    HttpError::Connect(innermost(&e))
                } else {
                    HttpError::Transport(innermost(&e))
                }
            })?;
            let status = resp.status();
            let declared = resp
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            if declared.is_some_and(|len| len > max_body as u64) {
                return Err(HttpError::TooLarge(max_body));
            }
            let body = Limited::new(resp.into_body(), max_body)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<LengthLimitError>() {
                        HttpError::TooLarge(max_body)
                    } else {
                        HttpError::Transport(innermost(&*e))
                    }
                })?
                .to_bytes();
            Ok(Answer { status, body })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or(Err(HttpError::Timeout))
    }
}

/// The innermost cause says what happened (refused, reset, DNS, TLS); the
/// client's errors never carry the URL (which could hold credentials).
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last: &(dyn std::error::Error + 'static) = e;
    while let Some(source) = last.source() {
        last = source;
    }
    last.to_string()
}

/// rustls on aws-lc-rs with the platform's roots, loaded once per process.
fn tls_config() -> Result<rustls::ClientConfig, EndpointError> {
    static CONFIG: OnceLock<Result<rustls::ClientConfig, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let loaded = rustls_native_certs::load_native_certs();
            let mut roots = rustls::RootCertStore::empty();
            let (_, unusable) = roots.add_parsable_certificates(loaded.certs);
            if roots.is_empty() {
                // Plain http to loopback (the emulator) still works; https
                // fails at the handshake, and this says why.
                tracing::warn!(
                    unusable,
                    errors = loaded.errors.len(),
                    "no trusted root certificates found on this machine \
                     (the ca-certificates package, SSL_CERT_FILE or SSL_CERT_DIR): \
                     https endpoints will fail"
                );
            }
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map(|b| b.with_root_certificates(roots).with_no_client_auth())
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(EndpointError::Client)
}

/// `HTTPS_PROXY`, `ALL_PROXY` and `NO_PROXY` (and their lower-case forms).
fn proxy_from_env() -> Arc<Matcher> {
    static PROXY: OnceLock<Arc<Matcher>> = OnceLock::new();
    PROXY.get_or_init(|| Arc::new(Matcher::from_env())).clone()
}

/// TCP to the destination, or for `https` to a host other than loopback through
/// the proxy the environment names (an HTTP CONNECT tunnel; TLS then runs end to
/// end inside it).
#[derive(Clone)]
struct ProxyConnector {
    tcp: HttpConnector,
    proxy: Arc<Matcher>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<Uri> for ProxyConnector {
    type Response = <HttpConnector as tower::Service<Uri>>::Response;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.tcp.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let tcp = self.tcp.clone();
        // A proxy cannot reach this machine's loopback: those go direct.
        let via = (dst.scheme() == Some(&http::uri::Scheme::HTTPS) && !is_loopback_host(&dst))
            .then(|| self.proxy.intercept(&dst))
            .flatten();
        Box::pin(async move {
            let Some(via) = via else {
                return tcp.oneshot(dst).await.map_err(Into::into);
            };
            if via.uri().scheme() != Some(&http::uri::Scheme::HTTP) {
                return Err(format!(
                    "proxy scheme {:?} is not supported (an http:// proxy is)",
                    via.uri().scheme_str().unwrap_or_default()
                )
                .into());
            }
            let mut tunnel = Tunnel::new(via.uri().clone(), tcp);
            if let Some(auth) = via.basic_auth() {
                tunnel = tunnel.with_auth(auth.clone());
            }
            tunnel.oneshot(dst).await.map_err(Into::into)
        })
    }
}

/// Why an outbound endpoint (token endpoint, JWKS) cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// `http` to a host that is not loopback: secrets and keys would travel in
    /// clear text.
    #[error(
        "{url} uses plain http to a non-loopback host; secrets and keys travel only over https"
    )]
    PlainHttp {
        /// The URL (never with user-info: those are refused earlier).
        url: String,
    },
    /// Neither `https` nor `http`.
    #[error("{url}: unsupported scheme {scheme:?}")]
    UnsupportedScheme {
        /// The URL.
        url: String,
        /// Its scheme.
        scheme: String,
    },
    /// The HTTP client could not be built (TLS backend).
    #[error("building the HTTP client: {0}")]
    Client(String),
}

/// Whether `url` may carry client secrets or keys: `https`, or `http` to loopback.
pub(crate) fn check_transport(url: &Uri) -> Result<(), EndpointError> {
    match url.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if is_loopback_host(url) => Ok(()),
        Some("http") => Err(EndpointError::PlainHttp {
            url: url.to_string(),
        }),
        other => Err(EndpointError::UnsupportedScheme {
            url: url.to_string(),
            scheme: other.unwrap_or_default().to_owned(),
        }),
    }
}

fn is_loopback_host(url: &Uri) -> bool {
    let Some(host) = url.host() else {
        return false;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

/// `url` with any password replaced by `redacted` (for logs and printed
/// configuration).
#[cfg(feature = "gateway")]
pub(crate) fn redact_url_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("redacted"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    fn connector(proxy: Matcher) -> ProxyConnector {
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        ProxyConnector {
            tcp,
            proxy: Arc::new(proxy),
        }
    }

    /// A CONNECT proxy on loopback: answers 200 to one request and hands back
    /// the request's head.
    async fn proxy() -> (String, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
                conn.read_exact(&mut byte).await.unwrap();
                head.push(byte[0]);
            }
            conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .unwrap();
            String::from_utf8(head).unwrap()
        });
        (format!("127.0.0.1:{}", addr.port()), seen)
    }

    #[tokio::test]
    async fn https_goes_through_the_environments_proxy_as_a_connect_tunnel() {
        let (proxy_addr, seen) = proxy().await;
        let matcher = Matcher::builder()
            .https(format!("http://user:pass@{proxy_addr}"))
            .build();
        // The destination's name is never resolved here: the proxy is asked.
        let dst: Uri = "https://cognito-idp.example:443/pool/.well-known/jwks.json"
            .parse()
            .unwrap();
        connector(matcher).oneshot(dst).await.unwrap();
        let head = seen.await.unwrap();
        assert!(
            head.starts_with("CONNECT cognito-idp.example:443 HTTP/1.1\r\n"),
            "{head}"
        );
        // user:pass, as the proxy URL gave them.
        assert!(
            head.to_ascii_lowercase()
                .contains("proxy-authorization: basic dxnlcjpwyxnz\r\n"),
            "{head}"
        );
    }

    #[tokio::test]
    async fn no_proxy_plain_http_and_loopback_go_direct() {
        let direct = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = direct.local_addr().unwrap().port();
        // A proxy that must not be used: nothing listens there.
        let unused = "http://127.0.0.1:9";
        for (matcher, dst) in [
            (
                Matcher::builder().all(unused).no("127.0.0.1").build(),
                format!("https://127.0.0.1:{port}/"),
            ),
            (
                Matcher::builder().all(unused).build(),
                format!("http://127.0.0.1:{port}/"),
            ),
            (
                Matcher::builder().all(unused).build(),
                format!("https://127.0.0.1:{port}/"),
            ),
        ] {
            // The connection reaches the destination itself.
            let (conn, accepted) = tokio::join!(
                connector(matcher).oneshot(dst.parse().unwrap()),
                direct.accept()
            );
            conn.unwrap_or_else(|e| panic!("{dst}: {e}"));
            accepted.unwrap();
        }
    }

    #[tokio::test]
    async fn a_proxy_other_than_http_is_refused_with_the_reason() {
        let matcher = Matcher::builder().https("socks5://127.0.0.1:9").build();
        let err = connector(matcher)
            .oneshot("https://cognito-idp.example/".parse().unwrap())
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("\"socks5\" is not supported"),
            "{err}"
        );
    }

    #[test]
    fn transport_rules() {
        for ok in [
            "https://cognito-idp.us-east-1.amazonaws.com/p",
            "http://127.0.0.1:9/t",
            "http://[::1]:9/t",
            "http://LOCALHOST/t",
        ] {
            assert_eq!(check_transport(&ok.parse().unwrap()), Ok(()), "{ok}");
        }
        for (refused, why) in [
            ("http://cognito.example/t", "plain http"),
            ("http://127.0.0.1.nip.example/t", "plain http"),
            ("http://[::2]/t", "plain http"),
            ("ws://127.0.0.1/t", "unsupported scheme \"ws\""),
        ] {
            let err = check_transport(&refused.parse().unwrap()).unwrap_err();
            assert!(err.to_string().contains(why), "{refused}: {err}");
        }
    }
}
