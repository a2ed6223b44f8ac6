//! Process isolation: a plugin served from a process of its own (`isolation = "process"`), so
//! that an abort, a segfault, a stack overflow or an `exit` in it costs its in-flight requests
//! and nothing else.
//!
//! - `mod.rs`: the settings and [`Isolated`], the parent's handle on one instance: it starts
//!   the child, passes calls over Unix sockets, restarts the child after a crash (with a
//!   backoff, until a crash loop marks it failed), kills it at a deadline, and retires it.
//! - `child.rs`: `kiln plugin-host`, the child: the same library and the same C ABI as in
//!   process, with host calls forwarded to the parent.
//! - `wire.rs`: the framing between the two.
//!
//! The child is the `kiln` binary itself. Each call connection is served by one thread on each
//! side, and a call's host calls come back on the connection to the parent thread that waits
//! for its answer, so they run with that thread's route and deadline, as in process.

pub mod child;
mod requests;
pub mod wire;

use crate::error_code::ErrorCode;
use crate::host::HostCtx;
use crate::host::logs::{Kind, LogStore};
use crate::loader::{CallError, LoadError};
use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use wire::{Fields, Frame};

/// Crashes within [`CRASH_WINDOW`] that end the restarts: the plugin is then `failed`.
pub const MAX_CRASHES: usize = 5;
pub const CRASH_WINDOW: Duration = Duration::from_secs(60);
/// How long init, a config change and the cleanup may take in the child before it is killed.
const INIT_TIMEOUT: Duration = Duration::from_secs(30);
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a call waits for a restarting process before it answers `PluginCrashed`.
const RESTART_WAIT: Duration = Duration::from_secs(3);
/// The longest line of the child's output kept (longer ones are cut).
const MAX_LINE: usize = 8 * 1024;
/// Lines of the child's stdout and stderr kept for the crash report.
const TAIL_LINES: usize = 8;
/// The environment variables a plugin's process gets from kiln's (no others).
const PASSED_ENV: &[&str] =
    &["PATH", "HOME", "TZ", "LANG", "LC_ALL", "RUST_BACKTRACE", "RUST_LIB_BACKTRACE", "RUST_MIN_STACK"];
/// Idle call connections kept per child (more are closed when returned).
const MAX_IDLE: usize = 64;

/// How a plugin is run: the manifest's `isolation` and limits, overridden by the row's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Isolation {
    /// In a process of its own.
    pub process: bool,
    /// The memory the child may map beyond what it maps once the library is open (RLIMIT_AS).
    pub memory_limit_mb: Option<u32>,
    /// CPU seconds the child may use in all (RLIMIT_CPU); past them it is killed and restarted.
    pub cpu_limit_s: Option<u32>,
}

impl Isolation {
    /// Parses `in_process` / `process`.
    pub fn mode(text: &str) -> Option<bool> {
        match text {
            "process" => Some(true),
            "in_process" => Some(false),
            _ => None,
        }
    }
}

/// What the reconciler hears from an isolated instance: a crash, and whether it ended the
/// restarts.
#[derive(Debug, Clone)]
pub struct CrashReport {
    pub plugin_id: i64,
    pub name: String,
    /// The content hash of the version that crashed.
    pub hash: String,
    /// Restarts of this instance so far.
    pub restarts: u32,
    /// How it died, and its last lines.
    pub last_crash: String,
    /// A crash loop: no more restarts (the reconciler marks it failed).
    pub failed: bool,
}

/// What starting an isolated instance needs besides the library, its config and its host.
#[derive(Debug, Clone)]
pub struct Spawn {
    /// The `kiln` binary to run as `kiln plugin-host`.
    pub exe: PathBuf,
    pub settings: Isolation,
    pub plugin_id: i64,
    pub hash: String,
    pub logs: Arc<LogStore>,
    pub reports: tokio::sync::mpsc::UnboundedSender<CrashReport>,
}

/// How a child ended.
#[derive(Debug, Clone, PartialEq)]
enum Death {
    /// By a signal or an exit of its own (the text says which).
    Crashed(String),
    /// Its memory limit (an allocation failed).
    MemoryLimit,
    /// Its CPU-time limit (SIGXCPU).
    CpuLimit,
    /// Killed by kiln: a call ran past its deadline.
    Timeout,
    /// Ended by kiln: retired, or a call it could not finish.
    Stopped,
}

impl Death {
    fn code(&self) -> ErrorCode {
        match self {
            Death::Crashed(_) | Death::Stopped => ErrorCode::PluginCrashed,
            Death::MemoryLimit => ErrorCode::MemoryLimit,
            Death::CpuLimit => ErrorCode::CpuLimit,
            Death::Timeout => ErrorCode::Timeout,
        }
    }

    /// What a call in flight when the child died answers. A call killed at its own deadline
    /// answers `Timeout` where it waits (`exchange`); one it took along was not late.
    fn error(&self) -> CallError {
        match self {
            Death::Timeout => {
                crashed("PluginCrashed: the plugin's process was killed at another call's deadline".into())
            }
            death => CallError::Crashed { code: death.code(), message: death.to_string() },
        }
    }

    /// Whether it counts towards a crash loop: kiln's own kills (a deadline, a stop) do not.
    fn counts(&self) -> bool {
        !matches!(self, Death::Timeout | Death::Stopped)
    }
}

impl std::fmt::Display for Death {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Death::Crashed(how) => write!(f, "PluginCrashed: the plugin's process {how}"),
            Death::MemoryLimit => f.write_str("MemoryLimit: the plugin's process ran out of its memory limit"),
            Death::CpuLimit => f.write_str("CpuLimit: the plugin's process used up its CPU-time limit"),
            Death::Timeout => f.write_str("Timeout: the plugin's process was killed at a handler's deadline"),
            Death::Stopped => f.write_str("PluginCrashed: the plugin's process was stopped"),
        }
    }
}

/// One instance of a plugin in a process of its own (restarted after a crash).
pub struct Isolated {
    name: String,
    library: PathBuf,
    spawn: Spawn,
    host: Arc<HostCtx>,
    /// The config the instance has (a restart inits with it).
    config: Mutex<Vec<u8>>,
    /// The description the first child gave: a restarted one must give the same.
    described: Vec<u8>,
    state: Mutex<State>,
    changed: Condvar,
    me: Weak<Isolated>,
}

#[derive(Default)]
struct State {
    child: Option<Arc<Child>>,
    /// Set by a crash loop (or a restart that failed): calls fail at once.
    failed: Option<String>,
    crashes: VecDeque<Instant>,
    restarts: u32,
    retired: bool,
    /// A restart is under way (`retire` waits for it, so that a child started for a retired
    /// instance gets its cleanup).
    restarting: bool,
}

impl std::fmt::Debug for Isolated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Isolated").field("name", &self.name).field("library", &self.library).finish()
    }
}

impl Isolated {
    /// Starts the child and creates the instance in it; the description it gave.
    pub fn start(
        name: &str,
        library: &Path,
        config: &[u8],
        host: &Arc<HostCtx>,
        spawn: Spawn,
    ) -> Result<(Arc<Self>, Vec<u8>), LoadError> {
        let (child, described) = launch(name, library, config, host, &spawn)?;
        let isolated = Arc::new_cyclic(|me| Self {
            name: name.into(),
            library: library.into(),
            spawn,
            host: host.clone(),
            config: Mutex::new(config.to_vec()),
            described: described.clone(),
            state: Mutex::new(State { child: Some(child.clone()), ..Default::default() }),
            changed: Condvar::new(),
            me: me.clone(),
        });
        child.watch(isolated.me.clone());
        Ok((isolated, described))
    }

    pub fn settings(&self) -> &Isolation {
        &self.spawn.settings
    }

    /// The crash loop that ended the restarts, if any.
    pub fn failed(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The child serving now; waits (until `deadline`) while one is restarted.
    /// The child serving now, without waiting: `None` while one is restarted.
    fn live_child_now(&self) -> Result<Option<Arc<Child>>, CallError> {
        let state = self.lock();
        if let Some(why) = &state.failed {
            return Err(crashed(why.clone()));
        }
        if state.retired {
            return Err(crashed("PluginCrashed: the plugin's process was retired".into()));
        }
        Ok(state.child.clone().filter(|c| !c.dead.load(Ordering::SeqCst)))
    }

    fn live_child(&self, deadline: Instant) -> Result<Arc<Child>, CallError> {
        let waited_until = &(Instant::now() + RESTART_WAIT);
        let mut state = self.lock();
        loop {
            if let Some(why) = &state.failed {
                return Err(crashed(why.clone()));
            }
            if state.retired {
                return Err(crashed("PluginCrashed: the plugin's process was retired".into()));
            }
            if let Some(child) = &state.child
                && !child.dead.load(Ordering::SeqCst)
            {
                return Ok(child.clone());
            }
            // A call waits for a restart a little (the first one takes a few milliseconds), not
            // to its deadline: waiting calls hold blocking-pool threads.
            let left = deadline.min(*waited_until).saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(crashed("PluginCrashed: the plugin's process is being restarted after a crash".into()));
            }
            state = self.changed.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// One call: its reply's fields are read by `read` from the connection's buffer.
    fn exchange<T>(
        &self,
        frame: Frame,
        deadline: Instant,
        read: impl FnOnce(wire::Reply<'_>) -> T,
    ) -> Result<T, CallError> {
        let child = self.live_child(deadline)?;
        let mut conn = match child.take_conn() {
            Ok(c) => c,
            // Gone: how it ended. Alive but not connectable (kiln out of descriptors, say):
            // this call fails, the process lives on.
            Err(_) if child.dead.load(Ordering::SeqCst) => return Err(child.failure()),
            Err(e) => return Err(crashed(format!("PluginCrashed: cannot reach the plugin's process: {e}"))),
        };
        match conn.call(frame, &self.host, deadline) {
            Ok(()) => {
                let out = match Fields::new(&conn.buf).reply() {
                    Ok(reply) if reply.status == wire::STATUS_BUSY => {
                        // The child closes this connection.
                        return Err(crashed(format!("PluginCrashed: {}", String::from_utf8_lossy(reply.a))));
                    }
                    Ok(reply) => read(reply),
                    Err(e) => return Err(CallError::InvalidResponse(e.to_string())),
                };
                child.put_back(conn);
                Ok(out)
            }
            Err(Broken::Timeout) => {
                child.kill(Death::Timeout);
                Err(CallError::Timeout)
            }
            Err(Broken::Io(e)) => {
                tracing::debug!(plugin = %self.name, "a call to the plugin's process broke: {e}");
                Err(child.failure())
            }
        }
    }

    /// A request. `headers` are the request's (name, value) pairs.
    pub fn handle(&self, req: &crate::loader::CallRequest<'_>, deadline: Instant) -> Result<Reply, CallError> {
        self.exchange(Self::request_frame(req), deadline, |r| Reply {
            status: r.status,
            http: r.http,
            head: r.a.to_vec(),
            body: r.b.to_vec(),
        })
    }

    /// A request as the frame that carries it (headers copied).
    pub fn request_frame(req: &crate::loader::CallRequest<'_>) -> Frame {
        let headers = collect_headers(req.headers);
        let size = req.body.len() + req.path.len() + req.query.len() + 64;
        Frame::with_capacity(wire::HANDLE, size)
            .u32(req.route)
            .bytes(req.method.as_bytes())
            .bytes(req.path.as_bytes())
            .bytes(req.query.as_bytes())
            .pairs(req.params.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
            .pairs(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
            .bytes(req.body)
    }

    /// A call whose reply is a status and a message or answer: configure, event, service.
    fn simple(&self, frame: Frame, deadline: Instant) -> Result<(i32, Vec<u8>), String> {
        self.exchange(frame, deadline, |r| (r.status, r.a.to_vec())).map_err(|e| e.to_string())
    }

    pub fn configure(&self, config: &[u8]) -> Result<(i32, Vec<u8>), String> {
        // Kept before the call: a restart after the child applied it inits with it. Put back
        // if the plugin does not apply it.
        let before = std::mem::replace(&mut *self.config.lock().unwrap_or_else(|p| p.into_inner()), config.to_vec());
        let answer = self.simple(Frame::new(wire::CONFIGURE).bytes(config), Instant::now() + INIT_TIMEOUT);
        if !matches!(answer, Ok((kiln_types::abi::STATUS_OK, _))) {
            *self.config.lock().unwrap_or_else(|p| p.into_inner()) = before;
        }
        answer
    }

    pub fn event(
        &self,
        subscription: u32,
        topic: &str,
        data: &[u8],
        deadline: Instant,
    ) -> Result<(i32, Vec<u8>), String> {
        self.simple(Frame::new(wire::EVENT).u32(subscription).bytes(topic.as_bytes()).bytes(data), deadline)
    }

    pub fn service(&self, index: u32, args: &[u8], deadline: Instant) -> Result<(i32, Vec<u8>), String> {
        self.simple(Frame::new(wire::SERVICE).u32(index).bytes(args), deadline)
    }

    /// Runs the cleanup in the child and lets it exit (killed if it does not in time); no
    /// restarts after this. The cleanup's status and message.
    pub fn retire(&self) -> (i32, String) {
        let child = {
            let mut state = self.lock();
            state.retired = true;
            self.changed.notify_all();
            let limit = INIT_TIMEOUT + Duration::from_secs(5);
            state =
                self.changed.wait_timeout_while(state, limit, |s| s.restarting).unwrap_or_else(|p| p.into_inner()).0;
            state.child.take()
        };
        let Some(child) = child else { return (kiln_types::abi::STATUS_OK, String::new()) };
        self.clean_up(&child)
    }

    /// Runs the cleanup in `child` and lets it exit (killed if it does not in time).
    fn clean_up(&self, child: &Arc<Child>) -> (i32, String) {
        let answer = match child.take_conn() {
            Ok(mut conn) => match conn.call(Frame::new(wire::CLEANUP), &self.host, Instant::now() + CLEANUP_TIMEOUT) {
                Ok(()) => Fields::new(&conn.buf)
                    .reply()
                    .map(|r| (r.status, String::from_utf8_lossy(r.a).into_owned()))
                    .unwrap_or((kiln_types::abi::STATUS_ERROR, "an unreadable reply".into())),
                Err(_) => (kiln_types::abi::STATUS_ERROR, "the cleanup did not finish".into()),
            },
            Err(e) => (kiln_types::abi::STATUS_ERROR, format!("no connection to the plugin's process: {e}")),
        };
        if !child.wait_exit(Duration::from_secs(2)) {
            child.kill(Death::Stopped);
            child.wait_exit(Duration::from_secs(2));
        }
        answer
    }

    /// The child `child` ended (its waiter calls this once): restart it, or give up.
    fn exited(&self, child: &Arc<Child>, death: Death) {
        let report = {
            let mut state = self.lock();
            let current = state.child.as_ref().is_some_and(|c| Arc::ptr_eq(c, child));
            if state.retired || !current {
                return;
            }
            state.child = None;
            let now = Instant::now();
            if death.counts() {
                state.crashes.push_back(now);
            }
            while state.crashes.front().is_some_and(|t| now.duration_since(*t) > CRASH_WINDOW) {
                state.crashes.pop_front();
            }
            let tail = child.tail();
            let mut text = death.to_string();
            if !tail.is_empty() {
                text.push_str("; its last lines: ");
                text.push_str(&tail.join(" | "));
            }
            let failed = state.crashes.len() >= MAX_CRASHES;
            state.restarting = !failed;
            if failed {
                text = format!("{text} (crashed {MAX_CRASHES} times in {}s: not restarted)", CRASH_WINDOW.as_secs());
                state.failed = Some(text.clone());
            } else {
                state.restarts += 1;
            }
            self.changed.notify_all();
            self.spawn.logs.record(&self.name, Kind::Panic, text.clone(), None);
            tracing::error!(plugin = %self.name, code = %death.code(), "{text}");
            CrashReport {
                plugin_id: self.spawn.plugin_id,
                name: self.name.clone(),
                hash: self.spawn.hash.clone(),
                restarts: state.restarts,
                last_crash: text,
                failed,
            }
        };
        let (failed, crashes) = (report.failed, self.lock().crashes.len());
        let _ = self.spawn.reports.send(report);
        if failed {
            return;
        }
        // The first crash restarts at once; more within the window wait longer each time.
        if crashes > 1 {
            std::thread::sleep(Duration::from_millis(50 << (crashes - 1).min(6)));
        }
        let done = |state: &mut State| {
            state.restarting = false;
            self.changed.notify_all();
        };
        if self.lock().retired {
            done(&mut self.lock());
            return;
        }
        let config = self.config.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let started = launch(&self.name, &self.library, &config, &self.host, &self.spawn);
        let mut state = self.lock();
        match started {
            Ok((child, described)) if same_description(&described, &self.described) => {
                if state.retired {
                    // Retired while it started: it was initialized, so it is cleaned up.
                    drop(state);
                    self.clean_up(&child);
                    done(&mut self.lock());
                    return;
                }
                state.child = Some(child.clone());
                state.restarting = false;
                tracing::info!(plugin = %self.name, restarts = state.restarts, "the plugin's process serves again");
                drop(state);
                self.changed.notify_all();
                // After the lock: a child that died already is handled at once, on this thread.
                child.watch(self.me.clone());
                return;
            }
            other => {
                let why = match other {
                    Ok((child, _)) => {
                        drop(state);
                        self.clean_up(&child);
                        state = self.lock();
                        "the restarted process describes other routes".to_string()
                    }
                    Err(e) => e.to_string(),
                };
                let text = format!("PluginCrashed: the plugin's process could not be restarted: {why}");
                state.failed = Some(text.clone());
                state.restarting = false;
                let _ = self.spawn.reports.send(CrashReport {
                    plugin_id: self.spawn.plugin_id,
                    name: self.name.clone(),
                    hash: self.spawn.hash.clone(),
                    restarts: state.restarts,
                    last_crash: text,
                    failed: true,
                });
            }
        }
        self.changed.notify_all();
    }
}

/// Whether two descriptions say the same (as JSON values: key order aside).
fn same_description(a: &[u8], b: &[u8]) -> bool {
    match (serde_json::from_slice::<serde_json::Value>(a), serde_json::from_slice::<serde_json::Value>(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// A call that failed because the process is down (`message` starts with the code).
fn crashed(message: String) -> CallError {
    CallError::Crashed { code: ErrorCode::PluginCrashed, message }
}

/// A handler's reply, copied out of the connection.
#[derive(Debug)]
pub struct Reply {
    pub status: i32,
    pub http: u16,
    pub head: Vec<u8>,
    pub body: Vec<u8>,
}

/// The request's headers, copied (the child reads them from its own copy).
fn collect_headers(headers: kiln_types::abi::KilnHeaders) -> Vec<(Vec<u8>, Vec<u8>)> {
    unsafe extern "C" fn visit(
        state: *mut std::ffi::c_void,
        name: kiln_types::abi::KilnStr,
        value: kiln_types::abi::KilnStr,
    ) {
        // SAFETY: `state` is the vector passed below, alive and not otherwise borrowed during
        // the call; the views live for the call (HeaderEachFn's contract).
        unsafe {
            let out = &mut *state.cast::<Vec<(Vec<u8>, Vec<u8>)>>();
            out.push((name.as_bytes().to_vec(), value.as_bytes().to_vec()));
        }
    }
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    // SAFETY: the request's headers are valid for the call this runs in; `visit` takes the
    // state it is given.
    unsafe { (headers.each)(headers.ctx, (&mut out as *mut Vec<(Vec<u8>, Vec<u8>)>).cast(), visit) };
    out
}

/// Starts a child, opens the side connection and inits the instance: the child and the
/// description.
fn launch(
    name: &str,
    library: &Path,
    config: &[u8],
    host: &Arc<HostCtx>,
    spawn: &Spawn,
) -> Result<(Arc<Child>, Vec<u8>), LoadError> {
    let io = |what: &str, e: io::Error| LoadError::Init(format!("could not start the plugin's process ({what}): {e}"));
    let dir = tempfile::Builder::new().prefix("kiln-host-").tempdir().map_err(|e| io("a socket directory", e))?;
    let path = dir.path().join("s");
    let listener = UnixListener::bind(&path).map_err(|e| io("a socket", e))?;
    let (reader, writer) = std::io::pipe().map_err(|e| io("a pipe", e))?;
    let mut command = Command::new(&spawn.exe);
    command.arg("plugin-host").arg("--library").arg(library).arg("--parent").arg(std::process::id().to_string());
    if let Some(mb) = spawn.settings.memory_limit_mb {
        command.arg("--memory-limit-mb").arg(mb.to_string());
    }
    if let Some(s) = spawn.settings.cpu_limit_s {
        command.arg("--cpu-limit-s").arg(s.to_string());
    }
    // Not kiln's environment: it holds the database URL and the admin token.
    command.env_clear();
    for (key, value) in std::env::vars_os() {
        if PASSED_ENV.iter().any(|k| key == *k) {
            command.env(key, value);
        }
    }
    command
        .stdin(Stdio::from(OwnedFd::from(listener)))
        .stdout(writer.try_clone().map_err(|e| io("a pipe", e))?)
        .stderr(writer)
        // One malloc arena: each would reserve 64 MiB of address space against the limit.
        .env("MALLOC_ARENA_MAX", "1");
    // The command holds the pipe's and the socket's ends: the spawner drops them, so that the
    // pipe ends with the child.
    let process = spawn_process(command).map_err(|e| io(&spawn.exe.display().to_string(), e))?;
    let child = Arc::new(Child {
        pid: process.id() as i32,
        path,
        _dir: dir,
        idle: Mutex::new(Vec::new()),
        idle_async: Mutex::new(Vec::new()),
        dead: AtomicBool::new(false),
        exit: Mutex::new(None),
        exited: Condvar::new(),
        kill_reason: Mutex::new(None),
        reaped: Mutex::new(false),
        tail: Arc::new(Mutex::new(VecDeque::new())),
        output_done: Arc::new(AtomicBool::new(false)),
        out_of_memory: Arc::new(AtomicBool::new(false)),
        owner: Mutex::new(Weak::new()),
        told: AtomicBool::new(false),
        name: name.into(),
    });
    child.read_output(reader, spawn.logs.clone());
    child.start_waiter(process);
    // From here, a failure does not leave the process behind.
    match init(&child, config, host) {
        Ok(described) => Ok((child, described)),
        Err(e) => {
            child.kill(Death::Stopped);
            Err(e)
        }
    }
}

/// Opens the side connection and creates the instance in a started child: its description.
fn init(child: &Arc<Child>, config: &[u8], host: &Arc<HostCtx>) -> Result<Vec<u8>, LoadError> {
    let io = |what: &str, e: io::Error| LoadError::Init(format!("could not start the plugin's process ({what}): {e}"));
    let side = UnixStream::connect(&child.path).map_err(|e| io("the side connection", e))?;
    child.serve_side(side, host.clone());
    let mut conn = child.take_conn().map_err(|e| io("a call connection", e))?;
    match conn.call(Frame::new(wire::INIT).bytes(config), host, Instant::now() + INIT_TIMEOUT) {
        Ok(()) => {}
        Err(broken) => {
            let death = match broken {
                Broken::Timeout => {
                    child.kill(Death::Timeout);
                    "its init ran past 30s".to_string()
                }
                Broken::Io(_) => {
                    child.wait_exit(Duration::from_secs(2));
                    child.death().map_or_else(|| "it stopped answering".into(), |d| d.to_string())
                }
            };
            let tail = child.tail();
            return Err(LoadError::Init(format!(
                "the plugin's process died during init: {death}; {}",
                tail.join(" | ")
            )));
        }
    }
    let reply = Fields::new(&conn.buf).reply().map_err(|e| LoadError::Describe(e.to_string()))?;
    if reply.status != kiln_types::abi::STATUS_OK {
        let message = String::from_utf8_lossy(reply.a).into_owned();
        let code = reply.http;
        drop(conn);
        return Err(match code {
            child::LOAD_INIT => LoadError::Init(message),
            _ => LoadError::InHost { code, message },
        });
    }
    let described = reply.a.to_vec();
    child.put_back(conn);
    Ok(described)
}

/// Starts `command` from one thread that lives as long as the process. The child asks the
/// kernel to kill it when its parent goes (PR_SET_PDEATHSIG), and "parent" there means the
/// thread that forked it: a child started from a pool thread, or from the waiter that restarts
/// it, would be killed when that thread ends.
fn spawn_process(command: Command) -> io::Result<std::process::Child> {
    type Request = (Command, std::sync::mpsc::SyncSender<io::Result<std::process::Child>>);
    static SPAWNER: std::sync::OnceLock<Mutex<std::sync::mpsc::Sender<Request>>> = std::sync::OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Request>();
        let started = std::thread::Builder::new().name("kiln-plugin-spawner".into()).spawn(move || {
            for (mut command, reply) in rx {
                let _ = reply.send(command.spawn());
            }
        });
        if let Err(e) = started {
            tracing::error!("cannot start the plugin process spawner: {e}");
        }
        Mutex::new(tx)
    });
    let (reply, answer) = std::sync::mpsc::sync_channel(1);
    let sent = spawner.lock().unwrap_or_else(|p| p.into_inner()).send((command, reply));
    sent.map_err(|_| io::Error::other("the plugin process spawner is gone"))?;
    answer.recv().map_err(|_| io::Error::other("the plugin process spawner is gone"))?
}

/// A call that did not get its reply.
#[derive(Debug)]
enum Broken {
    Timeout,
    Io(io::Error),
}

/// One connection to a child.
struct Conn {
    read: BufReader<UnixStream>,
    write: UnixStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Sends a call and serves the child's host calls until its reply, which is left in `buf`.
    fn call(&mut self, frame: Frame, host: &HostCtx, deadline: Instant) -> Result<(), Broken> {
        let left = || {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() { Err(Broken::Timeout) } else { Ok(left) }
        };
        self.write.set_write_timeout(Some(left()?)).map_err(Broken::Io)?;
        frame.send(&mut self.write).map_err(timeout_or_io)?;
        loop {
            self.read.get_ref().set_read_timeout(Some(left()?)).map_err(Broken::Io)?;
            let kind = wire::read_frame(&mut self.read, &mut self.buf).map_err(timeout_or_io)?;
            let answer = match kind {
                wire::REPLY => return Ok(()),
                wire::HOST_LOG | wire::HOST_CALL => serve_host_call(kind, &self.buf, host),
                _ => return Err(Broken::Io(io::Error::new(io::ErrorKind::InvalidData, "an unexpected frame"))),
            };
            self.write.set_write_timeout(Some(left()?)).map_err(Broken::Io)?;
            answer.send(&mut self.write).map_err(timeout_or_io)?;
        }
    }
}

fn timeout_or_io(e: io::Error) -> Broken {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Broken::Timeout,
        _ => Broken::Io(e),
    }
}

/// Serves one host call of the child's, on the thread the call came in on. Never unwinds: a
/// panic is a refused call.
fn serve_host_call(kind: u8, body: &[u8], host: &HostCtx) -> Frame {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| host_call(kind, body, host)))
        .unwrap_or_else(|_| Frame::reply(kiln_types::abi::STATUS_ERROR, 0, b"", b""))
}

fn host_call(kind: u8, body: &[u8], host: &HostCtx) -> Frame {
    let mut f = Fields::new(body);
    let bad = || Frame::reply(kiln_types::abi::STATUS_ERROR, 0, b"", b"");
    if kind == wire::HOST_LOG {
        let Ok((level, message, fields)) = (|| Ok::<_, io::Error>((f.u32()?, f.bytes()?, f.bytes()?)))() else {
            return bad();
        };
        return Frame::reply(host.log(level, message, fields), 0, b"", b"");
    }
    let Ok((op, args)) = (|| Ok::<_, io::Error>((f.bytes()?, f.bytes()?)))() else { return bad() };
    let (status, answer) = host.call(op, args);
    Frame::reply(status, 0, answer.as_deref().unwrap_or_default(), b"")
}

/// One child process.
struct Child {
    name: String,
    pid: i32,
    path: PathBuf,
    /// Holds the socket's directory (0700) until the child is gone.
    _dir: tempfile::TempDir,
    idle: Mutex<Vec<Conn>>,
    /// Idle connections for requests from async tasks (`requests.rs`).
    idle_async: Mutex<Vec<requests::AsyncConn>>,
    /// Set when the child is known to be gone (or going): no new calls start on it.
    dead: AtomicBool,
    exit: Mutex<Option<Death>>,
    exited: Condvar,
    /// Why kiln killed it, if it did.
    kill_reason: Mutex<Option<Death>>,
    /// Set (under this lock) once the process is reaped: its pid may then be reused, and no
    /// signal is sent to it any more.
    reaped: Mutex<bool>,
    tail: Arc<Mutex<VecDeque<String>>>,
    /// Set when the output reader reached the end of the child's output.
    output_done: Arc<AtomicBool>,
    /// Set when the output said an allocation failed (the memory limit).
    out_of_memory: Arc<AtomicBool>,
    /// Told when the child ends (see `watch`), once (`told`).
    owner: Mutex<Weak<Isolated>>,
    told: AtomicBool,
}

impl Child {
    fn take_conn(&self) -> io::Result<Conn> {
        if let Some(conn) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(conn);
        }
        if self.dead.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the plugin's process is gone"));
        }
        let stream = UnixStream::connect(&self.path)?;
        Ok(Conn { write: stream.try_clone()?, read: BufReader::with_capacity(64 * 1024, stream), buf: Vec::new() })
    }

    fn put_back(&self, mut conn: Conn) {
        // A large reply's buffer is not kept for every idle connection.
        conn.buf.shrink_to(1 << 20);
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE && !self.dead.load(Ordering::SeqCst) {
            idle.push(conn);
        }
    }

    /// Kills the child (SIGKILL), remembering why, unless it is reaped already.
    fn kill(&self, why: Death) {
        self.dead.store(true, Ordering::SeqCst);
        let reaped = self.reaped.lock().unwrap_or_else(|p| p.into_inner());
        if !*reaped {
            // Only a signal sent names the cause (and only a death by SIGKILL is taken for it).
            self.kill_reason.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(why);
            // SAFETY: kill(2) touches no memory of ours; the pid is our unreaped child's (the
            // `reaped` lock is held, and the waiter reaps only under it), so it names no other
            // process.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
    }

    fn death(&self) -> Option<Death> {
        self.exit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until the child's end is known; `false` if it is not by `limit`.
    fn wait_exit(&self, limit: Duration) -> bool {
        let exit = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        let (exit, _) = self.exited.wait_timeout_while(exit, limit, |e| e.is_none()).unwrap_or_else(|p| p.into_inner());
        exit.is_some()
    }

    /// A call broke: the child is (or is made) gone, and the error says how it ended.
    fn failure(&self) -> CallError {
        self.dead.store(true, Ordering::SeqCst);
        if !self.wait_exit(Duration::from_secs(1)) {
            // Alive but not answering on a connection: it cannot be trusted with more calls.
            self.kill(Death::Stopped);
            self.wait_exit(Duration::from_secs(1));
        }
        match self.death() {
            Some(death) => death.error(),
            None => crashed("PluginCrashed: the plugin's process stopped answering".into()),
        }
    }

    fn tail(&self) -> Vec<String> {
        self.tail.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }

    /// Keeps the child's output: the last lines for a crash report, each line in its log. Reads
    /// to the end whatever the bytes (a line is cut at [`MAX_LINE`], and need not be UTF-8), so
    /// the child never blocks on a full pipe.
    fn read_output(&self, reader: std::io::PipeReader, logs: Arc<LogStore>) {
        let (tail, name, done) = (self.tail.clone(), self.name.clone(), self.output_done.clone());
        let out_of_memory = self.out_of_memory.clone();
        let spawned = std::thread::Builder::new().name(format!("{name}-output")).spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut raw = Vec::new();
            loop {
                raw.clear();
                match (&mut reader).take(MAX_LINE as u64).read_until(b'\n', &mut raw) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&raw).trim_end_matches(['\n', '\r']).to_string();
                tracing::warn!(plugin = %name, "plugin process: {line}");
                let entry = crate::host::logs::LogEntry::new(
                    crate::host::logs::Level::Warn,
                    Kind::Log,
                    format!("(process output) {line}"),
                    serde_json::json!({}),
                    None,
                );
                logs.push(&name, entry);
                if line.starts_with("memory allocation of") && line.ends_with("failed") {
                    out_of_memory.store(true, Ordering::SeqCst);
                }
                // Backtrace frames (indented) and their footnote stay in the log, not in the
                // crash report's last lines.
                if line.starts_with(char::is_whitespace) || line.starts_with("note: Some details are omitted") {
                    continue;
                }
                let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
                if tail.len() == TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            done.store(true, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            tracing::warn!(plugin = %self.name, "cannot read the plugin process's output: {e}");
        }
    }

    /// Serves the host calls the child makes from threads of its own.
    fn serve_side(&self, side: UnixStream, host: Arc<HostCtx>) {
        let spawned = std::thread::Builder::new().name(format!("{}-side", self.name)).spawn(move || {
            let Ok(mut write) = side.try_clone() else { return };
            let (mut read, mut buf) = (BufReader::new(side), Vec::new());
            while let Ok(kind) = wire::read_frame_within(&mut read, &mut buf, wire::MAX_HOST_FRAME) {
                if !matches!(kind, wire::HOST_LOG | wire::HOST_CALL) {
                    break;
                }
                if serve_host_call(kind, &buf, &host).send(&mut write).is_err() {
                    break;
                }
                buf.shrink_to(64 * 1024);
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(plugin = %self.name, "cannot serve the plugin process's side connection: {e}");
        }
    }

    /// Makes `owner` the one told when the child ends (at once, if it has ended already).
    fn watch(self: &Arc<Self>, owner: Weak<Isolated>) {
        *self.owner.lock().unwrap_or_else(|p| p.into_inner()) = owner;
        self.tell_owner();
    }

    /// Tells the owner how the child ended, once, when both are known.
    fn tell_owner(self: &Arc<Self>) {
        let Some(death) = self.death() else { return };
        let Some(owner) = self.owner.lock().unwrap_or_else(|p| p.into_inner()).upgrade() else { return };
        if !self.told.swap(true, Ordering::SeqCst) {
            owner.exited(self, death);
        }
    }

    /// Starts the thread that reaps the child and records how it ended.
    fn start_waiter(self: &Arc<Self>, process: std::process::Child) {
        let child = self.clone();
        let waiter = move || {
            let mut process = process;
            // SAFETY: an all-zero siginfo_t is a valid value of this plain C struct.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // Waits without reaping, so that `kill` (under `reaped`) never signals a reused pid.
            loop {
                // SAFETY: waitid writes only into `info`, which lives for the call.
                let waited = unsafe {
                    libc::waitid(libc::P_PID, child.pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOWAIT)
                };
                // Anything but an interruption: the child has ended (or was reaped elsewhere,
                // and `wait` below returns at once).
                if waited == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                    break;
                }
            }
            child.dead.store(true, Ordering::SeqCst);
            let status = {
                let mut reaped = child.reaped.lock().unwrap_or_else(|p| p.into_inner());
                let status = process.wait();
                *reaped = true;
                status
            };
            child.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
            child.idle_async.lock().unwrap_or_else(|p| p.into_inner()).clear();
            let reason = child.kill_reason.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let death = match status {
                Ok(status) => classify(status, reason, child.output_read_after_exit()),
                Err(e) => Death::Crashed(format!("could not be waited for: {e}")),
            };
            *child.exit.lock().unwrap_or_else(|p| p.into_inner()) = Some(death);
            child.exited.notify_all();
            child.tell_owner();
        };
        let spawned = std::thread::Builder::new().name(format!("{}-waiter", self.name)).spawn(waiter);
        if let Err(e) = spawned {
            tracing::error!(plugin = %self.name, "cannot watch the plugin's process: {e}");
        }
    }

    /// Whether the output said an allocation failed, once the child is gone: its pipe is read
    /// to the end first (briefly: a grandchild may hold it open).
    fn output_read_after_exit(&self) -> bool {
        let deadline = Instant::now() + Duration::from_millis(200);
        while !self.output_done.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.out_of_memory.load(Ordering::SeqCst)
    }
}

/// How the child ended, from its status and what kiln knows.
fn classify(status: ExitStatus, kill_reason: Option<Death>, out_of_memory: bool) -> Death {
    if let Some(reason) = kill_reason
        && status.signal() == Some(libc::SIGKILL)
    {
        return reason;
    }
    if status.signal() == Some(libc::SIGXCPU) {
        return Death::CpuLimit;
    }
    if out_of_memory {
        return Death::MemoryLimit;
    }
    Death::Crashed(crate::supervisor::describe(status))
}
