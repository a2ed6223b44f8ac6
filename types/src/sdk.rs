//! The safe API plugin authors write against: [`Plugin`], [`Route`], [`Request`], [`Response`].

use crate::abi::{KilnPair, KilnRequest, KilnStr};
use crate::route::Route;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::ffi::c_void;

/// A kiln plugin. Implement it and call [`export_plugin!`](crate::export_plugin) once.
///
/// One value of this type is created per load (by [`Plugin::init`]) and shared by every request,
/// concurrently: keep mutable state behind a `Mutex` or atomics.
pub trait Plugin: Send + Sync + Sized + 'static {
    /// Creates the plugin instance when the server loads it. An error refuses the load; the
    /// message is shown on the plugin's row and a previous version keeps serving.
    fn init(ctx: &InitContext) -> Result<Self, String>;

    /// The routes the plugin serves. Called once per load, before [`Plugin::init`].
    fn routes() -> Vec<Route<Self>>;

    /// The events the plugin subscribes to: topic patterns and their handlers. Called once per
    /// load, like [`Plugin::routes`]. A subscription belongs to the plugin rather than to one
    /// loaded version: across a reload its events queue and go to the new version, none lost
    /// and none delivered twice.
    fn events() -> Vec<Subscription<Self>> {
        Vec::new()
    }

    /// The services the plugin offers the plugins that depend on it (`dependencies` in their
    /// manifests): named functions, JSON in and JSON out, called through the host
    /// ([`plugins::call`](crate::plugins::call)). Called once per load, like [`Plugin::routes`].
    fn services() -> Vec<Service<Self>> {
        Vec::new()
    }

    /// Called when the plugin's configuration changes (`ctx.config`, defaults applied, already
    /// valid against the manifest's configSchema), while requests may be running. Apply it in
    /// place and return [`ConfigChange::Applied`]; or return [`ConfigChange::Reload`] (the
    /// default) to get a fresh instance created by [`Plugin::init`]; or an error to refuse it
    /// (the instance keeps its config, and the row shows the message).
    fn configure(&self, ctx: &InitContext) -> Result<ConfigChange, String> {
        let _ = ctx;
        Ok(ConfigChange::Reload)
    }

    /// Runs when the server retires this instance: after it was unloaded, disabled or replaced,
    /// and after its last in-flight request finished. It runs exactly once per instance, also at
    /// shutdown.
    ///
    /// Stop and join every thread the instance started, and end whatever else runs on its behalf
    /// (timers, runtimes): nothing of an instance may run after its cleanup. kiln keeps every
    /// library version mapped until the server exits, so a thread left behind does not crash the
    /// server, but it keeps running and holding what it holds, for nothing.
    fn cleanup(&mut self) {}
}

/// What a plugin did with a new configuration (see [`Plugin::configure`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigChange {
    /// The instance now uses the new configuration.
    Applied,
    /// Replace the instance with a fresh one, created with the new configuration.
    Reload,
}

/// What the server tells a plugin when it creates an instance.
#[derive(Debug, Clone)]
pub struct InitContext {
    /// The plugin's configuration (JSON). An empty object when none is set.
    pub config: serde_json::Value,
}

/// An event handler: a plain function of the plugin and the event. An error (or a panic) is
/// counted and logged by kiln; the event is not delivered again.
pub type EventHandler<P> = fn(&P, &Event<'_>) -> Result<(), String>;

/// A service: a plain function of the plugin and the caller's JSON, answering JSON or an error.
pub type ServiceHandler<P> = fn(&P, serde_json::Value) -> Result<serde_json::Value, String>;

/// One service a plugin offers (see [`Plugin::services`]).
pub struct Service<P> {
    pub(crate) name: String,
    pub(crate) handler: ServiceHandler<P>,
}

impl<P> Service<P> {
    /// Service `name` (unique within the plugin), answered by `handler`.
    pub fn new(name: impl Into<String>, handler: ServiceHandler<P>) -> Self {
        Self { name: name.into(), handler }
    }
}

/// One event subscription: a topic pattern and its handler (see [`Plugin::events`]).
pub struct Subscription<P> {
    pub(crate) pattern: String,
    pub(crate) handler: EventHandler<P>,
    pub(crate) name: Option<String>,
    pub(crate) timeout: Option<std::time::Duration>,
}

impl<P> Subscription<P> {
    /// Events whose topic matches `pattern`: dot-separated segments, `*` matching any one
    /// (`notes.*` matches `notes.created`, not `notes.a.b`).
    pub fn on(pattern: impl Into<String>, handler: EventHandler<P>) -> Self {
        Self { pattern: pattern.into(), handler, name: None, timeout: None }
    }

    /// How long the handler may take over one event (default: the server's
    /// `--event-timeout-ms`, 5 s). Past it the event counts as timed out; the handler is not
    /// stopped (nothing in-process can be), and the subscription's next event waits for it.
    pub fn timeout(mut self, timeout: std::time::Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The handler's name (default: the pattern): with the pattern, it identifies the
    /// subscription from one version to the next.
    pub fn handler_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
}

/// An event, borrowed from kiln for the duration of one handler call.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    pub(crate) topic: &'a str,
    pub(crate) data: &'a [u8],
}

impl<'a> Event<'a> {
    /// An event over its parts (for tests and hosts that call handlers directly).
    pub fn new(topic: &'a str, data: &'a [u8]) -> Self {
        Self { topic, data }
    }

    /// The event's topic (`notes.created`).
    pub fn topic(&self) -> &'a str {
        self.topic
    }

    /// The event's data, as JSON text.
    pub fn data_bytes(&self) -> &'a [u8] {
        self.data
    }

    /// The event's data, parsed.
    pub fn data<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(self.data)
    }
}

/// An HTTP request, borrowed from the server for the duration of one handler call.
#[derive(Debug)]
pub struct Request<'a> {
    pub(crate) raw: &'a KilnRequest,
}

impl<'a> Request<'a> {
    /// A request over a raw one. For hosts that call handlers directly (the export glue,
    /// benchmarks, static linking); plugins never need it.
    ///
    /// # Safety
    /// Every view in `raw` must point at initialized bytes that stay valid and unmodified for
    /// `'a`: `params`/`params_len` at that many pairs (or a length of 0), and every view the
    /// `headers` functions give. `method`, `path`, `query` and both parts of every parameter
    /// must be UTF-8; header values may be any bytes.
    #[doc(hidden)]
    pub unsafe fn from_raw(raw: &'a KilnRequest) -> Self {
        Self { raw }
    }

    /// HTTP method, upper case.
    pub fn method(&self) -> &'a str {
        // SAFETY: `from_raw`'s contract: a UTF-8 view that lives for 'a.
        unsafe { str_of(self.raw.method) }
    }

    /// Request path, without the query string.
    pub fn path(&self) -> &'a str {
        // SAFETY: as in `method`.
        unsafe { str_of(self.raw.path) }
    }

    /// Raw query string, without `?` (empty when absent).
    pub fn query_string(&self) -> &'a str {
        // SAFETY: as in `method`.
        unsafe { str_of(self.raw.query) }
    }

    /// A path parameter of the matched route (`{id}` → `param("id")`), percent-decoded
    /// (`/files/caf%C3%A9` → `café`; a value that is not UTF-8 once decoded is empty).
    pub fn param(&self, name: &str) -> Option<&'a str> {
        // SAFETY: `from_raw`'s contract: `params_len` pairs of views that live for 'a.
        let value = unsafe { find_pair(self.raw.params, self.raw.params_len, name) }?;
        // SAFETY: `from_raw`'s contract: parameter values are UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(value) })
    }

    /// Every path parameter of the matched route, as (name, value) in the path's order,
    /// percent-decoded as [`Request::param`] is.
    pub fn params(&self) -> Vec<(&'a str, &'a str)> {
        // SAFETY: `from_raw`'s contract: `params_len` pairs of UTF-8 views that live for 'a.
        let pairs = unsafe { pairs_of(self.raw.params, self.raw.params_len) };
        // SAFETY: as above.
        pairs.iter().map(|p| unsafe { (str_of(p.name), str_of(p.value)) }).collect()
    }

    /// A request header by name (any case), when its value is UTF-8 (`X-Name: José` is).
    /// [`Request::header_bytes`] gives any value as it came.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        std::str::from_utf8(self.header_bytes(name)?).ok()
    }

    /// A request header's raw value by name (any case): the bytes the client sent.
    pub fn header_bytes(&self, name: &str) -> Option<&'a [u8]> {
        let h = &self.raw.headers;
        let mut value = KilnStr::new(&[]);
        // SAFETY: `from_raw`'s contract: the host's functions answer with views living for 'a;
        // `name` lives for the call and `value` is valid for a write.
        let found = unsafe { (h.get)(h.ctx, KilnStr::new(name.as_bytes()), &mut value) };
        // SAFETY: as above: a found value lives for 'a.
        (found == 1).then(|| unsafe { value.as_bytes() })
    }

    /// Every request header, as (lower-case name, raw value), in the order the client sent them
    /// (several values of one name together). Read from the host when called.
    pub fn headers(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        /// Collects what the host visits. Cannot unwind: it only pushes (an allocation failure
        /// aborts).
        unsafe extern "C" fn visit(state: *mut c_void, name: KilnStr, value: KilnStr) {
            // SAFETY: `state` is the `Vec` below, borrowed mutably for the host's call; the
            // views live for the request's call ('a).
            unsafe { (*(state as *mut Vec<(KilnStr, KilnStr)>)).push((name, value)) };
        }
        let h = &self.raw.headers;
        let mut pairs: Vec<(KilnStr, KilnStr)> = Vec::new();
        // SAFETY: `from_raw`'s contract: the host's `each` calls `visit` with live views before
        // it returns; `pairs` outlives the call.
        unsafe { (h.each)(h.ctx, &mut pairs as *mut Vec<(KilnStr, KilnStr)> as *mut c_void, visit) };
        // SAFETY: as above: every view lives for 'a.
        pairs.into_iter().map(|(n, v)| unsafe { (n.as_bytes(), v.as_bytes()) })
    }

    /// The first value of a query parameter, percent-decoding not applied.
    pub fn query(&self, name: &str) -> Option<&'a str> {
        self.query_string()
            .split('&')
            .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    /// The raw request body.
    pub fn body(&self) -> &'a [u8] {
        // SAFETY: the server passes a body view that lives for the whole call.
        unsafe { self.raw.body.as_bytes() }
    }

    /// The body parsed as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(self.body())
    }
}

/// # Safety
/// `s` must be a valid UTF-8 view that lives for `'a`.
unsafe fn str_of<'a>(s: KilnStr) -> &'a str {
    // SAFETY: the caller guarantees validity; the server only sends UTF-8 here.
    unsafe { std::str::from_utf8_unchecked(s.as_bytes()) }
}

/// # Safety
/// `pairs` must point at `len` valid pairs living for `'a` (or `len` is 0).
unsafe fn pairs_of<'a>(pairs: *const KilnPair, len: usize) -> &'a [KilnPair] {
    if len == 0 || pairs.is_null() {
        return &[];
    }
    // SAFETY: guaranteed by the caller.
    unsafe { std::slice::from_raw_parts(pairs, len) }
}

/// The value of the first pair named `name` (ASCII case ignored).
///
/// # Safety
/// `pairs` must point at `len` valid pairs of views living for `'a` (or `len` is 0).
unsafe fn find_pair<'a>(pairs: *const KilnPair, len: usize, name: &str) -> Option<&'a [u8]> {
    // SAFETY: guaranteed by the caller.
    let pairs = unsafe { pairs_of(pairs, len) };
    pairs.iter().find_map(|p| {
        // SAFETY: guaranteed by the caller.
        let (n, v) = unsafe { (p.name.as_bytes(), p.value.as_bytes()) };
        n.eq_ignore_ascii_case(name.as_bytes()).then_some(v)
    })
}

/// An HTTP response built by a handler.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// A response with a status and no body.
    pub fn status(status: u16) -> Self {
        Self { status, headers: Vec::new(), body: Vec::new() }
    }

    /// A JSON response.
    pub fn json<T: Serialize + ?Sized>(status: u16, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Self::status(status).header("content-type", "application/json").with_body(body),
            Err(e) => Self::error(500, &format!("could not serialize the response: {e}")),
        }
    }

    /// A JSON error body in kiln's shape: `{"error": <code>, "message": …, "details": {}}`, the
    /// code named after the status as kiln names its own (`NotFound`, `Conflict`, `Internal`, …).
    pub fn error(status: u16, message: &str) -> Self {
        let body = serde_json::json!({ "error": reason(status), "message": message, "details": {} });
        Self::status(status).header("content-type", "application/json").with_body(body.to_string().into_bytes())
    }

    /// A plain-text response.
    pub fn text(status: u16, text: impl Into<String>) -> Self {
        Self::status(status).header("content-type", "text/plain; charset=utf-8").with_body(text.into().into_bytes())
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Replaces the body.
    pub fn with_body(mut self, body: Vec<u8>) -> Self {
        self.body = body;
        self
    }
}

/// The code of an error answer by status, in the words kiln itself uses for its errors.
pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        413 => "TooLarge",
        415 => "UnsupportedMediaType",
        422 => "Unprocessable",
        500 => "Internal",
        503 => "Unavailable",
        504 => "Timeout",
        _ => "Error",
    }
}
