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
use aws_credential_types::provider::ProvideCredentials as _;
use futures_util::{Stream, StreamExt as _};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{OnceCell, watch};

use super::{
    iam_token::TokenRequest,
    target::{IamTarget, LinkError},
};
/// A new token this often, well before the last one expires.
const RENEW_EVERY: Duration = Duration::from_secs(600);

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
