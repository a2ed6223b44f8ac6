//! The plugin host process (`kiln plugin-host`): the child side of process isolation.
//!
//! The parent binds a Unix socket in a private directory and hands its listening end over as
//! this process's stdin. The first connection it accepts is the **side** connection, on which
//! this process asks the host for what a thread the plugin spawned needs (logs, services); every
//! later one is a **call** connection, served by a thread of its own: the parent sends a call
//! (init, a request, a config, an event, a service call, the cleanup), and while the plugin runs
//! it, the plugin's host calls go back over the same connection to the very parent thread that
//! waits for the answer, which serves them as if the plugin were in process (its route and
//! deadline are that thread's). The plugin's stdout and stderr go to the parent, which keeps
//! their last lines.

use super::wire::{self, Fields, Frame};
use crate::loader::{Exports, LoadError, take_bytes};
use kiln_types::abi::{self, KilnBuf, KilnHeaders, KilnHost, KilnPair, KilnRequest, KilnResponse, KilnStr};
use std::cell::RefCell;
use std::ffi::c_void;
use std::io::{self, BufReader};
use std::os::fd::AsRawFd;
use std::os::fd::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// Reply statuses of `INIT` beyond the ABI's, saying why the library did not load; the parent
/// makes the matching [`LoadError`] of them.
pub const LOAD_OPEN: u16 = 1;
pub const LOAD_ENTRYPOINT: u16 = 2;
pub const LOAD_ABI: u16 = 3;
pub const LOAD_INIT: u16 = 5;

/// What the parent passes on the command line.
#[derive(Debug, Default)]
struct Args {
    library: PathBuf,
    memory_limit_mb: Option<u64>,
    cpu_limit_s: Option<u64>,
    parent: Option<i32>,
    poll_us: Option<u64>,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let mut out = Args::default();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || value.parse::<u64>().map_err(|_| format!("{flag}: not a number: {value}"));
        match flag.as_str() {
            "--library" => out.library = value.into(),
            "--memory-limit-mb" => out.memory_limit_mb = Some(number()?),
            "--cpu-limit-s" => out.cpu_limit_s = Some(number()?),
            "--poll-us" => out.poll_us = Some(number()?),
            "--parent" => out.parent = Some(value.parse().map_err(|_| format!("--parent: {value}"))?),
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    if out.library.as_os_str().is_empty() {
        return Err("--library is required".into());
    }
    Ok(out)
}

/// The library and its instance: one of each per process.
static EXPORTS: OnceLock<Exports> = OnceLock::new();
static INSTANCE: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
/// The side connection, for host calls from threads that serve no call.
static SIDE: OnceLock<Mutex<Conn>> = OnceLock::new();
/// The host table the plugin gets: its functions ask the parent.
static HOST: HostTable =
    HostTable(KilnHost { abi: abi::ABI_VERSION, ctx: std::ptr::null(), log: child_log, call: child_call });

/// The host table, shareable: its context is null and its functions are thread-safe.
struct HostTable(KilnHost);

// SAFETY: the table is never written, its `ctx` is null (nothing is shared through it), and the
// functions it points at may be called from any thread.
unsafe impl Sync for HostTable {}

thread_local! {
    /// The call connection this thread serves, while it serves one.
    static CONN: RefCell<Option<Conn>> = const { RefCell::new(None) };
}

/// One connection to the parent.
struct Conn {
    read: BufReader<UnixStream>,
    write: UnixStream,
    buf: Vec<u8>,
}

impl Conn {
    fn new(stream: UnixStream) -> io::Result<Self> {
        Ok(Self { write: stream.try_clone()?, read: BufReader::with_capacity(64 * 1024, stream), buf: Vec::new() })
    }

    /// Sends a host call and reads the parent's reply: (status, answer).
    fn ask(&mut self, frame: Frame) -> io::Result<(i32, Vec<u8>)> {
        frame.send(&mut self.write)?;
        match wire::read_frame(&mut self.read, &mut self.buf)? {
            wire::REPLY => {
                let reply = Fields::new(&self.buf).reply()?;
                Ok((reply.status, reply.a.to_vec()))
            }
            _ => Err(io::Error::new(io::ErrorKind::InvalidData, "expected a reply")),
        }
    }
}

/// `kiln plugin-host …`: serves one plugin instance until the parent has it clean up, or goes.
pub fn main(args: &[String]) -> ExitCode {
    let args = match parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("kiln plugin-host: {e}");
            return ExitCode::from(2);
        }
    };
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and touches no memory of ours.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    // The parent may have gone before the line above: then nobody would kill this process.
    // SAFETY: getppid has no preconditions.
    if args.parent.is_some_and(|p| p != unsafe { libc::getppid() }) {
        return ExitCode::from(3);
    }
    // SAFETY: the parent passes the listening socket as stdin (see `isolation::spawn`), and
    // nothing else in this process uses fd 0.
    let listener = unsafe { UnixListener::from_raw_fd(0) };
    let side = match listener.accept().and_then(|(s, _)| Conn::new(s)) {
        Ok(conn) => conn,
        Err(e) => {
            eprintln!("kiln plugin-host: no side connection: {e}");
            return ExitCode::from(4);
        }
    };
    let _ = SIDE.set(Mutex::new(side));
    if let Err(e) = open(&args) {
        // Told to the parent at the first call (INIT), which is where it waits for an answer.
        serve_refusal(&listener, e);
        return ExitCode::from(5);
    }
    for stream in listener.incoming() {
        let Ok(stream) = stream else {
            // Out of descriptors, say: no busy loop (it would burn the CPU-time limit).
            std::thread::sleep(std::time::Duration::from_millis(10));
            continue;
        };
        let Ok(refusal) = stream.try_clone() else { continue };
        let spawned = std::thread::Builder::new().name("plugin-call".into()).spawn(move || serve(stream));
        if let Err(e) = spawned {
            // Under the memory limit a thread's stack may not fit: this call is refused, the
            // process lives on.
            eprintln!("kiln plugin-host: cannot start a thread: {e}");
            refuse(refusal);
        }
    }
    ExitCode::SUCCESS
}

/// Opens the library (checking its ABI), then applies the limits: the memory limit counts from
/// what the process maps once the library is open.
fn open(args: &Args) -> Result<(), LoadError> {
    let exports = Exports::open(&args.library)?;
    let _ = EXPORTS.set(exports);
    if let Some(mb) = args.memory_limit_mb {
        // SAFETY: sysconf has no preconditions.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let mapped = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u64>().ok()))
            .unwrap_or(0)
            * page;
        set_limit(libc::RLIMIT_AS, mapped + mb * 1024 * 1024, mapped + mb * 1024 * 1024);
    }
    if let Some(us) = args.poll_us {
        super::spin::set_budget(std::time::Duration::from_micros(us));
    }
    if let Some(s) = args.cpu_limit_s {
        NO_POLLING.store(true, Ordering::Relaxed);
        // SIGXCPU at the soft limit; SIGKILL a second later if it is ignored.
        set_limit(libc::RLIMIT_CPU, s, s + 1);
    }
    Ok(())
}

fn set_limit(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) {
    let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard };
    // SAFETY: setrlimit reads the struct we pass, which lives for the call.
    if unsafe { libc::setrlimit(resource, &limit) } != 0 {
        eprintln!("kiln plugin-host: setrlimit failed: {}", io::Error::last_os_error());
    }
}

/// Answers the first call with why the library did not load.
fn serve_refusal(listener: &UnixListener, e: LoadError) {
    let code = match &e {
        LoadError::EntrypointNotFound { .. } => LOAD_ENTRYPOINT,
        LoadError::AbiMismatch { .. } => LOAD_ABI,
        LoadError::Init(_) => LOAD_INIT,
        _ => LOAD_OPEN,
    };
    if let Ok((stream, _)) = listener.accept() {
        answer_first(stream, abi::STATUS_ERROR, code, e.to_string().as_bytes());
    }
}

/// Answers a connection's first call with [`wire::STATUS_BUSY`] and closes it.
fn refuse(stream: UnixStream) {
    answer_first(stream, wire::STATUS_BUSY, 0, b"the plugin's process has no thread for this call");
}

/// Reads a connection's first call and answers it with `status`, `http` and `message`.
fn answer_first(stream: UnixStream, status: i32, http: u16, message: &[u8]) {
    let Ok(mut conn) = Conn::new(stream) else { return };
    if wire::read_frame(&mut conn.read, &mut conn.buf).is_ok() {
        let _ = Frame::reply(status, http, message, b"").send(&mut conn.write);
    }
}

/// Calls this process is running or waiting for with a poll (see `spin`).
static BUSY: AtomicUsize = AtomicUsize::new(0);
/// Set when the process has a CPU-time limit, which polling would spend.
static NO_POLLING: AtomicBool = AtomicBool::new(false);

/// Whether polling is off (a CPU-time limit, which polling would spend).
pub(super) fn no_polling() -> bool {
    NO_POLLING.load(Ordering::Relaxed)
}

/// Serves the calls of one connection until the parent closes it: the multiplexed one if its
/// first frame says so (`hub`), else one call after another on this thread.
fn serve(stream: UnixStream) {
    let Ok(conn) = Conn::new(stream) else { return };
    CONN.with(|c| *c.borrow_mut() = Some(conn));
    let mut body = Vec::new();
    let mut poll_next = false;
    let mut first = true;
    loop {
        let kind = CONN.with(|c| {
            let mut c = c.borrow_mut();
            let conn = c.as_mut().expect("set above");
            // After a request of a client that sends one after another, alone and idle, the
            // next call (tens of µs away) is polled for before this thread sleeps: waking it
            // would cost more than the call.
            if poll_next && !NO_POLLING.load(Ordering::Relaxed) && conn.read.buffer().is_empty() {
                let busy = super::spin::InFlight::enter(&BUSY);
                if busy.alone() {
                    super::spin::ready_within(conn.read.get_ref().as_raw_fd(), super::spin::budget());
                }
            }
            if conn.read.buffer().is_empty() {
                super::spin::wait_readable(conn.read.get_ref().as_raw_fd());
            }
            wire::read_frame(&mut conn.read, &mut body)
        });
        let Ok(kind) = kind else { return };
        if std::mem::take(&mut first) && kind == wire::MUX {
            if let Some(conn) = CONN.with(|c| c.borrow_mut().take()) {
                super::hub::serve(conn.read, conn.write);
            }
            return;
        }
        poll_next = kind == wire::HANDLE_THEN_POLL;
        // No borrow of the connection is held while the plugin runs: its host calls use it.
        let _busy = super::spin::InFlight::enter(&BUSY);
        let reply = catch_unwind(AssertUnwindSafe(|| dispatch(kind, &body)))
            .unwrap_or_else(|_| Frame::reply(abi::STATUS_ERROR, 0, b"the plugin host failed", b""));
        let sent = CONN.with(|c| reply.send(&mut c.borrow_mut().as_mut().expect("set above").write));
        if kind == wire::CLEANUP {
            std::process::exit(0);
        }
        if sent.is_err() {
            return;
        }
    }
}

fn exports() -> &'static Exports {
    EXPORTS.get().expect("the library is open before calls are served")
}

/// Runs one call and makes its reply.
pub(super) fn dispatch(kind: u8, body: &[u8]) -> Frame {
    let bad = |e: io::Error| Frame::reply(abi::STATUS_ERROR, 0, e.to_string().as_bytes(), b"");
    let x = exports();
    let mut f = Fields::new(body);
    // Read once: the parent sends the cleanup only when no other call is in flight, so the
    // instance stays valid for this call.
    let instance = INSTANCE.load(Ordering::Acquire);
    if kind != wire::INIT && instance.is_null() {
        return Frame::reply(abi::STATUS_ERROR, 0, b"no instance", b"");
    }
    match kind {
        wire::INIT => {
            let body = match f.bytes() {
                Ok(config) => config,
                Err(e) => return bad(e),
            };
            let mut inst: *mut c_void = std::ptr::null_mut();
            let (mut described, mut err) = (KilnBuf::EMPTY, KilnBuf::EMPTY);
            // SAFETY: the host table is static; `body` (the config) outlives the call; the
            // out-pointers are valid for writes.
            let status = unsafe { (x.init)(&HOST.0, KilnStr::new(body), &mut inst, &mut described, &mut err) };
            // SAFETY: both were written by this library (or are empty), and are freed once.
            let (described, err) = unsafe { (take_bytes(x.free_fn, described), take_bytes(x.free_fn, err)) };
            if status != abi::STATUS_OK || inst.is_null() {
                let msg = if status == abi::STATUS_PANIC {
                    format!("panicked: {}", String::from_utf8_lossy(&err))
                } else {
                    String::from_utf8_lossy(&err).into_owned()
                };
                return Frame::reply(abi::STATUS_ERROR, LOAD_INIT, msg.as_bytes(), b"");
            }
            INSTANCE.store(inst, Ordering::Release);
            Frame::reply(abi::STATUS_OK, 0, &described, b"")
        }
        wire::HANDLE | wire::HANDLE_THEN_POLL => match handle(x, instance, &mut f) {
            Ok(frame) => frame,
            Err(e) => bad(e),
        },
        wire::CONFIGURE => {
            let body = match f.bytes() {
                Ok(config) => config,
                Err(e) => return bad(e),
            };
            let mut err = KilnBuf::EMPTY;
            // SAFETY: the instance is live (cleanup ends the process); `body` outlives the call.
            let status = unsafe { (x.configure_fn)(instance, KilnStr::new(body), &mut err) };
            // SAFETY: written by this library (or empty), freed once.
            Frame::reply(status, 0, &unsafe { take_bytes(x.free_fn, err) }, b"")
        }
        wire::EVENT => {
            let read = (|| Ok::<_, io::Error>((f.u32()?, f.bytes()?, f.bytes()?)))();
            let Ok((subscription, topic, data)) = read else { return bad(read.unwrap_err()) };
            let mut err = KilnBuf::EMPTY;
            // SAFETY: the instance is live; both views outlive the call; `err` is writable.
            let status =
                unsafe { (x.event_fn)(instance, subscription, KilnStr::new(topic), KilnStr::new(data), &mut err) };
            // SAFETY: written by this library (or empty), freed once.
            Frame::reply(status, 0, &unsafe { take_bytes(x.free_fn, err) }, b"")
        }
        wire::SERVICE => {
            let read = (|| Ok::<_, io::Error>((f.u32()?, f.bytes()?)))();
            let Ok((service, args)) = read else { return bad(read.unwrap_err()) };
            let mut out = KilnBuf::EMPTY;
            // SAFETY: the instance is live; `args` outlives the call; `out` is writable.
            let status = unsafe { (x.service_fn)(instance, service, KilnStr::new(args), &mut out) };
            // SAFETY: written by this library (or empty), freed once.
            Frame::reply(status, 0, &unsafe { take_bytes(x.free_fn, out) }, b"")
        }
        wire::CLEANUP => {
            let inst = INSTANCE.swap(std::ptr::null_mut(), Ordering::AcqRel);
            let mut err = KilnBuf::EMPTY;
            // SAFETY: the instance came from init and is used by nothing after this (the
            // process exits once the reply is sent).
            let status = unsafe { (x.cleanup_fn)(inst, &mut err) };
            // SAFETY: written by this library (or empty), freed once.
            Frame::reply(status, 0, &unsafe { take_bytes(x.free_fn, err) }, b"")
        }
        other => Frame::reply(abi::STATUS_ERROR, 0, format!("unknown call {other}").as_bytes(), b""),
    }
}

/// One request: the plugin's response, status and headers in one reply.
fn handle(x: &Exports, instance: *mut c_void, f: &mut Fields<'_>) -> io::Result<Frame> {
    let (route, method, path, query) = (f.u32()?, f.bytes()?, f.bytes()?, f.bytes()?);
    let pair = |(n, v): (&[u8], &[u8])| KilnPair { name: KilnStr::new(n), value: KilnStr::new(v) };
    let params: Vec<KilnPair> = f.pairs()?.into_iter().map(pair).collect();
    let headers: Vec<KilnPair> = f.pairs()?.into_iter().map(pair).collect();
    let body = f.bytes()?;
    let header_slice: &[KilnPair] = &headers;
    let raw = KilnRequest {
        route,
        method: KilnStr::new(method),
        path: KilnStr::new(path),
        query: KilnStr::new(query),
        params: params.as_ptr(),
        params_len: params.len(),
        headers: KilnHeaders::over_pairs(&header_slice),
        body: KilnStr::new(body),
    };
    let mut out = KilnResponse::EMPTY;
    // SAFETY: the instance is live; every view in `raw` borrows this frame's body or the vectors
    // above, all alive for the call; `out` is writable.
    let status = unsafe { (x.handle_fn)(instance, &raw, &mut out) };
    // SAFETY: both buffers were written by this library and are freed once.
    let (head, body) = unsafe { (take_bytes(x.free_fn, out.headers), take_bytes(x.free_fn, out.body)) };
    Ok(Frame::reply(status, out.status, &head, &body))
}

/// `KilnHost::log`, asked of the parent.
///
/// # Safety
/// The views live for the call (the SDK's contract).
unsafe extern "C" fn child_log(_: *const c_void, level: u32, message: KilnStr, fields: KilnStr) -> i32 {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the plugin's views live for the call.
        let (message, fields) = unsafe { (message.as_bytes(), fields.as_bytes()) };
        let frame = || Frame::new(wire::HOST_LOG).u32(level).bytes(message).bytes(fields);
        host_ask(frame).map_or(abi::STATUS_ERROR, |(status, _)| status)
    }))
    .unwrap_or(abi::STATUS_ERROR)
}

/// `KilnHost::call`, asked of the parent.
///
/// # Safety
/// The views live for the call; `write` with `out` may be called during it.
unsafe extern "C" fn child_call(
    _: *const c_void,
    op: KilnStr,
    args: KilnStr,
    out: *mut c_void,
    write: abi::WriteFn,
) -> i32 {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the plugin's views live for the call.
        let (op, args) = unsafe { (op.as_bytes(), args.as_bytes()) };
        let frame = || Frame::new(wire::HOST_CALL).bytes(op).bytes(args);
        match host_ask(frame) {
            Ok((status, answer)) => {
                if status != abi::STATUS_RETIRED {
                    // SAFETY: the plugin's writer, with its own `out`, during the call.
                    unsafe { write(out, KilnStr::new(&answer)) };
                }
                status
            }
            Err(_) => abi::STATUS_ERROR,
        }
    }))
    .unwrap_or(abi::STATUS_ERROR)
}

/// A host call: over the connection of the call this thread runs (the hub's, or its own call
/// connection, of which no borrow is held while the plugin runs), else over the side
/// connection.
fn host_ask(frame: impl Fn() -> Frame) -> io::Result<(i32, Vec<u8>)> {
    if let Some((hub, id)) = super::hub::current_call() {
        return hub.ask(id, frame());
    }
    let here = CONN.with(|c| c.try_borrow_mut().ok().and_then(|mut c| c.as_mut().map(|conn| conn.ask(frame()))));
    if let Some(answer) = here {
        return answer;
    }
    let side = SIDE.get().ok_or_else(|| io::Error::other("no side connection"))?;
    side.lock().unwrap_or_else(|p| p.into_inner()).ask(frame())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_read_or_refused() {
        let args: Vec<String> = ["--library", "/x.so", "--memory-limit-mb", "64", "--parent", "7", "--poll-us", "0"]
            .map(String::from)
            .into();
        let parsed = parse(&args).unwrap();
        assert_eq!((parsed.library, parsed.memory_limit_mb, parsed.parent), ("/x.so".into(), Some(64), Some(7)));
        assert_eq!(parsed.poll_us, Some(0));
        assert!(parse(&["--memory-limit-mb".to_string(), "x".to_string()]).is_err());
        assert!(parse(&[]).is_err(), "a library is required");
    }
}
