//! The child processes: starting one (from one long-lived thread), its output, its end
//! (reaped by a waiter thread, classified, told to its owner), and killing it.

use super::calls::{Broken, Conn, serve_host_call};
use super::wire::{self, Fields, Frame};
use super::{Death, INIT_TIMEOUT, Isolated, MAX_IDLE, MAX_LINE, PASSED_ENV, Spawn, TAIL_LINES, child, crashed};
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
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

/// Starts a child, opens the side connection and inits the instance: the child and the
/// description.
pub(super) fn launch(
    name: &str,
    library: &Path,
    config: &[u8],
    host: &Arc<HostCtx>,
    spawn: &Spawn,
) -> Result<(Arc<Child>, Vec<u8>), LoadError> {
    let io = start_error;
    super::stale_dirs::sweep_once();
    let dir = tempfile::Builder::new()
        .prefix(&super::stale_dirs::prefix())
        .tempdir()
        .map_err(|e| io("a socket directory", e))?;
    let path = dir.path().join("s");
    let listener = UnixListener::bind(&path).map_err(|e| io("a socket", e))?;
    let (reader, writer) = std::io::pipe().map_err(|e| io("a pipe", e))?;
    let mut command = Command::new(&spawn.exe);
    // Shown by `ps` as `kiln plugin-host --library …/<plugin>-<hash>.so`, whatever the path run.
    std::os::unix::process::CommandExt::arg0(&mut command, "kiln");
    command.arg("plugin-host").arg("--library").arg(library).arg("--parent").arg(std::process::id().to_string());
    if let Some(mb) = spawn.settings.memory_limit_mb {
        command.arg("--memory-limit-mb").arg(mb.to_string());
    }
    if let Some(s) = spawn.settings.cpu_limit_s {
        command.arg("--cpu-limit-s").arg(s.to_string());
    }
    command.arg("--poll-us").arg(super::spin::budget().as_micros().to_string());
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
        mux: tokio::sync::OnceCell::new(),
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

/// Why a child could not be started: `what` failed.
fn start_error(what: &str, e: io::Error) -> LoadError {
    LoadError::Init(format!("could not start the plugin's process ({what}): {e}"))
}

/// Opens the side connection and creates the instance in a started child: its description.
fn init(child: &Arc<Child>, config: &[u8], host: &Arc<HostCtx>) -> Result<Vec<u8>, LoadError> {
    let io = start_error;
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

/// One child process.
pub(super) struct Child {
    pub(super) name: String,
    pub(super) pid: i32,
    pub(super) path: PathBuf,
    /// Holds the socket's directory (0700) until the child is gone.
    pub(super) _dir: tempfile::TempDir,
    pub(super) idle: Mutex<Vec<Conn>>,
    /// The connection requests from async tasks share (`mux.rs`), opened at the first.
    pub(super) mux: tokio::sync::OnceCell<Arc<super::mux::Mux>>,
    /// Set when the child is known to be gone (or going): no new calls start on it.
    pub(super) dead: AtomicBool,
    pub(super) exit: Mutex<Option<Death>>,
    pub(super) exited: Condvar,
    /// Why kiln killed it, if it did.
    pub(super) kill_reason: Mutex<Option<Death>>,
    /// Set (under this lock) once the process is reaped: its pid may then be reused, and no
    /// signal is sent to it any more.
    pub(super) reaped: Mutex<bool>,
    pub(super) tail: Arc<Mutex<VecDeque<String>>>,
    /// Set when the output reader reached the end of the child's output.
    pub(super) output_done: Arc<AtomicBool>,
    /// Set when the output said an allocation failed (the memory limit).
    pub(super) out_of_memory: Arc<AtomicBool>,
    /// Told when the child ends (see `watch`), once (`told`).
    pub(super) owner: Mutex<Weak<Isolated>>,
    pub(super) told: AtomicBool,
}

impl Child {
    pub(super) fn take_conn(&self) -> io::Result<Conn> {
        if let Some(conn) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(conn);
        }
        if self.dead.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the plugin's process is gone"));
        }
        let stream = UnixStream::connect(&self.path)?;
        Ok(Conn { write: stream.try_clone()?, read: BufReader::with_capacity(64 * 1024, stream), buf: Vec::new() })
    }

    pub(super) fn put_back(&self, mut conn: Conn) {
        // A large reply's buffer is not kept for every idle connection.
        conn.buf.shrink_to(1 << 20);
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE && !self.dead.load(Ordering::SeqCst) {
            idle.push(conn);
        }
    }

    /// Kills the child (SIGKILL), remembering why, unless it is reaped already.
    pub(super) fn kill(&self, why: Death) {
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

    pub(super) fn death(&self) -> Option<Death> {
        self.exit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until the child's end is known; `false` if it is not by `limit`.
    pub(super) fn wait_exit(&self, limit: Duration) -> bool {
        let exit = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        let (exit, _) = self.exited.wait_timeout_while(exit, limit, |e| e.is_none()).unwrap_or_else(|p| p.into_inner());
        exit.is_some()
    }

    /// A call broke: the child is (or is made) gone, and the error says how it ended.
    pub(super) fn failure(&self) -> CallError {
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

    pub(super) fn tail(&self) -> Vec<String> {
        self.tail.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }

    /// Keeps the child's output: the last lines for a crash report, each line in its log. Reads
    /// to the end whatever the bytes (a line is cut at [`MAX_LINE`], and need not be UTF-8), so
    /// the child never blocks on a full pipe.
    pub(super) fn read_output(&self, reader: std::io::PipeReader, logs: Arc<LogStore>) {
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
    pub(super) fn serve_side(&self, side: UnixStream, host: Arc<HostCtx>) {
        let spawned = std::thread::Builder::new().name(format!("{}-side", self.name)).spawn(move || {
            let Ok(mut write) = side.try_clone() else { return };
            let (mut read, mut buf) = (BufReader::new(side), Vec::new());
            while let Ok(wire::Head { kind, .. }) = wire::read_frame_within(&mut read, &mut buf, wire::MAX_HOST_FRAME) {
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
    pub(super) fn watch(self: &Arc<Self>, owner: Weak<Isolated>) {
        *self.owner.lock().unwrap_or_else(|p| p.into_inner()) = owner;
        self.tell_owner();
    }

    /// Tells the owner how the child ended, once, when both are known.
    pub(super) fn tell_owner(self: &Arc<Self>) {
        let Some(death) = self.death() else { return };
        let Some(owner) = self.owner.lock().unwrap_or_else(|p| p.into_inner()).upgrade() else { return };
        if !self.told.swap(true, Ordering::SeqCst) {
            owner.exited(self, death);
        }
    }

    /// Starts the thread that reaps the child and records how it ended.
    pub(super) fn start_waiter(self: &Arc<Self>, process: std::process::Child) {
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
    pub(super) fn output_read_after_exit(&self) -> bool {
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
