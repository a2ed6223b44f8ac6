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

mod calls;
pub mod child;
mod hub;
mod mux;
mod process;
mod spin;
mod stale_dirs;

pub use spin::set_budget as set_poll_budget;
pub mod wire;

use crate::error_code::ErrorCode;
use crate::host::HostCtx;
use crate::host::logs::{Kind, LogStore};
use crate::loader::{CallError, LoadError};
use calls::Broken;
use process::{Child, launch};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use wire::{Fields, Frame};

/// Crashes within [`CRASH_WINDOW`] that end the restarts: the plugin is then `failed`.
pub const MAX_CRASHES: usize = 5;
pub const CRASH_WINDOW: Duration = Duration::from_secs(60);
/// Tries at a restart before the instance is given up (100 ms, then 200 ms apart).
const RESTART_ATTEMPTS: u32 = 3;
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

    /// The host context its calls are served with.
    pub fn host(&self) -> &Arc<HostCtx> {
        &self.host
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
                let out = read(reply_in(&conn.buf)?);
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
        // A restart that fails (no descriptor or memory to start a process just then, an init
        // that met a passing failure) is tried again before the instance is given up.
        let mut attempt = 1;
        let started = loop {
            let started = launch(&self.name, &self.library, &config, &self.host, &self.spawn);
            match &started {
                Err(e) if attempt < RESTART_ATTEMPTS && !self.lock().retired => {
                    let msg =
                        format!("the plugin's process could not be restarted (attempt {attempt}): {e}; trying again");
                    tracing::warn!(plugin = %self.name, "{msg}");
                    self.spawn.logs.record(&self.name, Kind::Init, msg, None);
                    std::thread::sleep(Duration::from_millis(100 << (attempt - 1)));
                    attempt += 1;
                }
                _ => break started,
            }
        };
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
                let text =
                    format!("PluginCrashed: the plugin's process could not be restarted ({attempt} attempts): {why}");
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

/// The reply a call left in its connection's buffer. A child that had no thread for the call
/// refused it ([`wire::STATUS_BUSY`]) and closes that connection, so `Err` never goes back to
/// the pool.
fn reply_in(buf: &[u8]) -> Result<wire::Reply<'_>, CallError> {
    match Fields::new(buf).reply() {
        Ok(reply) if reply.status == wire::STATUS_BUSY => {
            Err(crashed(format!("PluginCrashed: {}", String::from_utf8_lossy(reply.a))))
        }
        Ok(reply) => Ok(reply),
        Err(e) => Err(CallError::InvalidResponse(e.to_string())),
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
