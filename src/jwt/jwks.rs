//! The key set of one issuer: fetched from its JWKS URI, parsed once, refetched on
//! an unknown `kid` at most once per cool-down, and kept when a fetch fails.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, RwLock, atomic::Ordering},
    time::Duration,
};

use aws_lc_rs::signature::{ParsedPublicKey, RSA_PKCS1_2048_8192_SHA256};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use futures_util::future::BoxFuture;
use serde::Deserialize;
use tokio::{sync::watch, time::Instant};

/// Largest JWKS document accepted.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Longest `kid` accepted, from a JWKS or a token header.
pub const MAX_KID_LEN: usize = 256;

/// Why a JWKS fetch did not produce a key set, or its client could not be built
/// ([`BuildError::Jwks`](super::BuildError::Jwks)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    /// Transport failure, timeout, or non-200 status.
    #[error("JWKS fetch failed: {0}")]
    Fetch(String),
    /// The document is not a JWKS or holds no usable RSA signing key.
    #[error("JWKS answer unusable: {0}")]
    Garbage(String),
}

/// Why a JWK's RSA components are not a usable RS256 key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// A modulus under 2048 bits (RFC 7518 §3.3).
    #[error("modulus of {bits} bits is under 2048")]
    TooShort {
        /// The modulus length.
        bits: usize,
    },
    /// aws-lc-rs refused the key.
    #[error("key rejected: {0}")]
    Rejected(String),
}

/// Fetches the raw JWKS document. Implemented over HTTP by [`HttpFetcher`]; tests
/// supply their own.
pub trait JwksFetcher: Send + Sync + 'static {
    /// One fetch attempt.
    fn fetch(&self) -> BoxFuture<'_, Result<Vec<u8>, JwksError>>;
}

/// Fetches a JWKS over HTTP(S) with a total timeout and a size limit.
#[derive(Debug, Clone)]
pub struct HttpFetcher {
    client: crate::http::HttpClient,
    uri: http::Uri,
    full: Arc<str>,
}

impl HttpFetcher {
    /// A fetcher for `uri` (transport rules are checked by config validation).
    pub fn new(
        uri: http::Uri,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<Self, JwksError> {
        let client = crate::http::HttpClient::new(connect_timeout, timeout)
            .map_err(|e| JwksError::Fetch(e.to_string()))?;
        let full = uri.to_string().into();
        Ok(Self { client, uri, full })
    }
}

impl JwksFetcher for HttpFetcher {
    fn fetch(&self) -> BoxFuture<'_, Result<Vec<u8>, JwksError>> {
        let span = tracing::debug_span!(
            target: crate::trace_context::TARGET,
            "jwks fetch",
            otel.kind = "client",
            http.request.method = "GET",
            url.full = &*self.full,
            http.response.status_code = tracing::field::Empty,
        );
        let mut request = http::Request::get(self.uri.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(Default::default())
            .expect("a GET of a parsed URI is a valid request");
        crate::trace_context::inject(&span, request.headers_mut());
        Box::pin(tracing::Instrument::instrument(
            async move {
                let answer =
                    self.client
                        .send(request, MAX_JWKS_BYTES)
                        .await
                        .map_err(|e| match e {
                            crate::http::HttpError::TooLarge(_) => {
                                JwksError::Garbage(e.to_string())
                            }
                            other => JwksError::Fetch(other.to_string()),
                        })?;
                tracing::Span::current().record(
                    "http.response.status_code",
                    i64::from(answer.status.as_u16()),
                );
                if answer.status != http::StatusCode::OK {
                    return Err(JwksError::Fetch(format!("HTTP {}", answer.status)));
                }
                Ok(answer.body.into())
            },
            span,
        ))
    }
}

/// A JWKS document held in memory: keys shipped with a deployment, or a fixed set
/// in tests and benchmarks.
#[derive(Debug, Clone)]
pub struct StaticJwks(Arc<[u8]>);

impl StaticJwks {
    /// Serves `document` (the JSON text of a JWK set) on every fetch.
    pub fn new(document: impl Into<Vec<u8>>) -> Self {
        Self(document.into().into())
    }
}

impl JwksFetcher for StaticJwks {
    fn fetch(&self) -> BoxFuture<'_, Result<Vec<u8>, JwksError>> {
        let body = self.0.to_vec();
        Box::pin(async move { Ok(body) })
    }
}

/// One RSA verification key, parsed once at load.
pub struct VerifyingKey {
    kid: Arc<str>,
    alg: Option<String>,
    key: ParsedPublicKey,
}

impl VerifyingKey {
    /// Builds a key from the JWK's base64url `n` and `e`.
    pub fn from_components(
        kid: &str,
        alg: Option<&str>,
        n: &[u8],
        e: &[u8],
    ) -> Result<Self, KeyError> {
        let n = strip_zeros(n);
        if n.len() < 256 {
            return Err(KeyError::TooShort { bits: n.len() * 8 });
        }
        let der = rsa_public_key_der(n, strip_zeros(e));
        let key = ParsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, der)
            .map_err(|e| KeyError::Rejected(e.to_string()))?;
        Ok(Self {
            kid: Arc::from(kid),
            alg: alg.map(str::to_owned),
            key,
        })
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The key id, shared.
    pub fn kid_shared(&self) -> Arc<str> {
        self.kid.clone()
    }

    /// The JWK's `alg`, when it declares one.
    pub fn alg(&self) -> Option<&str> {
        self.alg.as_deref()
    }

    /// Verifies an RS256 signature over `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        self.key.verify_sig(message, signature).is_ok()
    }
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[first..]
}

/// DER of PKCS#1 `RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }`.
fn rsa_public_key_der(n: &[u8], e: &[u8]) -> Vec<u8> {
    fn integer(out: &mut Vec<u8>, v: &[u8]) {
        let pad = v.first().is_none_or(|&b| b & 0x80 != 0);
        out.push(0x02);
        length(out, v.len() + usize::from(pad));
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
    }
    fn length(out: &mut Vec<u8>, len: usize) {
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes = len.to_be_bytes();
            let skip = bytes
                .iter()
                .position(|&b| b != 0)
                .unwrap_or(bytes.len() - 1);
            out.push(0x80 | (bytes.len() - skip) as u8);
            out.extend_from_slice(&bytes[skip..]);
        }
    }
    let mut body = Vec::with_capacity(n.len() + e.len() + 16);
    integer(&mut body, n);
    integer(&mut body, e);
    let mut out = Vec::with_capacity(body.len() + 4);
    out.push(0x30);
    length(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

/// The JWK set document, each key kept as JSON so that one malformed key is
/// skipped instead of failing the whole set.
#[derive(Deserialize)]
struct JwkSetDoc {
    keys: Vec<serde_json::Value>,
}

/// The members of a JWK (RFC 7517 §4, RFC 7518 §6.3.1) that decide whether it
/// is an RSA signature-verification key, and its components.
#[derive(Deserialize)]
struct Jwk {
    kty: String,
    #[serde(rename = "use")]
    public_key_use: Option<String>,
    key_ops: Option<Vec<String>>,
    kid: Option<String>,
    alg: Option<String>,
    n: Option<String>,
    e: Option<String>,
}

/// Parses a JWKS document into verification keys: RSA signing keys only; a key
/// that cannot be used is skipped; no usable key at all is an error. The
/// verifier is built once here ([`VerifyingKey`], aws-lc-rs) because the hot
/// path verifies with it.
pub fn parse_jwks(body: &[u8]) -> Result<HashMap<String, Arc<VerifyingKey>>, JwksError> {
    let doc: JwkSetDoc = serde_json::from_slice(body)
        .map_err(|e| JwksError::Garbage(format!("not a JWK set: {e}")))?;
    let mut keys = HashMap::new();
    for raw in doc.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(raw) else {
            tracing::debug!("skipping a JWK with unexpected members");
            continue;
        };
        let (Some(n), Some(e)) = (&jwk.n, &jwk.e) else {
            continue;
        };
        if jwk.kty != "RSA"
            || jwk.public_key_use.as_deref().is_some_and(|u| u != "sig")
            || jwk
                .key_ops
                .as_ref()
                .is_some_and(|ops| !ops.iter().any(|op| op == "verify"))
        {
            continue;
        }
        let Some(kid) = jwk.kid.as_deref() else {
            continue;
        };
        if kid.is_empty() || kid.len() > MAX_KID_LEN {
            continue;
        }
        let (Ok(n), Ok(e)) = (URL_SAFE_NO_PAD.decode(n), URL_SAFE_NO_PAD.decode(e)) else {
            tracing::warn!(kid = %kid, "skipping a JWK with bad base64url components");
            continue;
        };
        // A key declared for another algorithm keeps that name (cut short for
        // the logs) and never verifies an RS256 token.
        let alg = jwk
            .alg
            .as_deref()
            .map(|a| if a.len() > 32 { "other" } else { a });
        match VerifyingKey::from_components(kid, alg, &n, &e) {
            Ok(key) => {
                if keys.contains_key(kid) {
                    tracing::warn!(kid = %kid, "duplicate kid in JWKS; keeping the first");
                    continue;
                }
                keys.insert(kid.to_owned(), Arc::new(key));
            }
            Err(reason) => tracing::warn!(kid = %kid, %reason, "skipping a JWK"),
        }
    }
    if keys.is_empty() {
        return Err(JwksError::Garbage("no usable RSA signing key".into()));
    }
    Ok(keys)
}

type KeyMap = HashMap<String, Arc<VerifyingKey>>;

crate::counters::counters! {
    /// Counters of JWKS activity.
    JwksStats => JwksStatsSnapshot {
        /// Fetches that produced a key set.
        fetch_ok,
        /// Fetches that failed or answered garbage.
        fetch_failed,
        /// Unknown-kid refetches skipped because of the cool-down.
        refetch_suppressed,
    }
}

/// The key set of one issuer. Readers take a short read lock (never across an
/// await) and clone an `Arc`; refreshes swap the whole map.
pub struct KeySet {
    issuer: Arc<str>,
    /// The user pool's name, in logs.
    pool: Arc<str>,
    fetcher: Arc<dyn JwksFetcher>,
    keys: RwLock<Arc<KeyMap>>,
    /// Serialises fetches: concurrent callers wait for the one in progress.
    fetching: tokio::sync::Mutex<()>,
    /// When an unknown `kid` last caused a fetch (the cool-down clock).
    last_triggered: std::sync::Mutex<Option<Instant>>,
    cooldown: Duration,
    loaded_tx: watch::Sender<Option<Instant>>,
    stats: JwksStats,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySet")
            .field("pool", &self.pool)
            .field("issuer", &self.issuer)
            .field("kids", &self.kids())
            .field("cooldown", &self.cooldown)
            .finish_non_exhaustive()
    }
}

impl KeySet {
    /// An empty key set for `issuer`, filled by [`KeySet::refresh`].
    pub fn new(
        issuer: impl Into<String>,
        fetcher: Arc<dyn JwksFetcher>,
        cooldown: Duration,
    ) -> Self {
        Self {
            issuer: Arc::from(issuer.into()),
            pool: Arc::from(crate::rules::cognito::DEFAULT_POOL),
            fetcher,
            keys: RwLock::new(Arc::new(HashMap::new())),
            fetching: tokio::sync::Mutex::new(()),
            last_triggered: std::sync::Mutex::new(None),
            cooldown,
            loaded_tx: watch::Sender::new(None),
            stats: JwksStats::default(),
        }
    }

    /// Names the user pool in this key set's log lines (`default` otherwise).
    pub fn with_pool(mut self, pool: impl Into<String>) -> Self {
        self.pool = Arc::from(pool.into());
        self
    }

    /// The user pool's name.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// The issuer these keys belong to.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The issuer, shared (for the claims verified with these keys).
    pub(crate) fn issuer_shared(&self) -> Arc<str> {
        self.issuer.clone()
    }

    /// The key for `kid`, if loaded. Never waits.
    pub fn get(&self, kid: &str) -> Option<Arc<VerifyingKey>> {
        self.snapshot().get(kid).cloned()
    }

    fn snapshot(&self) -> Arc<KeyMap> {
        match self.keys.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The loaded key ids, sorted.
    pub fn kids(&self) -> Vec<String> {
        let mut kids: Vec<String> = self.snapshot().keys().cloned().collect();
        kids.sort();
        kids
    }

    /// Whether a key set has ever been loaded.
    pub fn is_loaded(&self) -> bool {
        self.loaded_tx.borrow().is_some()
    }

    /// When the current key set was loaded.
    pub fn loaded_at(&self) -> Option<Instant> {
        *self.loaded_tx.borrow()
    }

    /// Counters.
    pub fn stats(&self) -> &JwksStats {
        &self.stats
    }

    /// Resolves once a key set has been loaded.
    pub async fn wait_loaded(&self) {
        let mut rx = self.loaded_tx.subscribe();
        let _ = rx.wait_for(Option::is_some).await;
    }

    /// Fetches now, whatever the cool-down (start-up and periodic refresh). A
    /// failure keeps the last good set.
    pub async fn refresh(&self) -> Result<usize, JwksError> {
        let _fetching = self.fetching.lock().await;
        self.fetch_and_swap().await
    }

    /// The refetch for an unknown `kid`: skipped when another one started within
    /// the cool-down, whoever asked; concurrent callers wait for the one fetch in
    /// progress. Returns whether this call fetched.
    pub async fn refresh_if_cool(&self) -> bool {
        let _fetching = self.fetching.lock().await;
        {
            let mut last = self
                .last_triggered
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < self.cooldown) {
                self.stats
                    .refetch_suppressed
                    .fetch_add(1, Ordering::Relaxed);
                return false;
            }
            *last = Some(Instant::now());
        }
        let _ = self.fetch_and_swap().await;
        true
    }

    async fn fetch_and_swap(&self) -> Result<usize, JwksError> {
        let result = match self.fetcher.fetch().await {
            Ok(body) => parse_jwks(&body),
            Err(e) => Err(e),
        };
        match result {
            Ok(map) => {
                let count = map.len();
                let changed = {
                    let mut guard = match self.keys.write() {
                        Ok(g) => g,
                        Err(poisoned) => poisoned.into_inner(),
                    };
                    let changed =
                        guard.len() != map.len() || map.keys().any(|k| !guard.contains_key(k));
                    *guard = Arc::new(map);
                    changed
                };
                self.loaded_tx.send_replace(Some(Instant::now()));
                self.stats.fetch_ok.fetch_add(1, Ordering::Relaxed);
                if changed {
                    tracing::info!(pool = %self.pool, issuer = %self.issuer, keys = count, "JWKS loaded");
                    // One line per key: a plain field, not a list in a string.
                    for kid in self.kids() {
                        tracing::info!(pool = %self.pool, issuer = %self.issuer, %kid, "JWKS key");
                    }
                }
                Ok(count)
            }
            Err(e) => {
                self.stats.fetch_failed.fetch_add(1, Ordering::Relaxed);
                if self.is_loaded() {
                    tracing::warn!(pool = %self.pool, issuer = %self.issuer, error = %e, "JWKS fetch failed; keeping the last good key set");
                } else {
                    tracing::warn!(pool = %self.pool, issuer = %self.issuer, error = %e, "JWKS fetch failed; no key set loaded yet (tokens are refused until one loads)");
                }
                Err(e)
            }
        }
    }

    /// Loads the first key set (retrying with backoff), then refreshes every
    /// `period`. Runs until the returned task is aborted or the key set is no
    /// longer used (it holds only a weak reference between fetches).
    pub fn spawn_loader(self: &Arc<Self>, period: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(load_while_used(Arc::downgrade(self), period))
    }
}

/// [`KeySet::spawn_loader`]'s task: the first key set with backoff (250 ms
/// doubling to 30 s), then a refresh every `period`; ends once `keys` is gone.
pub(crate) async fn load_while_used(keys: std::sync::Weak<KeySet>, period: Duration) {
    let mut backoff = Duration::from_millis(250);
    let mut loaded = false;
    loop {
        let Some(set) = keys.upgrade() else {
            return;
        };
        loaded |= set.refresh().await.is_ok();
        drop(set);
        let wait = if loaded {
            period
        } else {
            let wait = backoff;
            backoff = (backoff * 2).min(Duration::from_secs(30));
            wait
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Mutex, atomic::AtomicU64};

    /// A fetcher whose answers tests script and count.
    pub(crate) struct ScriptedFetcher {
        pub(crate) answer: Mutex<Result<Vec<u8>, JwksError>>,
        pub(crate) calls: AtomicU64,
    }

    impl ScriptedFetcher {
        pub(crate) fn new(answer: Result<Vec<u8>, JwksError>) -> Arc<Self> {
            Arc::new(Self {
                answer: Mutex::new(answer),
                calls: AtomicU64::new(0),
            })
        }
        pub(crate) fn set(&self, answer: Result<Vec<u8>, JwksError>) {
            *self.answer.lock().unwrap() = answer;
        }
        pub(crate) fn calls(&self) -> u64 {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl JwksFetcher for ScriptedFetcher {
        fn fetch(&self) -> BoxFuture<'_, Result<Vec<u8>, JwksError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let answer = self.answer.lock().unwrap().clone();
            Box::pin(async move { answer })
        }
    }

    #[test]
    fn der_lengths_encode_long_and_short_forms() {
        let der = rsa_public_key_der(&[0x80; 256], &[1, 0, 1]);
        // SEQUENCE, long length of two bytes; INTEGER with a leading zero pad.
        assert_eq!(&der[..2], &[0x30, 0x82]);
        assert_eq!(&der[4..8], &[0x02, 0x82, 0x01, 0x01]);
        assert_eq!(der[8], 0);
        let tail = &der[der.len() - 5..];
        assert_eq!(tail, &[0x02, 0x03, 1, 0, 1]);
    }

    #[test]
    fn garbage_documents_are_errors() {
        for body in [
            &b"not json"[..],
            b"{}",
            b"{\"keys\": []}",
            b"{\"keys\": [{\"kty\": \"EC\", \"kid\": \"x\"}]}",
            b"[]",
        ] {
            assert!(
                matches!(parse_jwks(body), Err(JwksError::Garbage(_))),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn short_rsa_keys_are_skipped() {
        let n = URL_SAFE_NO_PAD.encode([0xc3u8; 128]);
        let body = format!(r#"{{"keys":[{{"kty":"RSA","kid":"k","n":"{n}","e":"AQAB"}}]}}"#);
        assert!(parse_jwks(body.as_bytes()).is_err());
    }
}
