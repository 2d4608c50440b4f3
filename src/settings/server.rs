//! `[server]`: the listener's limits checked and typed, the TLS files read as
//! the listener will read them.

use std::{num::NonZeroUsize, time::Duration};

use super::At;
use crate::{
    config::{ConfigError, ServerConfig, TlsConfig},
    edge::EdgeSettings,
};

/// `[server]`, typed.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// gRPC address.
    pub listen: std::net::SocketAddr,
    /// Admin HTTP address.
    pub admin_listen: Option<std::net::SocketAddr>,
    /// TLS files.
    pub tls: Option<TlsConfig>,
    /// Longest RPC.
    pub request_timeout: Duration,
    /// Drain time after SIGTERM.
    pub shutdown_grace: Duration,
    /// Calls in flight across all connections.
    pub max_concurrent_requests: NonZeroUsize,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 keepalive ping interval.
    pub keepalive_interval: Duration,
    /// HTTP/2 keepalive ping timeout.
    pub keepalive_timeout: Duration,
    /// Connection and request limits (the connection cap as configured; the
    /// listener lowers it below the open-file limit when it starts).
    pub edge: EdgeSettings,
    /// Oldest a connection gets before it is asked to reconnect (`None`: no limit).
    pub max_connection_age: Option<Duration>,
    /// Time an aged connection has to finish its calls.
    pub max_connection_age_grace: Duration,
    /// After SIGTERM: readiness 503 this long while still accepting.
    pub drain_delay: Duration,
}

/// Checks `[server]` (every range, then the TLS files) and types it.
pub(super) fn check(server: &ServerConfig, at: &At<'_>) -> Result<ServerSettings, ConfigError> {
    let n = |v: usize| v as u64;
    let s = server;
    let ranges: [(&str, u64, std::ops::RangeInclusive<u64>); 17] = [
        (
            "max_connection_age_secs",
            s.max_connection_age_secs,
            0..=7 * 86_400,
        ),
        (
            "max_connection_age_grace_secs",
            s.max_connection_age_grace_secs,
            0..=3600,
        ),
        ("drain_delay_ms", s.drain_delay_ms, 0..=120_000),
        ("request_timeout_ms", s.request_timeout_ms, 1..=600_000),
        (
            "max_concurrent_requests",
            n(s.max_concurrent_requests),
            1..=1_000_000,
        ),
        ("max_connections", n(s.max_connections), 1..=1_000_000),
        (
            "max_connections_per_peer",
            n(s.max_connections_per_peer),
            0..=1_000_000,
        ),
        ("max_stream_secs", s.max_stream_secs, 1..=86_400),
        (
            "max_streams_per_peer",
            n(s.max_streams_per_peer),
            0..=1_000_000,
        ),
        (
            "max_streams_per_connection",
            n(s.max_streams_per_connection),
            1..=1_000,
        ),
        (
            "handshake_timeout_ms",
            s.handshake_timeout_ms,
            100..=120_000,
        ),
        ("idle_timeout_secs", s.idle_timeout_secs, 1..=86_400),
        (
            "request_body_timeout_ms",
            s.request_body_timeout_ms,
            100..=120_000,
        ),
        (
            "max_concurrent_streams",
            u64::from(s.max_concurrent_streams),
            1..=10_000,
        ),
        (
            "max_message_bytes",
            n(s.max_message_bytes),
            1024..=16 * 1024 * 1024,
        ),
        (
            "http2_keepalive_interval_secs",
            s.http2_keepalive_interval_secs,
            1..=3600,
        ),
        (
            "http2_keepalive_timeout_secs",
            s.http2_keepalive_timeout_secs,
            1..=3600,
        ),
    ];
    for (key, v, range) in ranges {
        at.in_range(&format!("server.{key}"), v, range)?;
    }
    if let Some(tls) = &server.tls {
        at.in_range(
            "server.tls.reload_interval_secs",
            tls.reload_interval_secs,
            1..=86_400,
        )?;
        check_tls(tls).map_err(|(key, message)| at.invalid(key, message))?;
    }
    let ms = Duration::from_millis;
    let secs = Duration::from_secs;
    let unlimited_if_zero = |n: usize| if n == 0 { usize::MAX } else { n };
    Ok(ServerSettings {
        listen: server.listen,
        admin_listen: server.admin_listen,
        tls: server.tls.clone(),
        request_timeout: ms(server.request_timeout_ms),
        shutdown_grace: ms(server.shutdown_grace_ms),
        max_connection_age: (server.max_connection_age_secs > 0)
            .then(|| secs(server.max_connection_age_secs)),
        max_connection_age_grace: secs(server.max_connection_age_grace_secs),
        drain_delay: ms(server.drain_delay_ms),
        max_concurrent_requests: NonZeroUsize::new(server.max_concurrent_requests)
            .unwrap_or(NonZeroUsize::MIN),
        max_concurrent_streams: server.max_concurrent_streams,
        keepalive_interval: secs(server.http2_keepalive_interval_secs),
        keepalive_timeout: secs(server.http2_keepalive_timeout_secs),
        edge: EdgeSettings {
            max_connections: server.max_connections,
            max_connections_per_peer: unlimited_if_zero(server.max_connections_per_peer),
            handshake_timeout: ms(server.handshake_timeout_ms),
            idle_timeout: secs(server.idle_timeout_secs),
            body_timeout: ms(server.request_body_timeout_ms),
            max_message_bytes: server.max_message_bytes,
            max_requests_per_peer: unlimited_if_zero(server.max_requests_per_peer),
            response_timeout: ms(server.request_timeout_ms),
            max_stream_lifetime: secs(server.max_stream_secs),
            max_streams_per_peer: unlimited_if_zero(server.max_streams_per_peer),
            max_streams_per_connection: server.max_streams_per_connection,
        },
    })
}

/// Reads and parses the TLS files, as the listener will: each error names the key
/// and the file (`check-config` and `serve` both stop on it).
fn check_tls(tls: &TlsConfig) -> Result<(), (&'static str, String)> {
    use crate::tls::{load_certified_key, read_certs};
    load_certified_key(&tls.cert, &tls.key)?;
    if let Some(ca) = &tls.client_ca {
        read_certs("server.tls.client_ca", ca)?;
    }
    Ok(())
}
