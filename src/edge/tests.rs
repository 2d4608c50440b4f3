//! The edge's own tests.

use std::{io, net::SocketAddr, time::Duration};

use futures_util::StreamExt as _;
use tokio::net::{TcpListener, TcpStream};

use super::{
    connection::{Accept, accepting},
    request::{bound_status_message, check_unary},
    *,
};

/// A listener that fails with EMFILE `failures` times, then accepts.
struct OutOfDescriptors {
    listener: TcpListener,
    failures: usize,
    attempts: Arc<AtomicUsize>,
}

impl Accept for OutOfDescriptors {
    async fn accept(&mut self) -> io::Result<(TcpStream, SocketAddr)> {
        self.attempts.fetch_add(1, Relaxed);
        if self.failures > 0 {
            self.failures -= 1;
            return Err(io::Error::from_raw_os_error(24)); // EMFILE
        }
        self.listener.accept().await
    }
}

#[tokio::test(start_paused = true)]
async fn accept_errors_back_off_instead_of_spinning_and_mark_the_edge_refusing() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let attempts = Arc::new(AtomicUsize::new(0));
    let edge = Edge::new(EdgeSettings::default());
    let started = Instant::now();
    let _client = TcpStream::connect(addr).await.unwrap();
    let mut conns = Box::pin(accepting(
        OutOfDescriptors {
            listener,
            failures: 12,
            attempts: attempts.clone(),
        },
        edge.clone(),
    ));
    let first = conns.next().await.unwrap().unwrap();
    // One attempt per error plus the one that accepted: no spinning.
    assert_eq!(attempts.load(Relaxed), 13);
    assert_eq!(edge.stats().accept_errors.load(Relaxed), 12);
    // 5, 10, 20, … ms doubling up to 1 s: at least 5.635 s of (paused) waiting.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(5 + 10 + 20 + 40 + 80 + 160 + 320 + 640 + 4 * 1000),
        "{waited:?}"
    );
    assert!(waited < Duration::from_secs(8), "{waited:?}");
    // Readiness: refusing for a second after the last accept error.
    assert!(edge.is_refusing());
    tokio::time::advance(Duration::from_millis(1100)).await;
    assert!(!edge.is_refusing());
    drop(first);
}

fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8];
    f.extend_from_slice(&(len as u32).to_be_bytes());
    f.extend(std::iter::repeat_n(7u8, len));
    f
}

#[test]
fn status_messages_are_bounded_without_breaking_an_escape() {
    let mut h = http::HeaderMap::new();
    h.insert("grpc-message", http::HeaderValue::from_static("short"));
    bound_status_message(&mut h);
    assert_eq!(h["grpc-message"], "short");
    let long = format!(
        "{}%41{}",
        "a".repeat(MAX_STATUS_MESSAGE - 2),
        "b".repeat(5000)
    );
    h.insert("grpc-message", http::HeaderValue::from_str(&long).unwrap());
    bound_status_message(&mut h);
    let v = h["grpc-message"].to_str().unwrap();
    assert!(v.len() <= MAX_STATUS_MESSAGE + 9, "{}", v.len());
    assert!(
        v.ends_with("a%E2%80%A6"),
        "cut before the escape: {}",
        &v[v.len() - 12..]
    );
}

#[test]
fn a_unary_body_is_exactly_one_message_within_the_limit() {
    assert!(check_unary(&frame(10), 100).is_ok());
    assert!(
        check_unary(&[], 100).is_ok(),
        "an empty message is tonic's to judge"
    );
    let two = [frame(3), frame(3)].concat();
    assert_eq!(
        check_unary(&two, 100).unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        check_unary(&frame(101), 100).unwrap_err().code(),
        tonic::Code::ResourceExhausted
    );
    assert_eq!(
        check_unary(&frame(10)[..8], 100).unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
}
