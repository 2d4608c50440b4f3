//! What the fleet's Redis is and how to reach it (`[cache]` typed), and why it
//! could not be used: the types the connection, the IAM token makers and the
//! configuration share, apart from the code that uses them.

use std::{fmt, time::Duration};

use redis::{ErrorKind, RedisError};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// How the gateway talks to its Redis (`cache.redis_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    /// Asks the endpoint (`INFO cluster`) and uses what it answers.
    #[default]
    Auto,
    /// One node (or a primary with replicas behind one endpoint).
    Standalone,
    /// Redis Cluster: follows MOVED/ASK redirects and topology changes.
    Cluster,
}

/// Which AWS service an IAM token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IamService {
    /// Amazon ElastiCache (Valkey or Redis OSS; serverless or not).
    #[default]
    Elasticache,
    /// Amazon MemoryDB.
    Memorydb,
}

impl IamService {
    /// SigV4's service name.
    pub fn signing_name(self) -> &'static str {
        match self {
            Self::Elasticache => "elasticache",
            Self::Memorydb => "memorydb",
        }
    }
}

/// IAM authentication (cargo feature `aws`): for whom and to which cache tokens
/// are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IamTarget {
    /// The IAM-enabled Redis user (its user id and name must be equal).
    pub user: String,
    /// The cache (ElastiCache replication group or serverless cache, MemoryDB
    /// cluster) name, lowercase.
    pub cache_name: String,
    /// An ElastiCache Serverless cache.
    pub serverless: bool,
    /// ElastiCache or MemoryDB.
    pub service: IamService,
    /// The cache's Region; the AWS chain's (AWS_REGION, profile, IMDS) when unset.
    pub region: Option<String>,
}

/// Where the fleet's Redis is and how to reach it.
#[derive(Clone)]
pub struct RedisTarget {
    /// `redis://` or `rediss://` (TLS) URL; may carry `user:password@`.
    pub url: String,
    /// Standalone, cluster, or found out.
    pub mode: RedisMode,
    /// PEM bundle of a private CA, trusted next to the platform's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// ACL user (overrides the URL's).
    pub username: Option<String>,
    /// ACL password (overrides the URL's).
    pub password: Option<SecretString>,
    /// IAM authentication instead of a password (needs the `aws` feature).
    pub iam: Option<IamTarget>,
    /// Connect and response timeout.
    pub timeout: Duration,
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTarget")
            .field("url", &crate::http::redact_url_password(&self.url))
            .field("mode", &self.mode)
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "..."))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "..."))
            .field("iam", &self.iam)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// What a Redis endpoint turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    /// A single node.
    Standalone,
    /// A cluster with these masters (`host:port`), as the endpoint announced them.
    Cluster {
        /// Master addresses.
        masters: Vec<(String, u16)>,
    },
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Standalone => f.write_str("standalone"),
            Self::Cluster { masters } => write!(f, "cluster ({} masters)", masters.len()),
        }
    }
}

/// Why Redis could not be used, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The URL or the TLS material cannot make a client.
    #[error("{0}")]
    Setup(String),
    /// Redis refused the credentials.
    #[error("authentication failed (check the ACL user and password): {0}")]
    Auth(String),
    /// The TLS handshake failed (certificate, CA or hostname).
    #[error("TLS handshake failed (check cache.redis_ca_file and the host name): {0}")]
    Tls(String),
    /// No answer in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// Anything else Redis or the network said.
    #[error("{0}")]
    Redis(String),
}

impl LinkError {
    /// Classifies a client error.
    pub(crate) fn from_redis(e: &RedisError) -> Self {
        let text = e.to_string();
        let auth = e.kind() == ErrorKind::AuthenticationFailed
            || matches!(e.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"));
        if auth {
            Self::Auth(text)
        } else if text.contains("certificate") || text.contains("TLS") || text.contains("tls") {
            Self::Tls(text)
        } else {
            Self::Redis(text)
        }
    }
}
