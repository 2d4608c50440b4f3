//! IAM authentication to ElastiCache and MemoryDB (`cache.redis_auth = "iam"`,
//! cargo feature `aws`). The password of the Redis user is a SigV4-presigned
//! `connect` request for the cache, valid 15 minutes, made from the standard AWS
//! credential chain (environment, web identity / IRSA, EKS Pod Identity, ECS,
//! instance metadata). A fresh token goes to every new connection, and every
//! connection re-authenticates with one every ten minutes, which also carries it
//! past ElastiCache's 12-hour limit on IAM-authenticated connections.

use std::{
    fmt,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use aws_config::BehaviorVersion;
use aws_credential_types::{Credentials, provider::ProvideCredentials as _};
use aws_sigv4::{
    http_request::{SignableBody, SignableRequest, SignatureLocation, SigningSettings, sign},
    sign::v4,
};
use futures_util::{Stream, StreamExt as _};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{OnceCell, watch};

use super::link::{IamTarget, LinkError};

/// How long a token is valid (AWS: 15 minutes).
const TOKEN_LIFETIME: Duration = Duration::from_secs(900);
/// A new token this often, well before the last one expires.
const RENEW_EVERY: Duration = Duration::from_secs(600);

/// The token request of AWS's documentation, for one cache and user.
#[derive(Debug, Clone)]
pub(crate) struct TokenRequest<'a> {
    pub(crate) target: &'a IamTarget,
    pub(crate) region: &'a str,
}

impl TokenRequest<'_> {
    /// The token: `<cache>/?Action=connect&User=<user>[&ResourceType=ServerlessCache]`
    /// presigned for `expires_in` 900 s at `at`, without the scheme.
    pub(crate) fn presign(
        &self,
        credentials: &Credentials,
        at: SystemTime,
    ) -> Result<SecretString, LinkError> {
        let fail = |e: &dyn fmt::Display| LinkError::Setup(format!("IAM token: {e}"));
        let mut url = url::Url::parse(&format!("https://{}/", self.target.cache_name))
            .map_err(|e| fail(&e))?;
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("Action", "connect");
            query.append_pair("User", &self.target.user);
            if self.target.serverless {
                query.append_pair("ResourceType", "ServerlessCache");
            }
        }
        let identity = credentials.clone().into();
        let mut settings = SigningSettings::default();
        settings.signature_location = SignatureLocation::QueryParams;
        settings.expires_in = Some(TOKEN_LIFETIME);
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(self.region)
            .name(self.target.service.signing_name())
            .time(at)
            .settings(settings)
            .build()
            .map_err(|e| fail(&e))?
            .into();
        let signable = SignableRequest::new(
            "GET",
            url.as_str(),
            std::iter::empty(),
            SignableBody::Bytes(&[]),
        )
        .map_err(|e| fail(&e))?;
        let (instructions, _) = sign(signable, &params).map_err(|e| fail(&e))?.into_parts();
        let mut request = http::Request::builder()
            .method("GET")
            .uri(url.as_str())
            .body(())
            .map_err(|e| fail(&e))?;
        instructions.apply_to_request_http1x(&mut request);
        let signed = request.uri().to_string();
        Ok(SecretString::from(
            signed
                .strip_prefix("https://")
                .unwrap_or(&signed)
                .to_owned(),
        ))
    }
}

struct Chain {
    provider: aws_credential_types::provider::SharedCredentialsProvider,
    region: String,
}

/// IAM tokens for the fleet's Redis: made on demand and renewed in the
/// background for the connections that follow them. Cheap to clone.
#[derive(Clone)]
pub(crate) struct IamCredentials {
    inner: Arc<Inner>,
}

struct Inner {
    target: IamTarget,
    chain: OnceCell<Chain>,
    current: watch::Sender<Option<(String, SecretString)>>,
    renewing: std::sync::Once,
}

impl fmt::Debug for IamCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IamCredentials")
            .field("target", &self.inner.target)
            .finish_non_exhaustive()
    }
}

impl IamCredentials {
    pub(crate) fn new(target: IamTarget) -> Self {
        Self {
            inner: Arc::new(Inner {
                target,
                chain: OnceCell::new(),
                current: watch::channel(None).0,
                renewing: std::sync::Once::new(),
            }),
        }
    }

    /// The Redis user the tokens are for.
    pub(crate) fn user(&self) -> &str {
        &self.inner.target.user
    }

    async fn chain(&self) -> Result<&Chain, LinkError> {
        self.inner
            .chain
            .get_or_try_init(|| async {
                let mut loader = aws_config::defaults(BehaviorVersion::latest());
                if let Some(region) = &self.inner.target.region {
                    loader = loader.region(aws_config::Region::new(region.clone()));
                }
                let config = loader.load().await;
                let provider = config.credentials_provider().ok_or_else(|| {
                    LinkError::Setup("IAM auth: no AWS credential provider".into())
                })?;
                let region = config.region().map(|r| r.to_string()).ok_or_else(|| {
                    LinkError::Setup(
                        "IAM auth: no AWS Region (set AWS_REGION or cache.redis_region)".into(),
                    )
                })?;
                Ok(Chain { provider, region })
            })
            .await
    }

    /// A fresh token from the credential chain.
    pub(crate) async fn token(&self) -> Result<SecretString, LinkError> {
        let chain = self.chain().await?;
        let credentials = chain
            .provider
            .provide_credentials()
            .await
            .map_err(|e| LinkError::Auth(format!("no AWS credentials for IAM auth: {e}")))?;
        let token = TokenRequest {
            target: &self.inner.target,
            region: &chain.region,
        }
        .presign(&credentials, SystemTime::now())?;
        self.inner
            .current
            .send_replace(Some((self.inner.target.user.clone(), token.clone())));
        self.renew_in_background();
        Ok(token)
    }

    fn renew_in_background(&self) {
        self.inner.renewing.call_once(|| {
            let weak = Arc::downgrade(&self.inner);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(RENEW_EVERY).await;
                    let Some(inner) = weak.upgrade() else { return };
                    if let Err(e) = (IamCredentials { inner }).token().await {
                        tracing::warn!(error = %e, "cannot renew the Redis IAM token; connections keep the last one until it expires");
                    }
                }
            });
        });
    }
}

impl redis::StreamingCredentialsProvider for IamCredentials {
    fn subscribe(
        &self,
    ) -> Pin<Box<dyn Stream<Item = redis::RedisResult<redis::BasicAuth>> + Send + 'static>> {
        tokio_stream_of(self.inner.current.subscribe())
    }
}

/// Every token, the current one first, as the Redis client's credentials.
fn tokio_stream_of(
    rx: watch::Receiver<Option<(String, SecretString)>>,
) -> Pin<Box<dyn Stream<Item = redis::RedisResult<redis::BasicAuth>> + Send + 'static>> {
    futures_util::stream::unfold((rx, true), |(mut rx, first)| async move {
        if !first {
            rx.changed().await.ok()?;
        }
        let current = rx.borrow_and_update().clone();
        Some((current, (rx, false)))
    })
    .filter_map(|current| {
        std::future::ready(current.map(|(user, token)| {
            Ok(redis::BasicAuth::new(
                user,
                token.expose_secret().to_owned(),
            ))
        }))
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::link::IamService;

    fn target(serverless: bool, service: IamService) -> IamTarget {
        IamTarget {
            user: "m2m-gateway".into(),
            cache_name: "my-cache".into(),
            serverless,
            service,
            region: None,
        }
    }

    /// The same token as AWS's documented Python (botocore's RequestSigner),
    /// from fixed credentials at a fixed time.
    fn botocore(target: &IamTarget, session_token: Option<&str>) -> Option<String> {
        let script = format!(
            r#"
import datetime, botocore.auth, botocore.session
from botocore.model import ServiceId
from botocore.signers import RequestSigner
from urllib.parse import urlencode, urlunparse, ParseResult
botocore.auth.get_current_datetime = lambda: datetime.datetime(2026, 12, 6, 10, 52, 6)
session = botocore.session.get_session()
session.set_credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", {token})
signer = RequestSigner(ServiceId("{service}"), "us-east-1", "{service}", "v4",
                       session.get_credentials(), session.get_component("event_emitter"))
query = {{"Action": "connect", "User": "m2m-gateway"}}
if {serverless}:
    query["ResourceType"] = "ServerlessCache"
url = urlunparse(ParseResult(scheme="https", netloc="my-cache", path="/",
                             query=urlencode(query), params="", fragment=""))
signed = signer.generate_presigned_url(
    {{"method": "GET", "url": url, "body": {{}}, "headers": {{}}, "context": {{}}}},
    operation_name="connect", expires_in=900, region_name="us-east-1")
print(signed.removeprefix("https://"))
"#,
            service = target.service.signing_name(),
            serverless = if target.serverless { "True" } else { "False" },
            token = session_token.map_or("None".to_owned(), |t| format!("{t:?}")),
        );
        let out = std::process::Command::new("python3")
            .args(["-c", &script])
            .output()
            .ok()?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let install = "python3 -m pip install botocore";
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "botocore is missing ({install}): {err}"
            );
            eprintln!("SKIPPING: botocore is missing ({install}): {err}");
            return None;
        }
        Some(String::from_utf8(out.stdout).unwrap().trim().to_owned())
    }

    fn query(token: &str) -> std::collections::BTreeMap<String, String> {
        url::Url::parse(&format!("https://{token}"))
            .unwrap()
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    #[test]
    fn tokens_match_botocore_for_elasticache_serverless_and_memorydb() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_554_326); // 2026-12-06T10:52:06Z
        for (t, session) in [
            (target(false, IamService::Elasticache), None),
            (
                target(true, IamService::Elasticache),
                Some("session-token/with+odd=chars"),
            ),
            (target(false, IamService::Memorydb), None),
        ] {
            let Some(reference) = botocore(&t, session) else {
                return;
            };
            let credentials = Credentials::new(
                "AKIDEXAMPLE",
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                session.map(str::to_owned),
                None,
                "test",
            );
            let ours = TokenRequest {
                target: &t,
                region: "us-east-1",
            }
            .presign(&credentials, at)
            .unwrap();
            let ours = ours.expose_secret();
            assert!(ours.starts_with("my-cache/?"), "{ours}");
            assert_eq!(
                query(ours),
                query(&reference),
                "\nours:     {ours}\nbotocore: {reference}"
            );
            assert_eq!(query(ours)["X-Amz-Expires"], "900");
        }
    }

    #[tokio::test]
    async fn redis_sees_every_new_token_the_current_one_first() {
        let (tx, rx) = watch::channel(Some(("u".to_owned(), SecretString::from("t1".to_owned()))));
        let mut stream = tokio_stream_of(rx);
        assert_eq!(stream.next().await.unwrap().unwrap().password(), "t1");
        tx.send_replace(Some(("u".to_owned(), SecretString::from("t2".to_owned()))));
        let next = stream.next().await.unwrap().unwrap();
        assert_eq!((next.username(), next.password()), ("u", "t2"));
    }
}
