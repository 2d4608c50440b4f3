//! The registry of third-party clients and the scope policy: which client may ask
//! for which scopes, and how a requested scope set is normalised.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use crate::rules::cognito::DEFAULT_POOL;
pub use crate::rules::scope::{MAX_SCOPE_LEN, ScopeError, is_valid_client_id, validate_scope};

/// Most scopes in one GetToken request (`limits.max_scopes`).
pub const DEFAULT_MAX_SCOPES: usize = 50;

/// One `[[clients]]` entry.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The Cognito app client id.
    pub client_id: String,
    /// The `[[pools]]` entry (by name) the client belongs to; required when
    /// there are several pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Name for logs and metrics.
    pub name: String,
    /// Scopes this client may ask for.
    pub allowed_scopes: Vec<String>,
}

/// A registered client.
#[derive(Debug, Clone)]
pub struct Client {
    /// The Cognito app client id.
    pub client_id: Arc<str>,
    /// Name for logs and metrics.
    pub name: Arc<str>,
    /// The user pool it belongs to (logs and metrics).
    pub pool: Arc<str>,
    /// The scopes it may ask for, sorted: also what an empty scope list asks for.
    pub allowed_scopes: ScopeSet,
    /// Its position in the registry (0..len): per-client state is kept in tables
    /// indexed by it.
    pub index: usize,
}

/// Why a scope request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeRequestError {
    /// Malformed scope string.
    #[error("invalid scope: {0}")]
    Invalid(#[from] ScopeError),
    /// More scopes than allowed in one request.
    #[error("too many scopes: at most {max}")]
    TooMany {
        /// The limit.
        max: usize,
    },
    /// A scope outside the client's `allowed_scopes`.
    #[error("scope {0:?} is not allowed for this client")]
    NotAllowed(String),
}

/// A normalised scope set: deduplicated, sorted, never empty.
/// Cheap to clone: the set and its parameter form are shared.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScopeSet {
    scopes: Arc<BTreeSet<String>>,
    param: Arc<str>,
}

impl ScopeSet {
    fn new(scopes: BTreeSet<String>) -> Self {
        let param = scopes
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(" ");
        Self {
            scopes: Arc::new(scopes),
            param: param.into(),
        }
    }

    /// The scopes, sorted.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.scopes.iter().map(String::as_str)
    }

    /// Space-separated, sorted: the form sent to Cognito and used in cache keys.
    pub fn param(&self) -> &Arc<str> {
        &self.param
    }

    /// Whether `scope` is in the set.
    pub fn contains(&self, scope: &str) -> bool {
        self.scopes.contains(scope)
    }

    /// Number of scopes.
    pub fn len(&self) -> usize {
        self.scopes.len()
    }

    /// Whether the set is empty (never, for a normalised request).
    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }
}

/// The registry of clients, immutable after load.
#[derive(Debug, Clone)]
pub struct Registry {
    clients: Arc<HashMap<String, Client, foldhash::fast::RandomState>>,
    max_scopes: usize,
}

impl Registry {
    /// Builds the registry from checked entries, each in the pool it names
    /// (`default` when it names none: the settings name every client's pool).
    pub fn new(clients: &[ClientConfig], max_scopes: usize) -> Self {
        let clients = clients
            .iter()
            .enumerate()
            .map(|(index, c)| {
                (
                    c.client_id.clone(),
                    Client {
                        client_id: Arc::from(c.client_id.as_str()),
                        name: Arc::from(c.name.as_str()),
                        pool: Arc::from(c.pool.as_deref().unwrap_or(DEFAULT_POOL)),
                        allowed_scopes: ScopeSet::new(c.allowed_scopes.iter().cloned().collect()),
                        index,
                    },
                )
            })
            .collect();
        Self {
            clients: Arc::new(clients),
            max_scopes,
        }
    }

    /// The client registered under `client_id`.
    pub fn get(&self, client_id: &str) -> Option<&Client> {
        self.clients.get(client_id)
    }

    /// Number of registered clients.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether no client is registered.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Every registered client, in no particular order.
    pub fn clients(&self) -> impl Iterator<Item = &Client> {
        self.clients.values()
    }

    /// Whether `client_id` is registered.
    pub fn contains(&self, client_id: &str) -> bool {
        self.clients.contains_key(client_id)
    }

    /// Checks what a scope request says without a client: how many scopes, and
    /// that each is a scope (the same answer for every client id).
    pub fn check_scope_syntax(&self, requested: &[String]) -> Result<(), ScopeRequestError> {
        if requested.len() > self.max_scopes {
            return Err(ScopeRequestError::TooMany {
                max: self.max_scopes,
            });
        }
        for scope in requested {
            validate_scope(scope)?;
        }
        Ok(())
    }

    /// Validates and normalises a request's scopes for `client`: deduplicated and
    /// sorted; empty means every allowed scope.
    pub fn normalise(
        &self,
        client: &Client,
        requested: &[String],
    ) -> Result<ScopeSet, ScopeRequestError> {
        self.check_scope_syntax(requested)?;
        self.normalise_checked(client, requested)
    }

    /// [`Registry::normalise`] of a request [`Registry::check_scope_syntax`] passed.
    pub(crate) fn normalise_checked(
        &self,
        client: &Client,
        requested: &[String],
    ) -> Result<ScopeSet, ScopeRequestError> {
        if requested.is_empty() {
            return Ok(client.allowed_scopes.clone());
        }
        let mut set = BTreeSet::new();
        for scope in requested {
            if !client.allowed_scopes.contains(scope) {
                return Err(ScopeRequestError::NotAllowed(scope.clone()));
            }
            set.insert(scope.clone());
        }
        Ok(ScopeSet::new(set))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        Registry::new(
            &[ClientConfig {
                client_id: "c1".into(),
                pool: None,
                name: "one".into(),
                allowed_scopes: vec!["a/read".into(), "a/write".into(), "b/x".into()],
            }],
            3,
        )
    }

    #[test]
    fn order_and_duplicates_normalise_to_one_set() {
        let r = registry();
        let c = r.get("c1").unwrap();
        let a = r
            .normalise(c, &["a/write".into(), "a/read".into(), "a/write".into()])
            .unwrap();
        let b = r
            .normalise(c, &["a/read".into(), "a/write".into()])
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(&**a.param(), "a/read a/write");
    }

    #[test]
    fn empty_request_means_all_allowed_scopes() {
        let r = registry();
        let c = r.get("c1").unwrap();
        let all = r.normalise(c, &[]).unwrap();
        let listed = r
            .normalise(c, &["b/x".into(), "a/write".into(), "a/read".into()])
            .unwrap();
        assert_eq!(all, listed);
    }

    #[test]
    fn scope_outside_allowed_set_refused() {
        let r = registry();
        let c = r.get("c1").unwrap();
        assert_eq!(
            r.normalise(c, &["a/admin".into()]),
            Err(ScopeRequestError::NotAllowed("a/admin".into()))
        );
    }

    #[test]
    fn malformed_and_too_many_scopes_refused() {
        let r = registry();
        let c = r.get("c1").unwrap();
        for bad in ["", "a b", "a\"b", "a\\b", "é", "a\nb"] {
            assert!(
                matches!(
                    r.normalise(c, &[bad.into()]),
                    Err(ScopeRequestError::Invalid(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            r.normalise(c, &["x".repeat(MAX_SCOPE_LEN + 1)]),
            Err(ScopeRequestError::Invalid(ScopeError::TooLong))
        ));
        let four = vec!["a/read".to_string(); 4];
        assert_eq!(
            r.normalise(c, &four),
            Err(ScopeRequestError::TooMany { max: 3 })
        );
    }

    #[test]
    fn client_ids() {
        assert!(is_valid_client_id("k6h0hnjenh7auvi2as"));
        assert!(!is_valid_client_id(""));
        assert!(!is_valid_client_id("a:b"));
        assert!(!is_valid_client_id(&"a".repeat(129)));
    }
}
