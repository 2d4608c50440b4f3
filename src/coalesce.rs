//! Write coalescing under the HTTP/2 connection.
//!
//! h2 writes a DATA payload of 256 bytes or more as its own `writev` before it can
//! buffer the next frame, and flushes again at the end of every connection poll.
//! A Validate or GetToken answer (a 0.4–0.8 KB message) therefore left as two TCP
//! segments — headers and message, then the trailers — and on loopback each segment
//! costs the sender the receiver's TCP work and a cross-core wake-up.
//!
//! [`CoalescingIo`] keeps what h2 writes in one buffer. A flush returns at once
//! and wakes the connection task instead of writing; the bytes go out, in one
//! `write`, at the task's next read of the connection — when it comes back after
//! the tasks already queued (the other calls finishing on this connection), whose
//! answers join the same write — or at shutdown, or once [`FLUSH_AT`] bytes are
//! pending. Nothing waits longer than one pass of the scheduler.
//!
//! So a completed flush does not mean the bytes were written: they go out at the
//! next read or shutdown. That is how an HTTP/2 connection (and TLS under it) uses
//! its I/O — it reads again after every write, and every wake-up — and what this
//! type is for; it is not a general-purpose writer.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// Bytes held before a write goes through without waiting for a flush.
const MAX_PENDING: usize = 64 * 1024;

/// Pending bytes at which a flush writes at once (a batch this size already
/// spreads the cost of a write thin).
pub const FLUSH_AT: usize = 16 * 1024;

/// An I/O stream whose writes are gathered until a flush (see the module docs).
#[derive(Debug)]
pub struct CoalescingIo<T> {
    inner: T,
    pending: Vec<u8>,
    /// Bytes of `pending` already written.
    sent: usize,
    /// A flush was answered without writing: the next read writes first.
    deferred: bool,
}

impl<T> CoalescingIo<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            pending: Vec::new(),
            sent: 0,
            deferred: false,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncWrite + Unpin> CoalescingIo<T> {
    /// Writes out everything pending.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.pending.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.pending.clear();
        self.sent = 0;
        self.deferred = false;
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes (writing out what is pending if needed).
    fn poll_reserve(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if !self.pending.is_empty() && self.pending.len() + len > MAX_PENDING {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for CoalescingIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.poll_read_after_flush(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> CoalescingIo<T> {
    /// A read after a deferred flush writes first: the peer may be waiting for
    /// those bytes before it sends anything (a TLS handshake does).
    fn poll_read_after_flush(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.deferred {
            // Pending: the write readiness wakes the task, which reads again.
            if let Poll::Ready(Err(e)) = self.poll_drain(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CoalescingIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_reserve(cx, data.len()))?;
        if this.pending.is_empty() && data.len() >= MAX_PENDING {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        this.pending.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        ready!(this.poll_reserve(cx, len))?;
        if this.pending.is_empty() && len >= MAX_PENDING {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.pending.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pending.is_empty() {
            return Pin::new(&mut this.inner).poll_flush(cx);
        }
        if this.pending.len() - this.sent < FLUSH_AT {
            if !this.deferred {
                // Come back after the tasks already queued; that read writes.
                this.deferred = true;
                cx.waker().wake_by_ref();
            }
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for CoalescingIo<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        task::Wake,
    };

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream, duplex};

    use super::*;
    use std::time::Duration;

    /// Counts wake-ups.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn pair() -> (CoalescingIo<DuplexStream>, DuplexStream) {
        let (a, b) = duplex(1 << 20);
        (CoalescingIo::new(a), b)
    }

    /// What the peer can read without waiting.
    async fn readable(peer: &mut DuplexStream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(Ok(n)) = tokio::time::timeout(Duration::ZERO, peer.read(&mut buf)).await {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    }

    #[tokio::test]
    async fn a_flush_defers_to_the_next_read_and_wakes_the_task_once() {
        let (mut io, mut peer) = pair();
        let wakes = Arc::new(Wakes::default());
        let waker = Arc::clone(&wakes).into();
        let mut cx = Context::from_waker(&waker);

        assert!(matches!(
            Pin::new(&mut io).poll_write(&mut cx, b"headers "),
            Poll::Ready(Ok(8))
        ));
        let parts = [io::IoSlice::new(b"message "), io::IoSlice::new(b"trailers")];
        assert!(matches!(
            Pin::new(&mut io).poll_write_vectored(&mut cx, &parts),
            Poll::Ready(Ok(16))
        ));
        assert!(
            readable(&mut peer).await.is_empty(),
            "nothing before a flush"
        );

        // A flush answers at once, writes nothing, and wakes the task to come back.
        assert!(matches!(
            Pin::new(&mut io).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert!(readable(&mut peer).await.is_empty());

        // More written and flushed in the same poll joins the batch; one wake-up.
        assert!(matches!(
            Pin::new(&mut io).poll_write(&mut cx, b" next"),
            Poll::Ready(Ok(5))
        ));
        assert!(matches!(
            Pin::new(&mut io).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert!(readable(&mut peer).await.is_empty());

        // The task comes back and reads: everything goes out first, in order.
        let mut buf = [0u8; 16];
        let mut read = ReadBuf::new(&mut buf);
        assert!(Pin::new(&mut io).poll_read(&mut cx, &mut read).is_pending());
        assert_eq!(readable(&mut peer).await, b"headers message trailers next");

        // Nothing pending: a flush is a plain flush, no wake-up.
        assert!(matches!(
            Pin::new(&mut io).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_flush_with_a_large_batch_writes_at_once() {
        let (mut io, mut peer) = pair();
        let batch = vec![5u8; FLUSH_AT];
        io.write_all(&batch).await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(readable(&mut peer).await.len(), FLUSH_AT);
    }

    #[tokio::test]
    async fn shutdown_writes_what_is_pending() {
        let (mut io, mut peer) = pair();
        io.write_all(b"last words").await.unwrap();
        io.shutdown().await.unwrap();
        let mut all = Vec::new();
        peer.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"last words");
    }

    #[tokio::test]
    async fn a_full_buffer_is_written_without_waiting_for_a_flush() {
        let (mut io, mut peer) = pair();
        let chunk = vec![7u8; MAX_PENDING / 2 + 1];
        io.write_all(&chunk).await.unwrap();
        assert!(readable(&mut peer).await.is_empty());
        // The second chunk does not fit beside the first: the first goes out.
        io.write_all(&chunk).await.unwrap();
        assert_eq!(readable(&mut peer).await.len(), chunk.len());
        // A write bigger than the buffer, with nothing pending, goes straight through.
        let (mut io, mut peer) = pair();
        let big = vec![9u8; MAX_PENDING + 1];
        io.write_all(&big).await.unwrap();
        assert_eq!(readable(&mut peer).await.len(), big.len());
    }

    #[tokio::test]
    async fn a_closed_peer_is_an_error_when_the_bytes_go_out() {
        let (mut io, peer) = pair();
        drop(peer);
        io.write_all(b"into the void").await.unwrap();
        io.flush().await.expect("a deferred flush writes nothing");
        let err = io.shutdown().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    #[tokio::test]
    async fn reads_pass_through_and_a_read_after_a_flush_writes_first() {
        let (mut io, mut peer) = pair();
        peer.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");

        // Written but not flushed: a read does not send it.
        io.write_all(b"server hello").await.unwrap();
        peer.write_all(b"more").await.unwrap();
        let mut buf = [0u8; 4];
        io.read_exact(&mut buf).await.unwrap();
        assert!(readable(&mut peer).await.is_empty());
        // Flushed (deferred): the next read sends it before reading, as a handshake
        // that waits for the peer's answer needs.
        io.flush().await.unwrap();
        assert!(readable(&mut peer).await.is_empty());
        peer.write_all(b"ok").await.unwrap();
        let mut buf = [0u8; 2];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(readable(&mut peer).await, b"server hello");
    }
}
