//! The outbound client over real TLS: the JWKS and the token endpoint served
//! over https (a TLS terminator in front of the emulator, its certificate from a
//! throwaway CA, trusted by the gateway process through SSL_CERT_FILE as an
//! operator adds a private CA); certificates for another name or from an
//! untrusted CA refused.

mod support;

use std::{path::Path, sync::Arc, time::Duration};

use m2m_gateway::{
    TokenSource,
    proto::gateway::v1::{GetTokenRequest, ValidateRequest, gateway_client::GatewayClient},
};
use support::{redis_servers::pki, *};
use tokio::net::TcpListener;
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    },
};

/// TLS on `127.0.0.1:0` (HTTP/1.1 by ALPN, as the emulator speaks), each
/// connection's plaintext relayed to `upstream`.
async fn tls_terminator(cert: &Path, key: &Path, upstream: String) -> String {
    let certs = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
            tokio::spawn(async move {
                // A refused handshake just ends the connection.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut plain = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    format!("https://127.0.0.1:{}", addr.port())
}

fn config(dir: &Path, token_endpoint: &str, issuer: &str, jwks_uri: &str) -> std::path::PathBuf {
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[cognito]\nregion = \"us-east-1\"\n\
             user_pool_id = \"us-east-1_Outbound1\"\ntoken_endpoint = \"{token_endpoint}\"\n\
             issuer = \"{issuer}\"\njwks_uri = \"{jwks_uri}\"\n\n[[clients]]\nclient_id = \"{CLIENT}\"\n\
             name = \"a\"\nallowed_scopes = [\"orders/read\"]\n",
        ),
    )
    .unwrap();
    path
}

fn ask() -> GetTokenRequest {
    GetTokenRequest {
        client_id: CLIENT.into(),
        client_secret: SECRET.into(),
        scopes: vec!["orders/read".into()],
    }
}

/// The gateway as operators run it: Cognito over https, a private CA trusted
/// through SSL_CERT_FILE; GetToken and Validate work, and a certificate for
/// another name (from the same CA) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_reaches_cognito_over_https_trusting_the_platforms_roots() {
    let pki = pki();
    let emu = emulator(vec![]).await;
    let upstream = emu
        .token_endpoint()
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let https = tls_terminator(&pki.cert, &pki.key, upstream.clone()).await;
    let secure = |url: String| url.replacen(&format!("http://{upstream}"), &https, 1);
    let dir = tempfile::tempdir().unwrap();
    let trust = [("SSL_CERT_FILE", pki.ca.display().to_string())];

    let good = config(
        dir.path(),
        &secure(emu.token_endpoint()),
        emu.issuer(),
        &secure(emu.jwks_uri()),
    );
    let (mut child, _lines, addr) = serve_process(&good, &trust).await;
    let mut client = GatewayClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let token = client.get_token(ask()).await.unwrap().into_inner();
    assert_eq!(emu.token_requests(), 1);
    let valid = client
        .validate(ValidateRequest {
            token: token.access_token,
            required_scopes: vec!["orders/read".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(valid.valid, "{valid:?}");
    child.kill().unwrap();
    child.wait().unwrap();

    // The same CA, a certificate for another name: no token, the log says why.
    let wrong = tls_terminator(&pki.wrong_name_cert, &pki.wrong_name_key, upstream.clone()).await;
    let bad = config(
        dir.path(),
        &format!("{wrong}/oauth2/token"),
        emu.issuer(),
        &secure(emu.jwks_uri()),
    );
    let (mut child, mut lines, addr) = serve_process(&bad, &trust).await;
    let mut client = GatewayClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let refused = client.get_token(ask()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("certificate not valid for name"),
        "{refused:?}"
    );
    let logged = tokio::time::timeout(
        Duration::from_secs(10),
        wait_for_line(&mut lines, "token request refused or failed"),
    )
    .await
    .expect("the certificate's refusal is logged");
    assert!(
        logged.contains("certificate not valid for name"),
        "{logged}"
    );
    assert!(!logged.contains(SECRET), "{logged}");
    assert_eq!(
        emu.token_requests(),
        1,
        "nothing reached the token endpoint"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// In the library, with the platform's roots only: a certificate from a CA the
/// machine does not trust is refused, and the error says it was the
/// certificate.
#[tokio::test]
async fn an_untrusted_certificate_is_refused_with_the_reason() {
    let pki = pki();
    let emu = emulator(vec![]).await;
    let upstream = emu
        .token_endpoint()
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let https = tls_terminator(&pki.cert, &pki.key, upstream).await;
    let tokens = TokenSource::from_cognito(
        format!("{https}/oauth2/token").parse().unwrap(),
        CLIENT,
        SECRET,
        ["orders/read"],
    )
    .unwrap();
    let err = tokens.token().await.unwrap_err().to_string();
    assert!(err.contains("certificate"), "{err}");
    assert_eq!(emu.token_requests(), 0);
}
