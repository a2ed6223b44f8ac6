//! The glue behind [`export_plugin!`](crate::export_plugin): generic functions that the macro
//! instantiates for the plugin type inside the plugin's own crate.
//!
//! Every function catches panics: a panic unwinding out of an `extern "C"` function would abort
//! the server, and the server cannot catch it itself (it is a foreign exception to its std).

use crate::abi::{self, KilnBuf, KilnRequest, KilnResponse, KilnStr};
use crate::description::{PluginDescription, RouteDescription};
use crate::sdk::{ConfigChange, Handler, InitContext, Plugin, Request, Response};
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

/// One loaded instance: the plugin value and its handlers, indexed like its described routes.
struct Instance<P> {
    plugin: P,
    handlers: Vec<Handler<P>>,
}

/// The text of a panic payload.
fn panic_message(payload: Box<dyn Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
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

/// Body of `kiln_describe`.
///
/// # Safety
/// `out` must be valid for a write.
pub unsafe fn describe<P: Plugin>(out: *mut KilnBuf, pkg: PackageInfo) -> i32 {
    let result = catch_unwind(|| {
        let routes = P::routes()
            .into_iter()
            .map(|r| RouteDescription {
                method: r.method.to_string(),
                path: r.path,
                summary: r.summary,
                handler: r.handler_name,
                request_schema: r.request_schema,
                response_schema: r.response_schema,
                blocking: r.blocking,
            })
            .collect();
        let description = PluginDescription {
            name: pkg.name.to_string(),
            version: pkg.version.to_string(),
            description: pkg.description.to_string(),
            author: pkg.authors.replace(':', ", "),
            routes,
        };
        serde_json::to_vec(&description)
    });
    match result {
        // SAFETY: `out` is valid for a write (caller).
        Ok(Ok(json)) => unsafe { fail(out, abi::STATUS_OK, String::from_utf8_lossy(&json).into_owned()) },
        // SAFETY: as above.
        Ok(Err(e)) => unsafe { fail(out, abi::STATUS_ERROR, format!("could not serialize the description: {e}")) },
        // SAFETY: as above.
        Err(p) => unsafe { fail(out, abi::STATUS_PANIC, panic_message(p)) },
    }
}

/// Body of `kiln_init`.
///
/// # Safety
/// `config` is a valid view for the call; `instance_out` and `err_out` are valid for writes.
pub unsafe fn init<P: Plugin>(config: KilnStr, instance_out: *mut *mut c_void, err_out: *mut KilnBuf) -> i32 {
    // SAFETY: `config` is valid for the call (caller).
    let config_bytes = unsafe { config.as_bytes() };
    let result = catch_unwind(AssertUnwindSafe(|| {
        let config = if config_bytes.is_empty() {
            serde_json::Value::Object(Default::default())
        } else {
            serde_json::from_slice(config_bytes).map_err(|e| format!("invalid config JSON: {e}"))?
        };
        let plugin = P::init(&InitContext { config })?;
        let handlers = P::routes().into_iter().map(|r| r.handler).collect();
        Ok::<_, String>(Box::new(Instance { plugin, handlers }))
    }));
    match result {
        Ok(Ok(instance)) => {
            // SAFETY: `instance_out` is valid for a write (caller).
            unsafe { instance_out.write(Box::into_raw(instance).cast()) };
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
    let result = catch_unwind(AssertUnwindSafe(|| {
        let request = Request { raw };
        match instance.handlers.get(raw.route as usize) {
            Some(handler) => handler(&instance.plugin, &request),
            None => Response::error(500, &format!("route index {} out of range", raw.route)),
        }
    }));
    let (status, response) = match result {
        Ok(r) => (abi::STATUS_OK, r),
        Err(p) => (abi::STATUS_PANIC, Response::text(500, panic_message(p))),
    };
    let mut headers = Vec::new();
    for (name, value) in &response.headers {
        headers.extend_from_slice(name.as_bytes());
        headers.push(b'\n');
        headers.extend_from_slice(value.as_bytes());
        headers.push(b'\n');
    }
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
    let result = catch_unwind(AssertUnwindSafe(|| {
        let config = serde_json::from_slice(config_bytes).map_err(|e| format!("invalid config JSON: {e}"))?;
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

/// Body of `kiln_cleanup`: runs [`Plugin::cleanup`] and frees the instance.
///
/// # Safety
/// `instance` comes from [`init`] for the same `P`, is not used again; `err_out` is valid for a write.
pub unsafe fn cleanup<P: Plugin>(instance: *mut c_void, err_out: *mut KilnBuf) -> i32 {
    // SAFETY: `instance` was made by `Box::into_raw` in `init` and is given back once (caller).
    let mut instance = unsafe { Box::from_raw(instance as *mut Instance<P>) };
    let result = catch_unwind(AssertUnwindSafe(move || {
        instance.plugin.cleanup();
        drop(instance);
    }));
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
/// ```ignore
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
        /// See [`kiln_types::abi::DescribeFn`].
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn kiln_describe(out: *mut $crate::abi::KilnBuf) -> i32 {
            let pkg = $crate::export::PackageInfo {
                name: env!("CARGO_PKG_NAME"),
                version: env!("CARGO_PKG_VERSION"),
                description: env!("CARGO_PKG_DESCRIPTION"),
                authors: env!("CARGO_PKG_AUTHORS"),
            };
            // SAFETY: the server upholds the contract of `DescribeFn`.
            unsafe { $crate::export::describe::<$plugin>(out, pkg) }
        }

        /// # Safety
        /// See [`kiln_types::abi::InitFn`].
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn kiln_init(
            config: $crate::abi::KilnStr,
            instance_out: *mut *mut ::std::ffi::c_void,
            err_out: *mut $crate::abi::KilnBuf,
        ) -> i32 {
            // SAFETY: the server upholds the contract of `InitFn`.
            unsafe { $crate::export::init::<$plugin>(config, instance_out, err_out) }
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
