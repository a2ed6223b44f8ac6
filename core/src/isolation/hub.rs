//! The multiplexed connection of a plugin's process (the child side of `mux.rs`): requests
//! from kiln's HTTP tasks arrive tagged with call ids on one connection, and each is run on the
//! thread that read it.
//!
//! Waking a sleeping thread is what a call across processes costs most on a small virtual
//! machine (an IPI, and a vCPU brought back from halt). With a thread per connection, every
//! request woke one thread of this process; here one thread reads, runs what it read, and reads
//! again, so under load it finds the next requests waiting in its buffer and sleeps rarely.
//!
//! **Reading is a role, not a thread.** The reader (the connection's read half) lies in the
//! shared state while nobody reads. A thread takes it, reads until a call arrives, puts it
//! back, and runs the call; when it is done it takes the reader again, if it is still there —
//! the fast path, with no thread woken. Two things hand the role to another thread:
//! - **a call that runs long.** The *watcher*, a thread that runs no calls, looks every
//!   [`TICK`] while a call runs and nobody reads: a reader left untaken for a whole tick goes to
//!   an idle thread (woken, or started). So a slow (or hung) handler holds up the calls behind
//!   it for about a tick, not for its length. The watcher sleeps after [`WATCH_IDLE_TICKS`]
//!   ticks without a new call, and the next call wakes it.
//! - **a host call.** A thread that waits for the answer to its host call reads meanwhile if
//!   nobody else does, queues the calls it reads for idle threads (woken, or started), and when
//!   its answer comes, hands the reader to another thread waiting for one.
//!
//! Answers to host calls are handed to the thread waiting for them, whoever reads them.

use super::wire::{self, Fields, Frame};
use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::io::{self, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::Thread;
use std::time::Duration;

/// How often the watcher looks at a call that runs with nobody reading.
const TICK: Duration = Duration::from_millis(1);
/// Ticks without a new call after which the watcher sleeps until the next one.
const WATCH_IDLE_TICKS: u32 = 50;
/// The most threads the connection's calls run on (more calls wait for one).
const MAX_THREADS: usize = 512;
/// Idle threads kept (more end): each keeps a stack mapped, against the memory limit.
const MAX_IDLE: usize = 16;
/// The largest reply held back to go out with the next, and the most bytes held back.
const HOLD_REPLY: usize = 16 * 1024;
const HOLD_MAX: usize = 64 * 1024;

/// The process's multiplexed connection, once kiln opened it.
static HUB: OnceLock<Arc<Hub>> = OnceLock::new();

thread_local! {
    /// The id of the call this thread runs for the hub, while it runs one.
    static CALL: Cell<Option<u32>> = const { Cell::new(None) };
}

pub(super) struct Hub {
    write: Mutex<Out>,
    /// The connection's descriptor (shut down when the hub closes, so kiln sees it end).
    fd: std::os::fd::RawFd,
    state: Mutex<State>,
    /// Idle threads wait here.
    standby: Condvar,
    /// The watcher waits here.
    watch: Condvar,
}

/// The connection's write half, and replies held back to go out with the next (see
/// [`Hub::run`]).
struct Out {
    stream: UnixStream,
    held: Vec<u8>,
}

impl Out {
    fn flush(&mut self) -> io::Result<()> {
        if self.held.is_empty() {
            return Ok(());
        }
        let written = self.stream.write_all(&self.held);
        self.held.clear();
        self.held.shrink_to(64 * 1024);
        written
    }
}

/// The connection's read half and the buffer of the frame read last.
struct Reader {
    read: BufReader<UnixStream>,
    body: Vec<u8>,
}

impl Reader {
    /// Whether a whole call waits in the buffer (to run next, without reading).
    fn has_call(&self) -> bool {
        matches!(wire::split_frame(self.read.buffer(), wire::MAX_FRAME), Ok(Some((head, _, _))) if head.kind != wire::REPLY)
    }
}

struct Call {
    id: u32,
    kind: u8,
    /// The CPU kiln sent it from.
    cpu: u16,
    body: Vec<u8>,
}

/// A thread waiting for the answer to its host call.
struct Awaited {
    thread: Thread,
    answer: Option<Vec<u8>>,
}

#[derive(Default)]
struct State {
    /// There while no thread reads.
    reader: Option<Reader>,
    /// Times the reader was taken: the watcher's mark of progress.
    taken: u64,
    /// Calls started so far: the watcher's mark of activity.
    started: u64,
    /// Calls read by a thread that could not run them (it waits for a host call's answer).
    queue: VecDeque<Call>,
    /// Host calls waiting for their answers, by call id.
    awaited: HashMap<u32, Awaited>,
    running: usize,
    /// Threads that run calls (the watcher aside), how many of them are idle, and how many of
    /// those were woken and have not yet taken the wake-up.
    threads: usize,
    idle: usize,
    wakes: usize,
    watcher_asleep: bool,
    /// The last call read asked for a poll after it (see `spin`), and the CPU kiln sent it from.
    poll_next: bool,
    peer_cpu: u16,
    /// The connection ended: threads leave.
    closed: bool,
}

/// Serves the multiplexed connection (its `MUX` frame read) on this thread and as many more as
/// its calls need. Returns when the connection ends.
pub(super) fn serve(read: BufReader<UnixStream>, write: UnixStream) {
    let reader = Reader { read, body: Vec::new() };
    let hub = Arc::new(Hub {
        fd: write.as_raw_fd(),
        write: Mutex::new(Out { stream: write, held: Vec::new() }),
        state: Mutex::new(State { reader: Some(reader), threads: 1, ..Default::default() }),
        standby: Condvar::new(),
        watch: Condvar::new(),
    });
    if HUB.set(hub.clone()).is_err() {
        return; // one per process: kiln opens one
    }
    let watcher = hub.clone();
    if let Err(e) = std::thread::Builder::new().name("plugin-watch".into()).spawn(move || watcher.watch_calls()) {
        // Calls are served; one that runs long holds up those behind it.
        eprintln!("kiln plugin-host: cannot start the watcher thread: {e}");
    }
    hub.work();
}

/// The hub and the id of the call this thread runs for it, if it runs one.
pub(super) fn current_call() -> Option<(&'static Hub, u32)> {
    let id = CALL.with(Cell::get)?;
    Some((HUB.get()?, id))
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts one more thread (which begins idle), unless there are [`MAX_THREADS`].
    fn spawn(self: &Arc<Self>, st: &mut State) {
        if st.threads >= MAX_THREADS {
            self.wake_a_waiter(st);
            return;
        }
        let hub = self.clone();
        match std::thread::Builder::new().name("plugin-call".into()).spawn(move || hub.work()) {
            Ok(_) => st.threads += 1,
            // Under the memory limit a stack may not fit: the calls wait for a thread that has
            // one (a thread waiting for a host call's answer reads meanwhile), and the process
            // lives on.
            Err(e) => {
                static TOLD: std::sync::Once = std::sync::Once::new();
                TOLD.call_once(|| eprintln!("kiln plugin-host: cannot start a thread: {e}"));
                self.wake_a_waiter(st);
            }
        }
    }

    /// Wakes a thread that waits for a host call's answer (it reads, if nobody does).
    fn wake_a_waiter(&self, st: &State) {
        if let Some(waiter) = st.awaited.values().find(|a| a.answer.is_none()) {
            waiter.thread.unpark();
        }
    }

    /// A thread's life: run queued calls, read (and run what it reads), or wait.
    fn work(self: Arc<Self>) {
        let mut st = self.lock();
        loop {
            if st.closed {
                st.threads -= 1;
                return;
            }
            if let Some(call) = st.queue.pop_front() {
                st = self.run(st, call);
                continue;
            }
            if let Some(reader) = st.reader.take() {
                st.taken += 1;
                // Polling pays only while kiln runs on another CPU: on this one, it would keep
                // the very thread that sends the next call from running.
                let poll = st.poll_next && st.running == 0 && st.peer_cpu != wire::current_cpu();
                drop(st);
                let read = self.read_call(reader, poll);
                st = self.lock();
                match read {
                    Some((reader, call)) => {
                        st.reader = Some(reader);
                        st = self.run(st, call);
                    }
                    None => self.close(&mut st),
                }
                continue;
            }
            if st.idle >= MAX_IDLE {
                st.threads -= 1;
                return;
            }
            st.idle += 1;
            loop {
                st = self.standby.wait(st).unwrap_or_else(|p| p.into_inner());
                if st.wakes > 0 || st.closed {
                    st.wakes = st.wakes.saturating_sub(1);
                    break;
                }
            }
            st.idle -= 1;
        }
    }

    /// Gets an idle thread going (for a queued call, or the reader): wakes one not woken yet,
    /// or starts one.
    fn more_hands(self: &Arc<Self>, st: &mut State) {
        if st.idle > st.wakes {
            st.wakes += 1;
            self.standby.notify_one();
        } else {
            self.spawn(st);
        }
    }

    /// Runs `call` (the reader is back in the state, for another thread if this one takes long).
    fn run<'a>(&'a self, mut st: MutexGuard<'a, State>, call: Call) -> MutexGuard<'a, State> {
        st.running += 1;
        st.started += 1;
        st.poll_next = call.kind == wire::HANDLE_THEN_POLL;
        st.peer_cpu = call.cpu;
        if st.watcher_asleep {
            self.watch.notify_one();
        }
        drop(st);
        CALL.with(|c| c.set(Some(call.id)));
        let reply =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| super::child::dispatch(call.kind, &call.body)))
                .unwrap_or_else(|_| Frame::reply(kiln_types::abi::STATUS_ERROR, 0, b"the plugin host failed", b""));
        CALL.with(|c| c.set(None));
        // With the next call waiting in the buffer already, a small reply is held back to go
        // out with the next one: one write (and one wake-up of kiln) for a batch. The last of
        // a batch sends them all; a call that runs long has them sent by the watcher.
        let reply = reply.tag(call.id);
        let batch = reply.size() <= HOLD_REPLY && self.lock().reader.as_ref().is_some_and(Reader::has_call);
        let sent = self.send(reply, !batch);
        let mut st = self.lock();
        st.running -= 1;
        if sent.is_err() {
            self.close(&mut st);
        }
        st
    }

    /// The watcher's life: looks every tick at a call that runs while nobody reads, and gets an
    /// idle thread to take the reader if it stays untaken a whole tick.
    fn watch_calls(self: Arc<Self>) {
        let mut st = self.lock();
        let (mut quiet_ticks, mut started) = (0, st.started);
        while !st.closed {
            if (st.reader.is_some() && st.running > 0) || !st.queue.is_empty() {
                let (taken, queued) = (st.taken, st.started);
                st = self.watch.wait_timeout(st, TICK).unwrap_or_else(|p| p.into_inner()).0;
                // A call ran a whole tick with nobody reading, or a queued call waited a whole
                // tick (and none started).
                let stale_reader = st.reader.is_some() && st.taken == taken && st.running > 0;
                let stale_queue = !st.queue.is_empty() && st.started == queued;
                if stale_reader || stale_queue {
                    self.more_hands(&mut st);
                }
            } else if quiet_ticks < WATCH_IDLE_TICKS {
                st = self.watch.wait_timeout(st, TICK).unwrap_or_else(|p| p.into_inner()).0;
            } else {
                st.watcher_asleep = true;
                st = self.watch.wait(st).unwrap_or_else(|p| p.into_inner());
                st.watcher_asleep = false;
            }
            quiet_ticks = if st.started == started { quiet_ticks + 1 } else { 0 };
            started = st.started;
            // Replies held back for a call that then ran long (unless a write is under way,
            // which sends them).
            drop(st);
            let flushed = match self.write.try_lock() {
                Ok(mut out) => out.flush(),
                Err(_) => Ok(()),
            };
            st = self.lock();
            if flushed.is_err() {
                self.close(&mut st);
            }
        }
    }

    /// Reads frames until a call arrives, handing over answers to host calls on the way.
    /// `None` when the connection ends.
    fn read_call(&self, mut reader: Reader, poll: bool) -> Option<(Reader, Call)> {
        let mut poll = poll && !super::child::no_polling();
        loop {
            let head = self.read_frame(&mut reader, std::mem::take(&mut poll))?;
            if head.kind == wire::REPLY {
                self.hand_over(head.id, &mut reader.body);
                continue;
            }
            let body = std::mem::take(&mut reader.body);
            return Some((reader, Call { id: head.id, kind: head.kind, cpu: head.cpu, body }));
        }
    }

    /// One frame into `reader.body`; `poll`: poll for it a little before sleeping.
    fn read_frame(&self, reader: &mut Reader, poll: bool) -> Option<wire::Head> {
        if reader.read.buffer().is_empty() {
            let fd = reader.read.get_ref().as_raw_fd();
            if poll {
                super::spin::ready_within(fd, super::spin::budget());
            }
            super::spin::wait_readable(fd);
        }
        wire::read_frame_within(&mut reader.read, &mut reader.body, wire::MAX_FRAME).ok()
    }

    /// Gives an answer to the thread that waits for it (none waits if its call is gone).
    fn hand_over(&self, id: u32, body: &mut Vec<u8>) {
        let mut st = self.lock();
        if let Some(awaited) = st.awaited.get_mut(&id) {
            awaited.answer = Some(std::mem::take(body));
            awaited.thread.unpark();
        }
    }

    /// Sends `frame` with the replies held back before it, or (`now` false) holds it back too.
    fn send(&self, frame: Frame, now: bool) -> io::Result<()> {
        let bytes = frame.into_bytes()?;
        let mut out = self.write.lock().unwrap_or_else(|p| p.into_inner());
        if out.held.is_empty() && now {
            return out.stream.write_all(&bytes);
        }
        out.held.extend_from_slice(&bytes);
        if now || out.held.len() > HOLD_MAX { out.flush() } else { Ok(()) }
    }

    /// The connection ended (or broke): every thread leaves, waiting host calls fail, and kiln
    /// sees the connection end (its calls on it fail, and it learns what became of the process).
    fn close(&self, st: &mut State) {
        // SAFETY: shutdown(2) on the connection's descriptor, which `write` keeps open for the
        // process's life (the hub is never dropped); a writer blocked on it gets an error.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        st.closed = true;
        for awaited in st.awaited.values() {
            awaited.thread.unpark();
        }
        self.standby.notify_all();
        self.watch.notify_all();
    }

    /// A host call of call `id` (running on this thread): (status, answer).
    pub(super) fn ask(&self, id: u32, frame: Frame) -> io::Result<(i32, Vec<u8>)> {
        let me = std::thread::current();
        self.lock().awaited.insert(id, Awaited { thread: me, answer: None });
        let answer = self.send(frame.tag(id), true).and_then(|()| self.wait_answer(id));
        self.lock().awaited.remove(&id);
        let answer = answer?;
        let reply = Fields::new(&answer).reply()?;
        Ok((reply.status, reply.a.to_vec()))
    }

    /// Waits for the answer to call `id`'s host call, reading meanwhile if nobody else does.
    fn wait_answer(&self, id: u32) -> io::Result<Vec<u8>> {
        let mut st = self.lock();
        loop {
            if let Some(answer) = st.awaited.get_mut(&id).and_then(|a| a.answer.take()) {
                return Ok(answer);
            }
            if st.closed {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the connection to kiln ended"));
            }
            let Some(mut reader) = st.reader.take() else {
                drop(st);
                std::thread::park();
                st = self.lock();
                continue;
            };
            st.taken += 1;
            drop(st);
            let ended = loop {
                let Some(head) = self.read_frame(&mut reader, false) else { break true };
                if head.kind == wire::REPLY {
                    self.hand_over(head.id, &mut reader.body);
                    if head.id == id {
                        break false;
                    }
                    continue;
                }
                // A call this thread cannot run now: for an idle thread (woken, or started).
                let call = Call { id: head.id, kind: head.kind, cpu: head.cpu, body: std::mem::take(&mut reader.body) };
                let mut st = self.lock();
                st.queue.push_back(call);
                if let Some(hub) = HUB.get() {
                    hub.more_hands(&mut st);
                }
            };
            st = self.lock();
            if ended {
                self.close(&mut st);
            } else {
                st.reader = Some(reader);
                // Another thread waiting for an answer reads next; else the watcher sees to it.
                if let Some(other) = st.awaited.iter().find(|(other, a)| **other != id && a.answer.is_none()) {
                    other.1.thread.unpark();
                } else if st.watcher_asleep {
                    self.watch.notify_one();
                }
            }
        }
    }
}
