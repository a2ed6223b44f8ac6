//! The host side of the plugin boundary: the functions kiln offers plugins through the
//! `KilnHost` table (`kiln_types::abi`), and what they keep.
//!
//! - `mod.rs`: the per-instance context and the table, and the C functions behind it.
//! - `logs.rs`: each plugin's recent log lines, panics and init errors.
//!
//! Nothing here changes what is served; the reconciler creates a context per instance and retires
//! it with the instance. A table and its context are never freed (a few dozen bytes per load):
//! a thread a plugin left running may call the host at any time, and must find it retired, not
//! gone.

pub mod logs;
pub mod services;

use kiln_types::abi::{self, KilnHost, KilnStr};
use logs::{LogEntry, LogStore};
use std::cell::Cell;
use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Longest log message kept, in bytes (longer ones are cut).
const MAX_MESSAGE: usize = 8 * 1024;

/// What the host knows of one plugin instance.
#[derive(Debug)]
pub struct HostCtx {
    plugin: String,
    version: String,
    /// Set once the instance's cleanup has run: later calls do nothing.
    retired: AtomicBool,
    logs: Arc<LogStore>,
    /// The services behind `KilnHost::call` (none outside a server: calls are refused).
    services: Option<services::Services>,
}

impl HostCtx {
    pub fn new(plugin: &str, version: &str, logs: Arc<LogStore>) -> Arc<Self> {
        Self::with_services(plugin, version, logs, None)
    }

    /// A context whose service calls `services` answers.
    pub fn with_services(
        plugin: &str,
        version: &str,
        logs: Arc<LogStore>,
        services: Option<services::Services>,
    ) -> Arc<Self> {
        let retired = AtomicBool::new(false);
        Arc::new(Self { plugin: plugin.into(), version: version.into(), retired, logs, services })
    }

    /// The plugin's name.
    pub fn plugin(&self) -> &str {
        &self.plugin
    }

    /// The instance is gone: host calls made from now on answer `STATUS_RETIRED`, and the
    /// event subscriptions it made at runtime end.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
        if let Some(services) = &self.services {
            services.events.forget_instance(self.key());
        }
    }

    /// What identifies this instance to the event bus (the context's address: contexts are
    /// never freed, so it is never reused).
    pub fn key(&self) -> usize {
        self as *const Self as usize
    }

    /// The table to hand the plugin, valid until the process exits (see the module docs).
    pub fn table(self: &Arc<Self>) -> &'static KilnHost {
        let ctx = Arc::into_raw(self.clone()).cast::<c_void>();
        Box::leak(Box::new(KilnHost { abi: abi::ABI_VERSION, ctx, log: host_log, call: host_call }))
    }
}

thread_local! {
    /// The route being handled on this thread, if any: plugin calls are synchronous, so a host
    /// call made during one runs on the thread that made it. A pointer, not a copy: this is set
    /// for every request, and read only when the plugin logs.
    static ROUTE: Cell<Option<*const str>> = const { Cell::new(None) };
    /// The deadline of the route being handled on this thread: host calls after it fail.
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Tags host calls made on this thread with `route` and its `deadline` until the guard drops
/// (then the route before it, if any, is back: a plugin's service called from another plugin's
/// handler runs inside that handler's call).
pub fn on_route(route: &str, deadline: Instant) -> RouteGuard<'_> {
    let route = ROUTE.with(|r| r.replace(Some(route as *const str)));
    let deadline = DEADLINE.with(|d| d.replace(Some(deadline)));
    RouteGuard { previous: (route, deadline), _route: std::marker::PhantomData }
}

/// The deadline set by [`on_route`] on this thread, if any.
pub fn current_deadline() -> Option<Instant> {
    DEADLINE.with(Cell::get)
}

/// Restores what [`on_route`] replaced; borrows the route, so it outlives its use.
pub struct RouteGuard<'a> {
    previous: (Option<*const str>, Option<Instant>),
    _route: std::marker::PhantomData<&'a str>,
}

impl Drop for RouteGuard<'_> {
    fn drop(&mut self) {
        // The previous route is the outer guard's, which outlives this one (guards nest).
        ROUTE.with(|r| r.set(self.previous.0));
        DEADLINE.with(|d| d.set(self.previous.1));
    }
}

/// The route set by [`on_route`] on this thread, copied.
fn current_route() -> Option<String> {
    // SAFETY: the pointer is set only while its `RouteGuard`, which borrows the string, lives
    // on this thread; when the guard drops, the pointer before it (of an outer guard, which
    // outlives it) or none is back.
    ROUTE.with(|r| r.get().map(|p| unsafe { &*p }.to_string()))
}

/// `KilnHost::log`.
///
/// # Safety
/// `ctx` is the context of a table made by [`HostCtx::table`]; the views live for the call.
unsafe extern "C" fn host_log(ctx: *const c_void, level: u32, message: KilnStr, fields: KilnStr) -> i32 {
    // Nothing may unwind into the plugin: a panic here is a refused call.
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `ctx` came from `Arc::into_raw` in `table` and is never released.
        let ctx = unsafe { &*ctx.cast::<HostCtx>() };
        // SAFETY: the plugin passes views that live for the call (the SDK's contract).
        let (message, fields) = unsafe { (message.as_bytes(), fields.as_bytes()) };
        ctx.log(level, message, fields)
    }))
    .unwrap_or(abi::STATUS_ERROR)
}

impl HostCtx {
    /// What `KilnHost::log` does, for a plugin in this process or one in a process of its own.
    pub fn log(&self, level: u32, message: &[u8], fields: &[u8]) -> i32 {
        if self.retired.load(Ordering::SeqCst) {
            return abi::STATUS_RETIRED;
        }
        let Some(level) = logs::Level::from_raw(level) else { return abi::STATUS_ERROR };
        let fields: serde_json::Value = if fields.is_empty() {
            serde_json::Value::Object(Default::default())
        } else {
            match serde_json::from_slice(fields) {
                Ok(v @ serde_json::Value::Object(_)) => v,
                _ => return abi::STATUS_ERROR,
            }
        };
        let message = String::from_utf8_lossy(&message[..message.len().min(MAX_MESSAGE)]).into_owned();
        let route = current_route();
        let entry = LogEntry::new(level, logs::Kind::Log, message, fields, route);
        entry.trace(&self.plugin, &self.version);
        self.logs.push(&self.plugin, entry);
        abi::STATUS_OK
    }

    /// What `KilnHost::call` does: the status, and the answer to hand over (none when retired).
    pub fn call(&self, op: &[u8], args: &[u8]) -> (i32, Option<Vec<u8>>) {
        if self.retired.load(Ordering::SeqCst) {
            return (abi::STATUS_RETIRED, None);
        }
        let deadline = DEADLINE.with(Cell::get);
        let answer = match (std::str::from_utf8(op), serde_json::from_slice::<serde_json::Value>(args), &self.services)
        {
            (Ok(op), Ok(args), Some(services)) => {
                let answer = services.call(&self.plugin, self.key(), op, &args, deadline);
                if op == "events.on" && self.retired.load(Ordering::SeqCst) {
                    // Retired while subscribing (from a thread the plugin left running): the
                    // retirement may have ended the instance's subscriptions before this one.
                    services.events.forget_instance(self.key());
                }
                answer
            }
            (_, _, None) => Err(services::CallError { code: "Unavailable", message: "no host services here".into() }),
            _ => Err(services::CallError {
                code: "BadRequest",
                message: "the op or its arguments are not readable".into(),
            }),
        };
        let (status, body) = match answer {
            Ok(value) => (abi::STATUS_OK, value),
            Err(e) => (abi::STATUS_ERROR, serde_json::json!({ "code": e.code, "message": e.message })),
        };
        (status, Some(serde_json::to_vec(&body).expect("a Value serializes")))
    }
}

/// `KilnHost::call`.
///
/// # Safety
/// `ctx` is the context of a table made by [`HostCtx::table`]; the views live for the call;
/// `write` with `out` may be called during the call.
unsafe extern "C" fn host_call(
    ctx: *const c_void,
    op: KilnStr,
    args: KilnStr,
    out: *mut c_void,
    write: abi::WriteFn,
) -> i32 {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `ctx` came from `Arc::into_raw` in `table` and is never released.
        let ctx = unsafe { &*ctx.cast::<HostCtx>() };
        // SAFETY: the plugin passes views that live for the call.
        let (op, args) = unsafe { (op.as_bytes(), args.as_bytes()) };
        let (status, answer) = ctx.call(op, args);
        if let Some(bytes) = answer {
            // SAFETY: the plugin's writer, with its own `out`, during the call (the contract).
            unsafe { write(out, KilnStr::new(&bytes)) };
        }
        status
    }))
    .unwrap_or(abi::STATUS_ERROR)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Calls the table's `log` as a plugin would.
    fn log(table: &KilnHost, message: &str, fields: &str) -> i32 {
        // SAFETY: the table came from `HostCtx::table`; both views live for the call.
        unsafe {
            (table.log)(table.ctx, abi::LOG_INFO, KilnStr::new(message.as_bytes()), KilnStr::new(fields.as_bytes()))
        }
    }

    #[test]
    fn a_host_call_after_retirement_fails_cleanly() {
        let logs: Arc<LogStore> = Default::default();
        let ctx = HostCtx::new("p", "1.0.0", logs.clone());
        let table = ctx.table();
        {
            let _route = on_route("GET /p", Instant::now() + std::time::Duration::from_secs(60));
            assert_eq!(log(table, "hello", r#"{"n":1}"#), abi::STATUS_OK);
        }
        assert_eq!(log(table, "bad fields", "[1]"), abi::STATUS_ERROR);
        ctx.retire();
        assert_eq!(log(table, "too late", ""), abi::STATUS_RETIRED);
        let kept = logs.query("p", logs::Level::Trace, None, 10);
        assert_eq!(kept.len(), 1);
        assert_eq!((kept[0].message.as_str(), kept[0].route.as_deref()), ("hello", Some("GET /p")));
        assert_eq!(kept[0].fields, serde_json::json!({ "n": 1 }));
    }
}
