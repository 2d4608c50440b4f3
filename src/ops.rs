//! What the command line does besides serving, as library code with its own
//! tests: the probe's policy (which endpoint answers for a configuration) and
//! its checks, the `check-config` report, and the shutdown signal.

use std::{net::SocketAddr, path::Path, time::Duration};

use crate::{server::LIVENESS_SERVICE, settings::Settings};

/// What `check-config` prints for a valid file: the first line says OK, the
/// rest is the effective configuration with secrets redacted.
pub fn check_config_report(path: &Path, settings: &Settings) -> String {
    format!("{}: OK\n{}", path.display(), settings.redacted_json())
}

/// Where a probe asks, for a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeTarget {
    /// The admin listener over HTTP: `/healthz` for liveness, `/readyz` else.
    Admin(String),
    /// grpc.health.v1 over plaintext gRPC.
    Grpc(SocketAddr),
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The configuration gives no endpoint a probe can reach.
    #[error(
        "the gRPC listener speaks TLS and there is no admin listener: set server.admin_listen to probe over HTTP"
    )]
    NoPlainEndpoint,
    /// The endpoint did not answer in time or at all.
    #[error("{0}")]
    Unreachable(String),
    /// It answered, but not serving; `answer` says what it answered.
    #[error("not serving")]
    NotServing {
        /// The answer, as the probe prints it.
        answer: String,
    },
}

/// The probe's policy: the admin listener when there is one (it answers
/// without TLS), else the gRPC listener if it is plaintext. A wildcard address
/// is probed on 127.0.0.1.
pub fn probe_target(settings: &Settings, service: &str) -> Result<ProbeTarget, ProbeError> {
    let local = |a: SocketAddr| {
        if a.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], a.port()))
        } else {
            a
        }
    };
    match (settings.server.admin_listen, &settings.server.tls) {
        (Some(admin), _) => {
            let route = if service == LIVENESS_SERVICE {
                "/healthz"
            } else {
                "/readyz"
            };
            Ok(ProbeTarget::Admin(format!(
                "http://{}{route}",
                local(admin)
            )))
        }
        (None, Some(_)) => Err(ProbeError::NoPlainEndpoint),
        (None, None) => Ok(ProbeTarget::Grpc(local(settings.server.listen))),
    }
}

/// Asks `target` once within `timeout`; the line describes the answer.
pub async fn probe(
    target: &ProbeTarget,
    service: &str,
    timeout: Duration,
) -> Result<String, ProbeError> {
    match target {
        ProbeTarget::Admin(url) => {
            let unreachable =
                |e: &dyn std::fmt::Display| ProbeError::Unreachable(format!("{url}: {e}"));
            let client =
                crate::http::HttpClient::new(timeout, timeout).map_err(|e| unreachable(&e))?;
            let request = http::Request::get(url.as_str())
                .body(Default::default())
                .map_err(|e| unreachable(&e))?;
            let status = client
                .send(request, 64 * 1024)
                .await
                .map_err(|e| unreachable(&e))?
                .status;
            let line = format!("{url}: {status}");
            if status.is_success() {
                Ok(line)
            } else {
                Err(ProbeError::NotServing { answer: line })
            }
        }
        ProbeTarget::Grpc(addr) => probe_grpc(*addr, service, timeout).await,
    }
}

async fn probe_grpc(
    addr: SocketAddr,
    service: &str,
    timeout: Duration,
) -> Result<String, ProbeError> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let unreachable = |e: &dyn std::fmt::Display| ProbeError::Unreachable(format!("{addr}: {e}"));
    let check = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| unreachable(&e))?
            .connect()
            .await
            .map_err(|e| unreachable(&e))?;
        let answer = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .map_err(|e| unreachable(&e))?;
        Ok::<_, ProbeError>(answer.into_inner().status)
    };
    let status = tokio::time::timeout(timeout, check).await.map_err(|_| {
        ProbeError::Unreachable(format!(
            "{addr}: no answer within {} ms",
            timeout.as_millis()
        ))
    })??;
    let name = ServingStatus::try_from(status).map_or("UNKNOWN", |s| s.as_str_name());
    let line = format!("{addr} {service:?}: {name}");
    if status == ServingStatus::Serving as i32 {
        Ok(line)
    } else {
        Err(ProbeError::NotServing { answer: line })
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::settings::tests::BASE;

    fn settings(server: &str) -> Settings {
        Settings::from_toml_str(&format!("[server]\n{server}\n{BASE}"), "t.toml").unwrap()
    }

    #[test]
    fn the_admin_listener_answers_first_on_localhost() {
        let s = settings("admin_listen = \"0.0.0.0:9464\"");
        assert_eq!(
            probe_target(&s, LIVENESS_SERVICE).unwrap(),
            ProbeTarget::Admin("http://127.0.0.1:9464/healthz".into())
        );
        assert_eq!(
            probe_target(&s, "").unwrap(),
            ProbeTarget::Admin("http://127.0.0.1:9464/readyz".into())
        );
    }

    #[test]
    fn plaintext_grpc_without_admin_and_never_tls() {
        let s = settings("listen = \"0.0.0.0:50051\"");
        assert_eq!(
            probe_target(&s, "").unwrap(),
            ProbeTarget::Grpc("127.0.0.1:50051".parse().unwrap())
        );
        let mut tls = settings("listen = \"10.0.0.1:50051\"");
        assert_eq!(
            probe_target(&tls, "").unwrap(),
            ProbeTarget::Grpc("10.0.0.1:50051".parse().unwrap())
        );
        tls.server.tls = Some(crate::config::TlsConfig {
            cert: "c.pem".into(),
            key: "k.pem".into(),
            client_ca: None,
            reload_interval_secs: 10,
        });
        assert!(matches!(
            probe_target(&tls, ""),
            Err(ProbeError::NoPlainEndpoint)
        ));
    }

    #[test]
    fn check_config_says_ok_then_shows_the_derived_endpoints() {
        let s = settings("");
        let report = check_config_report(Path::new("gw.toml"), &s);
        assert!(report.starts_with("gw.toml: OK\n{"), "{report}");
        assert!(
            report.contains("https://example.auth.us-east-1.amazoncognito.com/oauth2/token"),
            "{report}"
        );
    }

    #[tokio::test]
    async fn nothing_listening_is_unreachable_not_a_hang() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        let err = probe(&ProbeTarget::Grpc(addr), "", Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(matches!(err, ProbeError::Unreachable(_)), "{err}");
    }

    #[tokio::test]
    async fn a_not_serving_answer_is_handed_back_not_printed() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf).await.unwrap();
            conn.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
        });
        let url = format!("http://{addr}/readyz");
        let err = probe(&ProbeTarget::Admin(url.clone()), "", Duration::from_secs(5))
            .await
            .unwrap_err();
        match err {
            ProbeError::NotServing { answer } => {
                assert_eq!(answer, format!("{url}: 503 Service Unavailable"));
            }
            other => panic!("{other}"),
        }
        server.await.unwrap();
    }
}
