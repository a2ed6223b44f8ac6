//! The loader: opens a plugin library, checks its ABI, creates an instance, calls its handlers,
//! and retires it.
//!
//! A [`LoadedPlugin`] is one instance of one library file. The server keeps it in an `Arc` that
//! every in-flight request of that version also holds; when the last one drops, the plugin's
//! cleanup runs and the library is closed. Calls into the plugin are blocking: run them off the
//! async workers.

use crate::host::HostCtx;
use crate::isolation::{Isolated, Isolation, Spawn};
use kiln_types::PluginDescription;
use kiln_types::abi::{
    self, AbiVersionFn, CleanupFn, ConfigureFn, EventFn, FreeBufFn, HandleFn, InitFn, KilnBuf, KilnHeaders, KilnPair,
    KilnRequest, KilnResponse, KilnStr, ServiceFn, TypesVersionFn,
};
use libloading::Library;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Why a library could not be loaded. Nothing of it stays loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// dlopen failed (not a library, missing dependency, wrong architecture).
    #[error("could not open {path}: {source}")]
    Open { path: PathBuf, source: libloading::Error },
    /// A required export is missing: the library was not built with `export_plugin!`.
    #[error(
        "{path} is not a kiln plugin: it does not export `{symbol}` (was it built with kiln_types::export_plugin!?)"
    )]
    EntrypointNotFound { path: PathBuf, symbol: String },
    /// The library speaks another version of the plugin interface.
    #[error(
        "ABI mismatch: the plugin was built against kiln-types {plugin_types} (ABI {plugin_abi}), this server speaks kiln-types {server_types} (ABI {server_abi}); rebuild the plugin against this server's kiln-types"
    )]
    AbiMismatch { plugin_abi: u32, plugin_types: String, server_abi: u32, server_types: &'static str },
    /// The description `kiln_init` returned is unreadable.
    #[error("the plugin could not describe itself: {0}")]
    Describe(String),
    /// The plugin's init returned an error or panicked.
    #[error("the plugin's init failed: {0}")]
    Init(String),
    /// A plugin host process could not load the library (`code`: `isolation::child::LOAD_*`).
    #[error("{message}")]
    InHost { code: u16, message: String },
}

/// Why a handler call produced no response.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The handler panicked (the panic was caught inside the plugin).
    #[error("the plugin panicked: {0}")]
    Panic(String),
    /// The plugin returned a malformed response.
    #[error("the plugin returned an invalid response: {0}")]
    InvalidResponse(String),
    /// The plugin's process (isolation) died during the call, or is down: `code` says how
    /// (`PluginCrashed`, `MemoryLimit`, `CpuLimit`).
    #[error("{message}")]
    Crashed { code: crate::error_code::ErrorCode, message: String },
    /// The plugin's process was killed at the call's deadline.
    #[error("the handler ran past its deadline; its process was killed")]
    Timeout,
}

/// A request as the host hands it to [`LoadedPlugin::call`].
#[derive(Debug)]
pub struct CallRequest<'a> {
    pub route: u32,
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a str,
    pub params: &'a [(&'a str, &'a str)],
    /// The request's headers, read by the plugin through the host when it asks (the HTTP
    /// edge provides them over its own header map).
    pub headers: KilnHeaders,
    pub body: &'a [u8],
}

/// A plugin's response, in the plugin's own buffers (nothing is copied out of them).
#[derive(Debug)]
pub struct CallResponse {
    pub status: u16,
    /// Header pairs, length-prefixed as the plugin encoded them (see [`CallResponse::headers`]).
    head: Buf,
    body: Buf,
}

/// A response part: the plugin's own buffer (in process), or a copy (from its process).
#[derive(Debug)]
enum Buf {
    Plugin(PluginBuf),
    Owned(Vec<u8>),
}

impl AsRef<[u8]> for Buf {
    fn as_ref(&self) -> &[u8] {
        match self {
            Buf::Plugin(b) => b.as_ref(),
            Buf::Owned(v) => v,
        }
    }
}

impl CallResponse {
    /// The response a plugin's process sent (see `isolation`).
    pub fn from_reply(reply: crate::isolation::Reply) -> Result<Self, CallError> {
        match reply.status {
            abi::STATUS_OK => {
                Ok(CallResponse { status: reply.http, head: Buf::Owned(reply.head), body: Buf::Owned(reply.body) })
            }
            abi::STATUS_PANIC => Err(CallError::Panic(String::from_utf8_lossy(&reply.body).into_owned())),
            status => Err(CallError::InvalidResponse(format!("status code {status}"))),
        }
    }

    /// The response's (name, value) pairs, not yet checked as HTTP header names and values:
    /// views into the plugin's buffer.
    pub fn headers(&self) -> abi::HeaderPairs<'_> {
        abi::HeaderPairs::new(self.head.as_ref())
    }

    /// The body, handed over without a copy: the plugin's buffer goes back to the plugin when
    /// the last reference to it drops (after the body is written to the client).
    pub fn into_body(self) -> bytes::Bytes {
        match self.body {
            Buf::Owned(v) => bytes::Bytes::from(v),
            Buf::Plugin(b) if b.as_ref().is_empty() => bytes::Bytes::new(),
            Buf::Plugin(b) => bytes::Bytes::from_owner(b),
        }
    }
}

/// A buffer a plugin allocated and kiln holds: freed by the plugin's own `kiln_free_buf` when
/// dropped, on whatever thread drops it.
pub struct PluginBuf {
    buf: KilnBuf,
    free: FreeBufFn,
}

impl PluginBuf {
    /// # Safety
    /// `buf` was returned by the library `free` belongs to, and is handed over (not used or
    /// freed elsewhere).
    unsafe fn new(free: FreeBufFn, buf: KilnBuf) -> Self {
        Self { buf, free }
    }
}

impl std::fmt::Debug for PluginBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PluginBuf({} bytes)", self.buf.len)
    }
}

// SAFETY: the buffer is plain bytes owned by this value alone; the plugin's `kiln_free_buf`
// returns it to the plugin's allocator, which (like every Rust global allocator) is thread-safe,
// and the function stays mapped: libraries are never unmapped (RTLD_NODELETE, see `load`).
unsafe impl Send for PluginBuf {}
// SAFETY: shared access only reads the bytes.
unsafe impl Sync for PluginBuf {}

impl AsRef<[u8]> for PluginBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: a live buffer of the plugin's (see `new`), not freed before `self` drops.
        unsafe { self.buf.as_bytes() }
    }
}

impl Drop for PluginBuf {
    fn drop(&mut self) {
        if !self.buf.ptr.is_null() {
            let buf = KilnBuf { ptr: self.buf.ptr, len: self.buf.len, cap: self.buf.cap };
            // SAFETY: freed once, here, by the library that allocated it (see `new`).
            unsafe { (self.free)(buf) };
        }
    }
}

/// Counts loaded instances whose cleanup has not run yet, so that shutdown can wait for all of
/// them (a cleanup queued on the blocking pool would be dropped if the runtime exited first).
#[derive(Debug, Default)]
pub struct Retirements {
    pending: std::sync::atomic::AtomicUsize,
    done: tokio::sync::Notify,
}

impl Retirements {
    /// Instances loaded and not yet retired.
    pub fn pending(&self) -> usize {
        self.pending.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until every instance counted here has run its cleanup.
    pub async fn all_done(&self) {
        loop {
            let notified = self.done.notified();
            if self.pending() == 0 {
                return;
            }
            notified.await;
        }
    }

    fn loaded(&self) {
        self.pending.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn retired(&self) {
        self.pending.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.done.notify_waiters();
    }
}

/// The instance pointer a plugin's `kiln_init` returned.
struct Instance(*mut c_void);

/// One instance of one plugin library.
pub struct LoadedPlugin {
    description: Arc<PluginDescription>,
    binary_path: PathBuf,
    /// The row's `deadline_ms` for routes that set none (0: none), changed without a reload.
    deadline_ms: std::sync::atomic::AtomicU64,
    /// `Some` until dropped: `Drop` takes it to retire it (possibly on another thread).
    /// `None` from the start for an instance in a process of its own.
    live: Option<Live>,
    /// The instance's process, when it runs in one (`isolation = "process"`).
    isolated: Option<IsolatedLive>,
}

/// An instance in a process of its own, and who counts its retirement.
struct IsolatedLive {
    plugin: Arc<Isolated>,
    tracker: Option<Arc<Retirements>>,
}

/// The instance and the open library it lives in.
struct Live {
    instance: Instance,
    handle_fn: HandleFn,
    configure_fn: ConfigureFn,
    event_fn: EventFn,
    service_fn: ServiceFn,
    cleanup_fn: CleanupFn,
    free_fn: FreeBufFn,
    /// Told when this instance's cleanup has run.
    tracker: Option<Arc<Retirements>>,
    /// The host context of this instance: retired after its cleanup.
    host: Arc<HostCtx>,
    /// Must stay the last field: the function pointers above point into it, so it drops last.
    /// (Its code stays mapped even after: libraries are opened with RTLD_NODELETE, which is what
    /// lets a response body outlive the instance and still be freed by the plugin: `PluginBuf`.)
    _library: Library,
}

// SAFETY: the instance is only ever used through the plugin's exports, and `export_plugin!`
// requires the plugin type to be `Send + Sync`; the function pointers are plain code addresses.
unsafe impl Send for Live {}
// SAFETY: as above; `kiln_handle` takes the instance by shared reference on the plugin side.
unsafe impl Sync for Live {}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin").field("name", &self.description.name).field("path", &self.binary_path).finish()
    }
}

impl LoadedPlugin {
    /// [`LoadedPlugin::load_with`], counted in `tracker` until its cleanup has run.
    /// In a process of its own when `isolated` says so.
    pub fn load_tracked(
        path: &Path,
        config: &[u8],
        host: &Arc<HostCtx>,
        tracker: &Arc<Retirements>,
        isolated: Option<Spawn>,
    ) -> Result<Self, LoadError> {
        let mut plugin = match isolated {
            Some(spawn) => Self::load_isolated(path, config, host, spawn)?,
            None => Self::load_with(path, config, host)?,
        };
        tracker.loaded();
        if let Some(live) = &mut plugin.live {
            live.tracker = Some(tracker.clone());
        }
        if let Some(isolated) = &mut plugin.isolated {
            isolated.tracker = Some(tracker.clone());
        }
        Ok(plugin)
    }

    /// Starts a plugin host process for the library at `path` and creates the instance there.
    /// Blocking.
    pub fn load_isolated(path: &Path, config: &[u8], host: &Arc<HostCtx>, spawn: Spawn) -> Result<Self, LoadError> {
        let (plugin, described) = match Isolated::start(host.plugin(), path, config, host, spawn) {
            Ok(started) => started,
            Err(e) => {
                host.retire();
                return Err(e);
            }
        };
        let description: PluginDescription = match serde_json::from_slice(&described) {
            Ok(d) => d,
            Err(e) => {
                plugin.retire();
                host.retire();
                return Err(LoadError::Describe(format!("invalid description JSON: {e}")));
            }
        };
        Ok(Self {
            description: Arc::new(description),
            binary_path: path.to_path_buf(),
            deadline_ms: Default::default(),
            live: None,
            isolated: Some(IsolatedLive { plugin, tracker: None }),
        })
    }

    /// How this instance runs: `Some` in a process of its own, with its limits.
    pub fn isolation(&self) -> Option<&Isolation> {
        self.isolated.as_ref().map(|i| i.plugin.settings())
    }

    /// The instance's process, when it runs in one.
    pub fn isolated(&self) -> Option<&Arc<Isolated>> {
        self.isolated.as_ref().map(|i| &i.plugin)
    }

    /// The crash loop that stopped this isolated instance's restarts, if one did.
    pub fn crash_failed(&self) -> Option<String> {
        self.isolated.as_ref().and_then(|i| i.plugin.failed())
    }

    /// [`LoadedPlugin::load_with`] with a host of its own, whose logs go to tracing only (for
    /// callers outside a server, such as the benchmark).
    pub fn load(path: &Path, config: &[u8]) -> Result<Self, LoadError> {
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Self::load_with(path, config, &HostCtx::new(&name, "", Default::default()))
    }

    /// Opens the library at `path`, checks its ABI version, reads its description and creates an
    /// instance with `config` (JSON), served by `host`. Blocking.
    pub fn load_with(path: &Path, config: &[u8], host: &Arc<HostCtx>) -> Result<Self, LoadError> {
        let Exports { init, handle_fn, configure_fn, event_fn, service_fn, cleanup_fn, free_fn, library } =
            Exports::open(path)?;
        let mut instance: *mut c_void = std::ptr::null_mut();
        let (mut described, mut err) = (KilnBuf::EMPTY, KilnBuf::EMPTY);
        // SAFETY: the host table lives until the process exits; `config` outlives the call; the
        // three out-pointers are valid for writes.
        let status = unsafe { init(host.table(), KilnStr::new(config), &mut instance, &mut described, &mut err) };
        if status != abi::STATUS_OK || instance.is_null() {
            host.retire();
            // SAFETY: `err` was written by this library (or is empty) and is freed once.
            let msg = unsafe { take_string(free_fn, err) };
            let msg = if status == abi::STATUS_PANIC { format!("panicked: {msg}") } else { msg };
            return Err(LoadError::Init(msg));
        }
        let live = Live {
            instance: Instance(instance),
            handle_fn,
            configure_fn,
            event_fn,
            service_fn,
            cleanup_fn,
            free_fn,
            tracker: None,
            host: host.clone(),
            _library: library,
        };
        // SAFETY: `described` was written by this library and is freed exactly once, by it.
        let text = unsafe { take_string(free_fn, described) };
        let description: PluginDescription = match serde_json::from_str(&text) {
            Ok(d) => d,
            Err(e) => {
                live.retire("(undescribed)", path);
                return Err(LoadError::Describe(format!("invalid description JSON: {e}")));
            }
        };
        let description = Arc::new(description);
        Ok(Self {
            description,
            binary_path: path.to_path_buf(),
            deadline_ms: Default::default(),
            live: Some(live),
            isolated: None,
        })
    }

    /// What the plugin said about itself.
    pub fn description(&self) -> &PluginDescription {
        &self.description
    }

    /// The same, shared: for what outlives this instance (the API docs).
    pub fn shared_description(&self) -> Arc<PluginDescription> {
        self.description.clone()
    }

    /// The deadline the plugin's row sets for routes that set none.
    pub fn deadline(&self) -> Option<std::time::Duration> {
        match self.deadline_ms.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            ms => Some(std::time::Duration::from_millis(ms)),
        }
    }

    /// Sets [`LoadedPlugin::deadline`] (the row's `deadline_ms`); takes effect on the next request.
    pub fn set_deadline(&self, ms: Option<i32>) {
        let ms = ms.and_then(|ms| u64::try_from(ms).ok()).unwrap_or(0);
        self.deadline_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// The library file this instance was loaded from.
    pub fn binary_path(&self) -> &Path {
        &self.binary_path
    }

    /// Calls a handler. Blocking: runs the plugin's code on the calling thread.
    pub fn call(&self, req: &CallRequest<'_>) -> Result<CallResponse, CallError> {
        if let Some(isolated) = &self.isolated {
            let deadline = crate::host::current_deadline().unwrap_or_else(|| Instant::now() + DEFAULT_DEADLINE);
            return CallResponse::from_reply(isolated.plugin.handle(req, deadline)?);
        }
        let params: Vec<KilnPair> = req
            .params
            .iter()
            .map(|(n, v)| KilnPair { name: KilnStr::new(n.as_bytes()), value: KilnStr::new(v.as_bytes()) })
            .collect();
        let raw = KilnRequest {
            route: req.route,
            method: KilnStr::new(req.method.as_bytes()),
            path: KilnStr::new(req.path.as_bytes()),
            query: KilnStr::new(req.query.as_bytes()),
            params: params.as_ptr(),
            params_len: params.len(),
            headers: req.headers,
            body: KilnStr::new(req.body),
        };
        let live = self.live.as_ref().expect("a LoadedPlugin is live until dropped");
        let mut out = KilnResponse::EMPTY;
        // SAFETY: the instance is live (cleanup only runs in Drop); every view in `raw` points at
        // data borrowed for this call; `out` is valid for a write.
        let status = unsafe { (live.handle_fn)(live.instance.0, &raw, &mut out) };
        // SAFETY: both buffers were written by this library and are handed over to kiln.
        let (head, body) =
            unsafe { (PluginBuf::new(live.free_fn, out.headers), PluginBuf::new(live.free_fn, out.body)) };
        if status == abi::STATUS_PANIC {
            return Err(CallError::Panic(String::from_utf8_lossy(body.as_ref()).into_owned()));
        }
        if status != abi::STATUS_OK {
            return Err(CallError::InvalidResponse(format!("status code {status}")));
        }
        Ok(CallResponse { status: out.status, head: Buf::Plugin(head), body: Buf::Plugin(body) })
    }
}

impl LoadedPlugin {
    /// Runs the instance's service `name` with `args` (JSON) on this thread, its host calls
    /// bound by `deadline`; its answer (JSON). `Err` carries why not, or the plugin's error or
    /// panic message.
    pub fn service(&self, name: &str, args: &[u8], deadline: std::time::Instant) -> Result<Vec<u8>, String> {
        let index = self
            .description
            .services
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| format!("plugin {} offers no service {name:?}", self.description.name))?;
        let label = format!("service {name}");
        let _route = crate::host::on_route(&label, deadline);
        if let Some(isolated) = &self.isolated {
            let (status, out) = isolated.plugin.service(index as u32, args, deadline)?;
            return answer_of(status, out);
        }
        let live = self.live.as_ref().expect("a LoadedPlugin is live until dropped");
        let mut out = KilnBuf::EMPTY;
        // SAFETY: the instance is live; `args` outlives the call; `out` is valid for a write.
        let status = unsafe { (live.service_fn)(live.instance.0, index as u32, KilnStr::new(args), &mut out) };
        // SAFETY: `out` was written by this library (or is empty) and is handed over once.
        let out = unsafe { PluginBuf::new(live.free_fn, out) };
        match status {
            abi::STATUS_OK => Ok(out.as_ref().to_vec()),
            abi::STATUS_PANIC => Err(format!("panicked: {}", String::from_utf8_lossy(out.as_ref()))),
            _ => Err(String::from_utf8_lossy(out.as_ref()).into_owned()),
        }
    }

    /// What identifies this instance to the event bus: its host context's key.
    pub fn host_key(&self) -> usize {
        match (&self.live, &self.isolated) {
            (Some(l), _) => l.host.key(),
            (None, Some(i)) => i.plugin.host().key(),
            (None, None) => 0,
        }
    }

    /// Hands event `topic` with `data` (JSON) to the instance's subscription `subscription`
    /// (its index in the description, or `abi::RUNTIME_SUBSCRIPTION | id` for one it made at
    /// runtime). Blocking: the handler runs on this thread, with host
    /// calls bounded by `deadline`. `Err` carries the plugin's error or its panic message.
    pub fn event(
        &self,
        subscription: u32,
        topic: &str,
        data: &[u8],
        deadline: std::time::Instant,
    ) -> Result<(), String> {
        let label = format!("event {topic}");
        let _route = crate::host::on_route(&label, deadline);
        if let Some(isolated) = &self.isolated {
            let (status, msg) = isolated.plugin.event(subscription, topic, data, deadline)?;
            return answer_of(status, msg).map(drop);
        }
        let live = self.live.as_ref().expect("a LoadedPlugin is live until dropped");
        let mut err = KilnBuf::EMPTY;
        // SAFETY: the instance is live; both views outlive the call; `err` is valid for a write.
        let status = unsafe {
            (live.event_fn)(live.instance.0, subscription, KilnStr::new(topic.as_bytes()), KilnStr::new(data), &mut err)
        };
        // SAFETY: `err` was written by this library (or is empty) and is freed once.
        let msg = unsafe { take_string(live.free_fn, err) };
        match status {
            abi::STATUS_OK => Ok(()),
            abi::STATUS_PANIC => Err(format!("panicked: {msg}")),
            _ => Err(msg),
        }
    }
}

/// What the plugin did with a new configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Configured {
    /// The instance applied it in place.
    Applied,
    /// The plugin asks for a fresh instance instead.
    Reload,
}

impl LoadedPlugin {
    /// Hands the instance a new configuration (JSON). Blocking. `Err` carries the plugin's
    /// reason for refusing it (or its panic message).
    pub fn configure(&self, config: &[u8]) -> Result<Configured, String> {
        if let Some(isolated) = &self.isolated {
            let (status, msg) = isolated.plugin.configure(config)?;
            return match status {
                abi::STATUS_RELOAD => Ok(Configured::Reload),
                status => answer_of(status, msg).map(|_| Configured::Applied),
            };
        }
        let live = self.live.as_ref().expect("a LoadedPlugin is live until dropped");
        let mut err = KilnBuf::EMPTY;
        // SAFETY: the instance is live; `config` outlives the call; `err` is valid for a write.
        let status = unsafe { (live.configure_fn)(live.instance.0, KilnStr::new(config), &mut err) };
        // SAFETY: `err` was written by this library (or is empty) and is freed once.
        let msg = unsafe { take_string(live.free_fn, err) };
        match status {
            abi::STATUS_OK => Ok(Configured::Applied),
            abi::STATUS_RELOAD => Ok(Configured::Reload),
            abi::STATUS_PANIC => Err(format!("panicked: {msg}")),
            _ => Err(msg),
        }
    }

    /// Runs the plugin's cleanup and closes the library on this thread, now. Blocking.
    pub fn retire_now(mut self) {
        if let Some(live) = self.live.take() {
            live.retire(&self.description.name, &self.binary_path);
        }
        if let Some(isolated) = self.isolated.take() {
            isolated.retire(&self.description.name, &self.binary_path);
        }
    }
}

impl Drop for LoadedPlugin {
    /// The last reference may drop anywhere, also on an async worker at the end of a request:
    /// the plugin's cleanup (which may block) then moves to the blocking pool.
    fn drop(&mut self) {
        let (live, isolated) = (self.live.take(), self.isolated.take());
        if live.is_none() && isolated.is_none() {
            return;
        }
        let (name, path) = (self.description.name.clone(), self.binary_path.clone());
        let retire = move || {
            if let Some(live) = live {
                live.retire(&name, &path);
            }
            if let Some(isolated) = isolated {
                isolated.retire(&name, &path);
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(retire)),
            Err(_) => retire(),
        }
    }
}

impl Live {
    /// Runs the plugin's cleanup, then closes the library (by dropping `self`).
    fn retire(self, name: &str, path: &Path) {
        let mut err = KilnBuf::EMPTY;
        // SAFETY: the instance came from this library's init, and nothing can use it any more
        // (its LoadedPlugin is gone); the library is still open (it is dropped after this).
        let status = unsafe { (self.cleanup_fn)(self.instance.0, &mut err) };
        // SAFETY: `err` was written by this library (or is empty) and is freed once.
        let msg = unsafe { take_string(self.free_fn, err) };
        if status == abi::STATUS_OK {
            tracing::info!(plugin = %name, library = %path.display(), "cleanup ran; library retired");
        } else {
            tracing::error!(plugin = %name, library = %path.display(), "cleanup panicked: {msg}");
        }
        self.host.retire();
        let tracker = self.tracker.clone();
        drop(self);
        if let Some(t) = tracker {
            t.retired();
        }
    }
}

/// A plugin library, opened and checked: its ABI version is this server's, and these are its
/// exports. Also what a plugin host process (`isolation`) opens.
pub struct Exports {
    pub init: InitFn,
    pub handle_fn: HandleFn,
    pub configure_fn: ConfigureFn,
    pub event_fn: EventFn,
    pub service_fn: ServiceFn,
    pub cleanup_fn: CleanupFn,
    pub free_fn: FreeBufFn,
    /// Must outlive every use of the function pointers above.
    pub library: Library,
}

impl Exports {
    /// Opens the library at `path` and checks its ABI version before anything else is called.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        // Unload policy: a library is never unmapped (RTLD_NODELETE). glibc seldom unmaps a Rust
        // cdylib anyway (its std's thread-local destructors pin it), and when it did, a thread the
        // plugin spawned and did not stop would run unmapped code. Kept mapped, such a thread
        // leaks instead of crashing the server. The cost is one mapping per distinct version
        // loaded since start (the same version loaded again reuses its mapping; measured in the
        // `unload` test and the README).
        let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL | libc::RTLD_NODELETE;
        // SAFETY: opening a library runs its initializers. Plugins are trusted code (see the
        // README's trust model); the file is a kiln build output named by content hash, so it is
        // never replaced while open.
        let library: Library = unsafe { libloading::os::unix::Library::open(Some(path), flags) }
            .map_err(|source| LoadError::Open { path: path.into(), source })?
            .into();

        // The ABI check comes before anything else is called.
        // SAFETY: the symbol type matches the `kiln_abi_version` signature of every ABI version.
        let abi_version: AbiVersionFn = unsafe { symbol(&library, path, abi::SYM_ABI_VERSION)? };
        // SAFETY: `kiln_abi_version` takes nothing and returns a u32 in every ABI version.
        let plugin_abi = unsafe { abi_version() };
        if plugin_abi != abi::ABI_VERSION {
            // SAFETY: `kiln_types_version` has this signature in every ABI version (it is part of
            // the frozen version handshake) and returns a static string.
            let plugin_types = match unsafe { symbol::<TypesVersionFn>(&library, path, abi::SYM_TYPES_VERSION) } {
                // SAFETY: the returned view points at a static string in the library.
                Ok(f) => String::from_utf8_lossy(unsafe { f().as_bytes() }).into_owned(),
                Err(_) => "unknown".to_string(),
            };
            return Err(LoadError::AbiMismatch {
                plugin_abi,
                plugin_types,
                server_abi: abi::ABI_VERSION,
                server_types: kiln_types::TYPES_VERSION,
            });
        }
        // SAFETY (each of the seven): the ABI version matched, so the symbol has this signature.
        Ok(Self {
            // SAFETY: see above.
            init: unsafe { symbol(&library, path, abi::SYM_INIT)? },
            // SAFETY: see above.
            handle_fn: unsafe { symbol(&library, path, abi::SYM_HANDLE)? },
            // SAFETY: see above.
            configure_fn: unsafe { symbol(&library, path, abi::SYM_CONFIGURE)? },
            // SAFETY: see above.
            event_fn: unsafe { symbol(&library, path, abi::SYM_EVENT)? },
            // SAFETY: see above.
            service_fn: unsafe { symbol(&library, path, abi::SYM_SERVICE)? },
            // SAFETY: see above.
            cleanup_fn: unsafe { symbol(&library, path, abi::SYM_CLEANUP)? },
            // SAFETY: see above.
            free_fn: unsafe { symbol(&library, path, abi::SYM_FREE_BUF)? },
            library,
        })
    }
}

impl IsolatedLive {
    /// Runs the cleanup in the plugin's process and ends it.
    fn retire(self, name: &str, path: &Path) {
        let (status, msg) = self.plugin.retire();
        if status == abi::STATUS_OK {
            tracing::info!(plugin = %name, library = %path.display(), "cleanup ran; the plugin's process ended");
        } else {
            tracing::error!(plugin = %name, library = %path.display(), "cleanup failed: {msg}");
        }
        self.plugin.host().retire();
        if let Some(t) = self.tracker {
            t.retired();
        }
    }
}

/// A deadline for calls made outside any route (none set on the thread).
const DEFAULT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// The answer of a call that returns a status and a message or answer.
fn answer_of(status: i32, out: Vec<u8>) -> Result<Vec<u8>, String> {
    match status {
        abi::STATUS_OK => Ok(out),
        abi::STATUS_PANIC => Err(format!("panicked: {}", String::from_utf8_lossy(&out))),
        _ => Err(String::from_utf8_lossy(&out).into_owned()),
    }
}

/// Looks up an exported function.
///
/// # Safety
/// `T` must be the function-pointer type of the symbol's real signature.
unsafe fn symbol<T: Copy>(library: &Library, path: &Path, name: &[u8]) -> Result<T, LoadError> {
    // SAFETY: the caller guarantees the type; the copied pointer is used only while the library
    // stays open (it lives in the same struct and drops last).
    unsafe { library.get::<T>(name) }.map(|s| *s).map_err(|_| LoadError::EntrypointNotFound {
        path: path.to_path_buf(),
        symbol: String::from_utf8_lossy(&name[..name.len() - 1]).into_owned(),
    })
}

/// Copies a plugin buffer into a Vec and frees it.
///
/// # Safety
/// `buf` was returned by the library that `free` belongs to, and is not used again.
pub(crate) unsafe fn take_bytes(free: FreeBufFn, buf: KilnBuf) -> Vec<u8> {
    // SAFETY: forwarded from the caller; the buffer is freed when the `PluginBuf` drops.
    unsafe { PluginBuf::new(free, buf) }.as_ref().to_vec()
}

/// # Safety
/// As [`take_bytes`].
pub(crate) unsafe fn take_string(free: FreeBufFn, buf: KilnBuf) -> String {
    // SAFETY: forwarded from the caller.
    String::from_utf8_lossy(&unsafe { take_bytes(free, buf) }).into_owned()
}
