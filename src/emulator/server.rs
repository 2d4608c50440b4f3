//! The emulator's HTTP server: `/oauth2/token`, the JWKS and the OpenID
//! configuration, shaped like a Cognito user pool's.

use crate::rules::cognito::{is_pool_id, jwks_uri_of};
use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

use super::SigningKey;

/// An app client known to the emulator.
#[derive(Clone)]
pub struct EmulatorClient {
    /// App client id.
    pub client_id: String,
    /// App client secret.
    pub secret: String,
    /// Further active secrets: Cognito allows two per app client while one is
    /// rotated (`AddUserPoolClientSecret`).
    pub other_secrets: Vec<String>,
    /// Custom scopes assigned to the app client.
    pub scopes: Vec<String>,
    /// Whether the client_credentials grant is enabled for it.
    pub grant_enabled: bool,
}

impl std::fmt::Debug for EmulatorClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatorClient")
            .field("client_id", &self.client_id)
            .field("secret", &"...")
            .field("scopes", &self.scopes)
            .field("grant_enabled", &self.grant_enabled)
            .finish()
    }
}

impl EmulatorClient {
    /// A client with the grant enabled.
    pub fn new(client_id: &str, secret: &str, scopes: &[&str]) -> Self {
        Self {
            client_id: client_id.to_owned(),
            secret: secret.to_owned(),
            other_secrets: Vec::new(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            grant_enabled: true,
        }
    }

    /// Whether `secret` is one of its active secrets (compared in constant time).
    fn accepts(&self, secret: &str) -> bool {
        if secret.is_empty() {
            return false;
        }
        let mut ok = self.secret.as_bytes().ct_eq(secret.as_bytes());
        for other in &self.other_secrets {
            ok |= other.as_bytes().ct_eq(secret.as_bytes());
        }
        ok.into()
    }

    /// Parses `ID:SECRET:SCOPE[,SCOPE...]` (the `--client` flag).
    pub fn parse(spec: &str) -> Result<Self, ClientSpecError> {
        let mut parts = spec.splitn(3, ':');
        let (Some(id), Some(secret), Some(scopes)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(ClientSpecError::Shape);
        };
        if id.is_empty() || secret.is_empty() {
            return Err(ClientSpecError::Empty);
        }
        let scopes: Vec<&str> = scopes.split(',').filter(|s| !s.is_empty()).collect();
        for scope in &scopes {
            crate::rules::scope::validate_scope(scope).map_err(|e| ClientSpecError::Scope {
                scope: (*scope).to_owned(),
                reason: e.to_string(),
            })?;
        }
        Ok(Self::new(id, secret, &scopes))
    }
}

/// Why a `--client` spec is not `ID:SECRET:SCOPE[,SCOPE...]` (the spec itself is
/// not repeated: it holds a secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientSpecError {
    /// Fewer than three `:`-separated parts.
    #[error("expected ID:SECRET:SCOPE[,SCOPE...]")]
    Shape,
    /// An empty id or secret.
    #[error("empty client id or secret")]
    Empty,
    /// A scope that is not one.
    #[error("{scope:?}: {reason}")]
    Scope {
        /// The scope.
        scope: String,
        /// Why not.
        reason: String,
    },
}

/// Emulator settings.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// The user pool id in paths and in `iss`.
    pub pool_id: String,
    /// Access-token lifetime in seconds (Cognito's default: 3600).
    pub expires_in: u64,
    /// Registered app clients.
    pub clients: Vec<EmulatorClient>,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            pool_id: "us-east-1_Emulated1".into(),
            expires_in: 3600,
            clients: Vec::new(),
        }
    }
}

struct EmuState {
    pool_id: String,
    issuer: String,
    base: String,
    /// Published keys; the last one signs.
    keys: RwLock<Vec<Arc<SigningKey>>>,
    clients: RwLock<HashMap<String, EmulatorClient>>,
    expires_in: AtomicU64,
    token_requests: AtomicU64,
    tokens_issued: AtomicU64,
}

/// A running emulator. Stops when [`Emulator::shutdown`] is called or it is dropped.
pub struct Emulator {
    state: Arc<EmuState>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("addr", &self.addr)
            .field("issuer", &self.state.issuer)
            .finish_non_exhaustive()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Emulator {
    /// Binds `listen` (use port 0 for a free one) and serves in the background.
    pub async fn start(listen: SocketAddr, config: EmulatorConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        Self::serve(listener, config).await
    }

    /// Serves on an already bound listener.
    /// Refuses a `pool_id` that is not a user pool id (`us-east-1_Emulated1`):
    /// validators derive the issuer from it as from Cognito's.
    pub async fn serve(listener: TcpListener, config: EmulatorConfig) -> std::io::Result<Self> {
        if !is_pool_id(&config.pool_id) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{:?} is not a user pool id such as us-east-1_Emulated1",
                    config.pool_id
                ),
            ));
        }
        let addr = listener.local_addr()?;
        let base = format!("http://{addr}");
        let state = Arc::new(EmuState {
            issuer: format!("{base}/{}", config.pool_id),
            pool_id: config.pool_id,
            base,
            keys: RwLock::new(vec![Arc::new(SigningKey::generate_thumbprinted())]),
            clients: RwLock::new(
                config
                    .clients
                    .into_iter()
                    .map(|c| (c.client_id.clone(), c))
                    .collect(),
            ),
            expires_in: AtomicU64::new(config.expires_in),
            token_requests: AtomicU64::new(0),
            tokens_issued: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/oauth2/token", post(token))
            .route("/{pool}/.well-known/jwks.json", get(jwks))
            .route(
                "/{pool}/.well-known/openid-configuration",
                get(openid_configuration),
            )
            .with_state(state.clone());
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .await;
        });
        Ok(Self {
            state,
            addr,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// The pool id.
    pub fn pool_id(&self) -> &str {
        &self.state.pool_id
    }
    /// `iss` of the tokens: `http://HOST:PORT/{pool_id}`.
    pub fn issuer(&self) -> &str {
        &self.state.issuer
    }
    /// The token endpoint URL.
    pub fn token_endpoint(&self) -> String {
        format!("{}/oauth2/token", self.state.base)
    }
    /// The JWKS URL.
    pub fn jwks_uri(&self) -> String {
        jwks_uri_of(&self.state.issuer)
    }
    /// Token requests received (any outcome).
    pub fn token_requests(&self) -> u64 {
        self.state.token_requests.load(Ordering::SeqCst)
    }
    /// Tokens issued.
    pub fn tokens_issued(&self) -> u64 {
        self.state.tokens_issued.load(Ordering::SeqCst)
    }
    /// Sets the lifetime of tokens issued from now on.
    pub fn set_expires_in(&self, secs: u64) {
        self.state.expires_in.store(secs, Ordering::SeqCst);
    }
    /// Adds or replaces an app client.
    pub fn upsert_client(&self, client: EmulatorClient) {
        let mut clients = self
            .state
            .clients
            .write()
            .unwrap_or_else(|p| p.into_inner());
        clients.insert(client.client_id.clone(), client);
    }
    /// Adds an active secret to an app client (`AddUserPoolClientSecret`).
    pub fn add_secret(&self, client_id: &str, secret: &str) {
        self.with_client(client_id, |c| c.other_secrets.push(secret.to_owned()));
    }
    /// Deletes an active secret of an app client (`DeleteUserPoolClientSecret`);
    /// when it was the primary one, the next becomes primary.
    pub fn delete_secret(&self, client_id: &str, secret: &str) {
        self.with_client(client_id, |c| {
            c.other_secrets.retain(|s| s != secret);
            if c.secret == secret {
                c.secret = if c.other_secrets.is_empty() {
                    String::new()
                } else {
                    c.other_secrets.remove(0)
                };
            }
        });
    }
    fn with_client(&self, client_id: &str, change: impl FnOnce(&mut EmulatorClient)) {
        let mut clients = self
            .state
            .clients
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get_mut(client_id) {
            change(c);
        }
    }
    /// Publishes a new key and signs with it from now on; older keys stay
    /// published (as Cognito keeps them). Returns the new `kid`.
    pub fn rotate_key(&self) -> String {
        let key = Arc::new(SigningKey::generate_thumbprinted());
        let kid = key.kid().to_owned();
        self.state
            .keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(key);
        kid
    }
    /// Stops publishing every key but the current signer.
    pub fn retire_old_keys(&self) {
        let mut keys = self.state.keys.write().unwrap_or_else(|p| p.into_inner());
        let last = keys.pop();
        keys.clear();
        keys.extend(last);
    }
    /// Signs arbitrary claims with the current key (tests forge tokens with it).
    pub fn sign(&self, claims: &Value) -> String {
        self.state.signer().sign(claims)
    }
    /// Issues an access token as `/oauth2/token` would.
    pub fn issue(&self, client_id: &str, scopes: &[String]) -> String {
        self.state.issue(client_id, scopes)
    }

    /// Stops the server and waits for it.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl EmuState {
    fn signer(&self) -> Arc<SigningKey> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        keys.last().cloned().expect("the emulator always has a key")
    }

    fn issue(&self, client_id: &str, scopes: &[String]) -> String {
        let now = now();
        let mut jti = [0u8; 16];
        let _ = aws_lc_rs::rand::fill(&mut jti);
        let jti = jti.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let claims = json!({
            "sub": client_id,
            "token_use": "access",
            "scope": scopes.join(" "),
            "auth_time": now,
            "iss": self.issuer,
            "exp": now + self.expires_in.load(Ordering::SeqCst),
            "iat": now,
            "version": 2,
            "jti": format!("{}-{}-{}-{}-{}", &jti[..8], &jti[8..12], &jti[12..16], &jti[16..20], &jti[20..]),
            "client_id": client_id,
        });
        self.tokens_issued.fetch_add(1, Ordering::SeqCst);
        self.signer().sign(&claims)
    }
}

fn oauth_error(code: &str) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": code}))).into_response()
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    crate::http::decode_basic(rest)
}

async fn token(State(state): State<Arc<EmuState>>, headers: HeaderMap, body: Bytes) -> Response {
    state.token_requests.fetch_add(1, Ordering::SeqCst);
    let form_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim()
                .to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        });
    if !form_type {
        return oauth_error("invalid_request");
    }
    let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    let credentials = basic_credentials(&headers).or_else(|| {
        Some((
            form.get("client_id")?.clone(),
            form.get("client_secret")?.clone(),
        ))
    });
    let Some((client_id, secret)) = credentials else {
        return oauth_error("invalid_client");
    };
    let client = {
        let clients = state.clients.read().unwrap_or_else(|p| p.into_inner());
        clients.get(&client_id).cloned()
    };
    let Some(client) = client.filter(|c| c.accepts(&secret)) else {
        return oauth_error("invalid_client");
    };
    match form.get("grant_type").map(String::as_str) {
        None => return oauth_error("invalid_request"),
        Some("client_credentials") => {}
        Some(_) => return oauth_error("unsupported_grant_type"),
    }
    if !client.grant_enabled {
        return oauth_error("unauthorized_client");
    }
    let scopes: Vec<String> = match form.get("scope") {
        None => client.scopes.clone(),
        Some(s) => {
            let requested: BTreeSet<&str> = s.split(' ').filter(|s| !s.is_empty()).collect();
            if requested
                .iter()
                .any(|r| !client.scopes.iter().any(|c| c == r))
            {
                return oauth_error("invalid_scope");
            }
            requested.into_iter().map(str::to_owned).collect()
        }
    };
    let access_token = state.issue(&client.client_id, &scopes);
    (
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({
            "access_token": access_token,
            "expires_in": state.expires_in.load(Ordering::SeqCst),
            "token_type": "Bearer",
        })),
    )
        .into_response()
}

async fn jwks(State(state): State<Arc<EmuState>>, Path(pool): Path<String>) -> Response {
    if pool != state.pool_id {
        return StatusCode::NOT_FOUND.into_response();
    }
    let keys: Vec<Value> = state
        .keys
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|k| k.jwk())
        .collect();
    Json(json!({ "keys": keys })).into_response()
}

async fn openid_configuration(
    State(state): State<Arc<EmuState>>,
    Path(pool): Path<String>,
) -> Response {
    if pool != state.pool_id {
        return StatusCode::NOT_FOUND.into_response();
    }
    Json(json!({
        "issuer": state.issuer,
        "jwks_uri": jwks_uri_of(&state.issuer),
        "token_endpoint": format!("{}/oauth2/token", state.base),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["token"],
        "subject_types_supported": ["public"],
    }))
    .into_response()
}
