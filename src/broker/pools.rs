//! Several user pools behind one broker: each client's token requests go to its
//! own pool's token endpoint.

use std::{collections::HashMap, sync::Arc};

use futures_util::future::BoxFuture;
use secrecy::SecretString;

use super::{TokenEndpoint, TokenResponse, UpstreamError};

/// A [`TokenEndpoint`] that sends each client to its pool's endpoint.
pub struct PoolRoutes {
    by_client: HashMap<Arc<str>, Arc<dyn TokenEndpoint>>,
    pools: Vec<(Arc<str>, Arc<dyn TokenEndpoint>)>,
}

impl std::fmt::Debug for PoolRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolRoutes")
            .field("pools", &self.describe())
            .field("clients", &self.by_client.len())
            .finish()
    }
}

impl PoolRoutes {
    /// Routes for `pools` (name, endpoint) and `clients` (client id, pool name).
    /// A client of no listed pool is never sent anywhere.
    pub fn new<'a>(
        pools: Vec<(Arc<str>, Arc<dyn TokenEndpoint>)>,
        clients: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Self {
        let by_client = clients
            .into_iter()
            .filter_map(|(client, pool)| {
                let (_, endpoint) = pools.iter().find(|(name, _)| &**name == pool)?;
                Some((Arc::from(client), endpoint.clone()))
            })
            .collect();
        Self { by_client, pools }
    }
}

impl TokenEndpoint for PoolRoutes {
    fn client_credentials<'a>(
        &'a self,
        client_id: &'a str,
        secret: &'a SecretString,
        scope: &'a str,
    ) -> BoxFuture<'a, Result<TokenResponse, UpstreamError>> {
        match self.by_client.get(client_id) {
            Some(endpoint) => endpoint.client_credentials(client_id, secret, scope),
            // The broker asks only for registered clients, and every registered
            // client has a pool: a gateway bug, never sent upstream.
            None => Box::pin(std::future::ready(Err(UpstreamError::Rejected(
                "client has no user pool".into(),
            )))),
        }
    }

    fn describe(&self) -> String {
        self.pools
            .iter()
            .map(|(name, endpoint)| format!("{name}: {}", endpoint.describe()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Records the clients it was asked for.
    struct Recording(&'static str, Mutex<Vec<String>>);

    impl TokenEndpoint for Recording {
        fn client_credentials<'a>(
            &'a self,
            client_id: &'a str,
            _secret: &'a SecretString,
            _scope: &'a str,
        ) -> BoxFuture<'a, Result<TokenResponse, UpstreamError>> {
            self.1.lock().unwrap().push(client_id.to_owned());
            Box::pin(std::future::ready(Err(UpstreamError::Timeout)))
        }

        fn describe(&self) -> String {
            self.0.to_owned()
        }
    }

    #[tokio::test]
    async fn each_client_goes_to_its_pool_only() {
        let a = Arc::new(Recording("https://a/oauth2/token", Mutex::default()));
        let b = Arc::new(Recording("https://b/oauth2/token", Mutex::default()));
        let routes = PoolRoutes::new(
            vec![
                (Arc::from("a"), a.clone() as Arc<dyn TokenEndpoint>),
                (Arc::from("b"), b.clone() as Arc<dyn TokenEndpoint>),
            ],
            [("client-a", "a"), ("client-b", "b"), ("lost", "nowhere")],
        );
        let secret = SecretString::from("s");
        for client in ["client-a", "client-b", "client-b", "lost"] {
            let _ = routes.client_credentials(client, &secret, "x/y").await;
        }
        assert_eq!(*a.1.lock().unwrap(), ["client-a"]);
        assert_eq!(*b.1.lock().unwrap(), ["client-b", "client-b"]);
        assert!(matches!(
            routes.client_credentials("lost", &secret, "x/y").await,
            Err(UpstreamError::Rejected(_))
        ));
        assert_eq!(
            routes.describe(),
            "a: https://a/oauth2/token, b: https://b/oauth2/token"
        );
    }
}
