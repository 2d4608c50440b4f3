//! The connection to the fleet's Redis, as AWS users run it: one endpoint that
//! is a single node or a cluster (found out from the endpoint itself), TLS with
//! the platform's roots plus an optional private CA and hostname verification
//! always on, and ACL credentials from the URL, the environment or a file.
//!
//! A [`Link`] connects on first use: a Redis that is down at start does not stop
//! the gateway, and the next call after a failure tries again.

use std::{
    fmt,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use super::target::{LinkError, RedisMode, RedisTarget, Topology};
use redis::{
    Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, TlsCertificates,
    aio::{ConnectionManager, ConnectionManagerConfig},
    cluster::{ClusterClientBuilder, ClusterConfig},
    cluster_async::ClusterConnection,
};
use secrecy::ExposeSecret;

/// The one connection of a replica: a connection manager on a single node, a
/// cluster connection on a cluster.
#[derive(Clone)]
pub(crate) enum Conn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Standalone(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Standalone(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// The fleet's Redis: made from a [`RedisTarget`], connected on first use.
pub(crate) struct Link {
    target: RedisTarget,
    info: ConnectionInfo,
    seed: Client,
    /// The private CA with the platform's roots, read once (every client of the
    /// link, node and pub/sub ones included, trusts this bundle).
    roots: Option<Vec<u8>>,
    #[cfg(feature = "aws")]
    iam: Option<super::iam::IamCredentials>,
    conn: tokio::sync::OnceCell<Conn>,
    topology: OnceLock<Topology>,
    /// The last masters seen, for subscribing elsewhere when a node fails.
    masters: Mutex<Vec<(String, u16)>>,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("target", &self.target)
            .field("topology", &self.topology.get())
            .finish_non_exhaustive()
    }
}

/// Makes aws-lc-rs the process's rustls provider unless one is installed: the
/// Redis client builds its TLS configuration from the process default.
pub(crate) fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
}

impl Link {
    /// Checks the URL and the TLS material; connects nothing yet.
    pub(crate) fn new(target: RedisTarget) -> Result<Self, LinkError> {
        install_crypto_provider();
        let info = connection_info(&target)?;
        let roots = target.ca_pem.as_deref().map(with_platform_roots);
        let seed = client_for(roots.as_deref(), info.clone())?;
        if target.iam.is_some() {
            if !cfg!(feature = "aws") {
                return Err(LinkError::Setup(
                    "cache.redis_auth = \"iam\" needs a build with the `aws` cargo feature \
                     (cargo build --release --features aws)"
                        .into(),
                ));
            }
            if !matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
                return Err(LinkError::Setup(
                    "IAM authentication needs TLS: cache.redis_url must be rediss://".into(),
                ));
            }
        }
        Ok(Self {
            #[cfg(feature = "aws")]
            iam: target.iam.clone().map(super::iam::IamCredentials::new),
            target,
            info,
            seed,
            roots,
            conn: tokio::sync::OnceCell::new(),
            topology: OnceLock::new(),
            masters: Mutex::new(Vec::new()),
        })
    }

    /// Whether the URL asks for TLS.
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self.info.addr(), ConnectionAddr::TcpTls { .. })
    }

    /// The URL without its password.
    pub(crate) fn describe_url(&self) -> String {
        crate::http::redact_url_password(&self.target.url)
    }

    /// The endpoint for log lines: URL without password, and what it is.
    pub(crate) fn describe(&self) -> String {
        let url = crate::http::redact_url_password(&self.target.url);
        match self.topology.get() {
            Some(t) => format!("{url} ({t})"),
            None => url,
        }
    }

    /// What the endpoint turned out to be, once connected.
    pub(crate) fn topology(&self) -> Option<&Topology> {
        self.topology.get()
    }

    /// The connection, made on first use (bounded by the timeout); a failed
    /// attempt is tried again by the next call.
    pub(crate) async fn conn(&self) -> Result<Conn, LinkError> {
        let timeout = self.target.timeout;
        let make = async {
            match tokio::time::timeout(timeout * 3, self.connect()).await {
                Ok(result) => result,
                Err(_) => Err(LinkError::Timeout(timeout * 3)),
            }
        };
        self.conn.get_or_try_init(|| make).await.cloned()
    }

    async fn connect(&self) -> Result<Conn, LinkError> {
        let topology = match self.target.mode {
            RedisMode::Standalone => Topology::Standalone,
            RedisMode::Auto | RedisMode::Cluster => self.discover().await?,
        };
        let conn = match &topology {
            Topology::Standalone if self.target.mode == RedisMode::Cluster => {
                return Err(LinkError::Setup(
                    "cache.redis_mode = \"cluster\" but the endpoint is not a cluster".into(),
                ));
            }
            Topology::Standalone => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.target.timeout))
                    .set_response_timeout(Some(self.target.timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                #[cfg(feature = "aws")]
                let config = match &self.iam {
                    Some(iam) => config.set_credentials_provider(iam.clone()),
                    None => config,
                };
                let client = self.client(self.info.clone()).await?;
                let manager = ConnectionManager::new_with_config(client, config)
                    .await
                    .map_err(|e| LinkError::from_redis(&e))?;
                Conn::Standalone(manager)
            }
            Topology::Cluster { masters } => {
                *self.masters.lock().unwrap_or_else(|p| p.into_inner()) = masters.clone();
                let info = self.authed(self.info.clone()).await?;
                let mut builder = ClusterClientBuilder::new(vec![info.clone()])
                    .connection_timeout(self.target.timeout)
                    .response_timeout(self.target.timeout)
                    .retries(2)
                    .max_retry_wait(200);
                if let Some(user) = info.redis_settings().username() {
                    builder = builder.username(user);
                }
                if let Some(password) = info.redis_settings().password() {
                    builder = builder.password(password);
                }
                #[cfg(feature = "aws")]
                if let Some(iam) = &self.iam {
                    builder = builder.set_credentials_provider(iam.clone());
                }
                if self.is_tls() {
                    builder = builder.certs(self.certificates());
                }
                let client = builder.build().map_err(|e| LinkError::from_redis(&e))?;
                let config = ClusterConfig::new()
                    .set_connection_timeout(self.target.timeout)
                    .set_response_timeout(self.target.timeout);
                let conn = client
                    .get_async_connection_with_config(config)
                    .await
                    .map_err(|e| LinkError::from_redis(&e))?;
                Conn::Cluster(conn)
            }
        };
        let _ = self.topology.set(topology);
        Ok(conn)
    }

    /// Asks the endpoint whether it is a cluster, and if so for its masters.
    pub(crate) async fn discover(&self) -> Result<Topology, LinkError> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.target.timeout))
            .set_response_timeout(Some(self.target.timeout));
        let mut conn = self
            .client(self.info.clone())
            .await?
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| LinkError::from_redis(&e))?;
        let cluster = match redis::cmd("INFO")
            .arg("cluster")
            .query_async::<String>(&mut conn)
            .await
        {
            Ok(info) => info.lines().any(|l| l.trim() == "cluster_enabled:1"),
            // Some managed endpoints restrict INFO; CLUSTER SLOTS answers on a cluster only.
            Err(e) if matches!(LinkError::from_redis(&e), LinkError::Auth(_)) => {
                return Err(LinkError::from_redis(&e));
            }
            Err(_) => false,
        };
        if !cluster && self.target.mode == RedisMode::Auto {
            return Ok(Topology::Standalone);
        }
        let slots: redis::Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await
            .map_err(|e| {
                if cluster || self.target.mode == RedisMode::Cluster {
                    LinkError::from_redis(&e)
                } else {
                    LinkError::Redis(e.to_string())
                }
            })?;
        let masters = masters_of(&slots, self.host());
        Ok(Topology::Cluster { masters })
    }

    fn host(&self) -> &str {
        match self.info.addr() {
            ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. } => host,
            ConnectionAddr::Unix(_) => "localhost",
            _ => "localhost",
        }
    }

    /// `info` with a fresh IAM token as the password, when IAM auth is on.
    async fn authed(&self, info: ConnectionInfo) -> Result<ConnectionInfo, LinkError> {
        #[cfg(feature = "aws")]
        if let Some(iam) = &self.iam {
            let token = iam.token().await?;
            let redis = info
                .redis_settings()
                .clone()
                .set_username(iam.user())
                .set_password(token.expose_secret());
            return Ok(info.set_redis_settings(redis));
        }
        Ok(info)
    }

    /// A client for `info`, with a fresh IAM token when IAM auth is on.
    async fn client(&self, info: ConnectionInfo) -> Result<Client, LinkError> {
        #[cfg(feature = "aws")]
        if self.iam.is_some() {
            return client_for(self.roots.as_deref(), self.authed(info).await?);
        }
        if info.addr() == self.info.addr() {
            return Ok(self.seed.clone());
        }
        client_for(self.roots.as_deref(), info)
    }

    fn certificates(&self) -> TlsCertificates {
        TlsCertificates {
            client_tls: None,
            root_cert: self.roots.clone(),
        }
    }

    /// A pub/sub connection: to the endpoint, or when it does not answer, to one
    /// of the cluster's masters (classic pub/sub reaches every node of a cluster).
    pub(crate) async fn pubsub(&self) -> Result<redis::aio::PubSub, LinkError> {
        let timeout = self.target.timeout.max(Duration::from_secs(1));
        let seed = self.client(self.info.clone()).await?;
        let mut last = match tokio::time::timeout(timeout, seed.get_async_pubsub()).await {
            Ok(Ok(pubsub)) => return Ok(pubsub),
            Ok(Err(e)) => LinkError::from_redis(&e),
            Err(_) => LinkError::Timeout(timeout),
        };
        let masters = self
            .masters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (host, port) in masters {
            let addr = match self.info.addr() {
                ConnectionAddr::TcpTls { .. } => ConnectionAddr::TcpTls {
                    host,
                    port,
                    insecure: false,
                    tls_params: None,
                },
                _ => ConnectionAddr::Tcp(host, port),
            };
            let Ok(client) = self.client(self.info.clone().set_addr(addr)).await else {
                continue;
            };
            match tokio::time::timeout(timeout, client.get_async_pubsub()).await {
                Ok(Ok(pubsub)) => return Ok(pubsub),
                Ok(Err(e)) => last = LinkError::from_redis(&e),
                Err(_) => last = LinkError::Timeout(timeout),
            }
        }
        Err(last)
    }
}

/// The URL's connection info with the configured credentials applied; refuses
/// what the gateway will not do (unverified TLS).
fn connection_info(target: &RedisTarget) -> Result<ConnectionInfo, LinkError> {
    let parsed =
        url::Url::parse(&target.url).map_err(|e| LinkError::Setup(format!("not a URL: {e}")))?;
    if parsed.fragment() == Some("insecure") {
        return Err(LinkError::Setup(
            "#insecure turns off certificate checks; use cache.redis_ca_file for a private CA"
                .into(),
        ));
    }
    let info = target
        .url
        .as_str()
        .into_connection_info()
        .map_err(|e| LinkError::Setup(e.to_string()))?;
    let mut redis = info.redis_settings().clone();
    if let Some(user) = &target.username {
        redis = redis.set_username(user);
    }
    if let Some(password) = &target.password {
        redis = redis.set_password(password.expose_secret());
    }
    if target.ca_pem.is_some() && !matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
        return Err(LinkError::Setup(
            "cache.redis_ca_file is set but cache.redis_url is not rediss:// (TLS)".into(),
        ));
    }
    Ok(info.set_redis_settings(redis))
}

/// A client for `info`, trusting `roots` (the private CA with the platform's
/// roots) when given and the URL is TLS.
fn client_for(roots: Option<&[u8]>, info: ConnectionInfo) -> Result<Client, LinkError> {
    let result = match (roots, info.addr()) {
        (Some(roots), ConnectionAddr::TcpTls { .. }) => Client::build_with_tls(
            info,
            TlsCertificates {
                client_tls: None,
                root_cert: Some(roots.to_vec()),
            },
        ),
        _ => Client::open(info),
    };
    result.map_err(|e| LinkError::Setup(e.to_string()))
}

/// `ca` followed by the platform's roots, as one PEM bundle: the Redis client
/// trusts either the platform or a given bundle, and a private CA should add to
/// the platform's roots, not replace them.
fn with_platform_roots(ca: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    let mut bundle = ca.to_vec();
    bundle.push(b'\n');
    for cert in rustls_native_certs::load_native_certs().certs {
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        bundle.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            bundle.extend_from_slice(line);
            bundle.push(b'\n');
        }
        bundle.extend_from_slice(b"-----END CERTIFICATE-----\n");
    }
    bundle
}

/// Checks a PEM bundle of CA certificates: at least one certificate, each one
/// parsable. Returns how many.
pub fn check_ca_pem(pem: &[u8]) -> Result<usize, String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate bundle: {e}"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into());
    }
    let mut store = rustls::RootCertStore::empty();
    let (_, bad) = store.add_parsable_certificates(certs.iter().cloned());
    if bad > 0 {
        return Err(format!(
            "{bad} of {} certificates cannot be parsed",
            certs.len()
        ));
    }
    Ok(certs.len())
}

/// The distinct masters of a `CLUSTER SLOTS` answer; a master announced with an
/// empty host (a node that does not know its own name) is reached at `seed_host`.
fn masters_of(slots: &redis::Value, seed_host: &str) -> Vec<(String, u16)> {
    let mut masters: Vec<(String, u16)> = Vec::new();
    let redis::Value::Array(ranges) = slots else {
        return masters;
    };
    for range in ranges {
        let redis::Value::Array(parts) = range else {
            continue;
        };
        let Some(redis::Value::Array(node)) = parts.get(2) else {
            continue;
        };
        let host = match node.first() {
            Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(redis::Value::SimpleString(s)) => s.clone(),
            _ => continue,
        };
        let Some(redis::Value::Int(port)) = node.get(1) else {
            continue;
        };
        let host = if host.is_empty() || host == "?" {
            seed_host.to_owned()
        } else {
            host
        };
        let Ok(port) = u16::try_from(*port) else {
            continue;
        };
        if !masters.iter().any(|(h, p)| *h == host && *p == port) {
            masters.push((host, port));
        }
    }
    masters
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::{ErrorKind, RedisError};
    use secrecy::SecretString;

    fn target(url: &str) -> RedisTarget {
        RedisTarget {
            url: url.into(),
            mode: RedisMode::Auto,
            ca_pem: None,
            username: None,
            password: None,
            iam: None,
            timeout: Duration::from_millis(100),
        }
    }

    #[test]
    fn debug_and_redaction_never_show_a_password() {
        let mut t = target("rediss://app:hunter2@cache.example:6379");
        t.password = Some(SecretString::from("s3cr3t-pw".to_owned()));
        let shown = format!("{t:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cr3t-pw"),
            "{shown}"
        );
        assert!(shown.contains("app"), "the user is not secret: {shown}");
        assert_eq!(
            crate::http::redact_url_password("redis://127.0.0.1:1"),
            "redis://127.0.0.1:1"
        );
    }

    #[test]
    fn insecure_tls_and_a_ca_without_tls_are_refused() {
        let err = Link::new(target("rediss://cache.example:6379/#insecure")).unwrap_err();
        assert!(err.to_string().contains("#insecure"), "{err}");
        let mut t = target("redis://cache.example:6379");
        t.ca_pem = Some(b"-----BEGIN CERTIFICATE-----\n".to_vec());
        let err = Link::new(t).unwrap_err();
        assert!(err.to_string().contains("not rediss://"), "{err}");
    }

    #[test]
    fn configured_credentials_override_the_url() {
        let mut t = target("redis://old:old-pw@127.0.0.1:6379");
        t.username = Some("gateway".into());
        t.password = Some(SecretString::from("new-pw".to_owned()));
        let info = connection_info(&t).unwrap();
        assert_eq!(info.redis_settings().username(), Some("gateway"));
        assert_eq!(info.redis_settings().password(), Some("new-pw"));
        assert!(
            Link::new(target("rediss://cache.example:6379"))
                .unwrap()
                .is_tls()
        );
        assert!(
            !Link::new(target("redis://cache.example:6379"))
                .unwrap()
                .is_tls()
        );
    }

    #[test]
    fn ca_bundles_are_checked() {
        assert!(
            check_ca_pem(b"")
                .unwrap_err()
                .contains("no PEM certificate")
        );
        assert!(
            check_ca_pem(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
                .is_err()
        );
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        assert_eq!(check_ca_pem(ca.cert.pem().as_bytes()), Ok(1));
    }

    #[test]
    fn masters_are_read_from_cluster_slots() {
        use redis::Value::{Array, BulkString, Int};
        let node = |host: &str, port: i64| Array(vec![BulkString(host.into()), Int(port)]);
        let slots = Array(vec![
            Array(vec![
                Int(0),
                Int(5460),
                node("10.0.0.1", 7000),
                node("10.0.0.4", 7003),
            ]),
            Array(vec![Int(5461), Int(10922), node("", 7001)]),
            Array(vec![Int(10923), Int(16383), node("10.0.0.1", 7000)]),
        ]);
        assert_eq!(
            masters_of(&slots, "seed.example"),
            vec![("10.0.0.1".into(), 7000), ("seed.example".into(), 7001)]
        );
    }

    #[test]
    fn wrong_password_is_an_authentication_failure() {
        let e = RedisError::from((ErrorKind::AuthenticationFailed, "WRONGPASS"));
        assert!(matches!(LinkError::from_redis(&e), LinkError::Auth(_)));
        let e = RedisError::from((ErrorKind::Io, "invalid peer certificate: UnknownIssuer"));
        assert!(matches!(LinkError::from_redis(&e), LinkError::Tls(_)));
    }
}
