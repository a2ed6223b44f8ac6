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
//!
//! One timer serves every connection: a watch task ticks a coarse clock (every 1/32 of the
//! limit, between 10 and 250 ms) and wakes the connections whose head is overdue. A timer per
//! connection, re-armed after every answer, made each park of a runtime worker walk tokio's
//! timer wheel and cost about 8% of the CPU of a small request (`bench/run`, the throughput
//! section). A head gets the limit, give or take one tick.

use crate::error_code::ErrorCode;
use futures_util::task::AtomicWaker;
use poem::http::uri::Scheme;
use poem::listener::Acceptor;
use poem::web::{LocalAddr, RemoteAddr};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The longest request line (method, target, version) kiln reads.
pub const MAX_REQUEST_LINE: usize = 16 * 1024;

/// The most bytes of an over-long head read and dropped before the connection ends.
const MAX_DISCARD: usize = 1 << 20;

/// Wraps an acceptor so that its connections have a head deadline.
pub struct HeadDeadlineAcceptor<A> {
    inner: A,
    limit: Duration,
    watch: Arc<Watch>,
}

impl<A> HeadDeadlineAcceptor<A> {
    /// Wraps `inner`, and starts the watch task (on the current runtime; it ends when the
    /// acceptor is dropped).
    pub fn new(inner: A, limit: Duration) -> Self {
        let watch = Arc::new(Watch::default());
        let tick = (limit / 32).clamp(Duration::from_millis(10), Duration::from_millis(250));
        tokio::spawn(watch_task(Arc::downgrade(&watch), tick));
        Self { inner, limit, watch }
    }
}

impl<A: Acceptor> Acceptor for HeadDeadlineAcceptor<A> {
    type Io = HeadDeadline<A::Io>;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.inner.local_addr()
    }

    async fn accept(&mut self) -> io::Result<(Self::Io, LocalAddr, RemoteAddr, Scheme)> {
        let (io, local, remote, scheme) = self.inner.accept().await?;
        Ok((HeadDeadline::new(io, self.limit, &self.watch), local, remote, scheme))
    }
}

/// The coarse clock and the connections it watches.
#[derive(Default)]
struct Watch {
    /// Milliseconds since the watch started, as of its last tick.
    now_ms: AtomicU64,
    conns: Mutex<Vec<Weak<Overdue>>>,
}

/// What the watch task knows of one connection.
#[derive(Default)]
struct Overdue {
    /// When the awaited head is overdue, on the watch's clock (`u64::MAX`: no head awaited).
    at_ms: AtomicU64,
    /// The task reading the connection, woken once the head is overdue.
    waker: AtomicWaker,
}

/// Ticks the clock of `watch` and wakes the connections whose head is overdue, until the
/// acceptor is gone.
async fn watch_task(watch: Weak<Watch>, tick: Duration) {
    let start = tokio::time::Instant::now();
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(watch) = watch.upgrade() else { return };
        let now = start.elapsed().as_millis() as u64;
        watch.now_ms.store(now, Ordering::Relaxed);
        let mut conns = watch.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.retain(|conn| match conn.upgrade() {
            Some(conn) => {
                if conn.at_ms.load(Ordering::Relaxed) <= now {
                    conn.waker.wake();
                }
                true
            }
            None => false,
        });
    }
}

/// A connection whose request heads must arrive in time.
pub struct HeadDeadline<T> {
    inner: T,
    limit_ms: u64,
    /// Whether a head is awaited (then `overdue` bounds the wait).
    awaiting: bool,
    watch: Arc<Watch>,
    overdue: Arc<Overdue>,
    /// The last three bytes read, to find a `\r\n\r\n` split across reads.
    tail: [u8; 3],
    /// Bytes of the awaited head's request line read so far (`None` once its `\r\n` came).
    line: Option<usize>,
    /// `Some(n)`: the request line was too long, the answer is sent, `n` bytes were dropped.
    discarding: Option<usize>,
}

impl<T> HeadDeadline<T> {
    fn new(inner: T, limit: Duration, watch: &Arc<Watch>) -> Self {
        let overdue = Arc::new(Overdue::default());
        watch.conns.lock().unwrap_or_else(|p| p.into_inner()).push(Arc::downgrade(&overdue));
        let mut conn = Self {
            inner,
            limit_ms: limit.as_millis() as u64,
            awaiting: true,
            watch: watch.clone(),
            overdue,
            tail: [0; 3],
            line: Some(0),
            discarding: None,
        };
        conn.await_head();
        conn
    }

    /// A head is awaited from now.
    fn await_head(&mut self) {
        let now = self.watch.now_ms.load(Ordering::Relaxed);
        self.overdue.at_ms.store(now.saturating_add(self.limit_ms), Ordering::Relaxed);
        self.awaiting = true;
        self.tail = [0; 3];
        self.line = Some(0);
    }

    /// The awaited head came.
    fn head_came(&mut self) {
        self.awaiting = false;
        self.overdue.at_ms.store(u64::MAX, Ordering::Relaxed);
    }

    /// On a read that must wait: whether the awaited head is overdue; if not, the watch will
    /// wake this task when it is.
    fn overdue(&self, cx: &Context<'_>) -> bool {
        if !self.awaiting {
            return false;
        }
        self.overdue.waker.register(cx.waker());
        self.overdue.at_ms.load(Ordering::Relaxed) <= self.watch.now_ms.load(Ordering::Relaxed)
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
                        self.head_came();
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    return if self.overdue(cx) { Poll::Ready(Ok(())) } else { Poll::Pending };
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
                            self.head_came();
                            return Poll::Ready(Ok(())); // the whole head was in this read
                        }
                        return self.poll_discard(cx);
                    }
                    if self.ends_head(new) {
                        self.head_came();
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if self.overdue(cx) {
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the request head did not arrive in time")))
                } else {
                    Poll::Pending
                }
            }
            other => other,
        }
    }
}

impl<T> HeadDeadline<T> {
    /// After a write of `written`: once an answer went out, the next request's head is awaited
    /// from now.
    fn wrote(&mut self, written: &Poll<io::Result<usize>>) {
        if matches!(written, Poll::Ready(Ok(n)) if *n > 0) {
            self.await_head();
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HeadDeadline<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(&written);
        written
    }

    /// Passed through, so hyper writes a response's head and body in one `writev` (without it,
    /// hyper copies every body into its head buffer first).
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
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
        let mut d = HeadDeadline::new((), Duration::from_secs(1), &Arc::default());
        assert!(!d.ends_head(b"GET / HTTP/1.1\r\nHost: x\r"));
        assert!(!d.ends_head(b"\n"));
        assert!(d.ends_head(b"\r\n"));
        let mut d = HeadDeadline::new((), Duration::from_secs(1), &Arc::default());
        assert!(!d.ends_head(b"GET / HTTP/1.1\r\n"));
        assert!(d.ends_head(b"\r\nbody"));
    }

    #[tokio::test]
    async fn a_request_line_is_measured_within_a_read_and_across_reads() {
        let mut d = HeadDeadline::new((), Duration::from_secs(1), &Arc::default());
        assert!(!d.line_too_long(b"GET /short HTTP/1.1\r\nHost: x\r\n\r\n"));
        let long = format!("GET /?{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_REQUEST_LINE));
        let mut d = HeadDeadline::new((), Duration::from_secs(1), &Arc::default());
        assert!(d.line_too_long(long.as_bytes()), "all in one read");
        let mut d = HeadDeadline::new((), Duration::from_secs(1), &Arc::default());
        assert!(!d.line_too_long(&long.as_bytes()[..MAX_REQUEST_LINE]));
        assert!(d.line_too_long(&long.as_bytes()[MAX_REQUEST_LINE..]), "split across reads");
    }
}
