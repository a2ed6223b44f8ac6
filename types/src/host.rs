//! The host: what kiln offers a plugin while it runs: logs under the plugin's name
//! ([`log`](crate::log)), a key-value store of its own ([`storage`](crate::storage)), its own
//! database schema ([`db`](crate::db)) and events ([`events`](crate::events)).
//!
//! ```
//! kiln_types::log::info("note created");
//! kiln_types::log::with_fields(kiln_types::log::Level::Warn, "slow", &kiln_types::serde_json::json!({ "ms": 120 }));
//! ```
//!
//! Inside a call from kiln (init, a handler, configure, cleanup) the host is known: the free
//! functions of [`log`](crate::log) use it. A thread the plugin starts takes a [`Host`] along
//! (`Host::current()` before spawning). Once the instance is retired, host calls fail with
//! [`HostError::Retired`]; they never crash.

use crate::abi::{self, KilnHost, KilnStr};
use std::cell::Cell;

/// Log levels, most severe first (so `level <= Level::Info` means "info or more severe").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl Level {
    /// The level's number across the boundary (`abi::LOG_*`).
    pub fn raw(self) -> u32 {
        match self {
            Level::Error => abi::LOG_ERROR,
            Level::Warn => abi::LOG_WARN,
            Level::Info => abi::LOG_INFO,
            Level::Debug => abi::LOG_DEBUG,
            Level::Trace => abi::LOG_TRACE,
        }
    }

    /// The level of a number across the boundary.
    pub fn from_raw(raw: u32) -> Option<Self> {
        [Level::Error, Level::Warn, Level::Info, Level::Debug, Level::Trace].into_iter().find(|l| l.raw() == raw)
    }

    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        }
    }
}

/// Why a host call did nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostError {
    /// No host: not inside a call from kiln, and no [`Host`] was taken along.
    NoHost,
    /// The instance this host belongs to was retired.
    Retired,
    /// The host refused the call (a bad argument).
    Failed,
    /// The service answered with an error (`code` as in kiln's error table).
    Service { code: String, message: String },
}

impl std::fmt::Display for HostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HostError::NoHost => "no kiln host on this thread",
            HostError::Retired => "the plugin instance was retired",
            HostError::Failed => "the host refused the call",
            HostError::Service { code, message } => return write!(f, "{code}: {message}"),
        })
    }
}

impl std::error::Error for HostError {}

impl HostError {
    /// The code of a service's refusal (`"TableAccessDenied"`, `"Timeout"`, … as in kiln's
    /// error table), if that is what this is.
    pub fn code(&self) -> Option<&str> {
        match self {
            HostError::Service { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A handle to the host of one plugin instance. Cheap to copy, and may move to other threads.
#[derive(Debug, Clone, Copy)]
pub struct Host {
    raw: *const KilnHost,
}

// SAFETY: the host table and its context live until the process exits (see `KilnHost`), and
// every host function is thread-safe.
unsafe impl Send for Host {}
// SAFETY: as above.
unsafe impl Sync for Host {}

thread_local! {
    /// The host of the call from kiln in progress on this thread (null outside one).
    static CURRENT: Cell<*const KilnHost> = const { Cell::new(std::ptr::null()) };
}

impl Host {
    /// The host of the call from kiln in progress on this thread.
    pub fn current() -> Option<Host> {
        let raw = CURRENT.with(Cell::get);
        (!raw.is_null()).then_some(Host { raw })
    }

    /// What tells this host (so, the instance it serves) from others in the library.
    pub(crate) fn key(&self) -> usize {
        self.raw as usize
    }

    /// Logs `message` at `level`, with `fields` (a JSON object; anything else is logged as
    /// `{"value": …}`).
    pub fn log(&self, level: Level, message: &str, fields: &serde_json::Value) -> Result<(), HostError> {
        let fields = match fields {
            serde_json::Value::Null => Vec::new(),
            serde_json::Value::Object(_) => serde_json::to_vec(fields).unwrap_or_default(),
            other => serde_json::to_vec(&serde_json::json!({ "value": other })).unwrap_or_default(),
        };
        // SAFETY: `raw` came from the host (see `enter`) and stays valid until the process
        // exits; both views live for the call.
        let status = unsafe {
            let host = &*self.raw;
            (host.log)(host.ctx, level.raw(), KilnStr::new(message.as_bytes()), KilnStr::new(&fields))
        };
        match status {
            abi::STATUS_OK => Ok(()),
            abi::STATUS_RETIRED => Err(HostError::Retired),
            _ => Err(HostError::Failed),
        }
    }
}

impl Host {
    /// Calls host service `op` with `args` (a JSON object); its answer. Blocking: the services
    /// do I/O (kiln moves the calling worker out of its async pool meanwhile).
    pub fn call(&self, op: &str, args: &serde_json::Value) -> Result<serde_json::Value, HostError> {
        let args = serde_json::to_vec(args).map_err(|_| HostError::Failed)?;
        let mut answer: Vec<u8> = Vec::new();
        // SAFETY: as in `log`; `answer` outlives the call, and `write_into` only appends to it.
        let status = unsafe {
            let host = &*self.raw;
            (host.call)(
                host.ctx,
                KilnStr::new(op.as_bytes()),
                KilnStr::new(&args),
                (&mut answer as *mut Vec<u8>).cast(),
                write_into,
            )
        };
        let value = || serde_json::from_slice::<serde_json::Value>(&answer).map_err(|_| HostError::Failed);
        match status {
            abi::STATUS_OK => value(),
            abi::STATUS_RETIRED => Err(HostError::Retired),
            _ => {
                let v = value()?;
                let text = |k: &str| v[k].as_str().unwrap_or_default().to_string();
                Err(HostError::Service { code: text("code"), message: text("message") })
            }
        }
    }
}

/// The `WriteFn` the SDK hands the host: appends to the `Vec<u8>` behind `out`.
///
/// # Safety
/// `out` points at a live `Vec<u8>` (see [`Host::call`]); `bytes` is valid for the call.
unsafe extern "C" fn write_into(out: *mut std::ffi::c_void, bytes: KilnStr) {
    // Nothing may unwind into the host: a failed append (out of memory) aborts, as allocation
    // failures do anyway.
    // SAFETY: guaranteed by the caller.
    unsafe { (*out.cast::<Vec<u8>>()).extend_from_slice(bytes.as_bytes()) };
}

/// Makes `raw` the current host of this thread until the guard drops (then the previous one).
pub(crate) fn enter(raw: *const KilnHost) -> Entered {
    Entered { previous: CURRENT.with(|c| c.replace(raw)) }
}

/// Restores the previous current host.
pub(crate) struct Entered {
    previous: *const KilnHost,
}

impl Drop for Entered {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.previous));
    }
}

/// Logging under the plugin's name, through the current host. Logging never fails a handler:
/// outside a call from kiln (no host), these do nothing.
pub mod log {
    pub use super::Level;
    use super::{Host, HostError};

    /// Logs `message` with `fields` (a JSON object) at `level`.
    pub fn with_fields(level: Level, message: &str, fields: &serde_json::Value) {
        let _ = try_log(level, message, fields);
    }

    /// As [`with_fields`], telling why nothing was logged.
    pub fn try_log(level: Level, message: &str, fields: &serde_json::Value) -> Result<(), HostError> {
        Host::current().ok_or(HostError::NoHost)?.log(level, message, fields)
    }

    pub fn error(message: &str) {
        with_fields(Level::Error, message, &serde_json::Value::Null);
    }

    pub fn warn(message: &str) {
        with_fields(Level::Warn, message, &serde_json::Value::Null);
    }

    pub fn info(message: &str) {
        with_fields(Level::Info, message, &serde_json::Value::Null);
    }

    pub fn debug(message: &str) {
        with_fields(Level::Debug, message, &serde_json::Value::Null);
    }

    pub fn trace(message: &str) {
        with_fields(Level::Trace, message, &serde_json::Value::Null);
    }
}

/// The plugin's own key-value store, kept by kiln in PostgreSQL: values are JSON, keys are
/// strings (1 to 512 bytes). It survives reloads and restarts, and goes with the plugin on
/// uninstall. Calls block (they are database round trips) and need a host (a call from kiln, or
/// a [`Host`] taken along).
pub mod storage {
    use super::{Host, HostError};
    use serde_json::{Value, json};

    fn call(op: &str, args: Value) -> Result<Value, HostError> {
        Host::current().ok_or(HostError::NoHost)?.call(op, &args)
    }

    /// The value under `key`, if any.
    pub fn get(key: &str) -> Result<Option<Value>, HostError> {
        let v = call("storage.get", json!({ "key": key }))?;
        Ok(v.get("value").cloned().filter(|v| !v.is_null()))
    }

    /// Stores `value` under `key`.
    pub fn put(key: &str, value: &Value) -> Result<(), HostError> {
        call("storage.put", json!({ "key": key, "value": value })).map(drop)
    }

    /// Removes `key`; whether it was there.
    pub fn delete(key: &str) -> Result<bool, HostError> {
        Ok(call("storage.delete", json!({ "key": key }))?["deleted"].as_bool().unwrap_or(false))
    }

    /// Every (key, value) whose key starts with `prefix`, in key order (at most 1,000).
    pub fn list(prefix: &str) -> Result<Vec<(String, Value)>, HostError> {
        let v = call("storage.list", json!({ "prefix": prefix }))?;
        Ok(v["entries"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| Some((e["key"].as_str()?.to_string(), e["value"].clone())))
            .collect())
    }

    /// Stores `new` under `key` if the value there is `expected` (`None`: if there is none);
    /// whether it did. The building block of counters and locks without lost updates.
    pub fn compare_and_set(key: &str, expected: Option<&Value>, new: &Value) -> Result<bool, HostError> {
        let v = call("storage.cas", json!({ "key": key, "expected": expected, "value": new }))?;
        Ok(v["swapped"].as_bool().unwrap_or(false))
    }
}

/// The plugin's own PostgreSQL schema, through kiln. Declare the tables in the manifest
/// (`[package.metadata.kiln] tables = ["notes"]`) and create them with migrations
/// (`migrations/*.sql` in the crate, applied once each before init). Statements run as the
/// plugin's own role with its schema on the search path: `notes` is the plugin's table, and
/// anything else is refused by PostgreSQL (`TableAccessDenied`) unless the operator grants it
/// in the row's `resources`.
///
/// Parameters are JSON values bound as `$1`, `$2`, … (never spliced into the SQL); PostgreSQL
/// reads each as the type the statement needs. Rows come back as JSON objects. Calls block
/// (database round trips) and carry the handler's deadline as their statement timeout.
///
/// ```no_run
/// use kiln_types::{db, serde_json::json};
/// let rows = db::query("INSERT INTO notes (text) VALUES ($1) RETURNING id, text", &[json!("hi")])?;
/// let n = db::execute("DELETE FROM notes WHERE id = $1", &[json!(7)])?;
/// # Ok::<(), kiln_types::HostError>(())
/// ```
pub mod db {
    use super::{Host, HostError};
    use serde_json::{Value, json};

    fn call(op: &str, sql: &str, params: &[Value]) -> Result<Value, HostError> {
        Host::current().ok_or(HostError::NoHost)?.call(op, &json!({ "sql": sql, "params": params }))
    }

    /// Runs a statement that returns rows (`SELECT`, `VALUES`, `… RETURNING`); its rows, each a
    /// JSON object of column name to value (at most 10,000: page with `LIMIT`).
    pub fn query(sql: &str, params: &[Value]) -> Result<Vec<Value>, HostError> {
        match call("db.query", sql, params)? {
            Value::Object(mut o) => match o.remove("rows") {
                Some(Value::Array(rows)) => Ok(rows),
                _ => Err(HostError::Failed),
            },
            _ => Err(HostError::Failed),
        }
    }

    /// As [`query`], for at most one row.
    pub fn query_opt(sql: &str, params: &[Value]) -> Result<Option<Value>, HostError> {
        Ok(query(sql, params)?.into_iter().next())
    }

    /// Runs a statement that returns no rows (`INSERT`, `UPDATE`, `DELETE`, DDL); how many rows
    /// it touched.
    pub fn execute(sql: &str, params: &[Value]) -> Result<u64, HostError> {
        call("db.execute", sql, params)?["rows_affected"].as_u64().ok_or(HostError::Failed)
    }
}

/// Events: publish one for every plugin subscribed to its topic (see
/// [`Plugin::events`](crate::Plugin::events) for subscribing). Delivery is asynchronous: `emit`
/// returns once the event is queued for its subscribers, never waiting for them.
///
/// ```no_run
/// kiln_types::events::emit("notes.created", &kiln_types::serde_json::json!({ "id": 7 }))?;
/// # Ok::<(), kiln_types::HostError>(())
/// ```
pub mod events {
    use super::{Host, HostError};
    use crate::sdk::Event;
    use serde_json::json;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    /// Publishes `data` under `topic` (dot-separated segments of letters, digits, `_` and `-`;
    /// `kiln.` topics are kiln's own); the event's id.
    pub fn emit(topic: &str, data: &impl serde::Serialize) -> Result<u64, HostError> {
        let host = Host::current().ok_or(HostError::NoHost)?;
        let answer = host.call("events.emit", &json!({ "topic": topic, "data": data }))?;
        answer["id"].as_u64().ok_or(HostError::Failed)
    }

    /// A subscription made at runtime ([`on`], [`once`]); [`off`] ends it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct SubscriptionId(pub(crate) u32);

    /// A handler of a runtime subscription.
    pub type RuntimeHandler = Arc<dyn Fn(&Event<'_>) -> Result<(), String> + Send + Sync>;

    /// One runtime subscription: the host of its instance, its id, its handler, and whether it
    /// is for one event only.
    type Entry = (usize, u32, RuntimeHandler, bool);

    /// The runtime subscriptions of every instance of this library.
    static RUNTIME: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
    static NEXT: AtomicU32 = AtomicU32::new(1);

    /// Subscribes this instance to `pattern` from now on, until [`off`] or its retirement:
    /// unlike [`Plugin::events`](crate::Plugin::events), such a subscription belongs to the
    /// instance (a reloaded plugin makes it again, in its `init`), and events published while
    /// it is not serving yet are not delivered to it.
    pub fn on(
        pattern: &str,
        handler: impl Fn(&Event<'_>) -> Result<(), String> + Send + Sync + 'static,
    ) -> Result<SubscriptionId, HostError> {
        subscribe(pattern, Arc::new(handler), false)
    }

    /// As [`on`], for the first matching event only.
    pub fn once(
        pattern: &str,
        handler: impl Fn(&Event<'_>) -> Result<(), String> + Send + Sync + 'static,
    ) -> Result<SubscriptionId, HostError> {
        subscribe(pattern, Arc::new(handler), true)
    }

    /// Ends a runtime subscription; whether it was still there.
    pub fn off(id: SubscriptionId) -> Result<bool, HostError> {
        let host = Host::current().ok_or(HostError::NoHost)?;
        let answer = host.call("events.off", &json!({ "id": id.0 }))?;
        forget(|h, n| h == host.key() && n == id.0);
        Ok(answer["removed"].as_bool().unwrap_or(false))
    }

    fn subscribe(pattern: &str, handler: RuntimeHandler, once: bool) -> Result<SubscriptionId, HostError> {
        let host = Host::current().ok_or(HostError::NoHost)?;
        let id = NEXT.fetch_add(1, Ordering::Relaxed) & !crate::abi::RUNTIME_SUBSCRIPTION;
        lock().push((host.key(), id, handler, once));
        if let Err(e) = host.call("events.on", &json!({ "pattern": pattern, "id": id, "once": once })) {
            forget(|h, n| h == host.key() && n == id);
            return Err(e);
        }
        Ok(SubscriptionId(id))
    }

    fn lock() -> std::sync::MutexGuard<'static, Vec<Entry>> {
        RUNTIME.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes the matching entries. Their handlers are dropped after the lock is released (a
    /// captured value's `Drop` may subscribe or unsubscribe, or panic), inside `catch_unwind`:
    /// this runs under the plugin's `extern "C"` exports, which nothing may unwind out of.
    fn forget(which: impl Fn(usize, u32) -> bool) {
        let gone: Vec<Entry> = {
            let mut all = lock();
            let (gone, kept) = std::mem::take(&mut *all).into_iter().partition(|(h, n, _, _)| which(*h, *n));
            *all = kept;
            gone
        };
        if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(gone))) {
            std::mem::forget(payload);
        }
    }

    /// The handler of runtime subscription `id` of the instance served by `host`. A `once`
    /// subscription is removed as it is handed out: it gets this one event.
    pub(crate) fn handler(host: usize, id: u32) -> Option<RuntimeHandler> {
        let mut all = lock();
        let at = all.iter().position(|(h, n, _, _)| *h == host && *n == id)?;
        if all[at].3 {
            return Some(all.swap_remove(at).2);
        }
        Some(all[at].2.clone())
    }

    /// Drops every runtime subscription of the instance served by `host` (at its cleanup, or
    /// when its init failed).
    pub(crate) fn forget_host(host: usize) {
        forget(|h, _| h == host);
    }
}

/// Other plugins: call a service of a plugin this one depends on (`dependencies` in its manifest;
/// see [`Plugin::services`](crate::Plugin::services)). The call reaches the version of that
/// plugin serving now, runs on this thread, and is bound by this call's deadline.
///
/// ```no_run
/// let n = kiln_types::plugins::call("notes", "count", &kiln_types::serde_json::json!({}))?;
/// # Ok::<(), kiln_types::HostError>(())
/// ```
pub mod plugins {
    use super::{Host, HostError};
    use serde_json::{Value, json};

    /// Calls service `service` of plugin `plugin` with `args`; its answer. Fails with
    /// `DependencyNotDeclared` when this plugin's manifest does not name `plugin`, and with
    /// `DependencyUnavailable` when `plugin` does not serve.
    pub fn call(plugin: &str, service: &str, args: &Value) -> Result<Value, HostError> {
        let host = Host::current().ok_or(HostError::NoHost)?;
        let mut answer = host.call("plugin.call", &json!({ "plugin": plugin, "service": service, "args": args }))?;
        Ok(answer.get_mut("answer").map(Value::take).unwrap_or(Value::Null))
    }
}
