//! The test kit: a plugin's routes, events and services called in-process from its own
//! `#[test]`s, through the same glue kiln calls (the `export_plugin!` exports), with a host
//! kept in memory.
//!
//! ```
//! use kiln_types::testing::TestPlugin;
//! use kiln_types::{InitContext, Json, Plugin, Route};
//!
//! struct Hello;
//! impl Plugin for Hello {
//!     fn init(_: &InitContext) -> Result<Self, String> { Ok(Hello) }
//!     fn routes() -> Vec<Route<Self>> { vec![Route::get("/hello/{name}", Self::hello)] }
//! }
//! impl Hello {
//!     fn hello(&self, kiln_types::Path(name): kiln_types::Path<String>) -> Json<String> {
//!         Json(format!("hello, {name}"))
//!     }
//! }
//!
//! let hello = TestPlugin::<Hello>::new().unwrap();
//! let answer = hello.get("/hello/ann").send();
//! assert_eq!(answer.status, 200);
//! assert_eq!(answer.json::<String>().unwrap(), "hello, ann");
//! assert_eq!(hello.get("/nope").send().status, 404);
//! ```
//!
//! The host keeps [`storage`](crate::storage) in memory (empty at start, see
//! [`TestPlugin::storage`]), records log lines ([`TestPlugin::logs`]) and emitted events
//! ([`TestPlugin::emitted`]), and answers every other host call (`db.query`, `db.execute`,
//! `plugin.call`) with what [`TestPlugin::on_host_call`] says, or `NotInTests`.

use crate::abi::{self, KilnBuf, KilnHeaders, KilnHost, KilnPair, KilnRequest, KilnResponse, KilnStr};
use crate::description::PluginDescription;
use crate::host::{HostError, Level};
use crate::{Plugin, export};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Mutex, MutexGuard};

/// A host call answered by the test: the call's arguments in, its answer or error out.
type HostCallHandler = std::sync::Arc<dyn Fn(&Value) -> Result<Value, HostError> + Send + Sync>;

/// One log line a plugin wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct LogLine {
    pub level: Level,
    pub message: String,
    /// The fields (a JSON object; `null` when none).
    pub fields: Value,
}

/// What the test host keeps.
#[derive(Default)]
struct State {
    storage: BTreeMap<String, Value>,
    logs: Vec<LogLine>,
    emitted: Vec<(String, Value)>,
    /// Runtime subscriptions the instance made: (id, pattern, once).
    subscriptions: Vec<(u32, String, bool)>,
    handlers: BTreeMap<String, HostCallHandler>,
    retired: bool,
}

/// The host of one test instance (its address is the `ctx` of its `KilnHost`).
#[derive(Default)]
struct TestHost {
    state: Mutex<State>,
}

impl TestHost {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves one host call; `Err` carries `(code, message)`.
    fn call(&self, op: &str, args: &Value) -> Result<Value, (String, String)> {
        let key = || args["key"].as_str().map(str::to_string).ok_or(("BadRequest".to_string(), "no key".to_string()));
        let mut state = self.lock();
        match op {
            "storage.get" => Ok(json!({ "value": state.storage.get(&key()?) })),
            "storage.put" => {
                state.storage.insert(key()?, args["value"].clone());
                Ok(json!({}))
            }
            "storage.delete" => Ok(json!({ "deleted": state.storage.remove(&key()?).is_some() })),
            "storage.list" => {
                let prefix = args["prefix"].as_str().unwrap_or_default();
                let entries: Vec<Value> = (state.storage.iter())
                    .filter(|(k, _)| k.starts_with(prefix))
                    .take(1000)
                    .map(|(k, v)| json!({ "key": k, "value": v }))
                    .collect();
                Ok(json!({ "entries": entries }))
            }
            "storage.cas" => {
                let key = key()?;
                let expected = Some(&args["expected"]).filter(|v| !v.is_null());
                let swapped = state.storage.get(&key) == expected;
                if swapped {
                    state.storage.insert(key, args["value"].clone());
                }
                Ok(json!({ "swapped": swapped }))
            }
            "events.emit" => {
                let topic = args["topic"].as_str().unwrap_or_default().to_string();
                state.emitted.push((topic, args["data"].clone()));
                Ok(json!({ "id": state.emitted.len() }))
            }
            "events.on" => {
                let id = args["id"].as_u64().and_then(|id| u32::try_from(id).ok()).unwrap_or(0);
                let pattern = args["pattern"].as_str().unwrap_or_default().to_string();
                state.subscriptions.push((id, pattern, args["once"].as_bool().unwrap_or(false)));
                Ok(json!({}))
            }
            "events.off" => {
                let id = args["id"].as_u64();
                let before = state.subscriptions.len();
                state.subscriptions.retain(|(n, _, _)| Some(u64::from(*n)) != id);
                Ok(json!({ "removed": state.subscriptions.len() < before }))
            }
            _ => match state.handlers.get(op).cloned() {
                Some(handler) => {
                    // Called without the lock: a handler may call the host itself (log, …).
                    drop(state);
                    handler(args).map_err(|e| match e {
                        HostError::Service { code, message } => (code, message),
                        other => ("HostError".to_string(), other.to_string()),
                    })
                }
                None => Err((
                    "NotInTests".to_string(),
                    format!("{op} is not served by the test host: answer it with TestPlugin::on_host_call"),
                )),
            },
        }
    }
}

/// # Safety
/// `ctx` is a live `TestHost`; the views are valid for the call.
unsafe extern "C" fn host_log(ctx: *const c_void, level: u32, message: KilnStr, fields: KilnStr) -> i32 {
    // SAFETY: guaranteed by the caller.
    let (host, message, fields) = unsafe { (&*(ctx as *const TestHost), message.as_bytes(), fields.as_bytes()) };
    let logged = catch_unwind(AssertUnwindSafe(|| {
        let mut state = host.lock();
        if state.retired {
            return abi::STATUS_RETIRED;
        }
        let Some(level) = Level::from_raw(level) else { return abi::STATUS_ERROR };
        let fields = serde_json::from_slice(fields).unwrap_or(Value::Null);
        state.logs.push(LogLine { level, message: String::from_utf8_lossy(message).into_owned(), fields });
        abi::STATUS_OK
    }));
    logged.unwrap_or(abi::STATUS_ERROR)
}

/// # Safety
/// `ctx` is a live `TestHost`; the views are valid for the call; `write(out, …)` as
/// [`abi::HostCallFn`] says.
unsafe extern "C" fn host_call(
    ctx: *const c_void,
    op: KilnStr,
    args: KilnStr,
    out: *mut c_void,
    write: abi::WriteFn,
) -> i32 {
    // SAFETY: guaranteed by the caller.
    let (host, op, args) = unsafe { (&*(ctx as *const TestHost), op.as_bytes(), args.as_bytes()) };
    let answered = catch_unwind(AssertUnwindSafe(|| {
        if host.lock().retired {
            return None;
        }
        let op = String::from_utf8_lossy(op);
        let answer = match serde_json::from_slice::<Value>(args) {
            Ok(args) => host.call(&op, &args),
            Err(e) => Err(("BadRequest".to_string(), format!("the arguments are not JSON: {e}"))),
        };
        Some(answer)
    }));
    let (status, body) = match answered {
        Ok(None) => return abi::STATUS_RETIRED,
        Ok(Some(Ok(value))) => (abi::STATUS_OK, value),
        Ok(Some(Err((code, message)))) => (abi::STATUS_ERROR, json!({ "code": code, "message": message })),
        Err(_) => (abi::STATUS_ERROR, json!({ "code": "Internal", "message": "a test's host call handler panicked" })),
    };
    let body = body.to_string();
    // SAFETY: the SDK's writer and buffer, during the call (the caller).
    unsafe { write(out, KilnStr::new(body.as_bytes())) };
    status
}

/// One plugin instance, created by its `init` as kiln creates it, cleaned up when dropped.
pub struct TestPlugin<P: Plugin> {
    instance: *mut c_void,
    description: PluginDescription,
    host: &'static TestHost,
    raw_host: &'static KilnHost,
    _plugin: PhantomData<P>,
}

// SAFETY: the instance is a `P` (Send + Sync) behind the export glue, whose calls take shared
// references and are thread-safe as kiln's own calls are; the host is thread-safe.
unsafe impl<P: Plugin> Send for TestPlugin<P> {}
// SAFETY: as above.
unsafe impl<P: Plugin> Sync for TestPlugin<P> {}

impl<P: Plugin> std::fmt::Debug for TestPlugin<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPlugin").field("plugin", &self.description.name).finish_non_exhaustive()
    }
}

/// Takes what the glue wrote into a buffer of this library.
fn take(buf: KilnBuf) -> Vec<u8> {
    // SAFETY: the buffer was written by this library's export glue and is taken once.
    unsafe { buf.into_vec() }
}

impl<P: Plugin> TestPlugin<P> {
    /// An instance with an empty configuration (`{}`). `Err`: what `init` answered (a panic's
    /// message names its file and line).
    pub fn new() -> Result<Self, String> {
        Self::with_config(json!({}))
    }

    /// An instance with `config` (as kiln passes it: defaults are the plugin's business).
    pub fn with_config(config: Value) -> Result<Self, String> {
        // The host outlives the instance, as kiln's does (a thread the plugin left behind may
        // still call it): both are leaked, a few hundred bytes per test instance.
        let host: &'static TestHost = Box::leak(Box::default());
        let raw_host: &'static KilnHost = Box::leak(Box::new(KilnHost {
            abi: abi::ABI_VERSION,
            ctx: host as *const TestHost as *const c_void,
            log: host_log,
            call: host_call,
        }));
        let config = config.to_string();
        let (mut instance, mut description, mut err) = (std::ptr::null_mut(), KilnBuf::EMPTY, KilnBuf::EMPTY);
        let pkg = export::PackageInfo { name: "test", version: "0.0.0", description: "", authors: "" };
        // SAFETY: every pointer is valid for the call; the host lives until the process exits.
        let status = unsafe {
            export::init::<P>(raw_host, KilnStr::new(config.as_bytes()), &mut instance, &mut description, &mut err, pkg)
        };
        if status != abi::STATUS_OK {
            return Err(String::from_utf8_lossy(&take(err)).into_owned());
        }
        let description = serde_json::from_slice(&take(description)).map_err(|e| e.to_string())?;
        Ok(Self { instance, description, host, raw_host, _plugin: PhantomData })
    }

    /// How the plugin describes itself to kiln: its routes with their schemas, subscriptions
    /// and services (the package fields are the test's: `test` 0.0.0).
    pub fn description(&self) -> &PluginDescription {
        &self.description
    }

    /// A request to `path_and_query` (`/notes?limit=5`) with `method`, sent with
    /// [`TestRequest::send`].
    pub fn request(&self, method: &str, path_and_query: &str) -> TestRequest<'_, P> {
        let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
        TestRequest {
            plugin: self,
            method: method.to_ascii_uppercase(),
            path: path.to_string(),
            query: query.to_string(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// A `GET` request.
    pub fn get(&self, path_and_query: &str) -> TestRequest<'_, P> {
        self.request("GET", path_and_query)
    }

    /// A `POST` request.
    pub fn post(&self, path_and_query: &str) -> TestRequest<'_, P> {
        self.request("POST", path_and_query)
    }

    /// A `PUT` request.
    pub fn put(&self, path_and_query: &str) -> TestRequest<'_, P> {
        self.request("PUT", path_and_query)
    }

    /// A `PATCH` request.
    pub fn patch(&self, path_and_query: &str) -> TestRequest<'_, P> {
        self.request("PATCH", path_and_query)
    }

    /// A `DELETE` request.
    pub fn delete(&self, path_and_query: &str) -> TestRequest<'_, P> {
        self.request("DELETE", path_and_query)
    }

    /// Delivers an event to every declared subscription whose pattern matches `topic`, and to
    /// the runtime subscriptions the instance made, as kiln would. `Err`: the first handler's
    /// error or panic.
    pub fn event(&self, topic: &str, data: &impl Serialize) -> Result<(), String> {
        let data = serde_json::to_vec(data).map_err(|e| e.to_string())?;
        let declared = (self.description.subscriptions.iter().enumerate())
            .filter(|(_, s)| topic_matches(&s.pattern, topic))
            .map(|(i, _)| u32::try_from(i).unwrap_or(u32::MAX));
        let runtime: Vec<u32> = {
            let mut state = self.host.lock();
            let matched: Vec<(u32, bool)> = (state.subscriptions.iter())
                .filter(|(_, pattern, _)| topic_matches(pattern, topic))
                .map(|(id, _, once)| (*id, *once))
                .collect();
            state.subscriptions.retain(|(id, _, once)| !(*once && matched.iter().any(|(m, _)| m == id)));
            matched.into_iter().map(|(id, _)| id | abi::RUNTIME_SUBSCRIPTION).collect()
        };
        for subscription in declared.collect::<Vec<_>>().into_iter().chain(runtime) {
            let mut err = KilnBuf::EMPTY;
            let (topic, data) = (KilnStr::new(topic.as_bytes()), KilnStr::new(&data));
            // SAFETY: the instance is live (not yet dropped); the views outlive the call.
            let status = unsafe { export::event::<P>(self.instance, subscription, topic, data, &mut err) };
            if status != abi::STATUS_OK {
                return Err(String::from_utf8_lossy(&take(err)).into_owned());
            }
        }
        Ok(())
    }

    /// Calls service `name` of the plugin with `args`, as a dependent plugin would.
    pub fn call_service(&self, name: &str, args: &Value) -> Result<Value, String> {
        let index = (self.description.services.iter().position(|s| s.name == name))
            .ok_or_else(|| format!("the plugin offers no service {name:?}"))?;
        let args = args.to_string();
        let mut out = KilnBuf::EMPTY;
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        // SAFETY: the instance is live; the view outlives the call.
        let status = unsafe { export::service::<P>(self.instance, index, KilnStr::new(args.as_bytes()), &mut out) };
        let out = take(out);
        if status != abi::STATUS_OK {
            return Err(String::from_utf8_lossy(&out).into_owned());
        }
        serde_json::from_slice(&out).map_err(|e| e.to_string())
    }

    /// Answers host call `op` (`db.query`, `db.execute`, `plugin.call`, …) with `handler`
    /// from now on. Its argument is the call's JSON (`{"sql": …, "params": […]}` for `db.*`);
    /// `db.query` answers `{"rows": […]}`, `db.execute` `{"rows_affected": n}`, `plugin.call`
    /// (`{"plugin": …, "service": …, "args": …}`) `{"answer": …}`.
    pub fn on_host_call(&self, op: &str, handler: impl Fn(&Value) -> Result<Value, HostError> + Send + Sync + 'static) {
        self.host.lock().handlers.insert(op.to_string(), std::sync::Arc::new(handler));
    }

    /// The plugin's storage as it is now.
    pub fn storage(&self) -> BTreeMap<String, Value> {
        self.host.lock().storage.clone()
    }

    /// Every line the plugin logged so far.
    pub fn logs(&self) -> Vec<LogLine> {
        self.host.lock().logs.clone()
    }

    /// Every event the plugin emitted so far: (topic, data).
    pub fn emitted(&self) -> Vec<(String, Value)> {
        self.host.lock().emitted.clone()
    }

    /// Calls the route whose index is `route` (after matching).
    fn call(&self, route: usize, req: &TestRequest<'_, P>, params: &[(String, String)]) -> TestResponse {
        let pairs: Vec<KilnPair> = params
            .iter()
            .map(|(n, v)| KilnPair { name: KilnStr::new(n.as_bytes()), value: KilnStr::new(v.as_bytes()) })
            .collect();
        let header_pairs: Vec<KilnPair> = (req.headers.iter())
            .map(|(n, v)| KilnPair { name: KilnStr::new(n.as_bytes()), value: KilnStr::new(v) })
            .collect();
        let header_slice: &[KilnPair] = &header_pairs;
        let raw = KilnRequest {
            route: u32::try_from(route).unwrap_or(u32::MAX),
            method: KilnStr::new(req.method.as_bytes()),
            path: KilnStr::new(req.path.as_bytes()),
            query: KilnStr::new(req.query.as_bytes()),
            params: pairs.as_ptr(),
            params_len: pairs.len(),
            headers: KilnHeaders::over_pairs(&header_slice),
            body: KilnStr::new(&req.body),
        };
        let mut out = KilnResponse::EMPTY;
        // SAFETY: the instance is live; every view in `raw` outlives the call.
        let status = unsafe { export::handle::<P>(self.instance, &raw, &mut out) };
        let (headers, body) = (take(out.headers), take(out.body));
        if status == abi::STATUS_PANIC {
            let message = format!("the handler panicked: {}", String::from_utf8_lossy(&body));
            return TestResponse::error(500, "PluginError", &message);
        }
        let headers = abi::decode_headers(&headers)
            .map(|pairs| {
                pairs
                    .into_iter()
                    .map(|(n, v)| (String::from_utf8_lossy(n).into_owned(), String::from_utf8_lossy(v).into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        TestResponse { status: out.status, headers, body }
    }
}

impl<P: Plugin> Drop for TestPlugin<P> {
    fn drop(&mut self) {
        let mut err = KilnBuf::EMPTY;
        // SAFETY: the instance came from `init` and is not used again.
        let status = unsafe { export::cleanup::<P>(self.instance, &mut err) };
        let err = take(err);
        self.host.lock().retired = true;
        let _ = self.raw_host;
        if status != abi::STATUS_OK && !std::thread::panicking() {
            panic!("the plugin's cleanup panicked: {}", String::from_utf8_lossy(&err));
        }
    }
}

/// Path parameters: (name, value).
type Params = Vec<(String, String)>;

/// Whether topic pattern `pattern` (dot-separated, `*` matching any one segment) matches `topic`.
fn topic_matches(pattern: &str, topic: &str) -> bool {
    let (mut p, mut t) = (pattern.split('.'), topic.split('.'));
    loop {
        match (p.next(), t.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a == "*" || a == b => {}
            _ => return false,
        }
    }
}

/// The path parameters of `path` under route pattern `pattern`, if it matches, and which of its
/// segments are literal: of two matching routes, the one with a literal at the first segment
/// where they differ wins, as in kiln's router.
fn match_path(pattern: &str, path: &str) -> Option<(Vec<bool>, Params)> {
    let (pattern, path): (Vec<&str>, Vec<&str>) = (pattern.split('/').collect(), path.split('/').collect());
    if pattern.len() != path.len() {
        return None;
    }
    let (mut literal, mut params) = (Vec::new(), Vec::new());
    for (p, s) in pattern.iter().zip(&path) {
        match p.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            Some(name) if !s.is_empty() => {
                // Decoded as kiln decodes it.
                let value = percent_encoding::percent_decode_str(s).decode_utf8().unwrap_or_default();
                params.push((name.to_string(), value.into_owned()));
                literal.push(false);
            }
            None if p == s => literal.push(true),
            _ => return None,
        }
    }
    Some((literal, params))
}

/// A request being built for a [`TestPlugin`].
pub struct TestRequest<'a, P: Plugin> {
    plugin: &'a TestPlugin<P>,
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl<P: Plugin> std::fmt::Debug for TestRequest<'_, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}?{}", self.method, self.path, self.query)
    }
}

impl<P: Plugin> TestRequest<'_, P> {
    /// Adds a header (names are kept lower case, as kiln passes them).
    pub fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.as_ref().to_vec()));
        self
    }

    /// A JSON body (and its content type).
    pub fn json(self, value: &impl Serialize) -> Self {
        let body = serde_json::to_vec(value).expect("a test body serializes");
        self.header("content-type", "application/json").body(body)
    }

    /// A raw body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Sends it: the route is matched as kiln matches it (a literal segment before a
    /// parameter; `HEAD` served by `GET` without the body), and answered by the plugin. No
    /// route: 404 `NotFound`; the path with other methods only: 405 `MethodNotAllowed`.
    pub fn send(self) -> TestResponse {
        let method = if self.method == "HEAD" { "GET" } else { self.method.as_str() };
        let routes = &self.plugin.description.routes;
        let matched: Vec<(usize, Vec<bool>, Params)> = (routes.iter().enumerate())
            .filter_map(|(i, r)| match_path(&r.path, &self.path).map(|(literal, params)| (i, literal, params)))
            .collect();
        let path_exists = !matched.is_empty();
        let best = (matched.into_iter().filter(|(i, _, _)| routes[*i].method == method))
            .max_by_key(|(i, literal, _)| (literal.clone(), std::cmp::Reverse(*i)));
        match best {
            Some((route, _, params)) => {
                let mut answer = self.plugin.call(route, &self, &params);
                if self.method == "HEAD" {
                    answer.body.clear();
                }
                answer
            }
            None if path_exists => TestResponse::error(405, "MethodNotAllowed", "the path exists with other methods"),
            None => TestResponse::error(404, "NotFound", "no plugin route for this path"),
        }
    }
}

/// A plugin's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct TestResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl TestResponse {
    fn error(status: u16, code: &str, message: &str) -> Self {
        let body = json!({ "error": code, "message": message, "details": {} }).to_string().into_bytes();
        Self { status, headers: vec![("content-type".into(), "application/json".into())], body }
    }

    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `details` of an error answer in kiln's shape (an empty object otherwise).
    pub fn error_details(&self) -> Map<String, Value> {
        self.json::<Value>().ok().and_then(|v| v.get("details")?.as_object().cloned()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ApiError, Created, InitContext, Json, Path, Query, Request, Response, Route, Service};
    use schemars::JsonSchema;
    use serde::Deserialize;

    struct Shop;

    #[derive(Deserialize, Serialize, JsonSchema)]
    struct NewItem {
        name: String,
        price: u32,
        tags: Option<Vec<String>>,
    }

    #[derive(Deserialize, JsonSchema)]
    struct Page {
        limit: Option<u32>,
    }

    impl Plugin for Shop {
        fn init(ctx: &InitContext) -> Result<Self, String> {
            if ctx.config["fail"] == true {
                return Err("told to fail".into());
            }
            Ok(Shop)
        }
        fn routes() -> Vec<Route<Self>> {
            vec![
                Route::post("/items", Self::create),
                Route::get("/items/top", Self::top),
                Route::get("/items/{id}", Self::one).response(404, "No such item", None),
                Route::get("/items", Self::list),
                Route::get("/raw", Self::raw),
                Route::get("/boom", Self::boom),
            ]
        }
        fn services() -> Vec<Service<Self>> {
            vec![Service::new("double", |_, v| Ok(json!(v.as_i64().unwrap_or(0) * 2)))]
        }
    }

    impl Shop {
        fn create(&self, Json(item): Json<NewItem>) -> Result<Created<NewItem>, ApiError> {
            crate::storage::put(&item.name, &json!(item.price))?;
            crate::events::emit("items.created", &json!({ "name": item.name }))?;
            Ok(Created(item))
        }
        fn top(&self, _: &Request) -> Response {
            Response::text(200, "top")
        }
        fn one(&self, Path(id): Path<u64>) -> Result<Json<u64>, ApiError> {
            if id == 0 { Err(ApiError::not_found("no item 0")) } else { Ok(Json(id)) }
        }
        fn list(&self, req: &Request, Query(page): Query<Page>) -> Json<Value> {
            Json(json!({ "limit": page.limit, "accept": req.header("accept") }))
        }
        fn raw(&self, req: &Request) -> Response {
            crate::log::info(&format!("raw {}", req.query_string()));
            match crate::db::query("SELECT 1 AS one", &[]) {
                Ok(rows) => Response::json(200, &rows),
                Err(e) => ApiError::from(e).into_response(),
            }
        }
        fn boom(&self, _: &Request) -> Response {
            panic!("boom")
        }
    }

    use crate::IntoResponse;

    #[test]
    fn typed_routes_extract_answer_and_refuse_what_does_not_fit() {
        let shop = TestPlugin::<Shop>::new().unwrap();
        let created = shop.post("/items").json(&json!({ "name": "pen", "price": 3 })).send();
        assert_eq!(created.status, 201, "{}", created.text());
        assert_eq!(created.json::<Value>().unwrap()["price"], 3);
        assert_eq!(shop.storage()["pen"], json!(3));
        assert_eq!(shop.emitted(), [("items.created".to_string(), json!({ "name": "pen" }))]);

        let bad = shop.post("/items").json(&json!({ "name": "pen", "price": "three" })).send();
        assert_eq!(bad.status, 400);
        assert_eq!(bad.error_details()["in"], "body");
        assert_eq!(bad.error_details()["field"], "price", "{}", bad.text());
        let nested = shop.post("/items").json(&json!({ "name": "x", "price": 1, "tags": ["a", 2] })).send();
        assert_eq!(nested.error_details()["field"], "tags[1]", "{}", nested.text());
        assert_eq!(shop.post("/items").body("{").send().status, 400);

        assert_eq!(shop.get("/items/7").send().json::<u64>().unwrap(), 7);
        let not_a_number = shop.get("/items/seven").send();
        assert_eq!(not_a_number.status, 400);
        assert_eq!(not_a_number.error_details()["field"], "id");
        assert_eq!(shop.get("/items/0").send().json::<Value>().unwrap()["error"], "NotFound");
        assert_eq!(shop.get("/items/top").send().text(), "top", "a literal segment wins");

        let page = shop.get("/items?limit=5").header("Accept", "text/csv").send().json::<Value>().unwrap();
        assert_eq!(page, json!({ "limit": 5, "accept": "text/csv" }));
        assert_eq!(shop.get("/items?limit=-1").send().error_details()["field"], "limit");
    }

    #[test]
    fn the_kit_answers_like_kiln_for_what_the_plugin_does_not() {
        let shop = TestPlugin::<Shop>::new().unwrap();
        assert_eq!(shop.get("/nowhere").send().status, 404);
        assert_eq!(shop.delete("/items").send().status, 405);
        let head = shop.request("HEAD", "/items/top").send();
        assert_eq!((head.status, head.body.len()), (200, 0));
        let boom = shop.get("/boom").send();
        assert_eq!(boom.status, 500);
        assert!(boom.text().contains("boom"), "{}", boom.text());
        assert!(TestPlugin::<Shop>::with_config(json!({ "fail": true })).unwrap_err().contains("told to fail"));
    }

    #[test]
    fn host_calls_the_test_does_not_answer_fail_with_a_code() {
        let shop = TestPlugin::<Shop>::new().unwrap();
        let refused = shop.get("/raw?x=1").send();
        assert_eq!(refused.json::<Value>().unwrap()["error"], "NotInTests", "{}", refused.text());
        assert_eq!(shop.logs()[0].message, "raw x=1");
        shop.on_host_call("db.query", |args| {
            crate::log::info("answering"); // the host is not locked while a handler answers
            assert_eq!(args["sql"], "SELECT 1 AS one");
            Ok(json!({ "rows": [{ "one": 1 }] }))
        });
        assert_eq!(shop.get("/raw").send().json::<Value>().unwrap(), json!([{ "one": 1 }]));
        assert_eq!(shop.call_service("double", &json!(21)).unwrap(), json!(42));
    }

    #[test]
    fn typed_routes_document_their_schemas() {
        let shop = TestPlugin::<Shop>::new().unwrap();
        let routes = &shop.description().routes;
        let create = &routes[0];
        let body = create.request_schema.as_ref().unwrap();
        assert_eq!(body["properties"]["price"]["type"], "integer");
        assert_eq!(body["required"], json!(["name", "price"]));
        let statuses: Vec<u16> = create.responses.iter().map(|r| r.status).collect();
        assert_eq!(statuses, [400, 201]);
        let one = &routes[2];
        assert_eq!(one.params["id"]["type"], "integer");
        assert!(one.responses.iter().any(|r| r.status == 404 && r.description == "No such item"));
        let list = &routes[3];
        assert_eq!((list.query[0].name.as_str(), list.query[0].required), ("limit", false));
        assert!(routes[4].responses.is_empty(), "a raw route documents nothing by itself");
    }
}
