//! A deadline for request heads: a client must send a request's complete head (request line and
//! headers) within a time limit, counted from the connection's start or from the end of the
//! previous answer. A client that sends headers that never end, or trickles them byte by byte
//! (slowloris), or keeps an idle connection open, is disconnected then. poem 3 offers no header
//! read timeout (hyper's needs a timer poem does not pass), so this wraps the accepted sockets.
//!
//! The connection tracks whether it awaits a head: from its start, and again after each answer
//! it writes; the head ends at the first blank line (`\r\n\r\n`) the client sends. While it awaits
//! one, a read that would wait past the deadline fails with `TimedOut`, which ends the connection.
//! Once a head has arrived, the request takes as long as it takes (a build behind an admin call
//! can take minutes); bodies have their own deadline (see `body`).
//!
//! A request line longer than [`MAX_REQUEST_LINE`] (an over-long query string) is answered here,
//! with kiln's JSON error shape, instead of hyper's empty 414: the answer is written, the rest of
//! the head is read and dropped (so that the client reads the answer rather than a reset), and
//! the connection ends.

use crate::error_code::ErrorCode;
use poem::http::uri::Scheme;
use poem::listener::Acceptor;
use poem::web::{LocalAddr, RemoteAddr};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The longest request line (method, target, version) kiln reads.
pub const MAX_REQUEST_LINE: usize = 16 * 1024;

/// The most bytes of an over-long head read and dropped before the connection ends.
const MAX_DISCARD: usize = 1 << 20;

/// Wraps an acceptor so that its connections have a head deadline.
pub struct HeadDeadlineAcceptor<A> {
    pub inner: A,
    pub limit: Duration,
}

impl<A: Acceptor> Acceptor for HeadDeadlineAcceptor<A> {
    type Io = HeadDeadline<A::Io>;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.inner.local_addr()
    }

    async fn accept(&mut self) -> io::Result<(Self::Io, LocalAddr, RemoteAddr, Scheme)> {
        let (io, local, remote, scheme) = self.inner.accept().await?;
        Ok((HeadDeadline::new(io, self.limit), local, remote, scheme))
    }
}

/// A connection whose request heads must arrive in time.
pub struct HeadDeadline<T> {
    inner: T,
    limit: Duration,
    /// Whether a head is awaited (then `sleep` bounds the wait).
    awaiting: bool,
    /// The head deadline's timer, allocated once per connection.
    sleep: Pin<Box<Sleep>>,
    /// The last three bytes read, to find a `\r\n\r\n` split across reads.
    tail: [u8; 3],
    /// Bytes of the awaited head's request line read so far (`None` once its `\r\n` came).
    line: Option<usize>,
    /// `Some(n)`: the request line was too long, the answer is sent, `n` bytes were dropped.
    discarding: Option<usize>,
}

impl<T> HeadDeadline<T> {
    fn new(inner: T, limit: Duration) -> Self {
        let sleep = Box::pin(tokio::time::sleep(limit));
        Self { inner, limit, awaiting: true, sleep, tail: [0; 3], line: Some(0), discarding: None }
    }

    /// Counts `bytes` into the request line; whether it is now too long.
    fn line_too_long(&mut self, bytes: &[u8]) -> bool {
        let Some(n) = self.line else { return false };
        match bytes.iter().position(|b| *b == b'\n') {
            Some(i) => {
                self.line = None;
                n + i > MAX_REQUEST_LINE
            }
            None => {
                self.line = Some(n + bytes.len());
                n + bytes.len() > MAX_REQUEST_LINE
            }
        }
    }

    /// Whether `bytes` (following `self.tail`) complete a head; updates the tail. No copy of
    /// `bytes`: this runs on every read of every request head.
    fn ends_head(&mut self, bytes: &[u8]) -> bool {
        let k = bytes.len().min(3);
        let mut seam = [0u8; 6];
        seam[..3].copy_from_slice(&self.tail);
        seam[3..3 + k].copy_from_slice(&bytes[..k]);
        let seam = &seam[..3 + k];
        let found = seam.windows(4).any(|w| w == b"\r\n\r\n") || bytes.windows(4).any(|w| w == b"\r\n\r\n");
        self.tail.copy_from_slice(&seam[seam.len() - 3..]);
        if bytes.len() >= 3 {
            self.tail.copy_from_slice(&bytes[bytes.len() - 3..]);
        }
        found
    }
}

/// kiln's answer to an over-long request line.
fn uri_too_long() -> Vec<u8> {
    let message = format!(
        "the request line is longer than {MAX_REQUEST_LINE} bytes (a query string that long belongs in a body)"
    );
    let body =
        serde_json::json!({ "error": ErrorCode::UriTooLong.as_str(), "message": message, "details": {} }).to_string();
    format!(
        "HTTP/1.1 414 URI Too Long\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl<T: AsyncRead + AsyncWrite + Unpin> HeadDeadline<T> {
    /// Reads and drops the rest of an over-long head; `Ready(Ok(()))` (end of stream, to hyper)
    /// once it ended, the client stopped, or enough was dropped.
    fn poll_discard(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut scratch = [0u8; 8192];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) => {
                    let n = buf.filled().len();
                    let dropped = self.discarding.unwrap_or(0) + n;
                    self.discarding = Some(dropped);
                    let filled = buf.filled().to_vec();
                    if n == 0 || self.ends_head(&filled) || dropped > MAX_DISCARD {
                        self.awaiting = false;
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    let expired = self.awaiting && self.sleep.as_mut().poll(cx).is_ready();
                    return if expired { Poll::Ready(Ok(())) } else { Poll::Pending };
                }
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for HeadDeadline<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.discarding.is_some() {
            return self.poll_discard(cx);
        }
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if self.awaiting {
                    let new = &buf.filled()[before..];
                    if self.line_too_long(new) {
                        // Answer here (a small write to a fresh socket completes at once; if it
                        // cannot, the connection just ends), then drop the rest of the head.
                        let whole_head = self.ends_head(new);
                        let answer = uri_too_long();
                        let _ = Pin::new(&mut self.inner).poll_write(cx, &answer);
                        self.discarding = Some(0);
                        buf.set_filled(before);
                        if whole_head {
                            self.awaiting = false;
                            return Poll::Ready(Ok(())); // the whole head was in this read
                        }
                        return self.poll_discard(cx);
                    }
                    if self.ends_head(new) {
                        self.awaiting = false;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = self.awaiting && self.sleep.as_mut().poll(cx).is_ready();
                if expired {
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the request head did not arrive in time")))
                } else {
                    Poll::Pending
                }
            }
            other => other,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HeadDeadline<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            // An answer went out: the next request's head is awaited from now. Re-arming the
            // timer is a trip to tokio's timer wheel, which under load would be one per request;
            // it is skipped while the armed deadline lies within 1/32 of the limit of the exact
            // one (so a head may get up to 3% less time than the limit, never more).
            let at = Instant::now() + self.limit;
            if at.saturating_duration_since(self.sleep.deadline()) > self.limit / 32 {
                self.sleep.as_mut().reset(at);
            }
            self.awaiting = true;
            self.tail = [0; 3];
            self.line = Some(0);
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_head_ends_at_a_blank_line_even_split_across_reads() {
        let mut d = HeadDeadline::new((), Duration::from_secs(1));
        assert!(!d.ends_head(b"GET / HTTP/1.1\r\nHost: x\r"));
        assert!(!d.ends_head(b"\n"));
        assert!(d.ends_head(b"\r\n"));
        let mut d = HeadDeadline::new((), Duration::from_secs(1));
        assert!(!d.ends_head(b"GET / HTTP/1.1\r\n"));
        assert!(d.ends_head(b"\r\nbody"));
    }

    #[tokio::test]
    async fn a_request_line_is_measured_within_a_read_and_across_reads() {
        let mut d = HeadDeadline::new((), Duration::from_secs(1));
        assert!(!d.line_too_long(b"GET /short HTTP/1.1\r\nHost: x\r\n\r\n"));
        let long = format!("GET /?{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_REQUEST_LINE));
        let mut d = HeadDeadline::new((), Duration::from_secs(1));
        assert!(d.line_too_long(long.as_bytes()), "all in one read");
        let mut d = HeadDeadline::new((), Duration::from_secs(1));
        assert!(!d.line_too_long(&long.as_bytes()[..MAX_REQUEST_LINE]));
        assert!(d.line_too_long(&long.as_bytes()[MAX_REQUEST_LINE..]), "split across reads");
    }
}
