//! The glue behind [`export_plugin!`](crate::export_plugin): generic functions that the macro
//! instantiates for the plugin type inside the plugin's own crate.
//!
//! Every function catches panics: a panic unwinding out of an `extern "C"` function would abort
//! the server, and the server cannot catch it itself (it is a foreign exception to its std).

use crate::abi::{self, KilnBuf, KilnHost, KilnRequest, KilnResponse, KilnStr};
use crate::description::{PluginDescription, RouteDescription, ServiceDescription, SubscriptionDescription};
use crate::route::{BoxHandler, RouteMeta};
use crate::sdk::{ConfigChange, Event, EventHandler, InitContext, Plugin, Request, Response, ServiceHandler};
use std::any::Any;
use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Cargo package fields of the plugin crate, captured by the macro with `env!`.
#[derive(Debug, Clone, Copy)]
pub struct PackageInfo {
    pub name: &'static str,
    pub version: &'static str,
    pub description: &'static str,
    pub authors: &'static str,
}

/// One loaded instance: the plugin value, its handlers (indexed like its described routes), and
/// the host of every call into it.
struct Instance<P> {
    plugin: P,
    handlers: Vec<BoxHandler<P>>,
    /// Indexed like its described subscriptions.
    events: Vec<EventHandler<P>>,
    /// Indexed like its described services.
    services: Vec<ServiceHandler<P>>,
    host: *const KilnHost,
}

thread_local! {
    /// Where the last panic on this thread happened (set by the hook `init` installs).
    static PANIC_AT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Installs (once per library) a panic hook that remembers where a panic happened, so that the
/// message kiln shows names the file and line. The previous hook still runs.
fn remember_panic_locations() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Some(l) = info.location() {
                let at = format!("{}:{}:{}", l.file(), l.line(), l.column());
                let _ = PANIC_AT.try_with(|p| p.borrow_mut().replace(at));
            }
            previous(info);
        }));
    });
}

/// The text of a panic payload; the payload is disposed of here.
///
/// A payload's own `Drop` may panic (`panic_any(x)` where `x`'s drop panics): it is dropped
/// inside `catch_unwind`, and a payload of that second panic is leaked rather than dropped, so no
/// panic can escape into the `extern "C"` frame (which would abort the server).
fn panic_message(payload: Box<dyn Any + Send>) -> String {
    let mut message = if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    };
    if let Some(at) = PANIC_AT.try_with(|p| p.borrow_mut().take()).ok().flatten() {
        message = format!("{message} (at {at})");
    }
    if let Err(second) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
        std::mem::forget(second);
        return format!("{message} (and its payload panicked when dropped)");
    }
    message
}

/// Writes `msg` into `out` (if not null) and returns `status`.
///
/// # Safety
/// `out` is null or valid for a write.
unsafe fn fail(out: *mut KilnBuf, status: i32, msg: String) -> i32 {
    if !out.is_null() {
        // SAFETY: guaranteed by the caller.
        unsafe { out.write(KilnBuf::from_vec(msg.into_bytes())) };
    }
    status
}

/// A subscription as described: its pattern, its name, its timeout.
type SubscriptionMeta = (String, Option<String>, Option<std::time::Duration>);

/// The description of a plugin as JSON: package fields, the routes it serves in `routes`'
/// order, its subscriptions in `events`' order (a handler name used twice gets `#2`, `#3`, …)
/// and its services. Not generic (see [`RouteMeta`]).
fn describe(
    routes: Vec<RouteMeta>,
    events: Vec<SubscriptionMeta>,
    services: Vec<String>,
    pkg: PackageInfo,
) -> Result<Vec<u8>, String> {
    if let Some((i, s)) = services.iter().enumerate().find(|(i, s)| services[..*i].contains(s)) {
        return Err(format!("service {s:?} is offered twice (the second at {i})"));
    }
    let mut subscriptions: Vec<SubscriptionDescription> = Vec::new();
    for (pattern, name, timeout) in events {
        let base = name.unwrap_or_else(|| pattern.clone());
        let taken = |h: &str| subscriptions.iter().any(|s| s.pattern == pattern && s.handler == h);
        let mut handler = base.clone();
        let mut n = 1;
        while taken(&handler) {
            n += 1;
            handler = format!("{base}#{n}");
        }
        let timeout_ms = timeout.map(|d| d.as_millis().try_into().unwrap_or(u64::MAX));
        subscriptions.push(SubscriptionDescription { pattern, handler, timeout_ms });
    }
    let mut definitions = serde_json::Map::new();
    let mut routes: Vec<RouteDescription> = routes
        .into_iter()
        .map(|r| {
            definitions.extend(r.docs.definitions);
            RouteDescription {
                method: r.method.to_string(),
                path: r.path,
                summary: r.summary,
                handler: r.handler_name,
                request_schema: r.docs.request_schema,
                response_schema: r.response_schema,
                blocking: r.blocking,
                responses: r.docs.responses,
                params: r.docs.params,
                query: r.docs.query,
                deadline_ms: r.deadline.map(|d| d.as_millis().try_into().unwrap_or(u64::MAX)),
            }
        })
        .collect();
    let mut schemas = std::collections::BTreeMap::new();
    if !definitions.is_empty() {
        // Derived schemas of recursive types refer to their definitions by the type's name; in
        // the document, the plugin's name keeps them apart from other plugins' types.
        for (name, schema) in &definitions {
            let mut schema = schema.clone();
            crate::schema::prefix_refs(&mut schema, pkg.name, &definitions);
            schemas.insert(crate::schema::component_name(pkg.name, name), schema);
        }
        for route in &mut routes {
            let all = route.request_schema.iter_mut().chain(route.response_schema.iter_mut());
            let all = all.chain(route.params.values_mut()).chain(route.query.iter_mut().map(|q| &mut q.schema));
            for schema in all.chain(route.responses.iter_mut().filter_map(|r| r.schema.as_mut())) {
                crate::schema::prefix_refs(schema, pkg.name, &definitions);
            }
        }
    }
    let description = PluginDescription {
        subscriptions,
        services: services.into_iter().map(|name| ServiceDescription { name }).collect(),
        name: pkg.name.to_string(),
        version: pkg.version.to_string(),
        description: pkg.description.to_string(),
        author: pkg.authors.replace(':', ", "),
        routes,
        schemas,
    };
    serde_json::to_vec(&description).map_err(|e| format!("could not serialize the description: {e}"))
}

/// A configuration as the server hands it over (empty: `{}`).
fn parse_config(bytes: &[u8]) -> Result<serde_json::Value, String> {
    if bytes.is_empty() {
        return Ok(serde_json::Value::Object(Default::default()));
    }
    serde_json::from_slice(bytes).map_err(|e| format!("invalid config JSON: {e}"))
}

/// A service call's arguments.
fn service_args(bytes: &[u8]) -> Result<serde_json::Value, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("the arguments are not JSON: {e}"))
}

/// A service's answer, as JSON.
fn service_answer(answer: &serde_json::Value) -> Result<Vec<u8>, String> {
    serde_json::to_vec(answer).map_err(|e| format!("could not serialize the answer: {e}"))
}

/// Body of `kiln_init`: [`Plugin::routes`] runs once, and both the description the server
/// routes by and the handlers the instance dispatches to come from that one list.
///
/// # Safety
/// `config` is a valid view for the call; `instance_out`, `description_out` and `err_out` are
/// valid for writes.
pub unsafe fn init<P: Plugin>(
    host: *const KilnHost,
    config: KilnStr,
    instance_out: *mut *mut c_void,
    description_out: *mut KilnBuf,
    err_out: *mut KilnBuf,
    pkg: PackageInfo,
) -> i32 {
    // SAFETY: `config` is valid for the call (caller).
    let config_bytes = unsafe { config.as_bytes() };
    remember_panic_locations();
    let _entered = crate::host::enter(host);
    let result = catch_unwind(AssertUnwindSafe(|| {
        let config = parse_config(config_bytes)?;
        // This is compiled for every plugin type: it only splits the lists (plain loops, less
        // code than iterator adapters); the rest is in `describe`.
        let (mut routes, mut handlers, mut subscriptions, mut events) = (vec![], vec![], vec![], vec![]);
        let (mut offered, mut services) = (vec![], vec![]);
        for r in P::routes() {
            routes.push(r.meta);
            handlers.push(r.handler);
        }
        for s in P::events() {
            subscriptions.push((s.pattern, s.name, s.timeout));
            events.push(s.handler);
        }
        for s in P::services() {
            offered.push(s.name);
            services.push(s.handler);
        }
        let described = describe(routes, subscriptions, offered, pkg)?;
        let plugin = P::init(&InitContext { config })?;
        Ok::<_, String>((Box::new(Instance { plugin, handlers, events, services, host }), described))
    }));
    if !matches!(result, Ok(Ok(_))) {
        // No instance: what its init subscribed to at runtime goes with it.
        crate::host::events::forget_host(host as usize);
    }
    match result {
        Ok(Ok((instance, described))) => {
            // SAFETY: both out-pointers are valid for writes (caller).
            unsafe {
                instance_out.write(Box::into_raw(instance).cast());
                description_out.write(KilnBuf::from_vec(described));
            }
            abi::STATUS_OK
        }
        // SAFETY: `err_out` is valid for a write (caller).
        Ok(Err(msg)) => unsafe { fail(err_out, abi::STATUS_ERROR, msg) },
        // SAFETY: as above.
        Err(p) => unsafe { fail(err_out, abi::STATUS_PANIC, panic_message(p)) },
    }
}

/// Body of `kiln_handle`.
///
/// # Safety
/// `instance` comes from [`init`] for the same `P` and is not yet cleaned up; `req` is valid for
/// the call; `out` is valid for a write.
pub unsafe fn handle<P: Plugin>(instance: *mut c_void, req: *const KilnRequest, out: *mut KilnResponse) -> i32 {
    // SAFETY: `instance` is a live `Instance<P>` (caller); handlers only take shared references.
    let instance = unsafe { &*(instance as *const Instance<P>) };
    // SAFETY: `req` is valid for the call (caller).
    let raw = unsafe { &*req };
    let _entered = crate::host::enter(instance.host);
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `HandleFn`'s contract: the server's views live for the call and are UTF-8
        // wherever `Request` reads them as text.
        let request = unsafe { Request::from_raw(raw) };
        match instance.handlers.get(raw.route as usize) {
            Some(handler) => handler(&instance.plugin, &request),
            None => Response::error(500, &format!("route index {} out of range", raw.route)),
        }
    }));
    let (status, response) = match result {
        Ok(r) => (abi::STATUS_OK, r),
        Err(p) => (abi::STATUS_PANIC, Response::text(500, panic_message(p))),
    };
    let headers = abi::encode_headers(response.headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
    let out_value = KilnResponse {
        status: response.status,
        headers: KilnBuf::from_vec(headers),
        body: KilnBuf::from_vec(response.body),
    };
    // SAFETY: `out` is valid for a write (caller).
    unsafe { out.write(out_value) };
    status
}

/// Body of `kiln_configure`.
///
/// # Safety
/// `instance` comes from [`init`] for the same `P` and is live; `config` is valid for the call;
/// `err_out` is valid for a write.
pub unsafe fn configure<P: Plugin>(instance: *mut c_void, config: KilnStr, err_out: *mut KilnBuf) -> i32 {
    // SAFETY: `instance` is a live `Instance<P>` (caller); configure takes a shared reference.
    let instance = unsafe { &*(instance as *const Instance<P>) };
    // SAFETY: `config` is valid for the call (caller).
    let config_bytes = unsafe { config.as_bytes() };
    let _entered = crate::host::enter(instance.host);
    let result = catch_unwind(AssertUnwindSafe(|| {
        let config = parse_config(config_bytes)?;
        instance.plugin.configure(&InitContext { config })
    }));
    match result {
        Ok(Ok(ConfigChange::Applied)) => abi::STATUS_OK,
        Ok(Ok(ConfigChange::Reload)) => abi::STATUS_RELOAD,
        // SAFETY: `err_out` is valid for a write (caller).
        Ok(Err(msg)) => unsafe { fail(err_out, abi::STATUS_ERROR, msg) },
        // SAFETY: as above.
        Err(p) => unsafe { fail(err_out, abi::STATUS_PANIC, panic_message(p)) },
    }
}

/// Body of `kiln_event`.
///
/// # Safety
/// `instance` comes from [`init`] for the same `P` and is live; `topic` and `data` are valid for
/// the call; `err_out` is valid for a write.
pub unsafe fn event<P: Plugin>(
    instance: *mut c_void,
    subscription: u32,
    topic: KilnStr,
    data: KilnStr,
    err_out: *mut KilnBuf,
) -> i32 {
    // SAFETY: `instance` is a live `Instance<P>` (caller); handlers take shared references.
    let instance = unsafe { &*(instance as *const Instance<P>) };
    // SAFETY: both views are valid for the call (caller).
    let (topic, data) = unsafe { (topic.as_bytes(), data.as_bytes()) };
    let _entered = crate::host::enter(instance.host);
    let result = catch_unwind(AssertUnwindSafe(|| {
        let topic = std::str::from_utf8(topic).map_err(|_| "the topic is not UTF-8".to_string())?;
        let event = Event::new(topic, data);
        if subscription & abi::RUNTIME_SUBSCRIPTION != 0 {
            let id = subscription & !abi::RUNTIME_SUBSCRIPTION;
            let handler = crate::host::events::handler(instance.host as usize, id)
                .ok_or_else(|| format!("no runtime subscription {id}"))?;
            return handler(&event);
        }
        let handler = instance
            .events
            .get(subscription as usize)
            .ok_or_else(|| format!("subscription index {subscription} out of range"))?;
        handler(&instance.plugin, &event)
    }));
    match result {
        Ok(Ok(())) => abi::STATUS_OK,
        // SAFETY: `err_out` is valid for a write (caller).
        Ok(Err(msg)) => unsafe { fail(err_out, abi::STATUS_ERROR, msg) },
        // SAFETY: as above.
        Err(p) => unsafe { fail(err_out, abi::STATUS_PANIC, panic_message(p)) },
    }
}

/// Body of `kiln_service`.
///
/// # Safety
/// `instance` comes from [`init`] for the same `P` and is live; `args` is valid for the call;
/// `out` is valid for a write.
pub unsafe fn service<P: Plugin>(instance: *mut c_void, service: u32, args: KilnStr, out: *mut KilnBuf) -> i32 {
    // SAFETY: `instance` is a live `Instance<P>` (caller); services take shared references.
    let instance = unsafe { &*(instance as *const Instance<P>) };
    // SAFETY: `args` is valid for the call (caller).
    let args = unsafe { args.as_bytes() };
    let _entered = crate::host::enter(instance.host);
    let result = catch_unwind(AssertUnwindSafe(|| {
        let handler =
            instance.services.get(service as usize).ok_or_else(|| format!("service index {service} out of range"))?;
        let answer = handler(&instance.plugin, service_args(args)?)?;
        service_answer(&answer)
    }));
    match result {
        Ok(Ok(answer)) => {
            // SAFETY: `out` is valid for a write (caller).
            unsafe { out.write(KilnBuf::from_vec(answer)) };
            abi::STATUS_OK
        }
        // SAFETY: as above.
        Ok(Err(msg)) => unsafe { fail(out, abi::STATUS_ERROR, msg) },
        // SAFETY: as above.
        Err(p) => unsafe { fail(out, abi::STATUS_PANIC, panic_message(p)) },
    }
}

/// Body of `kiln_cleanup`: runs [`Plugin::cleanup`] and frees the instance.
///
/// # Safety
/// `instance` comes from [`init`] for the same `P`, is not used again; `err_out` is valid for a write.
pub unsafe fn cleanup<P: Plugin>(instance: *mut c_void, err_out: *mut KilnBuf) -> i32 {
    // SAFETY: `instance` was made by `Box::into_raw` in `init` and is given back once (caller).
    let mut instance = unsafe { Box::from_raw(instance as *mut Instance<P>) };
    let _entered = crate::host::enter(instance.host);
    let host = instance.host as usize;
    let result = catch_unwind(AssertUnwindSafe(move || {
        instance.plugin.cleanup();
        drop(instance);
    }));
    // After the cleanup, which may still have subscribed; `forget_host` cannot unwind.
    crate::host::events::forget_host(host);
    match result {
        Ok(()) => abi::STATUS_OK,
        // SAFETY: `err_out` is valid for a write (caller).
        Err(p) => unsafe { fail(err_out, abi::STATUS_PANIC, panic_message(p)) },
    }
}

/// Body of `kiln_free_buf`.
///
/// # Safety
/// `buf` was returned by this library and is not used again.
pub unsafe fn free_buf(buf: KilnBuf) {
    // SAFETY: guaranteed by the caller. Dropping a Vec<u8> cannot panic.
    drop(unsafe { buf.into_vec() });
}

/// Generates the C exports of a plugin type that implements [`Plugin`](crate::Plugin).
///
/// ```
/// # use kiln_types::{InitContext, Plugin, Route};
/// # struct MyPlugin;
/// # impl Plugin for MyPlugin {
/// #     fn init(_: &InitContext) -> Result<Self, String> { Ok(MyPlugin) }
/// #     fn routes() -> Vec<Route<Self>> { Vec::new() }
/// # }
/// kiln_types::export_plugin!(MyPlugin);
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[unsafe(no_mangle)]
        pub extern "C" fn kiln_abi_version() -> u32 {
            $crate::abi::ABI_VERSION
        }

        #[unsafe(no_mangle)]
        pub extern "C" fn kiln_types_version() -> $crate::abi::KilnStr {
            $crate::abi::KilnStr::from_static($crate::TYPES_VERSION)
        }

        /// # Safety
        /// See [`kiln_types::abi::InitFn`].
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn kiln_init(
            host: *const $crate::abi::KilnHost,
            config: $crate::abi::KilnStr,
            instance_out: *mut *mut ::std::ffi::c_void,
            description_out: *mut $crate::abi::KilnBuf,
            err_out: *mut $crate::abi::KilnBuf,
        ) -> i32 {
            let pkg = $crate::export::PackageInfo {
                name: env!("CARGO_PKG_NAME"),
                version: env!("CARGO_PKG_VERSION"),
                description: env!("CARGO_PKG_DESCRIPTION"),
                authors: env!("CARGO_PKG_AUTHORS"),
            };
            // SAFETY: the server upholds the contract of `InitFn`.
            unsafe { $crate::export::init::<$plugin>(host, config, instance_out, description_out, err_out, pkg) }
        }

        /// # Safety
        /// See [`kiln_types::abi::HandleFn`].
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn kiln_handle(
            instance: *mut ::std::ffi::c_void,
            req: *const $crate::abi::KilnRequest,
            out: *mut $crate::abi::KilnResponse,
        ) -> i32 {
            // SAFETY: the server upholds the contract of `HandleFn`.
            unsafe { $crate::export::handle::<$plugin>(instance, req, out) }
        }

        /// # Safety
        /// See [`kiln_types::abi::ConfigureFn`].
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn kiln_configure(
            instance: *mut ::std::ffi::c_void,
            config: $crate::abi::KilnStr,
            err_out: *mut $crate::abi::KilnBuf,
        ) -> i32 {
            // SAFETY: the server upholds the contract of `ConfigureFn`.
            unsafe { $crate::export::configure::<$plugin>(instance, config, err_out) }
        }

        /// # Safety
        /// See [`kiln_types::abi::EventFn`].
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn kiln_event(
            instance: *mut ::std::ffi::c_void,
            subscription: u32,
            topic: $crate::abi::KilnStr,
            data: $crate::abi::KilnStr,
            err_out: *mut $crate::abi::KilnBuf,
        ) -> i32 {
            // SAFETY: the server upholds the contract of `EventFn`.
            unsafe { $crate::export::event::<$plugin>(instance, subscription, topic, data, err_out) }
        }

        /// # Safety
        /// See [`kiln_types::abi::ServiceFn`].
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn kiln_service(
            instance: *mut ::std::ffi::c_void,
            service: u32,
            args: $crate::abi::KilnStr,
            out: *mut $crate::abi::KilnBuf,
        ) -> i32 {
            // SAFETY: the server upholds the contract of `ServiceFn`.
            unsafe { $crate::export::service::<$plugin>(instance, service, args, out) }
        }

        /// # Safety
        /// See [`kiln_types::abi::CleanupFn`].
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn kiln_cleanup(
            instance: *mut ::std::ffi::c_void,
            err_out: *mut $crate::abi::KilnBuf,
        ) -> i32 {
            // SAFETY: the server upholds the contract of `CleanupFn`.
            unsafe { $crate::export::cleanup::<$plugin>(instance, err_out) }
        }

        /// # Safety
        /// See [`kiln_types::abi::FreeBufFn`].
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn kiln_free_buf(buf: $crate::abi::KilnBuf) {
            // SAFETY: the server upholds the contract of `FreeBufFn`.
            unsafe { $crate::export::free_buf(buf) }
        }
    };
}

#[cfg(test)]
mod tests {
    //! The glue called in-process, as the server calls it through the exports.
    use super::*;
    use crate::Route;
    use crate::abi::{KilnHeaders, KilnPair, KilnRequest};
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Glue;

    /// `routes()` lists its routes in another order on every call.
    static CALLS: AtomicU32 = AtomicU32::new(0);

    /// A panic payload whose `Drop` panics.
    struct Bomb;
    impl Drop for Bomb {
        fn drop(&mut self) {
            panic!("the payload's drop panicked");
        }
    }

    impl Plugin for Glue {
        fn init(_: &InitContext) -> Result<Self, String> {
            Ok(Glue)
        }
        fn routes() -> Vec<Route<Self>> {
            let mut routes =
                vec![Route::get("/a", Self::a), Route::get("/b", Self::b), Route::get("/bomb", Self::bomb)];
            if CALLS.fetch_add(1, Ordering::Relaxed) % 2 == 1 {
                routes.reverse();
            }
            routes
        }
    }

    /// What the test host was told: (level, message, fields).
    static LOGGED: std::sync::Mutex<Vec<(u32, String, String)>> = std::sync::Mutex::new(Vec::new());

    /// The test host offers no services.
    unsafe extern "C" fn test_call(
        _ctx: *const c_void,
        _op: KilnStr,
        _args: KilnStr,
        out: *mut c_void,
        write: abi::WriteFn,
    ) -> i32 {
        // SAFETY: the SDK's writer and buffer, during the call.
        unsafe { write(out, KilnStr::from_static(r#"{"code":"NotFound","message":"no services"}"#)) };
        abi::STATUS_ERROR
    }

    unsafe extern "C" fn test_log(_ctx: *const c_void, level: u32, message: KilnStr, fields: KilnStr) -> i32 {
        // SAFETY: the views live for the call (the SDK's contract).
        let (m, f) = unsafe { (message.as_bytes(), fields.as_bytes()) };
        let entry = (level, String::from_utf8_lossy(m).into_owned(), String::from_utf8_lossy(f).into_owned());
        LOGGED.lock().unwrap().push(entry);
        abi::STATUS_OK
    }

    impl Glue {
        fn a(&self, req: &Request) -> Response {
            crate::log::with_fields(crate::Level::Info, "a called", &serde_json::json!({ "route": "a" }));
            let name = req.header("x-name").unwrap_or("?").to_string();
            Response::text(200, "a").header("x-echo", name).header("x-evil", "x\nset-cookie\nsession=attacker")
        }
        fn b(&self, _: &Request) -> Response {
            Response::text(200, "b")
        }
        fn bomb(&self, _: &Request) -> Response {
            std::panic::panic_any(Bomb)
        }
    }

    const PKG: PackageInfo = PackageInfo { name: "glue", version: "0", description: "", authors: "" };

    /// An instance and its description, through `init`.
    fn load() -> (*mut c_void, PluginDescription) {
        let (mut instance, mut desc, mut err) = (std::ptr::null_mut(), KilnBuf::EMPTY, KilnBuf::EMPTY);
        // A host lives until the process exits, as kiln's do.
        let host: &'static KilnHost = Box::leak(Box::new(KilnHost {
            abi: abi::ABI_VERSION,
            ctx: std::ptr::null(),
            log: test_log,
            call: test_call,
        }));
        // SAFETY: every out-pointer is valid for a write; the config view and the host are static.
        let status = unsafe { init::<Glue>(host, KilnStr::from_static("{}"), &mut instance, &mut desc, &mut err, PKG) };
        assert_eq!(status, abi::STATUS_OK);
        // SAFETY: made by `from_vec` in this crate.
        let desc = unsafe { desc.into_vec() };
        (instance, serde_json::from_slice(&desc).unwrap())
    }

    /// Cleans the instance up (once).
    fn retire(instance: *mut c_void) {
        let mut err = KilnBuf::EMPTY;
        // SAFETY: a live instance from `load`, not used again.
        assert_eq!(unsafe { cleanup::<Glue>(instance, &mut err) }, abi::STATUS_OK);
    }

    /// Calls route `path` of `instance` with one header; (status code, response).
    fn call(instance: *mut c_void, desc: &PluginDescription, path: &str, header: &[u8]) -> (i32, KilnResponse) {
        let route = desc.routes.iter().position(|r| r.path == path).unwrap() as u32;
        let pairs: &[KilnPair] = &[KilnPair { name: KilnStr::from_static("x-name"), value: KilnStr::new(header) }];
        let raw = KilnRequest {
            route,
            method: KilnStr::from_static("GET"),
            path: KilnStr::new(path.as_bytes()),
            query: KilnStr::from_static(""),
            params: std::ptr::null(),
            params_len: 0,
            headers: KilnHeaders::over_pairs(&pairs),
            body: KilnStr::from_static(""),
        };
        let mut out = KilnResponse::EMPTY;
        // SAFETY: a live instance of `Glue`; every view lives for the call.
        let status = unsafe { handle::<Glue>(instance, &raw, &mut out) };
        (status, out)
    }

    #[test]
    fn routes_dispatch_as_described_however_routes_varies() {
        for _ in 0..4 {
            let (instance, desc) = load();
            for path in ["/a", "/b"] {
                let (status, out) = call(instance, &desc, path, b"");
                assert_eq!(status, abi::STATUS_OK);
                // SAFETY: made by `from_vec` in this crate.
                let body = unsafe { out.body.into_vec() };
                assert_eq!(body, &path.as_bytes()[1..], "route {path} reached another handler");
            }
            retire(instance);
        }
    }

    #[test]
    fn headers_cross_as_pairs_and_utf8_values_are_seen() {
        let (instance, desc) = load();
        let (_, out) = call(instance, &desc, "/a", "José".as_bytes());
        // SAFETY: made by `from_vec` in this crate.
        let head = unsafe { out.headers.into_vec() };
        let pairs = abi::decode_headers(&head).unwrap();
        let names: Vec<&[u8]> = pairs.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, vec![&b"content-type"[..], b"x-echo", b"x-evil"], "no header was injected");
        assert_eq!(pairs[1].1, "José".as_bytes());
        let (_, out) = call(instance, &desc, "/a", b"\xff");
        // SAFETY: as above.
        let head = unsafe { out.headers.into_vec() };
        assert_eq!(abi::decode_headers(&head).unwrap()[1].1, b"?", "a non-UTF-8 value is not text");
        retire(instance);
    }

    #[test]
    fn headers_are_read_through_the_host_by_name_and_in_order() {
        let pairs: &[KilnPair] = &[
            KilnPair { name: KilnStr::from_static("host"), value: KilnStr::from_static("a") },
            KilnPair { name: KilnStr::from_static("x-name"), value: KilnStr::new(b"\xff") },
        ];
        for (headers, expected) in [(KilnHeaders::over_pairs(&pairs), 2), (KilnHeaders::NONE, 0)] {
            let raw = KilnRequest {
                route: 0,
                method: KilnStr::from_static("GET"),
                path: KilnStr::from_static("/"),
                query: KilnStr::from_static(""),
                params: std::ptr::null(),
                params_len: 0,
                headers,
                body: KilnStr::from_static(""),
            };
            // SAFETY: every view is static or lives in `pairs`, which outlives `req`.
            let req = unsafe { Request::from_raw(&raw) };
            let all: Vec<_> = req.headers().collect();
            assert_eq!(all.len(), expected);
            if expected == 2 {
                assert_eq!(all, vec![(&b"host"[..], &b"a"[..]), (b"x-name", b"\xff")]);
                assert_eq!(req.header("HOST"), Some("a"), "names match in any case");
                assert_eq!(req.header_bytes("x-name"), Some(&b"\xff"[..]));
                assert_eq!(req.header("x-name"), None, "not UTF-8");
            }
            assert_eq!(req.header("accept"), None);
        }
    }

    #[test]
    fn handlers_log_through_the_host_of_their_instance() {
        let (instance, desc) = load();
        call(instance, &desc, "/a", b"");
        let logged = LOGGED.lock().unwrap().clone();
        assert!(logged.contains(&(abi::LOG_INFO, "a called".into(), r#"{"route":"a"}"#.into())), "{logged:?}");
        retire(instance);
        assert_eq!(
            crate::log::try_log(crate::Level::Info, "outside", &serde_json::Value::Null),
            Err(crate::HostError::NoHost)
        );
    }

    #[test]
    fn a_payload_that_panics_when_dropped_is_contained() {
        let (instance, desc) = load();
        let (status, out) = call(instance, &desc, "/bomb", b"");
        assert_eq!(status, abi::STATUS_PANIC);
        // SAFETY: made by `from_vec` in this crate.
        let body = String::from_utf8(unsafe { out.body.into_vec() }).unwrap();
        assert!(body.contains("panicked when dropped"), "{body}");
        assert!(body.contains("(at types/src/export.rs:"), "the panic names its place: {body}");
        retire(instance);
    }
}
