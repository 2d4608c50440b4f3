//! TLS on the gRPC listener (rustls on aws-lc-rs), with the certificate and key
//! read again every `server.tls.reload_interval_secs`: a renewal (cert-manager
//! rewriting the Secret's files) serves the next handshakes without a restart,
//! and connections already open keep theirs. New files that do not parse, or
//! whose key is not the certificate's (caught half-written), leave the current
//! pair in place; the failure is logged once per change of the files.
//!
//! Handshakes run concurrently, each within the edge's handshake timeout, after
//! the edge's connection guard (cap, per-address limit) admitted the connection.

use std::{
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use futures_util::{Stream, StreamExt as _};
use rustls::{
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tonic::transport::server::Connected;

use crate::edge::{Edge, Guarded, PeerInfo};

/// What is wrong with a TLS file: the configuration key that names it
/// (`server.tls.cert`, ...) and the message (which names the file).
pub type FileError = (&'static str, String);

/// `server.tls.reload_interval_secs` when unset.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// The certificate file's bytes and the key file's.
type Contents = (Vec<u8>, Vec<u8>);

/// What one look at the files found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// The same contents as last time.
    Unchanged,
    /// New contents, now served.
    Reloaded,
    /// New contents that cannot be served (the current pair stays); the reason.
    Refused(String),
}

/// The listener's certificate and key: the pair last read that was valid.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// The file contents last looked at (served or refused), so that a refused
    /// change is reported once, not at every look.
    seen: Mutex<Contents>,
}

impl ReloadingCert {
    /// Reads the pair in `cert` and `key` (a start fails on what `check-config`
    /// refuses).
    pub fn load(cert: &Path, key: &Path) -> Result<Self, FileError> {
        let (chain, key_pem) = Self::read(cert, key)?;
        let certified = certified_key(cert, &chain, key, &key_pem)?;
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new(Arc::new(certified)),
            seen: Mutex::new((chain, key_pem)),
        })
    }

    /// The contents of the certificate and key files.
    fn read(cert: &Path, key: &Path) -> Result<Contents, FileError> {
        Ok((
            read_file("server.tls.cert", cert)?,
            read_file("server.tls.key", key)?,
        ))
    }

    /// Reads the files again and serves them if they changed and are valid.
    pub fn reload(&self) -> Reload {
        let (chain, key) = match Self::read(&self.cert, &self.key) {
            Ok(contents) => contents,
            // A file missing for a moment (a Secret volume swapping its link):
            // the next look will tell.
            Err((_, message)) => return Reload::Refused(message),
        };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.0 == chain && seen.1 == key {
            return Reload::Unchanged;
        }
        let outcome = match certified_key(&self.cert, &chain, &self.key, &key) {
            Ok(certified) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(certified);
                Reload::Reloaded
            }
            Err((_, message)) => Reload::Refused(message),
        };
        *seen = (chain, key);
        outcome
    }

    /// The certificate chain now served (DER, leaf first).
    pub fn chain(&self) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .cert
            .clone()
    }

    /// Looks at the files every `every` until aborted, logging what changed.
    pub fn spawn_reloader(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            // The last refusal logged: each distinct one once (a file missing
            // for a while is refused at every look).
            let mut refused: Option<String> = None;
            loop {
                ticks.tick().await;
                let me = this.clone();
                let outcome = tokio::task::spawn_blocking(move || me.reload())
                    .await
                    .unwrap_or_else(|e| Reload::Refused(e.to_string()));
                match outcome {
                    // Back to what was looked at last (a file that was missing
                    // for a moment came back): a later refusal is news again.
                    Reload::Unchanged => refused = None,
                    Reload::Reloaded => {
                        refused = None;
                        tracing::info!(cert = %this.cert.display(), "TLS certificate reloaded; new handshakes use it");
                    }
                    Reload::Refused(error) => {
                        if refused.as_ref() != Some(&error) {
                            tracing::warn!(%error, "TLS certificate not reloaded; still serving the previous one");
                            refused = Some(error);
                        }
                    }
                }
            }
        })
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// The bytes of `path`; an error names `key` and the file.
pub(crate) fn read_file(key: &'static str, path: &Path) -> Result<Vec<u8>, FileError> {
    std::fs::read(path).map_err(|e| (key, format!("{}: cannot read: {e}", path.display())))
}

/// The PEM certificates in `path`, at least one.
pub(crate) fn read_certs(
    key: &'static str,
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, FileError> {
    parse_certs(key, path, &read_file(key, path)?)
}

fn parse_certs(
    key: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, FileError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            (
                key,
                format!("{}: not a PEM certificate ({e})", path.display()),
            )
        })?;
    if certs.is_empty() {
        return Err((key, format!("{}: not a PEM certificate", path.display())));
    }
    Ok(certs)
}

/// The listener's certificate chain and key, read and checked to belong
/// together (at start, and again at each reload).
pub(crate) fn load_certified_key(
    cert: &Path,
    key: &Path,
) -> Result<rustls::sign::CertifiedKey, FileError> {
    let chain_pem = read_file("server.tls.cert", cert)?;
    let key_pem = read_file("server.tls.key", key)?;
    certified_key(cert, &chain_pem, key, &key_pem)
}

/// [`load_certified_key`] on contents already read.
pub(crate) fn certified_key(
    cert: &Path,
    chain_pem: &[u8],
    key: &Path,
    key_pem: &[u8],
) -> Result<rustls::sign::CertifiedKey, FileError> {
    use rustls::pki_types::{PrivateKeyDer, pem::PemObject};
    let chain = parse_certs("server.tls.cert", cert, chain_pem)?;
    let private = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| {
        (
            "server.tls.key",
            format!(
                "{}: no PEM private key (PKCS#8, PKCS#1 or SEC1)",
                key.display()
            ),
        )
    })?;
    let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&private).map_err(|e| {
        (
            "server.tls.key",
            format!("{}: unusable private key: {e}", key.display()),
        )
    })?;
    let certified = rustls::sign::CertifiedKey::new(chain, signer);
    if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
        certified.keys_match()
    {
        return Err((
            "server.tls.key",
            format!(
                "{} is not the key of the certificate in {}",
                key.display(),
                cert.display()
            ),
        ));
    }
    Ok(certified)
}

/// The acceptor of the gRPC listener: HTTP/2 by ALPN, the reloading pair, and
/// client certificates required when `client_ca` is set.
pub fn acceptor(
    client_ca: Option<&Path>,
    cert: Arc<ReloadingCert>,
) -> Result<TlsAcceptor, FileError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ("server.tls.cert", e.to_string()))?;
    let builder = match client_ca {
        Some(ca) => {
            let refused = |e: &dyn std::fmt::Display| {
                ("server.tls.client_ca", format!("{}: {e}", ca.display()))
            };
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs("server.tls.client_ca", ca)? {
                roots.add(c).map_err(|e| refused(&e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| refused(&e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A connection after its handshake.
pub struct TlsConn(TlsStream<Guarded<TcpStream>>);

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn")
            .field("remote", &self.connect_info().remote)
            .finish_non_exhaustive()
    }
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The TLS connections of `listener`: guarded by the edge, then each handshake
/// on its own task within `handshake_timeout` (the edge's preface deadline
/// counts bytes below TLS, which a ClientHello already satisfies, so a stalled
/// handshake needs its own). Ends, closing the listener, when the server drops it.
pub fn incoming(
    listener: TcpListener,
    edge: Arc<Edge>,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
) -> impl Stream<Item = io::Result<TlsConn>> + Send + 'static {
    let (ready, rx) = tokio::sync::mpsc::channel::<TlsConn>(64);
    tokio::spawn(async move {
        let mut accepted = std::pin::pin!(crate::edge::incoming(listener, edge));
        loop {
            let stream = tokio::select! {
                next = accepted.next() => match next {
                    Some(Ok(stream)) => stream,
                    Some(Err(_)) => continue,
                    None => break,
                },
                () = ready.closed() => break,
            };
            let (acceptor, ready) = (acceptor.clone(), ready.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = ready.send(TlsConn(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
            });
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|conn| (Ok(conn), rx))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &std::path::Path, stem: &str) -> (PathBuf, PathBuf, Vec<u8>) {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert, key) = (
            dir.join(format!("{stem}.crt")),
            dir.join(format!("{stem}.key")),
        );
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        (cert, key, made.cert.der().to_vec())
    }

    #[test]
    fn a_valid_change_is_served_and_anything_else_keeps_the_current_pair() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, first) = pair(dir.path(), "a");
        let (next_cert, next_key, next) = pair(dir.path(), "b");
        let served = ReloadingCert::load(&cert, &key).unwrap();
        assert_eq!(served.chain()[0].as_ref(), first);
        assert_eq!(served.reload(), Reload::Unchanged);

        // Half-written: the new certificate beside the old key.
        std::fs::copy(&next_cert, &cert).unwrap();
        let Reload::Refused(why) = served.reload() else {
            panic!("a mismatched pair was served");
        };
        assert!(why.contains("is not the key of the certificate"), "{why}");
        assert_eq!(served.chain()[0].as_ref(), first);
        // Reported once: the same contents are not looked at again.
        assert_eq!(served.reload(), Reload::Unchanged);

        // The key follows: served.
        std::fs::copy(&next_key, &key).unwrap();
        assert_eq!(served.reload(), Reload::Reloaded);
        assert_eq!(served.chain()[0].as_ref(), next);

        // Garbage, then a file gone for a moment: the current pair stays.
        std::fs::write(&cert, "not a certificate").unwrap();
        assert!(matches!(served.reload(), Reload::Refused(_)));
        std::fs::remove_file(&key).unwrap();
        assert!(matches!(served.reload(), Reload::Refused(_)));
        assert_eq!(served.chain()[0].as_ref(), next);
    }
}
