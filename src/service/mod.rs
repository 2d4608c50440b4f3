//! The tonic `Gateway` service: thin. Extracts credentials, calls the broker or the
//! validator, and is the only place that turns their errors into `tonic::Status`.
//! Served by the generated `GatewayServer`; counting and logging calls is
//! [`crate::calls::CallLayer`]'s.

mod watch;

use std::sync::Arc;

use secrecy::SecretString;
use tonic::{Request, Response, Status, metadata::MetadataMap};

use crate::{
    broker::{Broker, BrokerError, Credentials},
    calls::CallNote,
    jwt::CognitoValidator,
    proto::gateway::v1 as pb,
    registry, status,
};

pub use watch::{UpdateStream, WATCH_HEARTBEAT};

/// Most `required_scopes` in one Validate request.
const MAX_REQUIRED_SCOPES: usize = 50;

/// The `m2m.gateway.v1.Gateway` implementation.
#[derive(Debug, Clone)]
pub struct GatewayService {
    broker: Broker,
    validator: CognitoValidator,
    /// This process's run of revocation-list versions (WatchRevocations).
    epoch: Arc<str>,
    /// True once the gateway drains: WatchRevocations streams end.
    draining: Option<tokio::sync::watch::Receiver<bool>>,
}

impl GatewayService {
    /// A service over a broker and a validator (whose revocations, if any,
    /// WatchRevocations streams).
    pub fn new(broker: Broker, validator: CognitoValidator) -> Self {
        Self {
            broker,
            validator,
            epoch: Arc::from(watch::new_epoch()),
            draining: None,
        }
    }

    /// Ends WatchRevocations streams once `draining` turns true (a gateway
    /// shutting down must not wait for its watchers).
    pub fn draining(mut self, draining: tokio::sync::watch::Receiver<bool>) -> Self {
        self.draining = Some(draining);
        self
    }

    /// The generated server for it, refusing messages over `max_message_bytes`.
    pub fn into_server(self, max_message_bytes: usize) -> pb::gateway_server::GatewayServer<Self> {
        pb::gateway_server::GatewayServer::new(self).max_decoding_message_size(max_message_bytes)
    }
}

#[tonic::async_trait]
impl pb::gateway_server::Gateway for GatewayService {
    async fn get_token(
        &self,
        request: Request<pb::GetTokenRequest>,
    ) -> Result<Response<pb::GetTokenResponse>, Status> {
        let note = CallNote::of(request.extensions());
        let source = request.remote_addr().map(|a| a.ip());
        let (metadata, _, mut req) = request.into_parts();
        let credentials = credentials(&metadata, &mut req)?;
        if let Some(note) = &note {
            note.client_id(&credentials.client_id);
        }
        let token = self
            .broker
            .get_token_from(&credentials, &req.scopes, source)
            .await
            .map_err(|e| status::broker_status(&e))?;
        Ok(Response::new(pb::GetTokenResponse {
            access_token: token.access_token.expose().to_owned(),
            token_type: "Bearer".to_owned(),
            expires_in: i64::try_from(token.expires_in).unwrap_or(i64::MAX),
            scopes: token.scopes.to_vec(),
        }))
    }

    async fn validate(
        &self,
        request: Request<pb::ValidateRequest>,
    ) -> Result<Response<pb::ValidateResponse>, Status> {
        let note = CallNote::of(request.extensions());
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
                if let Some(note) = &note {
                    note.client_id(claims.client_id());
                }
                pb::ValidateResponse {
                    valid: true,
                    rejection: pb::Rejection::Unspecified as i32,
                    detail: String::new(),
                    claims: Some(claims.to_proto()),
                }
            }
            Err(invalid) => {
                if let Some(note) = &note {
                    note.rejection(invalid.rejection, &invalid.detail);
                }
                pb::ValidateResponse {
                    valid: false,
                    rejection: status::rejection_to_proto(invalid.rejection) as i32,
                    detail: invalid.detail,
                    claims: None,
                }
            }
        };
        Ok(Response::new(answer))
    }

    type WatchRevocationsStream = UpdateStream;

    async fn watch_revocations(
        &self,
        request: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<UpdateStream>, Status> {
        let Some(revocations) = self.validator.revocations() else {
            return Err(Status::unimplemented(
                "this gateway keeps no revocation list",
            ));
        };
        if crate::auth::claims(&request).is_none() {
            // Served without the gateway's AuthLayer: the token is checked here.
            let header = request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok());
            let token = crate::auth::bearer_token(header)?;
            self.validator
                .validate(token, &[])
                .await
                .map_err(|invalid| status::refusal(&invalid, &[]))?;
        }
        Ok(Response::new(watch::updates(
            revocations,
            self.epoch.clone(),
            request.get_ref(),
            self.draining.clone(),
        )))
    }
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
        _ => Err(status::broker_status(&BrokerError::InvalidClient)),
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

    const BAD_CREDENTIALS: &str = "invalid client credentials";

    mod answers {
        use std::sync::atomic::{AtomicU64, Ordering};

        use futures_util::future::BoxFuture;
        use serde_json::json;

        use std::sync::Arc;

        use super::super::*;
        use crate::{
            broker::{AccessToken, BrokerSettings, TokenEndpoint, TokenResponse, UpstreamError},
            emulator::SigningKey,
            jwt::{ManualClock, StaticJwks},
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
            let clock = ManualClock::new(NOW);
            let validator =
                crate::jwt::tests::loaded_validator(Arc::new(StaticJwks::new(jwks)), &clock).await;
            let registry = crate::broker::tests::registry();
            let broker = Broker::new(
                registry,
                Arc::new(Numbered::default()),
                BrokerSettings::default(),
            );
            Fixture {
                service: GatewayService::new(broker, validator),
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

        async fn validate(f: &Fixture, token: &str, scopes: &[&str]) -> pb::ValidateResponse {
            use pb::gateway_server::Gateway as _;
            let request = Request::new(pb::ValidateRequest {
                token: token.into(),
                required_scopes: scopes.iter().map(|s| s.to_string()).collect(),
            });
            f.service.validate(request).await.unwrap().into_inner()
        }

        #[tokio::test]
        async fn every_check_runs_on_a_verified_token_cache_hit() {
            let f = fixture().await;
            let token = token(&f.key);
            let first = validate(&f, &token, &[]).await;
            assert!(first.valid, "{first:?}");
            let claims = first.claims.as_ref().unwrap();
            assert_eq!(claims.client_id, "client-a");
            assert_eq!(claims.scopes, ["orders/read", "orders/write"]);
            assert!(claims.all.as_ref().unwrap().fields.contains_key("custom"));
            // The same answer again, from the verified-token cache.
            let second = validate(&f, &token, &["orders/read"]).await;
            assert_eq!(first, second);
            assert_eq!(f.service.validator.cached_verifications(), 1);

            // A scope the token lacks: refused although its verification is cached.
            let answer = validate(&f, &token, &["orders/admin"]).await;
            assert!(!answer.valid);
            assert_eq!(answer.rejection, pb::Rejection::InsufficientScope as i32);
            assert!(answer.claims.is_none());

            // Expired since it was cached: refused.
            f.clock.set(NOW + 3600 + 60);
            let answer = validate(&f, &token, &[]).await;
            assert!(!answer.valid);
            assert_eq!(answer.rejection, pb::Rejection::Expired as i32);
        }

        #[tokio::test]
        async fn get_token_answers_the_cached_token_with_its_seconds_left() {
            use pb::gateway_server::Gateway as _;
            let f = fixture().await;
            let call = |scopes: &[&str]| {
                f.service.get_token(Request::new(pb::GetTokenRequest {
                    client_id: "client-a".into(),
                    client_secret: "s".into(),
                    scopes: scopes.iter().map(|s| s.to_string()).collect(),
                }))
            };
            let a = call(&[]).await.unwrap().into_inner();
            assert_eq!(a.access_token, "token-1");
            assert_eq!(a.token_type, "Bearer");
            assert_eq!(a.scopes, ["orders/read", "orders/write"]);
            assert!((3590..=3600).contains(&a.expires_in), "{a:?}");
            // All registered scopes, asked in another order: the same token.
            let b = call(&["orders/write", "orders/read"])
                .await
                .unwrap()
                .into_inner();
            assert_eq!(b.access_token, "token-1");
            // Another scope set is another token.
            let c = call(&["orders/read"]).await.unwrap().into_inner();
            assert_eq!(
                (c.access_token.as_str(), &c.scopes[..]),
                ("token-2", &["orders/read".to_string()][..])
            );
            let refused = call(&["orders/admin"]).await.unwrap_err();
            assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        }
    }
}
