//! Validation through the gateway's Validate RPC, with a bounded cache.

use std::{fmt, sync::Arc, time::Duration};

use tokio::time::Instant;

use aws_lc_rs::digest;
use tonic::transport::Channel;

use crate::{
    jwt::{Claims, Clock, Invalid, Rejection, SystemClock, ValidatorSettings},
    proto::gateway::v1::{ValidateRequest, gateway_client::GatewayClient},
    revocations::Revocations,
    status::rejection_from_proto,
};

/// Asks a running gateway whether tokens are valid. Answers for valid tokens are
/// cached by SHA-256 of the token, never beyond the token's `exp`; scopes and
/// expiry are checked locally on every hit, with the same leeway as the local
/// validator (5 s by default, [`RemoteValidator::with_leeway`]).
///
/// A cached answer never outlives a revocation: with a list kept by a
/// [`RevocationWatcher`](super::RevocationWatcher)
/// ([`RemoteValidator::with_revocations`]) every hit is checked against it;
/// without one, an answer is reused for at most one second
/// ([`DEFAULT_REVALIDATE_AFTER`]), then asked again.
///
/// Behind [`AuthLayer::remote`](super::AuthLayer::remote), a service checks
/// tokens with the gateway's Validate instead of keeping key sets itself:
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use m2m_gateway::{AuthLayer, AuthPolicy, RemoteValidator};
/// use tonic::transport::{Channel, Server};
///
/// let gateway = Channel::from_static("http://m2m-gateway:50051").connect_lazy();
/// let validator = RemoteValidator::new(gateway, 10_000); // answers cached per token
/// Server::builder()
///     .layer(AuthLayer::remote(validator, AuthPolicy::new().require(["orders/read"])))
/// #   .add_service(m2m_gateway::proto::demo::v1::echo_server::EchoServer::new(m2m_gateway::demo::EchoService))
///     // .add_service(OrdersServer::new(orders))
///     .serve("0.0.0.0:50052".parse()?)
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RemoteValidator {
    client: GatewayClient<Channel>,
    cache: Arc<Answers>,
    clock: Arc<dyn Clock>,
    leeway: i64,
    revocations: Option<Revocations>,
    revalidate_after: Duration,
}

/// Valid answers by SHA-256 of the token, with when they were asked.
type Answers = quick_cache::sync::Cache<[u8; 32], (Arc<Claims>, Instant)>;

/// How long a cached answer is reused without a revocation list.
pub const DEFAULT_REVALIDATE_AFTER: Duration = Duration::from_secs(1);

impl fmt::Debug for RemoteValidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteValidator")
            .field("cached", &self.cache.len())
            .finish_non_exhaustive()
    }
}

impl RemoteValidator {
    /// A validator calling the gateway on `channel`, remembering up to
    /// `cache_size` valid tokens.
    pub fn new(channel: Channel, cache_size: u64) -> Self {
        Self {
            client: GatewayClient::new(channel),
            cache: Arc::new(quick_cache::sync::Cache::new(
                usize::try_from(cache_size).unwrap_or(usize::MAX).max(1),
            )),
            clock: Arc::new(SystemClock),
            leeway: ValidatorSettings::default().leeway.as_secs() as i64,
            revocations: None,
            revalidate_after: DEFAULT_REVALIDATE_AFTER,
        }
    }

    /// Checks every answer, cached or not, against `revocations` (kept current
    /// by a [`RevocationWatcher`](super::RevocationWatcher)); cached answers
    /// are then reused until the token expires.
    pub fn with_revocations(mut self, revocations: Revocations) -> Self {
        self.revocations = Some(revocations);
        self
    }

    /// Allows `exp` this far in the past (clock skew), as the local validator
    /// does ([`CognitoValidatorBuilder::leeway`](crate::jwt::CognitoValidatorBuilder::leeway),
    /// 5 s by default).
    pub fn with_leeway(mut self, leeway: Duration) -> Self {
        self.leeway = i64::try_from(leeway.as_secs()).unwrap_or(i64::MAX);
        self
    }

    /// Validates `token` and checks `required_scopes` against its claims.
    pub async fn validate(
        &self,
        token: &str,
        required_scopes: &[String],
    ) -> Result<Arc<Claims>, Invalid> {
        let key = <[u8; 32]>::try_from(digest::digest(&digest::SHA256, token.as_bytes()).as_ref())
            .expect("SHA-256 is 32 bytes");
        let now = self.clock.now();
        let live = |c: &Arc<Claims>| c.expires_at().saturating_add(self.leeway) > now;
        // Without a revocation list, an answer is asked again after a second:
        // a revocation reaches this service within it.
        let fresh =
            |at: &Instant| self.revocations.is_some() || at.elapsed() < self.revalidate_after;
        let cached = self
            .cache
            .get(&key)
            .filter(|(c, at)| live(c) && fresh(at))
            .map(|(c, _)| c);
        let claims = match cached {
            Some(claims) => claims,
            None => {
                let claims = self.ask(token).await?;
                if live(&claims) {
                    self.cache.insert(key, (claims.clone(), Instant::now()));
                } else {
                    self.cache.remove(&key);
                }
                claims
            }
        };
        if let Some(revocations) = &self.revocations {
            crate::jwt::not_revoked(revocations, &claims)?;
        }
        claims.check_use(now, self.leeway, None, required_scopes)?;
        Ok(claims)
    }

    async fn ask(&self, token: &str) -> Result<Arc<Claims>, Invalid> {
        let response = self
            .client
            .clone()
            .validate(ValidateRequest {
                token: token.to_owned(),
                required_scopes: Vec::new(),
            })
            .await
            .map_err(|status| {
                tracing::warn!(code = ?status.code(), "gateway Validate call failed");
                Invalid::new(Rejection::KeysUnavailable, "the gateway could not be asked")
            })?
            .into_inner();
        if !response.valid {
            let rejection =
                rejection_from_proto(response.rejection).unwrap_or(Rejection::Malformed);
            return Err(Invalid::new(rejection, response.detail));
        }
        let c = response
            .claims
            .ok_or_else(|| {
                Invalid::new(
                    Rejection::Malformed,
                    "gateway answered valid without claims",
                )
            })?
            .into_inner();
        let all = c.all.map(struct_to_json).unwrap_or_default();
        Ok(Arc::new(Claims::from_verified(
            &c.client_id,
            &c.subject,
            &c.issuer,
            c.expires_at,
            &all,
        )))
    }
}

fn struct_to_json(s: prost_types::Struct) -> serde_json::Map<String, serde_json::Value> {
    s.fields
        .into_iter()
        .map(|(k, v)| (k, value_to_json(v)))
        .collect()
}

fn value_to_json(v: prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => b.into(),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                (n as i64).into()
            } else {
                serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, Into::into)
            }
        }
        Some(Kind::StringValue(s)) => s.into(),
        Some(Kind::ListValue(l)) => l.values.into_iter().map(value_to_json).collect(),
        Some(Kind::StructValue(s)) => struct_to_json(s).into(),
    }
}
