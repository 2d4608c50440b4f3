//! Which methods need which scopes.

use std::collections::{HashMap, HashSet};

/// Services reachable without a token unless made protected: health and
/// reflection, so that probes and `grpcurl list` work.
pub const DEFAULT_PUBLIC: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Per-method access policy. Lookup order: public method, then the method's
/// scopes, then public service, then a method refused for declaring nothing, then
/// the service's scopes, then the default.
///
/// In code, or from the scopes your `.proto` declares
/// ([`AuthPolicy::from_descriptors`], the README's build.rs recipe):
///
/// ```
/// use m2m_gateway::{AuthPolicy, auth::Requirement};
///
/// let policy = AuthPolicy::new()
///     .require(["orders/read"])                                  // every other method
///     .method("/orders.v1.Orders/Cancel", ["orders/write"])      // this one
///     .public("/orders.v1.Orders/Ping");                          // no token
/// assert!(matches!(policy.requirement("/orders.v1.Orders/Ping"), Requirement::Public));
/// assert!(matches!(
///     policy.requirement("/orders.v1.Orders/Cancel"),
///     Requirement::Scopes(s) if s == ["orders/write"]
/// ));
/// ```
#[derive(Debug, Clone)]
pub struct AuthPolicy {
    default: Vec<String>,
    services: HashMap<String, Vec<String>>,
    methods: HashMap<String, Vec<String>>,
    public: HashSet<String>,
    denied: HashSet<String>,
}

/// Why a descriptor set cannot give a policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Not an encoded `FileDescriptorSet`.
    #[error("not an encoded FileDescriptorSet: {0}")]
    NotADescriptorSet(String),
    /// A method both public and with required scopes.
    #[error("{0}: declares both (m2m.auth.v1.public) and required scopes")]
    Contradictory(String),
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
    /// Refused (PERMISSION_DENIED) whatever the token: the method declares no
    /// scopes in its `.proto` and its service no default.
    Denied,
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
            denied: HashSet::new(),
        }
    }

    /// The policy declared in `.proto` files with `m2m/auth/v1/options.proto`
    /// (pass the encoded `FileDescriptorSet` tonic-build writes, imports
    /// included): a method's `(m2m.auth.v1.required_scopes)` or
    /// `(m2m.auth.v1.public)`, else its service's `(m2m.auth.v1.default_scopes)`
    /// or `(m2m.auth.v1.public_service)`; a method declaring nothing in a service
    /// declaring nothing is **refused** (PERMISSION_DENIED). Health and reflection
    /// stay public. Methods of services outside the set follow the default
    /// (`require`); later calls (`method`, `service`, `public`) override.
    ///
    /// ```
    /// use m2m_gateway::{auth::{AuthPolicy, Requirement}, proto::DEMO_DESCRIPTOR_SET};
    /// let policy = AuthPolicy::from_descriptors(DEMO_DESCRIPTOR_SET).unwrap();
    /// // echo.proto: rpc Echo(...) { option (m2m.auth.v1.required_scopes) = "demo/read"; }
    /// assert_eq!(
    ///     policy.requirement("/m2m.demo.v1.Echo/Echo"),
    ///     Requirement::Scopes(&["demo/read".to_string()])
    /// );
    /// ```
    pub fn from_descriptors(descriptor_set: &[u8]) -> Result<Self, PolicyError> {
        use prost::Message as _;

        use crate::proto::auth::internal::FileDescriptorSet;
        let set = FileDescriptorSet::decode(descriptor_set)
            .map_err(|e| PolicyError::NotADescriptorSet(e.to_string()))?;
        let mut policy = Self::new();
        for file in &set.file {
            let package = file.package();
            for service in &file.service {
                let name = if package.is_empty() {
                    service.name().to_owned()
                } else {
                    format!("{package}.{}", service.name())
                };
                if DEFAULT_PUBLIC.contains(&name.as_str()) {
                    continue;
                }
                let options = service.options.clone().unwrap_or_default();
                let service_declares =
                    options.public_service() || !options.default_scopes.is_empty();
                if options.public_service() {
                    policy.public.insert(name.clone());
                } else if !options.default_scopes.is_empty() {
                    policy
                        .services
                        .insert(name.clone(), options.default_scopes.clone());
                }
                for method in &service.method {
                    let path = format!("/{name}/{}", method.name());
                    let m = method.options.clone().unwrap_or_default();
                    match (m.public(), m.required_scopes.is_empty()) {
                        (true, false) => return Err(PolicyError::Contradictory(path)),
                        (true, true) => {
                            policy.public.insert(path);
                        }
                        (false, false) => {
                            // Scopes on a method of a public service: protected.
                            policy.methods.insert(path, m.required_scopes.clone());
                        }
                        (false, true) if !service_declares => {
                            policy.denied.insert(path);
                        }
                        (false, true) => {}
                    }
                }
            }
        }
        Ok(policy)
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
        self.denied.remove(path);
        self.methods.insert(path.to_owned(), owned(scopes));
        self
    }

    /// Makes a service (`"pkg.Service"`) or a method (`"/pkg.Service/Method"`) public.
    pub fn public(mut self, service_or_method: &str) -> Self {
        self.denied.remove(service_or_method);
        self.public.insert(service_or_method.to_owned());
        self
    }

    /// Whether `path` (`/pkg.Service/Method`) is a method this policy names,
    /// itself or through its service (from descriptors or in code), rather
    /// than one it only meets under the default: such a path is known to exist,
    /// and may name a span.
    pub(crate) fn declares(&self, path: &str) -> bool {
        let service = service_of(path);
        self.methods.contains_key(path)
            || self.public.contains(path)
            || self.denied.contains(path)
            || service.is_some_and(|s| self.services.contains_key(s) || self.public.contains(s))
    }

    /// The requirement for a request path (`/pkg.Service/Method`).
    pub fn requirement(&self, path: &str) -> Requirement<'_> {
        let service = service_of(path);
        if self.public.contains(path) {
            return Requirement::Public;
        }
        // A method's own scopes win over its service being public.
        if let Some(scopes) = self.methods.get(path) {
            return Requirement::Scopes(scopes);
        }
        if service.is_some_and(|s| self.public.contains(s)) {
            return Requirement::Public;
        }
        if self.denied.contains(path) {
            // A service rule set in code after the descriptors still applies.
            return match service.and_then(|s| self.services.get(s)) {
                Some(scopes) => Requirement::Scopes(scopes),
                None => Requirement::Denied,
            };
        }
        if let Some(scopes) = service.and_then(|s| self.services.get(s)) {
            return Requirement::Scopes(scopes);
        }
        Requirement::Scopes(&self.default)
    }
}

/// `pkg.Service` of `/pkg.Service/Method`.
fn service_of(path: &str) -> Option<&str> {
    path.strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .map(|(service, _)| service)
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
        let scopes = |path| show(&p, path);
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
        // Named by the policy (and so fit to name a span), or met only under
        // the default.
        for named in [
            "/orders.v1.Orders/Cancel",
            "/orders.v1.Orders/List",
            "/orders.v1.Orders/Ping",
            "/grpc.health.v1.Health/Check",
        ] {
            assert!(p.declares(named), "{named}");
        }
        for unnamed in [
            "/billing.v1.Billing/Pay",
            "garbage",
            "/orders.v1.Orderz/List",
        ] {
            assert!(!p.declares(unnamed), "{unnamed}");
        }
    }

    /// A descriptor set as protoc writes it (the view types encode the same
    /// fields under the same numbers).
    fn descriptors() -> Vec<u8> {
        use prost::Message as _;

        use crate::proto::auth::internal::{
            FileDescriptorProto, FileDescriptorSet, MethodDescriptorProto, MethodOptions,
            ServiceDescriptorProto, ServiceOptions,
        };
        let method = |name: &str, scopes: &[&str], public: Option<bool>| MethodDescriptorProto {
            name: Some(name.into()),
            options: Some(MethodOptions {
                required_scopes: scopes.iter().map(|s| s.to_string()).collect(),
                public,
            }),
        };
        let service =
            |name: &str, options: Option<ServiceOptions>, methods| ServiceDescriptorProto {
                name: Some(name.into()),
                method: methods,
                options,
            };
        FileDescriptorSet {
            file: vec![FileDescriptorProto {
                name: Some("orders.proto".into()),
                package: Some("orders.v1".into()),
                service: vec![
                    service(
                        "Orders",
                        None,
                        vec![
                            method("Cancel", &["orders/write", "orders/admin"], None),
                            method("Ping", &[], Some(true)),
                            method("List", &[], None),
                        ],
                    ),
                    service(
                        "Reports",
                        Some(ServiceOptions {
                            default_scopes: vec!["reports/read".into()],
                            public_service: None,
                        }),
                        vec![
                            method("Daily", &[], None),
                            method("Purge", &["reports/admin"], None),
                        ],
                    ),
                    service(
                        "Status",
                        Some(ServiceOptions {
                            default_scopes: vec![],
                            public_service: Some(true),
                        }),
                        vec![
                            method("Get", &[], None),
                            method("Secret", &["ops/read"], None),
                        ],
                    ),
                ],
            }],
        }
        .encode_to_vec()
    }

    fn show(p: &AuthPolicy, path: &str) -> Vec<String> {
        match p.requirement(path) {
            Requirement::Scopes(s) => s.to_vec(),
            Requirement::Public => vec!["<public>".into()],
            Requirement::Denied => vec!["<denied>".into()],
        }
    }

    #[test]
    fn scopes_declared_in_the_proto_and_undeclared_methods_refused() {
        let p = AuthPolicy::from_descriptors(&descriptors()).unwrap();
        // Declared on the method.
        assert_eq!(
            show(&p, "/orders.v1.Orders/Cancel"),
            ["orders/write", "orders/admin"]
        );
        assert_eq!(show(&p, "/orders.v1.Orders/Ping"), ["<public>"]);
        // Declared nowhere: refused, whatever the token.
        assert_eq!(show(&p, "/orders.v1.Orders/List"), ["<denied>"]);
        // The service's default, and a method overriding it.
        assert_eq!(show(&p, "/orders.v1.Reports/Daily"), ["reports/read"]);
        assert_eq!(show(&p, "/orders.v1.Reports/Purge"), ["reports/admin"]);
        // A public service, with one protected method.
        assert_eq!(show(&p, "/orders.v1.Status/Get"), ["<public>"]);
        assert_eq!(show(&p, "/orders.v1.Status/Secret"), ["ops/read"]);
        // Health stays public; services outside the set follow the default.
        assert_eq!(show(&p, "/grpc.health.v1.Health/Check"), ["<public>"]);
        assert_eq!(show(&p, "/billing.v1.Billing/Pay"), Vec::<String>::new());
        // Code overrides the declarations.
        let p = p
            .method("/orders.v1.Orders/List", ["orders/read"])
            .service("orders.v1.Reports", ["reports/all"]);
        assert_eq!(show(&p, "/orders.v1.Orders/List"), ["orders/read"]);
        assert_eq!(show(&p, "/orders.v1.Reports/Daily"), ["reports/all"]);
        assert_eq!(show(&p, "/orders.v1.Reports/Purge"), ["reports/admin"]);
    }

    #[test]
    fn garbage_and_contradictions_are_errors() {
        assert!(matches!(
            AuthPolicy::from_descriptors(b"\xff\xff not protobuf"),
            Err(PolicyError::NotADescriptorSet(_))
        ));
        use prost::Message as _;

        use crate::proto::auth::internal::*;
        let both = FileDescriptorSet {
            file: vec![FileDescriptorProto {
                name: None,
                package: Some("p".into()),
                service: vec![ServiceDescriptorProto {
                    name: Some("S".into()),
                    options: None,
                    method: vec![MethodDescriptorProto {
                        name: Some("M".into()),
                        options: Some(MethodOptions {
                            required_scopes: vec!["a/b".into()],
                            public: Some(true),
                        }),
                    }],
                }],
            }],
        };
        assert_eq!(
            AuthPolicy::from_descriptors(&both.encode_to_vec()).unwrap_err(),
            PolicyError::Contradictory("/p.S/M".into())
        );
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
