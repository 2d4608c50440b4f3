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
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::{
    broker::{AccessToken, Broker, BrokerError, Credentials},
    jwt::{Claims, JwtValidator, Rejection},
    proto::{Encoded, gateway::v1 as pb},
    registry,
    telemetry::RpcStats,
};

/// Most `required_scopes` in one Validate request.
const MAX_REQUIRED_SCOPES: usize = 50;

/// Most encoded answers kept per method (each ~0.5–0.8 KB, plus the claims or the
/// token it keeps alive).
const ANSWERS_KEPT: usize = 512;

/// The `m2m.gateway.v1.Gateway` implementation.
#[derive(Clone)]
pub struct GatewayService {
    broker: Broker,
    validator: JwtValidator,
    rpc: Arc<RpcStats>,
    /// The encoded `ValidateResponse` of verified claims, by the claims the
    /// validator's cache hands out.
    answers: Arc<quick_cache::sync::Cache<ByAddress<Claims>, Bytes>>,
    /// The fixed part of GetToken answers, by the token the broker's cache holds.
    token_answers: Arc<quick_cache::sync::Cache<ByAddress<str>, GetTokenAnswer>>,
}

impl std::fmt::Debug for GatewayService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayService")
            .field("broker", &self.broker)
            .field("validator", &self.validator)
            .field("answers", &self.answers.len())
            .field("token_answers", &self.token_answers.len())
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

/// A shared value compared by identity (memo keys). The key holds its `Arc`, so
/// the address cannot be reused by another value while the entry lives.
struct ByAddress<T: ?Sized>(Arc<T>);

impl<T: ?Sized> Clone for ByAddress<T> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<T: ?Sized> PartialEq for ByAddress<T> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl<T: ?Sized> Eq for ByAddress<T> {}

impl<T: ?Sized> Hash for ByAddress<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        std::ptr::hash(Arc::as_ptr(&self.0).cast::<()>(), state);
    }
}

/// A GetToken answer: what stays the same for a cached token (fields 1, 2 and 4)
/// encoded once, and the seconds left, encoded per call. The bytes are exactly
/// prost's encoding of the same `GetTokenResponse`.
#[derive(Clone, Default, PartialEq)]
struct GetTokenAnswer {
    /// `access_token` and `token_type`.
    head: Bytes,
    expires_in: i64,
    /// `scopes`.
    tail: Bytes,
}

impl GetTokenAnswer {
    fn new(token: &AccessToken, scopes: &[String], expires_in: i64) -> Self {
        let head = pb::GetTokenResponse {
            access_token: token.expose().to_owned(),
            token_type: "Bearer".to_owned(),
            ..Default::default()
        };
        let tail = pb::GetTokenResponse {
            scopes: scopes.to_vec(),
            ..Default::default()
        };
        Self {
            head: head.encode_to_vec().into(),
            expires_in,
            tail: tail.encode_to_vec().into(),
        }
    }
}

impl std::fmt::Debug for GetTokenAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GetTokenAnswer")
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

impl prost::Message for GetTokenAnswer {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        buf.put_slice(&self.head);
        if self.expires_in != 0 {
            prost::encoding::int64::encode(3, &self.expires_in, buf);
        }
        buf.put_slice(&self.tail);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // Sent only.
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        let seconds = if self.expires_in != 0 {
            prost::encoding::int64::encoded_len(3, &self.expires_in)
        } else {
            0
        };
        self.head.len() + seconds + self.tail.len()
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

impl GatewayService {
    /// A service over a broker and a validator, counting calls into `rpc`.
    pub fn new(broker: Broker, validator: JwtValidator, rpc: Arc<RpcStats>) -> Self {
        Self {
            broker,
            validator,
            rpc,
            answers: Arc::new(quick_cache::sync::Cache::new(ANSWERS_KEPT)),
            token_answers: Arc::new(quick_cache::sync::Cache::new(ANSWERS_KEPT)),
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
        let key = ByAddress(Arc::clone(claims));
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
            (_, rejection) => {
                let reason = rejection.map(Rejection::as_str);
                // Counted always (above); logged at a bounded rate per kind.
                if let Some(suppressed) = self
                    .rpc
                    .refusals
                    .admit((method, code as i32, reason), std::time::Instant::now())
                {
                    tracing::info!(
                        target: "m2m_gateway::rpc",
                        method,
                        status = ?code,
                        rejection = reason,
                        latency_us,
                        client_id,
                        suppressed,
                        "rpc"
                    );
                }
            }
        }
    }

    /// GetToken, answered with the fixed part of the answer encoded once per
    /// cached token (the one implementation behind both routes).
    async fn get_token_encoded(
        &self,
        request: Request<pb::GetTokenRequest>,
    ) -> Result<Response<GetTokenAnswer>, Status> {
        let started = Instant::now();
        let mut note = CallNote::default();
        let result = self.get_token_inner(request, &mut note).await;
        self.finish(0, started, &note, &result);
        result
    }

    async fn get_token_inner(
        &self,
        request: Request<pb::GetTokenRequest>,
        note: &mut CallNote,
    ) -> Result<Response<GetTokenAnswer>, Status> {
        let (metadata, _, mut req) = request.into_parts();
        let credentials = credentials(&metadata, &mut req)?;
        let token = self.broker.get_token(&credentials, &req.scopes).await;
        note.client_id = credentials.client_id;
        let token = token.map_err(|e| broker_status(&e))?;
        let expires_in = i64::try_from(token.expires_in).unwrap_or(i64::MAX);
        let key = ByAddress(Arc::clone(token.access_token.shared()));
        let answer = match self.token_answers.get(&key) {
            Some(fixed) => GetTokenAnswer {
                expires_in,
                ..fixed
            },
            None => {
                let answer = GetTokenAnswer::new(&token.access_token, &token.scopes, expires_in);
                self.token_answers.insert(key, answer.clone());
                answer
            }
        };
        Ok(Response::new(answer))
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

const GET_TOKEN_PATH: &str = "/m2m.gateway.v1.Gateway/GetToken";
const VALIDATE_PATH: &str = "/m2m.gateway.v1.Gateway/Validate";

/// The `m2m.gateway.v1.Gateway` service as a server mounts it
/// ([`GatewayService::into_routes`]): GetToken and Validate send answers encoded
/// ahead (per cached token, per verified token); any other method goes to the
/// generated `GatewayServer` (UNIMPLEMENTED).
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
        let service = self.service.clone();
        let limit = self.max_message_bytes;
        match req.uri().path() {
            GET_TOKEN_PATH => serve_unary(GetTokenMethod(service), req, limit),
            VALIDATE_PATH => serve_unary(ValidateMethod(service), req, limit),
            _ => self.generated.call(req),
        }
    }
}

/// One unary call through tonic, answering with an encoded message.
fn serve_unary<Req, M>(
    method: M,
    req: http::Request<Body>,
    limit: usize,
) -> BoxFuture<http::Response<Body>, Infallible>
where
    Req: prost::Message + Default + Send + 'static,
    M: UnaryService<Req> + Send + 'static,
    M::Response: prost::Message + Send + 'static,
    M::Future: Send,
{
    Box::pin(async move {
        let codec = tonic_prost::ProstCodec::<M::Response, Req>::default();
        let mut grpc =
            tonic::server::Grpc::new(codec).apply_max_message_size_config(Some(limit), None);
        Ok(grpc.unary(method, req).await)
    })
}

struct GetTokenMethod(Arc<GatewayService>);

impl UnaryService<pb::GetTokenRequest> for GetTokenMethod {
    type Response = GetTokenAnswer;
    type Future = BoxFuture<Response<GetTokenAnswer>, Status>;

    fn call(&mut self, request: Request<pb::GetTokenRequest>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.get_token_encoded(request).await })
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
        BrokerError::TooManyFailedAttempts { retry_after }
        | BrokerError::UpstreamBudget { retry_after } => {
            // The standard machine-readable wait (google.rpc.RetryInfo) beside the
            // sentence for humans.
            Status::with_error_details(
                Code::ResourceExhausted,
                e.to_string(),
                ErrorDetails::with_retry_info(Some(*retry_after)),
            )
        }
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

/// Credentials from the request body (taken out of it) or from
/// `authorization: Basic` metadata.
fn credentials(
    metadata: &MetadataMap,
    req: &mut pb::GetTokenRequest,
) -> Result<Credentials, Status> {
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
                client_id: std::mem::take(&mut req.client_id),
                secret: SecretString::from(std::mem::take(&mut req.client_secret)),
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

/// An encoded answer as the proto message (for the generated routes).
fn decoded<M: prost::Message + Default>(
    answer: Response<impl prost::Message>,
) -> Result<Response<M>, Status> {
    let (metadata, answer, extensions) = answer.into_parts();
    let message = M::decode(answer.encode_to_vec().as_slice())
        .map_err(|e| Status::internal(format!("re-reading an encoded answer: {e}")))?;
    Ok(Response::from_parts(metadata, message, extensions))
}

/// Served by [`GatewayRoutes`]; these are for a `GatewayServer` built directly.
#[tonic::async_trait]
impl pb::gateway_server::Gateway for GatewayService {
    async fn get_token(
        &self,
        request: Request<pb::GetTokenRequest>,
    ) -> Result<Response<pb::GetTokenResponse>, Status> {
        decoded(self.get_token_encoded(request).await?)
    }

    async fn validate(
        &self,
        request: Request<pb::ValidateRequest>,
    ) -> Result<Response<pb::ValidateResponse>, Status> {
        decoded(self.validate_encoded(request).await?)
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
        let c = credentials(&MetadataMap::new(), &mut req("a", "s")).unwrap();
        assert_eq!(c.client_id, "a");
        let c = credentials(&basic("a:s:with:colons"), &mut req("", "")).unwrap();
        assert_eq!(c.client_id, "a");
        assert!(!format!("{c:?}").contains("with:colons"));
        // Both, agreeing.
        assert!(credentials(&basic("a:s"), &mut req("a", "s")).is_ok());
        assert!(credentials(&basic("a:s"), &mut req("a", "")).is_ok());
    }

    #[test]
    fn conflicting_or_malformed_credentials() {
        let code = |m: &MetadataMap, r: &pb::GetTokenRequest| {
            credentials(m, &mut r.clone()).unwrap_err().code()
        };
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
            let s = credentials(&MetadataMap::new(), &mut r.clone()).unwrap_err();
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
    fn limit_refusals_carry_retry_info() {
        use tonic_types::StatusExt as _;
        for e in [
            BrokerError::TooManyFailedAttempts {
                retry_after: std::time::Duration::from_secs(6),
            },
            BrokerError::UpstreamBudget {
                retry_after: std::time::Duration::from_millis(250),
            },
        ] {
            let status = broker_status(&e);
            assert_eq!(status.code(), Code::ResourceExhausted);
            let info = status.get_details_retry_info().expect("RetryInfo");
            assert_eq!(info.retry_delay, e.retry_after());
            assert!(
                status.message().contains("retry in"),
                "{}",
                status.message()
            );
        }
        let plain = broker_status(&BrokerError::ResourceExhausted("throttled".into()));
        assert!(plain.get_details_retry_info().is_none());
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

    mod answers {
        use std::{
            sync::atomic::{AtomicU64, Ordering},
            time::Duration,
        };

        use futures::future::BoxFuture;
        use serde_json::json;

        use super::super::*;
        use crate::{
            broker::{BrokerSettings, TokenEndpoint, TokenResponse, UpstreamError},
            config::ClientConfig,
            emulator::SigningKey,
            jwt::{KeySet, ManualClock, StaticJwks, ValidatorSettings},
            registry::Registry,
        };

        const ISS: &str = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Test123";
        const NOW: i64 = 1_800_000_000;

        /// Hands out `token-1`, `token-2`, ... valid for an hour.
        #[derive(Default)]
        struct Numbered(AtomicU64);

        impl TokenEndpoint for Numbered {
            fn client_credentials<'a>(
                &'a self,
                _client_id: &'a str,
                _secret: &'a SecretString,
                _scope: &'a str,
            ) -> BoxFuture<'a, Result<TokenResponse, UpstreamError>> {
                let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
                Box::pin(async move {
                    Ok(TokenResponse {
                        access_token: AccessToken::new(format!("token-{n}")),
                        expires_in: 3600,
                    })
                })
            }
            fn describe(&self) -> String {
                "numbered".into()
            }
        }

        struct Fixture {
            service: GatewayService,
            clock: ManualClock,
            key: SigningKey,
        }

        async fn fixture() -> Fixture {
            let key = SigningKey::generate("key-1");
            let jwks = json!({ "keys": [key.jwk()] }).to_string();
            let keys = Arc::new(KeySet::new(
                ISS,
                Arc::new(StaticJwks::new(jwks)),
                Duration::from_secs(10),
            ));
            keys.refresh().await.unwrap();
            let clock = ManualClock::new(NOW);
            let validator = JwtValidator::new(
                ISS,
                ["client-a".to_string()],
                keys,
                ValidatorSettings::default(),
            )
            .with_clock(Arc::new(clock.clone()));
            let registry = Registry::new(
                &[ClientConfig {
                    client_id: "client-a".into(),
                    name: "acme".into(),
                    allowed_scopes: vec!["orders/read".into(), "orders/write".into()],
                }],
                10,
            );
            let broker = Broker::new(
                registry,
                Arc::new(Numbered::default()),
                BrokerSettings::default(),
            );
            Fixture {
                service: GatewayService::new(broker, validator, Arc::default()),
                clock,
                key,
            }
        }

        fn token(key: &SigningKey) -> String {
            key.sign(&json!({
                "sub": "client-a", "client_id": "client-a", "token_use": "access",
                "scope": "orders/read orders/write", "iss": ISS,
                "iat": NOW - 10, "exp": NOW + 3600, "jti": "j-1",
                "custom": { "tenant": "t1" }
            }))
        }

        async fn validate(
            f: &Fixture,
            token: &str,
            scopes: &[&str],
        ) -> (Bytes, pb::ValidateResponse) {
            let request = Request::new(pb::ValidateRequest {
                token: token.into(),
                required_scopes: scopes.iter().map(|s| s.to_string()).collect(),
            });
            let bytes = f
                .service
                .validate_encoded(request)
                .await
                .unwrap()
                .into_inner()
                .0;
            let answer = pb::ValidateResponse::decode(bytes.clone()).unwrap();
            (bytes, answer)
        }

        #[tokio::test]
        async fn validate_answers_are_kept_but_every_check_runs_again() {
            let f = fixture().await;
            let token = token(&f.key);
            let (first, answer) = validate(&f, &token, &[]).await;
            assert!(answer.valid, "{answer:?}");
            let claims = answer.claims.as_ref().unwrap();
            assert_eq!(claims.client_id, "client-a");
            assert_eq!(claims.scopes, ["orders/read", "orders/write"]);
            assert!(claims.all.as_ref().unwrap().fields.contains_key("custom"));
            // The same bytes again, from the one kept answer.
            let (second, _) = validate(&f, &token, &["orders/read"]).await;
            assert_eq!(first, second);
            assert_eq!(f.service.answers.len(), 1);

            // A scope the token lacks: refused although an answer is kept.
            let (_, answer) = validate(&f, &token, &["orders/admin"]).await;
            assert!(!answer.valid);
            assert_eq!(answer.rejection, pb::Rejection::InsufficientScope as i32);
            assert!(answer.claims.is_none());

            // Expired since it was kept: refused.
            f.clock.set(NOW + 3600 + 60);
            let (_, answer) = validate(&f, &token, &[]).await;
            assert!(!answer.valid);
            assert_eq!(answer.rejection, pb::Rejection::Expired as i32);
        }

        #[tokio::test]
        async fn the_generated_routes_answer_the_same_messages() {
            use pb::gateway_server::Gateway as _;
            let f = fixture().await;
            let token = token(&f.key);
            let (_, encoded) = validate(&f, &token, &[]).await;
            let direct = f
                .service
                .validate(Request::new(pb::ValidateRequest {
                    token: token.clone(),
                    required_scopes: vec![],
                }))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(direct, encoded);

            let direct = f
                .service
                .get_token(Request::new(pb::GetTokenRequest {
                    client_id: "client-a".into(),
                    client_secret: "s".into(),
                    scopes: vec![],
                }))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(direct.access_token, "token-1");
            assert_eq!(direct.token_type, "Bearer");
            assert_eq!(direct.scopes, ["orders/read", "orders/write"]);
            assert!((3590..=3600).contains(&direct.expires_in), "{direct:?}");
        }

        #[tokio::test]
        async fn get_token_answers_keep_the_fixed_part_per_cached_token() {
            let f = fixture().await;
            let call = |scopes: &[&str]| {
                f.service
                    .get_token_encoded(Request::new(pb::GetTokenRequest {
                        client_id: "client-a".into(),
                        client_secret: "s".into(),
                        scopes: scopes.iter().map(|s| s.to_string()).collect(),
                    }))
            };
            let a = call(&[]).await.unwrap().into_inner();
            let b = call(&["orders/write", "orders/read"])
                .await
                .unwrap()
                .into_inner();
            assert_eq!((a.head.clone(), a.tail.clone()), (b.head, b.tail));
            assert_eq!(f.service.token_answers.len(), 1);
            // Another scope set is another cached token, with its own answer.
            let c = call(&["orders/read"]).await.unwrap().into_inner();
            assert_ne!(a.head, c.head);
            assert_eq!(f.service.token_answers.len(), 2);
            let decoded = pb::GetTokenResponse::decode(c.encode_to_vec().as_slice()).unwrap();
            assert_eq!(decoded.access_token, "token-2");
            assert_eq!(decoded.scopes, ["orders/read"]);
            // Refusals are not answers: nothing kept, the status as before.
            let refused = f
                .service
                .get_token_encoded(Request::new(pb::GetTokenRequest {
                    client_id: "client-a".into(),
                    client_secret: "s".into(),
                    scopes: vec!["orders/admin".into()],
                }))
                .await
                .unwrap_err();
            assert_eq!(refused.code(), Code::PermissionDenied);
            assert_eq!(f.service.token_answers.len(), 2);
        }

        #[test]
        fn get_token_answer_bytes_are_prost_bytes() {
            let token = AccessToken::new("header.payload.signature");
            for scopes in [
                vec![],
                vec!["a/b".to_string()],
                vec!["a/b".into(), "c/d".into()],
            ] {
                for expires_in in [0, 1, 127, 128, 3600, i64::MAX] {
                    let answer = GetTokenAnswer::new(&token, &scopes, expires_in);
                    let message = pb::GetTokenResponse {
                        access_token: token.expose().to_owned(),
                        token_type: "Bearer".into(),
                        expires_in,
                        scopes: scopes.clone(),
                    };
                    assert_eq!(answer.encoded_len(), message.encoded_len());
                    assert_eq!(answer.encode_to_vec(), message.encode_to_vec());
                }
            }
            let answer = GetTokenAnswer::new(&token, &[], 60);
            assert!(!format!("{answer:?}").contains("payload"));
        }
    }
}
