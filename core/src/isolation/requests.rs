//! Requests to an isolated plugin from kiln's async HTTP tasks: the frame goes out and the reply
//! comes back on a tokio connection, so a request takes no blocking-pool thread (two thread
//! switches fewer than a blocking call). Host calls the plugin makes meanwhile are served on the
//! worker (`block_in_place`, as in-process plugins' host calls are), logs inline.

use super::calls::serve_host_call;
use super::process::Child;
use super::wire::{self, Frame};
use super::{Death, Isolated, Reply, crashed, reply_in, spin};
use crate::host::HostCtx;
use crate::loader::CallError;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// One connection to a child, for async callers.
pub(super) struct AsyncConn {
    stream: BufReader<UnixStream>,
    buf: Vec<u8>,
}

/// Requests in flight from this process to isolated plugins (see `spin`).
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

impl AsyncConn {
    /// Sends a call and serves the child's host calls until its reply, left in `buf`.
    async fn call(&mut self, frame: Frame, host: &Arc<HostCtx>, deadline: Instant, route: &Arc<str>) -> io::Result<()> {
        let in_flight = spin::InFlight::enter(&IN_FLIGHT);
        let sequential = in_flight.sequential();
        let mut bytes = frame.into_bytes()?;
        if sequential && bytes[4] == wire::HANDLE {
            bytes[4] = wire::HANDLE_THEN_POLL;
        }
        self.stream.get_mut().write_all(&bytes).await?;
        loop {
            // With one request after another, the answer of a quick handler is polled for on
            // this worker (a few µs) rather than waited for in the reactor (an idle vCPU
            // woken: tens of µs).
            if sequential && in_flight.alone() && self.stream.buffer().is_empty() {
                spin::ready_within(self.stream.get_ref().as_raw_fd(), spin::budget());
            }
            let kind = wire::read_frame_async(&mut self.stream, &mut self.buf).await?;
            let answer = match kind {
                wire::REPLY => return Ok(()),
                // Quick and without I/O: on the worker.
                wire::HOST_LOG => {
                    let _route = crate::host::on_route(route, deadline);
                    serve_host_call(kind, &self.buf, host)
                }
                wire::HOST_CALL => blocking_host_call(&self.buf, host, deadline, route).await,
                _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "an unexpected frame")),
            };
            self.stream.get_mut().write_all(&answer.into_bytes()?).await?;
        }
    }
}

/// A host call (storage, the database, a service) served off the async pool's hands: the
/// worker is handed over (`block_in_place`) on a multi-threaded runtime, else the call moves to
/// the blocking pool.
async fn blocking_host_call(body: &[u8], host: &Arc<HostCtx>, deadline: Instant, route: &Arc<str>) -> Frame {
    let serve = move |body: &[u8], host: &HostCtx, route: &str| {
        let _route = crate::host::on_route(route, deadline);
        serve_host_call(wire::HOST_CALL, body, host)
    };
    let multi_threaded =
        tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread;
    if multi_threaded {
        return tokio::task::block_in_place(|| serve(body, host, route));
    }
    let (body, host, route) = (body.to_vec(), host.clone(), route.clone());
    tokio::task::spawn_blocking(move || serve(&body, &host, &route))
        .await
        .unwrap_or_else(|_| Frame::reply(kiln_types::abi::STATUS_ERROR, 0, b"", b""))
}

impl Child {
    async fn take_async_conn(&self) -> io::Result<AsyncConn> {
        if let Some(conn) = self.idle_async.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(conn);
        }
        if self.dead.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the plugin's process is gone"));
        }
        let stream = UnixStream::connect(&self.path).await?;
        Ok(AsyncConn { stream: BufReader::with_capacity(64 * 1024, stream), buf: Vec::new() })
    }

    fn put_back_async(&self, mut conn: AsyncConn) {
        conn.buf.shrink_to(1 << 20);
        let mut idle = self.idle_async.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < super::MAX_IDLE && !self.dead.load(Ordering::SeqCst) {
            idle.push(conn);
        }
    }

    /// [`Child::failure`] (which waits for the child's end) off the async worker.
    async fn failure_async(self: &Arc<Self>) -> CallError {
        let child = self.clone();
        tokio::task::spawn_blocking(move || child.failure())
            .await
            .unwrap_or_else(|e| crashed(format!("PluginCrashed: the plugin's process failed: {e}")))
    }
}

impl Isolated {
    /// A request (see [`Isolated::request_frame`]) from an async task, answered by `deadline`:
    /// past it the child is killed and the answer is [`CallError::Timeout`].
    pub async fn handle_async(
        self: &Arc<Self>,
        frame: Frame,
        deadline: Instant,
        route: &Arc<str>,
    ) -> Result<Reply, CallError> {
        let child = match self.live_child_now()? {
            Some(child) => child,
            None => {
                // Restarting: wait for it (briefly) where waiting blocks nothing else.
                let me = self.clone();
                tokio::task::spawn_blocking(move || me.live_child(deadline))
                    .await
                    .map_err(|e| crashed(format!("PluginCrashed: {e}")))??
            }
        };
        let mut conn = match child.take_async_conn().await {
            Ok(c) => c,
            Err(_) if child.dead.load(Ordering::SeqCst) => return Err(child.failure_async().await),
            Err(e) => return Err(crashed(format!("PluginCrashed: cannot reach the plugin's process: {e}"))),
        };
        match tokio::time::timeout_at(deadline.into(), conn.call(frame, &self.host, deadline, route)).await {
            Ok(Ok(())) => {
                let r = reply_in(&conn.buf)?;
                let reply = Reply { status: r.status, http: r.http, head: r.a.to_vec(), body: r.b.to_vec() };
                child.put_back_async(conn);
                Ok(reply)
            }
            Ok(Err(e)) => {
                tracing::debug!(plugin = %self.name, "a request to the plugin's process broke: {e}");
                Err(child.failure_async().await)
            }
            Err(_) => {
                child.kill(Death::Timeout);
                Err(CallError::Timeout)
            }
        }
    }
}
