//! Small helpers shared by the HTTP clients (JWKS and token endpoint).

/// Decodes the credentials of an HTTP Basic authorization value (the part after
/// the scheme): `base64(id:secret)`, split at the first colon.
#[cfg(feature = "emulator")]
pub(crate) fn decode_basic(encoded: &str) -> Option<(String, String)> {
    use base64::{Engine as _, engine::general_purpose::STANDARD};
    let text = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

/// Reads a response body, refusing more than `max` bytes.
pub(crate) async fn read_limited(
    mut resp: reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, BodyError> {
    if resp.content_length().is_some_and(|len| len > max as u64) {
        return Err(BodyError::TooLarge(max));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| BodyError::Transport(describe(&e)))?
    {
        if body.len() + chunk.len() > max {
            return Err(BodyError::TooLarge(max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Why a body could not be read.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    #[error("{0}")]
    Transport(String),
}

/// A reqwest error without its URL (which may carry credentials in userinfo).
pub(crate) fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect error"
    } else if e.is_body() || e.is_decode() {
        "body error"
    } else {
        "transport error"
    };
    let mut msg = kind.to_owned();
    let mut source = std::error::Error::source(e);
    // The innermost cause says what happened (refused, reset, DNS, TLS).
    while let Some(s) = source {
        if s.source().is_none() {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
        }
        source = s.source();
    }
    msg
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
pub fn check_transport(url: &url::Url) -> Result<(), EndpointError> {
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback_host(url) => Ok(()),
        "http" => Err(EndpointError::PlainHttp {
            url: url.to_string(),
        }),
        other => Err(EndpointError::UnsupportedScheme {
            url: url.to_string(),
            scheme: other.to_owned(),
        }),
    }
}

fn is_loopback_host(url: &url::Url) -> bool {
    use std::net::IpAddr;
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

/// A reqwest client with the gateway's defaults: no redirects (credentials must
/// never follow one), bounded connect and total timeouts.
pub(crate) fn client(
    connect_timeout: std::time::Duration,
    timeout: std::time::Duration,
) -> Result<reqwest::Client, EndpointError> {
    reqwest::Client::builder()
        .connect_timeout(connect_timeout)
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("m2m-gateway/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| EndpointError::Client(describe(&e)))
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
