//! Which methods need which scopes.

use std::collections::{HashMap, HashSet};

/// Services reachable without a token unless made protected: health and
/// reflection, so that probes and `grpcurl list` work.
pub const DEFAULT_PUBLIC: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Per-method access policy. Lookup order: public method or service, then the
/// method's scopes, then the service's, then the default.
#[derive(Debug, Clone)]
pub struct AuthPolicy {
    default: Vec<String>,
    services: HashMap<String, Vec<String>>,
    methods: HashMap<String, Vec<String>>,
    public: HashSet<String>,
}

impl Default for AuthPolicy {
    fn default() -> Self {
        Self::new()
    }
}

/// What a method requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement<'a> {
    /// No token needed.
    Public,
    /// A valid token carrying every one of these scopes (possibly none).
    Scopes(&'a [String]),
}

fn owned<I: IntoIterator<Item = S>, S: Into<String>>(scopes: I) -> Vec<String> {
    scopes.into_iter().map(Into::into).collect()
}

impl AuthPolicy {
    /// Every method needs a valid token (no particular scope); health and
    /// reflection are public.
    pub fn new() -> Self {
        Self {
            default: Vec::new(),
            services: HashMap::new(),
            methods: HashMap::new(),
            public: DEFAULT_PUBLIC.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    /// Scopes every method needs unless a service or method rule says otherwise.
    pub fn require<I: IntoIterator<Item = S>, S: Into<String>>(mut self, scopes: I) -> Self {
        self.default = owned(scopes);
        self
    }

    /// Scopes for every method of `service` (e.g. `"orders.v1.Orders"`).
    pub fn service<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        service: &str,
        scopes: I,
    ) -> Self {
        let service = service.trim_matches('/').to_owned();
        self.public.remove(&service);
        self.services.insert(service, owned(scopes));
        self
    }

    /// Scopes for one method, by full path (`"/orders.v1.Orders/Cancel"`).
    pub fn method<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        path: &str,
        scopes: I,
    ) -> Self {
        self.public.remove(path);
        self.methods.insert(path.to_owned(), owned(scopes));
        self
    }

    /// Makes a service (`"pkg.Service"`) or a method (`"/pkg.Service/Method"`) public.
    pub fn public(mut self, service_or_method: &str) -> Self {
        self.public.insert(service_or_method.to_owned());
        self
    }

    /// The requirement for a request path (`/pkg.Service/Method`).
    pub fn requirement(&self, path: &str) -> Requirement<'_> {
        let service = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .map(|(service, _)| service);
        if self.public.contains(path) || service.is_some_and(|s| self.public.contains(s)) {
            return Requirement::Public;
        }
        if let Some(scopes) = self.methods.get(path) {
            return Requirement::Scopes(scopes);
        }
        if let Some(scopes) = service.and_then(|s| self.services.get(s)) {
            return Requirement::Scopes(scopes);
        }
        Requirement::Scopes(&self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_beats_service_beats_default_and_health_is_public() {
        let p = AuthPolicy::new()
            .require(["a/read"])
            .service("orders.v1.Orders", ["orders/read"])
            .method("/orders.v1.Orders/Cancel", ["orders/write"])
            .public("/orders.v1.Orders/Ping");
        let scopes = |path| match p.requirement(path) {
            Requirement::Scopes(s) => s.to_vec(),
            Requirement::Public => vec!["<public>".to_string()],
        };
        assert_eq!(scopes("/orders.v1.Orders/Cancel"), vec!["orders/write"]);
        assert_eq!(scopes("/orders.v1.Orders/List"), vec!["orders/read"]);
        assert_eq!(scopes("/billing.v1.Billing/Pay"), vec!["a/read"]);
        assert_eq!(scopes("/orders.v1.Orders/Ping"), vec!["<public>"]);
        assert_eq!(scopes("/grpc.health.v1.Health/Check"), vec!["<public>"]);
        assert_eq!(
            scopes("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            vec!["<public>"]
        );
        assert_eq!(scopes("garbage"), vec!["a/read"]);
    }

    #[test]
    fn health_can_be_protected() {
        let p = AuthPolicy::new().service("grpc.health.v1.Health", ["ops/read"]);
        assert_eq!(
            p.requirement("/grpc.health.v1.Health/Check"),
            Requirement::Scopes(&["ops/read".to_string()])
        );
    }
}
