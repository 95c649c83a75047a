//! The first bytes after a TLS 1.3 handshake, read before HTTP/2 takes the stream.
//!
//! With TLS 1.3 the client's handshake completes before the server has judged the client's
//! certificate; a refusal arrives later as an alert, and if h2 happens to write first it sees
//! only a broken pipe. A peer that accepted us sends its first HTTP/2 frames at once, one that
//! refused sends the alert: reading first makes the verdict, and so the error message,
//! deterministic. The bytes read are replayed to h2 ([`Replay`]). Both ends that dial use it:
//! the coordinator towards an agent, and an agent towards the `ferry serve` it dials.
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Why no first bytes came.
#[derive(Debug, thiserror::Error)]
pub enum NoFirstBytes {
    #[error("nothing came within {0:?} of the TLS handshake")]
    Timeout(Duration),
    /// The read failed: a TLS alert (the peer refused us) or a transport error.
    #[error("{0}")]
    Io(#[source] std::io::Error),
    #[error("the peer closed the connection right after the TLS handshake")]
    Closed,
}

/// Waits up to `limit` for the peer's first bytes after the handshake.
pub async fn first_bytes<S: AsyncRead + Unpin>(mut tls: S, limit: Duration) -> Result<Replay<S>, NoFirstBytes> {
    let mut buf = vec![0u8; 1024];
    match tokio::time::timeout(limit, tls.read(&mut buf)).await {
        Err(_) => Err(NoFirstBytes::Timeout(limit)),
        Ok(Err(e)) => Err(NoFirstBytes::Io(e)),
        Ok(Ok(0)) => Err(NoFirstBytes::Closed),
        Ok(Ok(n)) => {
            buf.truncate(n);
            Ok(Replay { first: buf, pos: 0, inner: tls })
        }
    }
}

/// A stream that yields `first` before reading from `inner`.
pub struct Replay<S> {
    first: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Replay<S> {
    /// The stream read from.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.pos < self.first.len() {
            let n = buf.remaining().min(self.first.len() - self.pos);
            let start = self.pos;
            buf.put_slice(&self.first[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
