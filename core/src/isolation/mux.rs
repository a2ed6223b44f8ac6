//! Requests to an isolated plugin from kiln's async HTTP tasks, over one connection per child
//! that all of them share (the child side is `hub.rs`): each request's frame carries a call id,
//! and so do the host calls the plugin makes while it runs and their answers.
//!
//! **Reading is a role here too.** A call waiting for its next frame (a host call or its
//! reply) either finds it in its channel or, if no other call reads, takes the read half and
//! reads: frames for other calls go to their channels, and at the first frame of its own it
//! gives the read half up for the next waiting call. So one request after another is read by
//! its own task, with no task or thread woken in between (and it may poll for its answer, see
//! `spin`), and under load one task reads a batch of frames for many.
//!
//! **A call may be dropped at any await** (its client gone mid-request, its deadline), so
//! nothing it leaves half-done may harm the others:
//! - frames are cut from the read buffer only once whole, so a reader dropped mid-read leaves
//!   the stream intact;
//! - a frame is sent without an await: written at once as far as the socket takes it, the rest
//!   queued for a flusher task, so no frame goes out half-written;
//! - frames are handed to a call's channel under the lock that its drop takes, so none is lost
//!   in between: a dropped call refuses the host calls it was handed (and the one it was
//!   serving), so that the plugin's thread does not wait for ever, and if its reply has not
//!   come it is *abandoned*: a task reads on until the reply arrives, refusing its host calls.
//!
//! A request takes no blocking-pool thread. Host calls the plugin makes are served by the
//! request's task, with its route and deadline, as in process: logs inline, the others with the
//! worker handed over (`block_in_place`).

use super::calls::serve_host_call;
use super::process::Child;
use super::wire::{self, Frame};
use super::{Death, Isolated, Reply, crashed, reply_in, spin};
use crate::host::HostCtx;
use crate::loader::CallError;
use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// Requests in flight from this process to isolated plugins (see `spin`).
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// A frame from the child for one call: its kind and body.
type Delivery = (u8, Vec<u8>);

/// The shared connection to one child.
pub(super) struct Mux {
    write: OwnedWriteHalf,
    /// Bytes the socket did not take at once, for the flusher task.
    unsent: Mutex<Unsent>,
    read: tokio::sync::Mutex<ReadHalf>,
    calls: Mutex<Calls>,
    fd: RawFd,
    next_id: AtomicU32,
    /// The CPU the child sent its last frame from.
    peer_cpu: AtomicU16,
}

#[derive(Default)]
struct Unsent {
    bytes: Vec<u8>,
    /// A flusher task writes `bytes`.
    flushing: bool,
    /// A write failed: the connection is unusable.
    broken: bool,
}

#[derive(Default)]
struct Calls {
    /// Calls waiting for frames, by id.
    waiting: HashMap<u32, UnboundedSender<Delivery>>,
    /// Calls dropped before their replies.
    abandoned: HashSet<u32>,
    /// A task reads for the abandoned calls.
    draining: bool,
    /// The connection ended: no call starts on it.
    closed: bool,
}

/// The read half and the bytes read from it that no frame was cut from yet.
struct ReadHalf {
    stream: OwnedReadHalf,
    buf: Vec<u8>,
    /// Where the bytes not yet cut start.
    at: usize,
}

impl ReadHalf {
    /// Whether a whole frame (or a header in error) waits in the buffer.
    fn has_frame(&self) -> bool {
        !matches!(wire::split_frame(&self.buf[self.at..], wire::MAX_FRAME), Ok(None))
    }

    /// The next frame: its header and body. Cancel-safe: bytes are read into the buffer (which
    /// outlives the call) and a frame is cut only once whole.
    async fn next(&mut self) -> io::Result<(wire::Head, Vec<u8>)> {
        loop {
            if let Some((head, body, len)) = wire::split_frame(&self.buf[self.at..], wire::MAX_FRAME)? {
                if head.kind != wire::REPLY && body.len() > wire::MAX_HOST_FRAME {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "a host call over 64 MiB"));
                }
                let body = self.buf[self.at + body.start..self.at + body.end].to_vec();
                self.at += len;
                if self.at == self.buf.len() {
                    self.buf.clear();
                    self.at = 0;
                    // A large frame's room is not kept.
                    self.buf.shrink_to(READ_ROOM);
                }
                return Ok((head, body));
            }
            if self.at > 0 {
                self.buf.drain(..self.at);
                self.at = 0;
            }
            self.buf.reserve(READ_ROOM);
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the plugin's process closed the connection"));
            }
        }
    }
}

/// The room read into at once.
const READ_ROOM: usize = 64 * 1024;

fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the connection to the plugin's process ended")
}

/// A call's place in [`Calls`] and its channel, given up when the call ends (see the module's
/// docs for a call dropped before).
struct Registered<'a> {
    mux: &'a Arc<Mux>,
    id: u32,
    rx: UnboundedReceiver<Delivery>,
    /// Its reply came.
    answered: bool,
    /// It was handed a host call it has not answered yet.
    owes_answer: bool,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut refusals = usize::from(self.owes_answer);
        let drain = {
            let mut calls = self.mux.lock();
            calls.waiting.remove(&self.id);
            // Frames are handed over under this lock: none is on its way any more.
            while let Ok((kind, _)) = self.rx.try_recv() {
                if kind == wire::REPLY {
                    self.answered = true;
                } else {
                    refusals += 1;
                }
            }
            if self.answered || calls.closed {
                false
            } else {
                calls.abandoned.insert(self.id);
                !std::mem::replace(&mut calls.draining, true)
            }
        };
        for _ in 0..refusals {
            let _ = self.mux.send(refusal(self.id));
        }
        if drain {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn(self.mux.clone().drain())),
                // Another call's reads end it.
                Err(_) => self.mux.lock().draining = false,
            }
        }
    }
}

/// The answer to a host call of a call that is gone.
fn refusal(id: u32) -> Frame {
    Frame::reply(kiln_types::abi::STATUS_ERROR, 0, b"the request is gone", b"").tag(id)
}

impl Mux {
    /// Connects to `child`.
    async fn open(child: &Child) -> io::Result<Arc<Self>> {
        let mut stream = UnixStream::connect(&child.path).await?;
        stream.write_all(&Frame::new(wire::MUX).into_bytes()?).await?;
        Ok(Self::over(stream))
    }

    /// The connection `stream`, its `MUX` frame sent.
    fn over(stream: UnixStream) -> Arc<Self> {
        let fd = stream.as_raw_fd();
        let (read, write) = stream.into_split();
        Arc::new(Self {
            write,
            unsent: Mutex::default(),
            read: tokio::sync::Mutex::new(ReadHalf { stream: read, buf: Vec::new(), at: 0 }),
            calls: Mutex::default(),
            fd,
            next_id: AtomicU32::new(1),
            peer_cpu: AtomicU16::new(wire::NO_CPU),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Calls> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends a frame without an await (so that a dropped call never leaves one half-sent): as
    /// much as the socket takes now, the rest by a flusher task, in order. A write error
    /// closes the connection.
    fn send(self: &Arc<Self>, frame: Frame) -> io::Result<()> {
        let bytes = frame.into_bytes()?;
        let mut unsent = self.unsent.lock().unwrap_or_else(|p| p.into_inner());
        if unsent.broken {
            return Err(broken());
        }
        let mut rest = &bytes[..];
        if unsent.bytes.is_empty() {
            while !rest.is_empty() {
                match self.write.try_write(rest) {
                    Ok(n) => rest = &rest[n..],
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        unsent.broken = true;
                        drop(unsent);
                        self.close();
                        return Err(e);
                    }
                }
            }
        }
        if !rest.is_empty() {
            unsent.bytes.extend_from_slice(rest);
            if !unsent.flushing {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    unsent.broken = true;
                    drop(unsent);
                    self.close();
                    return Err(broken());
                };
                unsent.flushing = true;
                runtime.spawn(self.clone().flush());
            }
        }
        Ok(())
    }

    /// Writes the bytes the socket did not take at once, as it takes them.
    async fn flush(self: Arc<Self>) {
        loop {
            let writable = self.write.writable().await;
            let mut unsent = self.unsent.lock().unwrap_or_else(|p| p.into_inner());
            let written = writable.and_then(|()| {
                loop {
                    match self.write.try_write(&unsent.bytes) {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        other => break other,
                    }
                }
            });
            match written {
                Ok(n) => {
                    unsent.bytes.drain(..n);
                    if unsent.bytes.is_empty() {
                        unsent.flushing = false;
                        unsent.bytes.shrink_to(READ_ROOM);
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    (unsent.broken, unsent.flushing) = (true, false);
                    drop(unsent);
                    self.close();
                    return;
                }
            }
        }
    }

    /// The connection broke or ended: every waiting call learns so (its channel closes).
    fn close(&self) {
        let mut calls = self.lock();
        calls.closed = true;
        calls.waiting.clear();
    }

    /// Sends a call and serves the plugin's host calls until its reply, whose body it returns.
    async fn call(
        self: &Arc<Self>,
        frame: Frame,
        host: &Arc<HostCtx>,
        deadline: Instant,
        route: &Arc<str>,
    ) -> io::Result<Vec<u8>> {
        let in_flight = spin::InFlight::enter(&IN_FLIGHT);
        let sequential = in_flight.sequential();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = unbounded_channel();
        let mut call = {
            let mut calls = self.lock();
            if calls.closed {
                return Err(broken());
            }
            calls.waiting.insert(id, tx);
            Registered { mux: self, id, rx, answered: false, owes_answer: false }
        };
        let mut frame = frame.tag(id);
        if sequential && frame.kind() == wire::HANDLE {
            frame.set_kind(wire::HANDLE_THEN_POLL);
        }
        self.send(frame)?;
        loop {
            // With one request after another, the answer of a quick handler is polled for (a
            // few µs) rather than waited for in the reactor (an idle vCPU woken: tens of µs).
            let (kind, body) = self.next_for(id, &mut call.rx, sequential && in_flight.alone()).await?;
            call.owes_answer = kind != wire::REPLY;
            let answer = match kind {
                wire::REPLY => {
                    call.answered = true;
                    return Ok(body);
                }
                // Quick and without I/O: on the worker.
                wire::HOST_LOG => {
                    let _route = crate::host::on_route(route, deadline);
                    serve_host_call(kind, &body, host)
                }
                wire::HOST_CALL => blocking_host_call(&body, host, deadline, route).await,
                _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "an unexpected frame")),
            };
            call.owes_answer = false;
            self.send(answer.tag(id))?;
        }
    }

    /// The next frame for call `id`: from its channel, or read by this call while no other
    /// call reads (`poll`: poll for it a little first).
    async fn next_for(
        self: &Arc<Self>,
        id: u32,
        rx: &mut UnboundedReceiver<Delivery>,
        poll: bool,
    ) -> io::Result<Delivery> {
        let mut read = tokio::select! {
            biased;
            delivered = rx.recv() => return delivered.ok_or_else(broken),
            read = self.read.lock() => read,
        };
        // Polling pays only while the child runs on another CPU: on this one, it would keep
        // the very thread that answers from running.
        if poll && !read.has_frame() && self.peer_cpu.load(Ordering::Relaxed) != wire::current_cpu() {
            spin::ready_within(self.fd, spin::budget());
        }
        loop {
            // Delivered by the call that read before this one took over.
            if let Ok(delivered) = rx.try_recv() {
                return Ok(delivered);
            }
            let (head, body) = match read.next().await {
                Ok(frame) => frame,
                Err(e) => {
                    self.close();
                    return Err(e);
                }
            };
            self.peer_cpu.store(head.cpu, Ordering::Relaxed);
            if head.id == id {
                return Ok((head.kind, body));
            }
            self.deliver(head.kind, head.id, body);
        }
    }

    /// Hands a frame to the call it belongs to, under the lock its drop takes (so that a call
    /// dropped meanwhile finds it in its channel). A host call of a call that is gone is
    /// refused (its plugin thread would wait for ever); the reply of an abandoned call ends it.
    fn deliver(self: &Arc<Self>, kind: u8, id: u32, body: Vec<u8>) {
        {
            let mut calls = self.lock();
            if let Some(to) = calls.waiting.get(&id) {
                let _ = to.send((kind, body));
                return;
            }
            if kind == wire::REPLY {
                calls.abandoned.remove(&id);
                return;
            }
        }
        let _ = self.send(refusal(id));
    }

    /// Reads for abandoned calls until none is left (or the connection ends).
    async fn drain(self: Arc<Self>) {
        let mut read = self.read.lock().await;
        loop {
            {
                let mut calls = self.lock();
                if calls.abandoned.is_empty() || calls.closed {
                    calls.draining = false;
                    return;
                }
            }
            match read.next().await {
                Ok((head, body)) => self.deliver(head.kind, head.id, body),
                Err(_) => {
                    self.close();
                    self.lock().draining = false;
                    return;
                }
            }
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
    /// The shared connection, opened at the first request.
    async fn mux(&self) -> io::Result<Arc<Mux>> {
        if self.dead.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the plugin's process is gone"));
        }
        self.mux.get_or_try_init(|| Mux::open(self)).await.cloned()
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
        let mux = match child.mux().await {
            Ok(mux) => mux,
            Err(_) if child.dead.load(Ordering::SeqCst) => return Err(child.failure_async().await),
            Err(e) => return Err(crashed(format!("PluginCrashed: cannot reach the plugin's process: {e}"))),
        };
        match tokio::time::timeout_at(deadline.into(), mux.call(frame, &self.host, deadline, route)).await {
            Ok(Ok(body)) => {
                let r = reply_in(&body)?;
                Ok(Reply { status: r.status, http: r.http, head: r.a.to_vec(), body: r.b.to_vec() })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::logs::LogStore;
    use std::time::Duration;

    /// A request dropped after the child took it (its client gone, say): the host call its
    /// handler makes then is refused at once, the other requests go on, and once its reply
    /// comes no reading is left pending for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_call_has_its_host_calls_refused_until_its_reply() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mux = Mux::over(ours);
        let (read, child) = theirs.into_split();
        let mut child_reads = ReadHalf { stream: read, buf: Vec::new(), at: 0 };
        let host = HostCtx::new("p", "1", Arc::new(LogStore::default()));
        let call = |mux: &Arc<Mux>| {
            let (mux, host) = (mux.clone(), host.clone());
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(30);
                mux.call(Frame::new(wire::HANDLE), &host, deadline, &Arc::from("GET /x")).await
            })
        };
        let send = |frame: Frame| child.try_write(&frame.into_bytes().unwrap()).unwrap();
        async fn next(reads: &mut ReadHalf) -> (wire::Head, Vec<u8>) {
            let frame = tokio::time::timeout(Duration::from_secs(10), reads.next()).await;
            frame.expect("a frame within 10 s").unwrap()
        }

        let dropped = call(&mux);
        let (request, _) = next(&mut child_reads).await;
        assert!(matches!(request.kind, wire::HANDLE | wire::HANDLE_THEN_POLL));
        dropped.abort();
        assert!(dropped.await.unwrap_err().is_cancelled());
        // Its handler's host call, after it was dropped: refused.
        send(Frame::new(wire::HOST_CALL).bytes(b"storage.get").bytes(b"{}").tag(request.id));
        let (answer, body) = next(&mut child_reads).await;
        assert_eq!((answer.kind, answer.id), (wire::REPLY, request.id));
        assert_eq!(wire::Fields::new(&body).reply().unwrap().status, kiln_types::abi::STATUS_ERROR);
        // Another request meanwhile is served.
        let other = call(&mux);
        let (second, _) = next(&mut child_reads).await;
        assert_ne!(second.id, request.id);
        send(Frame::reply(kiln_types::abi::STATUS_OK, 200, b"", b"second").tag(second.id));
        let reply = other.await.unwrap().unwrap();
        assert_eq!(wire::Fields::new(&reply).reply().unwrap().b, b"second");
        // The dropped call's reply ends the reading for it.
        send(Frame::reply(kiln_types::abi::STATUS_OK, 200, b"", b"late").tag(request.id));
        let deadline = Instant::now() + Duration::from_secs(10);
        while mux.lock().draining || !mux.lock().abandoned.is_empty() {
            assert!(Instant::now() < deadline, "the dropped call is still read for");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
