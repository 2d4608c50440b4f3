//! The tonic `Gateway` service: thin. Extracts credentials, calls the broker or the
//! validator, and is the only place that turns their errors into `tonic::Status`.
//!
//! [`GatewayRoutes`] is what the server mounts: the generated `GatewayServer` for
//! GetToken, and Validate answered from encodings kept per verified token (the
//! answer for a token seen before is the same bytes every time).

use std::{
    convert::Infallible,
    hash::{Hash, Hasher},
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use prost::Message as _;
use secrecy::SecretString;
use tonic::{
    Code, Request, Response, Status,
    body::Body,
    codegen::BoxFuture,
    metadata::MetadataMap,
    server::{NamedService, UnaryService},
};

use crate::{
    broker::{Broker, BrokerError, Credentials},
    jwt::{Claims, JwtValidator, Rejection},
    proto::{Encoded, gateway::v1 as pb},
    registry,
    telemetry::RpcStats,
};

/// Most `required_scopes` in one Validate request.
const MAX_REQUIRED_SCOPES: usize = 50;

/// Most encoded Validate answers kept (each ~1.5 KB with its claims).
const ANSWERS_KEPT: u64 = 4096;

/// The `m2m.gateway.v1.Gateway` implementation.
#[derive(Clone)]
pub struct GatewayService {
    broker: Broker,
    validator: JwtValidator,
    rpc: Arc<RpcStats>,
    /// The encoded `ValidateResponse` of verified claims, by the claims the
    /// validator's cache hands out.
    answers: Arc<quick_cache::sync::Cache<ClaimsRef, Bytes>>,
}

impl std::fmt::Debug for GatewayService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayService")
            .field("broker", &self.broker)
            .field("validator", &self.validator)
            .field("answers", &self.answers.len())
            .finish_non_exhaustive()
    }
}

/// What a call's log line says beyond its status.
#[derive(Default)]
struct CallNote {
    client_id: String,
    /// Why Validate answered `valid: false`.
    rejection: Option<Rejection>,
}

/// Verified claims compared by identity. The key holds its `Arc`, so the address
/// cannot be reused by other claims while the entry lives.
#[derive(Clone)]
struct ClaimsRef(Arc<Claims>);

impl PartialEq for ClaimsRef {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ClaimsRef {}

impl Hash for ClaimsRef {
    fn hash<H: Hasher>(&self, state: &mut H) {
        std::ptr::hash(Arc::as_ptr(&self.0), state);
    }
}

impl GatewayService {
    /// A service over a broker and a validator, counting calls into `rpc`.
    pub fn new(broker: Broker, validator: JwtValidator, rpc: Arc<RpcStats>) -> Self {
        Self {
            broker,
            validator,
            rpc,
            answers: Arc::new(quick_cache::sync::Cache::new(ANSWERS_KEPT as usize)),
        }
    }

    /// Mounts the service for a server, refusing requests over `max_message_bytes`.
    pub fn into_routes(self, max_message_bytes: usize) -> GatewayRoutes {
        let service = Arc::new(self);
        GatewayRoutes {
            generated: pb::gateway_server::GatewayServer::from_arc(service.clone())
                .max_decoding_message_size(max_message_bytes),
            service,
            max_message_bytes,
        }
    }

    /// Validate, answered as encoded bytes (the one implementation behind both
    /// routes).
    async fn validate_encoded(
        &self,
        request: Request<pb::ValidateRequest>,
    ) -> Result<Response<Encoded>, Status> {
        let started = Instant::now();
        let mut note = CallNote::default();
        let result = self.validate_inner(request, &mut note).await;
        self.finish(1, started, &note, &result);
        result
    }

    /// The encoded answer for verified claims, made once per cached verification.
    fn valid_answer(&self, claims: &Arc<Claims>) -> Encoded {
        let key = ClaimsRef(Arc::clone(claims));
        if let Some(bytes) = self.answers.get(&key) {
            return Encoded(bytes);
        }
        let answer = Encoded::of(&pb::ValidateResponse {
            valid: true,
            rejection: pb::Rejection::Unspecified as i32,
            detail: String::new(),
            claims: Some(claims_to_proto(claims)),
        });
        self.answers.insert(key, answer.0.clone());
        answer
    }

    /// Counts the call and logs it (never a token or a secret): at `info` when it
    /// failed or a token was rejected, at `debug` when it succeeded (the routine
    /// case, counted by the metrics; `RUST_LOG=info,m2m_gateway::rpc=debug` logs
    /// every call).
    fn finish<T>(
        &self,
        method: usize,
        started: Instant,
        note: &CallNote,
        result: &Result<T, Status>,
    ) {
        let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
        let latency = started.elapsed();
        self.rpc.record(method, code, latency);
        // The client id comes from the caller: log it only when it looks like one.
        let client_id = if registry::is_valid_client_id(&note.client_id) {
            note.client_id.as_str()
        } else {
            "-"
        };
        let method = crate::telemetry::METHODS[method];
        let latency_us = latency.as_micros() as u64;
        match (code, note.rejection) {
            (Code::Ok, None) => tracing::debug!(
                target: "m2m_gateway::rpc",
                method,
                status = ?code,
                latency_us,
                client_id,
                "rpc"
            ),
            (_, rejection) => tracing::info!(
                target: "m2m_gateway::rpc",
                method,
                status = ?code,
                rejection = rejection.map(Rejection::as_str),
                latency_us,
                client_id,
                "rpc"
            ),
        }
    }

    async fn get_token_inner(
        &self,
        request: Request<pb::GetTokenRequest>,
        note: &mut CallNote,
    ) -> Result<Response<pb::GetTokenResponse>, Status> {
        let credentials = credentials(request.metadata(), request.get_ref())?;
        note.client_id.clone_from(&credentials.client_id);
        let req = request.into_inner();
        let token = self
            .broker
            .get_token(&credentials, &req.scopes)
            .await
            .map_err(|e| broker_status(&e))?;
        Ok(Response::new(pb::GetTokenResponse {
            access_token: token.access_token.expose().to_owned(),
            token_type: "Bearer".to_owned(),
            expires_in: i64::try_from(token.expires_in).unwrap_or(i64::MAX),
            scopes: token.scopes,
        }))
    }

    async fn validate_inner(
        &self,
        request: Request<pb::ValidateRequest>,
        note: &mut CallNote,
    ) -> Result<Response<Encoded>, Status> {
        let req = request.into_inner();
        let token = strip_bearer(&req.token);
        if token.is_empty() {
            return Err(Status::invalid_argument("token is empty"));
        }
        if req.required_scopes.len() > MAX_REQUIRED_SCOPES {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_REQUIRED_SCOPES} required_scopes"
            )));
        }
        for (i, scope) in req.required_scopes.iter().enumerate() {
            registry::validate_scope(scope)
                .map_err(|e| Status::invalid_argument(format!("required_scopes[{i}]: {e}")))?;
        }
        let answer = match self.validator.validate(token, &req.required_scopes).await {
            Ok(claims) => {
                note.client_id.push_str(claims.client_id());
                self.valid_answer(&claims)
            }
            Err(invalid) => {
                note.rejection = Some(invalid.rejection);
                Encoded::of(&pb::ValidateResponse {
                    valid: false,
                    rejection: rejection_to_proto(invalid.rejection) as i32,
                    detail: invalid.detail,
                    claims: None,
                })
            }
        };
        Ok(Response::new(answer))
    }
}

const VALIDATE_PATH: &str = "/m2m.gateway.v1.Gateway/Validate";

/// The `m2m.gateway.v1.Gateway` service as a server mounts it
/// ([`GatewayService::into_routes`]): Validate sends its encoded answer as is,
/// everything else goes to the generated `GatewayServer`.
#[derive(Debug, Clone)]
pub struct GatewayRoutes {
    service: Arc<GatewayService>,
    generated: pb::gateway_server::GatewayServer<GatewayService>,
    max_message_bytes: usize,
}

impl NamedService for GatewayRoutes {
    const NAME: &'static str =
        <pb::gateway_server::GatewayServer<GatewayService> as NamedService>::NAME;
}

impl tower::Service<http::Request<Body>> for GatewayRoutes {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() != VALIDATE_PATH {
            return self.generated.call(req);
        }
        let method = ValidateMethod(self.service.clone());
        let limit = self.max_message_bytes;
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<Encoded, pb::ValidateRequest>::default();
            let mut grpc =
                tonic::server::Grpc::new(codec).apply_max_message_size_config(Some(limit), None);
            Ok(grpc.unary(method, req).await)
        })
    }
}

struct ValidateMethod(Arc<GatewayService>);

impl UnaryService<pb::ValidateRequest> for ValidateMethod {
    type Response = Encoded;
    type Future = BoxFuture<Response<Encoded>, Status>;

    fn call(&mut self, request: Request<pb::ValidateRequest>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.validate_encoded(request).await })
    }
}

/// The one message for every authentication failure: no client enumeration.
const BAD_CREDENTIALS: &str = "invalid client credentials";

/// Maps a broker error onto the DESIGN status table.
pub fn broker_status(e: &BrokerError) -> Status {
    match e {
        BrokerError::Unauthenticated => Status::unauthenticated(BAD_CREDENTIALS),
        BrokerError::InvalidArgument(m) => Status::invalid_argument(m.clone()),
        BrokerError::PermissionDenied(m) => Status::permission_denied(m.clone()),
        BrokerError::FailedPrecondition(m) => Status::failed_precondition(m.clone()),
        BrokerError::ResourceExhausted(m) => Status::resource_exhausted(m.clone()),
        BrokerError::Unavailable(m) => Status::unavailable(m.clone()),
        BrokerError::Internal(m) => Status::internal(m.clone()),
    }
}

/// The proto value of a [`Rejection`].
pub fn rejection_to_proto(r: Rejection) -> pb::Rejection {
    match r {
        Rejection::Malformed => pb::Rejection::Malformed,
        Rejection::UnsupportedAlgorithm => pb::Rejection::UnsupportedAlgorithm,
        Rejection::UnknownKey => pb::Rejection::UnknownKey,
        Rejection::BadSignature => pb::Rejection::BadSignature,
        Rejection::Expired => pb::Rejection::Expired,
        Rejection::NotYetValid => pb::Rejection::NotYetValid,
        Rejection::WrongIssuer => pb::Rejection::WrongIssuer,
        Rejection::WrongTokenUse => pb::Rejection::WrongTokenUse,
        Rejection::ClientNotAllowed => pb::Rejection::ClientNotAllowed,
        Rejection::InsufficientScope => pb::Rejection::InsufficientScope,
        Rejection::KeysUnavailable => pb::Rejection::KeysUnavailable,
    }
}

/// The [`Rejection`] of a proto value (`None` for UNSPECIFIED or unknown values).
pub fn rejection_from_proto(value: i32) -> Option<Rejection> {
    Rejection::ALL
        .into_iter()
        .find(|r| rejection_to_proto(*r) as i32 == value)
}

/// Credentials from the request body or from `authorization: Basic` metadata.
fn credentials(metadata: &MetadataMap, req: &pb::GetTokenRequest) -> Result<Credentials, Status> {
    let from_header = match metadata.get("authorization") {
        None => None,
        Some(value) => {
            let value = value
                .to_str()
                .map_err(|_| Status::invalid_argument("authorization metadata is not ASCII"))?;
            match value.split_once(' ') {
                Some((scheme, rest)) if scheme.eq_ignore_ascii_case("basic") => {
                    Some(parse_basic(rest.trim())?)
                }
                // Another scheme (e.g. Bearer) carries no client credentials.
                _ => None,
            }
        }
    };
    let in_body = !req.client_id.is_empty() || !req.client_secret.is_empty();
    match (from_header, in_body) {
        (Some((id, secret)), true) => {
            let same_id = req.client_id.is_empty() || req.client_id == id;
            let same_secret = req.client_secret.is_empty() || req.client_secret == secret;
            if !(same_id && same_secret) {
                return Err(Status::invalid_argument(
                    "credentials in both the request and the authorization metadata, and they differ",
                ));
            }
            Ok(Credentials {
                client_id: id,
                secret: SecretString::from(secret),
            })
        }
        (Some((id, secret)), false) => Ok(Credentials {
            client_id: id,
            secret: SecretString::from(secret),
        }),
        (None, true) if !req.client_id.is_empty() && !req.client_secret.is_empty() => {
            Ok(Credentials {
                client_id: req.client_id.clone(),
                secret: SecretString::from(req.client_secret.clone()),
            })
        }
        _ => Err(Status::unauthenticated(BAD_CREDENTIALS)),
    }
}

fn parse_basic(encoded: &str) -> Result<(String, String), Status> {
    let bad = || {
        Status::invalid_argument(
            "malformed Basic authorization: need base64(client_id:client_secret)",
        )
    };
    crate::http::decode_basic(encoded)
        .filter(|(id, secret)| !id.is_empty() && !secret.is_empty())
        .ok_or_else(bad)
}

/// Converts verified claims into the proto message (`all` as a `Struct`).
pub fn claims_to_proto(c: &Claims) -> pb::Claims {
    pb::Claims {
        client_id: c.client_id().to_owned(),
        subject: c.subject().to_owned(),
        issuer: c.issuer().to_owned(),
        scopes: c.scopes().map(str::to_owned).collect(),
        token_use: c.token_use().to_owned(),
        jti: c.jti().to_owned(),
        issued_at: c.issued_at(),
        expires_at: c.expires_at(),
        all: Some(json_object_to_struct(c.all())),
    }
}

fn json_object_to_struct(map: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .into_iter()
            .map(|(k, v)| (k, json_to_value(v)))
            .collect(),
    }
}

fn json_to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        J::String(s) => Kind::StringValue(s),
        J::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(json_to_value).collect(),
        }),
        J::Object(o) => Kind::StructValue(json_object_to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Strips a leading `Bearer ` (any case) and surrounding whitespace.
pub fn strip_bearer(token: &str) -> &str {
    let t = token.trim();
    match (t.get(..6), t.as_bytes().get(6)) {
        (Some(scheme), None) if scheme.eq_ignore_ascii_case("bearer") => "",
        (Some(scheme), Some(b))
            if scheme.eq_ignore_ascii_case("bearer") && b.is_ascii_whitespace() =>
        {
            t[6..].trim_start()
        }
        _ => t,
    }
}

#[tonic::async_trait]
impl pb::gateway_server::Gateway for GatewayService {
    async fn get_token(
        &self,
        request: Request<pb::GetTokenRequest>,
    ) -> Result<Response<pb::GetTokenResponse>, Status> {
        let started = Instant::now();
        let mut note = CallNote::default();
        let result = self.get_token_inner(request, &mut note).await;
        self.finish(0, started, &note, &result);
        result
    }

    async fn validate(
        &self,
        request: Request<pb::ValidateRequest>,
    ) -> Result<Response<pb::ValidateResponse>, Status> {
        // Served by GatewayRoutes; this route is for a GatewayServer built directly.
        let (metadata, answer, extensions) = self.validate_encoded(request).await?.into_parts();
        let answer = pb::ValidateResponse::decode(answer.0)
            .map_err(|e| Status::internal(format!("encoding a Validate answer: {e}")))?;
        Ok(Response::from_parts(metadata, answer, extensions))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::{Engine as _, engine::general_purpose::STANDARD};

    fn req(id: &str, secret: &str) -> pb::GetTokenRequest {
        pb::GetTokenRequest {
            client_id: id.into(),
            client_secret: secret.into(),
            scopes: vec![],
        }
    }

    fn basic(id_secret: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert(
            "authorization",
            format!("Basic {}", STANDARD.encode(id_secret))
                .parse()
                .unwrap(),
        );
        m
    }

    #[test]
    fn credentials_from_body_or_basic() {
        let c = credentials(&MetadataMap::new(), &req("a", "s")).unwrap();
        assert_eq!(c.client_id, "a");
        let c = credentials(&basic("a:s:with:colons"), &req("", "")).unwrap();
        assert_eq!(c.client_id, "a");
        assert!(!format!("{c:?}").contains("with:colons"));
        // Both, agreeing.
        assert!(credentials(&basic("a:s"), &req("a", "s")).is_ok());
        assert!(credentials(&basic("a:s"), &req("a", "")).is_ok());
    }

    #[test]
    fn conflicting_or_malformed_credentials() {
        let code = |m: &MetadataMap, r: &pb::GetTokenRequest| credentials(m, r).unwrap_err().code();
        assert_eq!(
            code(&basic("a:s"), &req("b", "s")),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            code(&basic("a:s"), &req("a", "t")),
            tonic::Code::InvalidArgument
        );
        let mut m = MetadataMap::new();
        m.insert("authorization", "Basic !!!".parse().unwrap());
        assert_eq!(code(&m, &req("", "")), tonic::Code::InvalidArgument);
        assert_eq!(
            code(&basic("no-colon"), &req("", "")),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            code(&basic(":s"), &req("", "")),
            tonic::Code::InvalidArgument
        );
        // Nothing, or half of it: the one UNAUTHENTICATED message.
        for r in [req("", ""), req("a", ""), req("", "s")] {
            let s = credentials(&MetadataMap::new(), &r).unwrap_err();
            assert_eq!(
                (s.code(), s.message()),
                (tonic::Code::Unauthenticated, BAD_CREDENTIALS)
            );
        }
    }

    #[test]
    fn bearer_prefix_is_tolerated() {
        assert_eq!(strip_bearer("Bearer abc"), "abc");
        assert_eq!(strip_bearer("bearer  abc "), "abc");
        assert_eq!(strip_bearer("abc"), "abc");
        assert_eq!(strip_bearer("Bearer "), "");
        assert_eq!(strip_bearer("BEARER\tabc"), "abc");
        assert_eq!(strip_bearer("Bearerabc"), "Bearerabc");
    }

    #[test]
    fn every_rejection_maps_to_a_distinct_proto_value() {
        let mut seen = std::collections::HashSet::new();
        for r in Rejection::ALL {
            let p = rejection_to_proto(r);
            assert_ne!(p, pb::Rejection::Unspecified);
            assert!(seen.insert(p as i32));
            // Same order as the proto enum: the snake-case names agree.
            assert_eq!(
                p.as_str_name().to_ascii_lowercase(),
                format!("rejection_{}", r.as_str())
            );
        }
    }
}
