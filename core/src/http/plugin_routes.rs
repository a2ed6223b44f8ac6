//! The plugin route table: a [`PathRouter`] of every served plugin endpoint, made anew on each
//! change and swapped in atomically.
//!
//! A new table shares every branch of the previous one (a first path segment) that no plugin
//! which came or went has a route under, and each instance's endpoints are made once, when it
//! first serves. So a change costs the routes of the plugins that changed, not the 10,000 routes
//! of a thousand plugins (a full rebuild of those took ~10 ms a change).
//!
//! Each endpoint holds the `Arc` of the plugin version it belongs to, so a request that started
//! on an old version finishes on it, and the old version is retired after its last request.

use super::docs::Docs;
use super::error::json_error;
use super::path_router::{First, ParamSpans, PathRouter};
use super::request_headers;
use crate::error_code::ErrorCode;
use crate::host::logs::{Kind, Level, LogEntry, LogStore};
use crate::loader::{CallError, CallRequest, CallResponse, LoadedPlugin};
use crate::routes::{Pattern, RouteSink};
use arc_swap::ArcSwap;
use poem::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use poem::{Request, Response};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// One published table: every plugin path, by its endpoints.
#[derive(Default)]
pub struct Table {
    paths: PathRouter<Arc<PathEndpoint>>,
}

impl Table {
    /// Answers a request: its path's endpoint, or 404 in kiln's error shape.
    ///
    /// The request is borrowed all the way down: each level holding it by value made this
    /// future 3,624 bytes, and the one poem moves and boxes for every request 4.6 KiB (see
    /// `http::tests::a_requests_future_stays_small`).
    pub async fn call(&self, req: &mut Request) -> Response {
        match self.paths.find(req.uri().path()) {
            Some((endpoint, spans)) => endpoint.call(req, spans).await,
            None => {
                let msg = format!("no route for {} {}", req.method(), req.uri().path());
                json_error(ErrorCode::NotFound, &msg)
            }
        }
    }
}

/// The swappable table of plugin routes, and the docs that describe it.
pub struct PluginRouter {
    current: ArcSwap<Table>,
    /// Set once the admin API's document exists (it needs the reconciler, which needs this
    /// router); always before the first publish.
    docs: OnceLock<Arc<Docs>>,
    limits: Limits,
    /// Where a handler's panic is recorded, under its plugin.
    logs: Arc<LogStore>,
    /// What the current table was made from.
    built: Mutex<Built>,
    /// Where each endpoint's request counters come from (none: requests are not counted).
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Each plugin's bulkhead, by name (shared by its versions: a reload does not free the
    /// threads the last one's calls hold).
    bulkheads: Mutex<HashMap<String, Arc<Bulkhead>>>,
    /// The slots of all plugins' blocking routes together (`--blocking-calls`).
    server_slots: Arc<tokio::sync::Semaphore>,
    server_limit: usize,
}

/// The endpoints of one plugin instance, by path (a path's endpoint dispatches by method).
type InstancePaths = Arc<[(Pattern, Arc<PathEndpoint>)]>;

/// The instances the current table serves and their endpoints, kept for the next change.
#[derive(Default)]
struct Built {
    /// Each instance's endpoints, by the instance's address (the entry holds the instance, so
    /// the address is not reused while it is here).
    instances: HashMap<usize, (Arc<LoadedPlugin>, InstancePaths)>,
    /// Which instances have a route under each first segment.
    by_first: HashMap<First, HashSet<usize>>,
}

impl Built {
    fn add(&mut self, key: usize, plugin: Arc<LoadedPlugin>, paths: InstancePaths) {
        for (pattern, _) in paths.iter() {
            self.by_first.entry(First::of(pattern)).or_default().insert(key);
        }
        self.instances.insert(key, (plugin, paths));
    }

    fn remove(&mut self, key: usize) -> Option<(Arc<LoadedPlugin>, InstancePaths)> {
        let (plugin, paths) = self.instances.remove(&key)?;
        for (pattern, _) in paths.iter() {
            let first = First::of(pattern);
            if let Some(keys) = self.by_first.get_mut(&first) {
                keys.remove(&key);
                if keys.is_empty() {
                    self.by_first.remove(&first);
                }
            }
        }
        Some((plugin, paths))
    }
}

/// What a plugin request may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest body passed to a plugin.
    pub max_body: usize,
    /// How long the body may take to arrive.
    pub body_timeout: Duration,
    /// A route's deadline unless it sets its own.
    pub default_deadline: Duration,
    /// Calls of one plugin's blocking routes that may run at once (see [`Bulkhead`]).
    pub blocking_calls: usize,
    /// Calls of all plugins' blocking routes that may run at once.
    pub server_blocking_calls: usize,
}

impl PluginRouter {
    pub fn new(limits: Limits, logs: Arc<LogStore>, metrics: Option<Arc<crate::metrics::Metrics>>) -> Self {
        let server_limit = limits.server_blocking_calls.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        Self {
            current: ArcSwap::from_pointee(Table::default()),
            docs: OnceLock::new(),
            limits,
            logs,
            built: Default::default(),
            metrics,
            bulkheads: Default::default(),
            server_slots: Arc::new(tokio::sync::Semaphore::new(server_limit)),
            server_limit,
        }
    }

    /// Connects the docs that every publish updates.
    pub fn attach_docs(&self, docs: Arc<Docs>) {
        let _ = self.docs.set(docs);
    }

    /// The table in effect now. The guard keeps it (and the plugin versions in it) alive, like
    /// an `Arc`, without a reference count shared by every worker on the hot path.
    pub fn table(&self) -> arc_swap::Guard<Arc<Table>> {
        self.current.load()
    }
}

impl PluginRouter {
    /// One plugin instance's endpoints, one per path.
    fn paths_of(&self, plugin: &Arc<LoadedPlugin>) -> Result<InstancePaths, String> {
        let description = plugin.description();
        let bulkhead = (self.bulkheads.lock().unwrap_or_else(|p| p.into_inner()))
            .entry(description.name.clone())
            .or_insert_with(|| {
                Arc::new(Bulkhead::new(self.limits.blocking_calls, self.server_slots.clone(), self.server_limit))
            })
            .clone();
        // One endpoint per path, dispatching by method: a plugin may serve GET and POST on the
        // same path.
        let mut by_path: Vec<(Pattern, PathEndpoint)> = Vec::new();
        for (index, r) in description.routes.iter().enumerate() {
            let pattern = Pattern::parse(&r.path)?;
            let method = Method::from_bytes(r.method.as_bytes()).map_err(|_| format!("bad method {:?}", r.method))?;
            let endpoint = PluginEndpoint {
                plugin: plugin.clone(),
                route: index as u32,
                params: pattern.params().map(str::to_string).collect(),
                blocking: r.blocking,
                bulkhead: bulkhead.clone(),
                max_body: self.limits.max_body,
                body_timeout: self.limits.body_timeout,
                route_deadline: r.deadline_ms.map(Duration::from_millis),
                server_deadline: self.limits.default_deadline,
                logs: self.logs.clone(),
                metrics: self.metrics.as_ref().map(|m| m.route(&description.name, &r.method, &r.path)),
                label: format!("{} {}", r.method, r.path).into(),
            };
            // By shape: `/items/{id}` and `/items/{key}` are one path (each endpoint binds its
            // own names).
            match by_path.iter_mut().find(|(p, _)| p.segments().eq(pattern.segments())) {
                Some((_, path)) => path.methods.push((method, endpoint)),
                None => by_path.push((pattern, PathEndpoint { methods: vec![(method, endpoint)] })),
            }
        }
        Ok(by_path.into_iter().map(|(pattern, endpoint)| (pattern, Arc::new(endpoint))).collect())
    }

    /// The table for `plugins`, made from `current` and what changed since (`built`), which it
    /// brings up to date; on an error, `built` is as it was.
    fn next_table(&self, built: &mut Built, current: &Table, plugins: &[Arc<LoadedPlugin>]) -> Result<Table, String> {
        let now: HashMap<usize, &Arc<LoadedPlugin>> = plugins.iter().map(|p| (Arc::as_ptr(p) as usize, p)).collect();
        let gone: Vec<usize> = built.instances.keys().filter(|k| !now.contains_key(k)).copied().collect();
        let mut came = Vec::new();
        for (&key, &plugin) in &now {
            if !built.instances.contains_key(&key) {
                came.push((key, plugin.clone(), self.paths_of(plugin)?));
            }
        }
        let mut firsts: HashSet<First> = HashSet::new();
        let removed: Vec<(usize, (Arc<LoadedPlugin>, InstancePaths))> =
            gone.into_iter().filter_map(|key| Some((key, built.remove(key)?))).collect();
        for (_, (_, paths)) in &removed {
            firsts.extend(paths.iter().map(|(pattern, _)| First::of(pattern)));
        }
        let added: Vec<usize> = came.iter().map(|(key, _, _)| *key).collect();
        for (key, plugin, paths) in came {
            firsts.extend(paths.iter().map(|(pattern, _)| First::of(pattern)));
            built.add(key, plugin, paths);
        }
        // Every instance with a route under a branch to rebuild gives all its routes there.
        let owners: HashSet<usize> = firsts.iter().filter_map(|f| built.by_first.get(f)).flatten().copied().collect();
        let routes = owners.iter().flat_map(|key| {
            let paths = &built.instances[key].1;
            paths.iter().filter(|(p, _)| firsts.contains(&First::of(p))).map(|(p, e)| (p, e.clone()))
        });
        match current.paths.rebuilt(&firsts, routes) {
            Ok(paths) => Ok(Table { paths }),
            Err(e) => {
                for key in added {
                    built.remove(key);
                }
                for (key, (plugin, paths)) in removed {
                    built.add(key, plugin, paths);
                }
                Err(e)
            }
        }
    }
}

impl RouteSink for PluginRouter {
    fn check(&self, plugin: &Arc<LoadedPlugin>) -> Result<(), String> {
        let mut table = Table::default();
        for (pattern, endpoint) in self.paths_of(plugin)?.iter() {
            table.paths.insert(pattern, endpoint.clone()).map_err(|e| format!("{}: {e}", plugin.description().name))?;
        }
        Ok(())
    }

    fn publish(&self, plugins: &[Arc<LoadedPlugin>]) -> Result<(), String> {
        let mut built = self.built.lock().expect("built lock");
        let table = self.next_table(&mut built, &self.current.load(), plugins)?;
        if let Some(docs) = self.docs.get() {
            docs.update(plugins.iter().map(|p| p.shared_description()).collect());
        }
        self.current.store(Arc::new(table));
        drop(built);
        prune(&mut self.bulkheads.lock().unwrap_or_else(|p| p.into_inner()));
        Ok(())
    }
}

/// Forgets the bulkheads of plugins that no longer serve (uninstalled, renamed, turned off):
/// those no endpoint holds and no call holds a slot of. One whose calls still run is kept, so
/// that a version loaded again counts them.
fn prune(bulkheads: &mut HashMap<String, Arc<Bulkhead>>) {
    bulkheads.retain(|_, b| Arc::strong_count(b) > 1 || b.running.available_permits() < b.limit);
}

/// The routes of one path, by method. A `HEAD` the path does not serve itself is its `GET`
/// without the body; any other method it does not serve answers 405 with `Allow`.
struct PathEndpoint {
    methods: Vec<(Method, PluginEndpoint)>,
}

impl PathEndpoint {
    /// `spans`: where the path parameters' values lie in the request path.
    async fn call(&self, req: &mut Request, spans: ParamSpans) -> Response {
        let find = |m: &Method| self.methods.iter().find(|(method, _)| method == m).map(|(_, e)| e);
        if let Some(endpoint) = find(req.method()) {
            return endpoint.call(req, spans).await;
        }
        if req.method() == Method::HEAD
            && let Some(get) = find(&Method::GET)
        {
            req.set_method(Method::GET);
            let mut resp = get.call(req, spans).await;
            resp.set_body(());
            return resp;
        }
        let msg = format!("{} does not accept {}", req.uri().path(), req.method());
        let mut resp = json_error(ErrorCode::MethodNotAllowed, &msg);
        let allow: Vec<&str> = self.methods.iter().map(|(m, _)| m.as_str()).collect();
        if let Ok(allow) = HeaderValue::from_str(&allow.join(", ")) {
            resp.headers_mut().insert(poem::http::header::ALLOW, allow);
        }
        resp
    }
}

/// How many calls of one plugin's blocking routes may run at once (`--blocking-calls-per-plugin`),
/// and of all plugins' together (`--blocking-calls`).
///
/// A blocking handler runs on its thread of the blocking pool to its end, also past its deadline
/// (answered 504) or after its client left: nothing stops it in the middle. The pool is the
/// whole server's: host calls, event deliveries, builds and the docs use it too. So one plugin
/// whose blocking handler hangs, or that is slow under load, may hold only so many threads (a
/// bulkhead), and all plugins together only so many, below the pool's size, so that the server's
/// own blocking work has threads left (`config::BLOCKING_RESERVE`; event handlers and configure
/// hooks, plugin code too, share those, at most one thread per subscription). A call past either
/// limit waits, with no thread, for a call to end; if none does before its deadline it answers
/// 503 `PluginOverloaded`, its handler never run. Under ordinary load the wait is short and
/// nothing is refused (a refusal at once answered nearly every request of 100 clients of
/// `GET /notes`, a route that waits on the database).
struct Bulkhead {
    /// One permit per call that may run; a call holds its permit until its handler returns.
    running: Arc<tokio::sync::Semaphore>,
    limit: usize,
    /// The server's slots, shared by every plugin's bulkhead; taken after the plugin's own, so
    /// that the calls waiting behind a plugin's hung ones hold none.
    server: Arc<tokio::sync::Semaphore>,
    server_limit: usize,
    /// Calls holding a slot of the plugin's that wait for one of the server's: while any do,
    /// a call refused for want of a plugin slot was refused because the server's are taken.
    waiting_for_server: std::sync::atomic::AtomicUsize,
    /// When refusals were last logged, and how many came since: logged at most every
    /// [`REFUSALS_LOGGED_EVERY`], so that a plugin at its limit under load does not flood the
    /// logs (its own keep its last 1,000 lines).
    refusals: Mutex<(Option<Instant>, u64)>,
}

/// How often a plugin's refusals are logged, at most.
const REFUSALS_LOGGED_EVERY: Duration = Duration::from_secs(10);

/// What a running blocking call holds: a slot of its plugin's and one of the server's.
struct Slots {
    _plugin: tokio::sync::OwnedSemaphorePermit,
    _server: tokio::sync::OwnedSemaphorePermit,
}

/// Which limit refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Full {
    /// The plugin's (`--blocking-calls-per-plugin`).
    Plugin,
    /// The server's, all plugins together (`--blocking-calls`).
    Server,
}

impl Bulkhead {
    fn new(limit: usize, server: Arc<tokio::sync::Semaphore>, server_limit: usize) -> Self {
        let limit = limit.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        let running = Arc::new(tokio::sync::Semaphore::new(limit));
        Self {
            running,
            limit,
            server,
            server_limit,
            waiting_for_server: Default::default(),
            refusals: Default::default(),
        }
    }

    /// A call's slots, once both are free, if that is before `deadline`.
    async fn admit(&self, deadline: Instant) -> Result<Slots, Full> {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(plugin) = take(&self.running, deadline).await else {
            // The plugin's slots are taken, but maybe by calls that only wait for the server's.
            return Err(if self.waiting_for_server.load(Relaxed) > 0 { Full::Server } else { Full::Plugin });
        };
        if let Ok(server) = self.server.clone().try_acquire_owned() {
            return Ok(Slots { _plugin: plugin, _server: server });
        }
        // Counted while waiting, also if this call is dropped meanwhile.
        struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Relaxed);
            }
        }
        self.waiting_for_server.fetch_add(1, Relaxed);
        let _waiting = Waiting(&self.waiting_for_server);
        let server = take(&self.server, deadline).await.ok_or(Full::Server)?;
        Ok(Slots { _plugin: plugin, _server: server })
    }

    /// Counts a refusal: the refusals to log now (this one included), if it is time to.
    fn refused(&self) -> Option<u64> {
        let mut refusals = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        refusals.1 += 1;
        if refusals.0.is_some_and(|last| last.elapsed() < REFUSALS_LOGGED_EVERY) {
            return None;
        }
        let n = refusals.1;
        *refusals = (Some(Instant::now()), 0);
        Some(n)
    }
}

/// A permit of `slots`, once one is free, if that is before `deadline`: a free one without a
/// timer (the common case), a timer only to wait.
async fn take(slots: &Arc<tokio::sync::Semaphore>, deadline: Instant) -> Option<tokio::sync::OwnedSemaphorePermit> {
    if let Ok(permit) = slots.clone().try_acquire_owned() {
        return Some(permit);
    }
    tokio::time::timeout_at(deadline.into(), slots.clone().acquire_owned()).await.ok()?.ok()
}

/// What became of a call on the blocking pool.
enum Blocking {
    Answered(Result<CallResponse, CallError>),
    /// Past its deadline: the handler runs on, its answer will be dropped.
    Late,
    /// Refused: the plugin's blocking routes, or all plugins' together, ran as many calls as
    /// they may until the deadline.
    Full(Full),
}

/// An inline handler slower than this is reported: it held an async worker.
const SLOW_INLINE: std::time::Duration = std::time::Duration::from_millis(50);

/// One route of one plugin version.
struct PluginEndpoint {
    plugin: Arc<LoadedPlugin>,
    /// Index of the route in the plugin's description.
    route: u32,
    /// Names of the route's path parameters.
    params: Vec<String>,
    /// Run on the blocking pool (the plugin marked the route as blocking).
    blocking: bool,
    /// What the plugin's blocking routes may hold of the blocking pool.
    bulkhead: Arc<Bulkhead>,
    max_body: usize,
    body_timeout: Duration,
    /// How long the handler may take, if the route says (`Route::deadline` in the SDK); else
    /// the plugin's row says (`deadline_ms`); else the server (`--route-deadline-ms`).
    route_deadline: Option<Duration>,
    server_deadline: Duration,
    logs: Arc<LogStore>,
    /// Its counters and latency histogram (`GET /metrics`), unless requests are not counted.
    metrics: Option<crate::metrics::RouteMetrics>,
    /// `METHOD /path` of the route, for logs.
    label: Arc<str>,
}

impl PluginEndpoint {
    /// Calls the handler on the blocking pool, off the async workers (the request is owned, so
    /// it can move to another thread), if the plugin's bulkhead and the server's limit let it
    /// in. `Late` past the deadline: the client is answered then; the handler runs on to its end
    /// on its thread (nothing can stop it in the middle), holding its slots, and its answer is
    /// dropped.
    async fn call_blocking(&self, owned: OwnedRequest, body: bytes::Bytes, deadline: Instant) -> Blocking {
        let permit = match self.bulkhead.admit(deadline).await {
            Ok(slots) => slots,
            Err(full) => return Blocking::Full(full),
        };
        let (plugin, route, label) = (self.plugin.clone(), self.route, self.label.clone());
        let call = move || {
            // Held until the handler returns (or, if the pool never runs this, until dropped).
            let _permit = permit;
            let _route = crate::host::on_route(&label, deadline);
            let params: Vec<(&str, &str)> = owned.params.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            plugin.call(&CallRequest {
                route,
                method: &owned.method,
                path: &owned.path,
                query: &owned.query,
                params: &params,
                headers: request_headers::over(&owned.headers),
                body: &body,
            })
        };
        match tokio::time::timeout_at(deadline.into(), tokio::task::spawn_blocking(call)).await {
            Ok(Ok(r)) => Blocking::Answered(r),
            Ok(Err(e)) => Blocking::Answered(Err(CallError::Panic(format!("the handler task failed: {e}")))),
            Err(_) => Blocking::Late,
        }
    }

    /// The answer for a blocking route while the plugin's bulkhead, or the server's limit, is
    /// full. Refusals are logged, to the server and to the plugin's logs, at most every
    /// [`REFUSALS_LOGGED_EVERY`].
    fn overloaded(&self, full: Full) -> Response {
        if let Some(m) = &self.metrics {
            m.overloaded();
        }
        let name = &self.plugin.description().name;
        let msg = match full {
            Full::Plugin => format!(
                "plugin {name}: its blocking routes ran {} calls (hung, or slow under load: each holds a server thread) until this call's deadline; {} was not run",
                self.bulkhead.limit, self.label
            ),
            Full::Server => format!(
                "plugin {name}: the blocking routes of all plugins ran {} calls, the server's limit (hung, or slow under load: each holds a server thread), until this call's deadline; {} was not run",
                self.bulkhead.server_limit, self.label
            ),
        };
        if let Some(n) = self.bulkhead.refused() {
            let logged = format!("{msg} ({n} refused since the last report)");
            tracing::error!(plugin = %name, route = %self.label, "{logged}");
            let entry =
                LogEntry::new(Level::Error, Kind::Log, logged, serde_json::json!({}), Some(self.label.to_string()));
            self.logs.push(name, entry);
        }
        let mut resp = json_error(ErrorCode::PluginOverloaded, &msg);
        // Slots free as calls end; a client may try again soon.
        resp.headers_mut().insert(poem::http::header::RETRY_AFTER, poem::http::HeaderValue::from_static("1"));
        resp
    }

    /// The answer for a handler that ran past its deadline.
    fn timed_out(&self, limit: Duration, took: Duration) -> Response {
        if let Some(m) = &self.metrics {
            m.timed_out();
        }
        let name = &self.plugin.description().name;
        let msg = format!("plugin {name}: {} ran past its deadline of {limit:?} ({took:?})", self.label);
        tracing::warn!(plugin = %name, route = %self.label, "{msg}");
        let entry =
            LogEntry::new(Level::Warn, Kind::Log, msg.clone(), serde_json::json!({}), Some(self.label.to_string()));
        self.logs.push(name, entry);
        json_error(ErrorCode::Timeout, &msg)
    }
}

impl PluginEndpoint {
    /// `spans`: where the path parameters' values lie in the request path.
    async fn call(&self, req: &mut Request, spans: ParamSpans) -> Response {
        // One clock read for the metrics and the deadline (each read shows in a profile).
        let arrived = Instant::now();
        let Some(metrics) = &self.metrics else {
            return self.answer(req, spans, arrived).await.unwrap_or_else(|e| e.into_response());
        };
        let _in_flight = metrics.enter();
        let response = self.answer(req, spans, arrived).await.unwrap_or_else(|e| e.into_response());
        metrics.answered(response.status().as_u16(), arrived.elapsed());
        response
    }

    /// `arrived`: when the request reached this route. The handler's deadline counts from then,
    /// or from the end of its body's read.
    async fn answer(&self, req: &mut Request, spans: ParamSpans, arrived: Instant) -> poem::Result<Response> {
        let name = &self.plugin.description().name;
        // The body's read and the blocking call are boxed, so that this future, moved on every
        // request, stays small for the common case: an inline handler and no body.
        let (body, started) = if super::body::declared(req) {
            match Box::pin(super::body::read(req, self.max_body, self.body_timeout)).await {
                Ok(b) => (b.unwrap_or_default(), Instant::now()),
                Err(answer) => return Ok(answer),
            }
        } else {
            (bytes::Bytes::new(), arrived)
        };
        let limit = self.route_deadline.or_else(|| self.plugin.deadline()).unwrap_or(self.server_deadline);
        let deadline = started + limit;
        let result = if let Some(isolated) = self.plugin.isolated() {
            // In a process of its own: the frame is made here (the request's views do not
            // cross an await), and the call is awaited without a blocking-pool thread.
            let frame = self.with_call_request(req, &spans, &body, crate::isolation::Isolated::request_frame);
            match Box::pin(isolated.handle_async(frame, deadline, &self.label)).await {
                Err(CallError::Timeout) => return Ok(self.timed_out(limit, started.elapsed())),
                answer => answer.and_then(CallResponse::from_reply),
            }
        } else if self.blocking {
            let owned = OwnedRequest::new(req, &self.params, &spans);
            match Box::pin(self.call_blocking(owned, body, deadline)).await {
                Blocking::Answered(r) => r,
                Blocking::Late => return Ok(self.timed_out(limit, started.elapsed())),
                Blocking::Full(full) => return Ok(self.overloaded(full)),
            }
        } else {
            // Inline, with the request borrowed: the fastest path, as for a linked-in handler.
            let _route = crate::host::on_route(&self.label, deadline);
            let result = self.with_call_request(req, &spans, &body, |call| self.plugin.call(call));
            let took = started.elapsed();
            if took > SLOW_INLINE {
                let route = &self.plugin.description().routes[self.route as usize];
                tracing::warn!(
                    plugin = %name, route = %format!("{} {}", route.method, route.path), ?took,
                    "a handler ran long on an async worker, stalling other requests; mark its route .blocking()"
                );
            }
            if took > limit {
                return Ok(self.timed_out(limit, took));
            }
            result
        };
        let response = match result {
            Ok(r) => r,
            Err(CallError::Timeout) => return Ok(self.timed_out(limit, started.elapsed())),
            Err(CallError::Crashed { code, message }) => {
                let msg = format!("plugin {name}: {message}");
                tracing::error!(plugin = %name, path = %req.uri().path(), "{msg}");
                return Ok(json_error(code, &msg));
            }
            Err(e) => {
                tracing::error!(plugin = %name, path = %req.uri().path(), "{e}");
                if let (CallError::Panic(_), Some(m)) = (&e, &self.metrics) {
                    m.panicked();
                }
                self.logs.record(name, Kind::Panic, e.to_string(), Some(self.label.to_string()));
                let msg = format!("plugin {name}: {e}");
                return Ok(json_error(ErrorCode::PluginError, &msg));
            }
        };
        let Ok(status) = StatusCode::from_u16(response.status) else {
            let msg = format!("plugin {name} returned the invalid status {}", response.status);
            tracing::error!(plugin = %name, "{msg}");
            return Ok(json_error(ErrorCode::PluginError, &msg));
        };
        let mut builder = Response::builder().status(status);
        let invalid = |what: String| {
            let msg = format!("plugin {name} returned {what}");
            tracing::error!(plugin = %name, "{msg}");
            Ok(json_error(ErrorCode::PluginError, &msg))
        };
        // Names and values are checked as HTTP defines them: a value holding CR or LF is refused,
        // it cannot become another header.
        for pair in response.headers() {
            let (n, v) = match pair {
                Ok(pair) => pair,
                Err(e) => return invalid(e),
            };
            match (HeaderName::from_bytes(n), HeaderValue::from_bytes(v)) {
                (Ok(n), Ok(v)) => builder = builder.header(n, v),
                _ => return invalid(format!("an invalid header {:?}", String::from_utf8_lossy(n))),
            }
        }
        Ok(builder.body(response.into_body()))
    }
}

impl PluginEndpoint {
    /// The request as the plugin sees it (views of `req`, its parameters decoded), handed to `f`.
    fn with_call_request<T>(
        &self,
        req: &Request,
        spans: &ParamSpans,
        body: &[u8],
        f: impl FnOnce(&CallRequest<'_>) -> T,
    ) -> T {
        let decoded = param_values(&self.params, spans, req.uri().path());
        let params: Vec<(&str, &str)> = decoded.iter().map(|(n, v)| (*n, v.as_ref())).collect();
        f(&CallRequest {
            route: self.route,
            method: req.method().as_str(),
            path: req.uri().path(),
            query: req.uri().query().unwrap_or(""),
            params: &params,
            headers: request_headers::over(req.headers()),
            body,
        })
    }
}

/// The parts of a request a blocking handler sees, owned so they can move to another thread.
struct OwnedRequest {
    method: String,
    path: String,
    query: String,
    params: Vec<(String, String)>,
    headers: HeaderMap,
}

impl OwnedRequest {
    fn new(req: &Request, params: &[String], spans: &ParamSpans) -> Self {
        Self {
            method: req.method().as_str().to_string(),
            path: req.uri().path().to_string(),
            query: req.uri().query().unwrap_or("").to_string(),
            params: (param_values(params, spans, req.uri().path()).into_iter())
                .map(|(n, v)| (n.to_string(), v.into_owned()))
                .collect(),
            headers: req.headers().clone(),
        }
    }
}

/// Each path parameter's name and value, percent-decoded (as poem's router gave them, and as
/// `Request::param` promises); a value that does not decode to UTF-8 is empty.
fn param_values<'a>(names: &'a [String], spans: &ParamSpans, path: &'a str) -> Vec<(&'a str, Cow<'a, str>)> {
    (names.iter().enumerate())
        .map(|(i, name)| {
            let raw = spans.get(i).and_then(|&(s, e)| path.get(s..e)).unwrap_or("");
            (name.as_str(), percent_encoding::percent_decode_str(raw).decode_utf8().unwrap_or_default())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_behind_calls_waiting_for_the_server_is_refused_for_the_server() {
        let server = Arc::new(tokio::sync::Semaphore::new(1));
        let other_plugin = server.clone().try_acquire_owned().expect("the server's one slot");
        let bulkhead = Arc::new(Bulkhead::new(1, server, 1));
        let soon = || Instant::now() + Duration::from_millis(200);
        // The first call takes the plugin's one slot and waits for the server's.
        let first = tokio::spawn({
            let bulkhead = bulkhead.clone();
            async move { bulkhead.admit(soon()).await.err() }
        });
        while bulkhead.waiting_for_server.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        // The second finds no plugin slot: the server's limit is why.
        assert_eq!(bulkhead.admit(soon()).await.err(), Some(Full::Server));
        assert_eq!(first.await.unwrap(), Some(Full::Server));
        assert_eq!(bulkhead.waiting_for_server.load(std::sync::atomic::Ordering::Relaxed), 0);
        // With the server's slot free, a call is admitted, and the plugin's own limit is named.
        drop(other_plugin);
        let running = bulkhead.admit(soon()).await.expect("admitted");
        assert_eq!(bulkhead.admit(soon()).await.err(), Some(Full::Plugin));
        drop(running);
    }

    #[tokio::test]
    async fn bulkheads_of_plugins_gone_are_forgotten_once_their_calls_end() {
        let server = Arc::new(tokio::sync::Semaphore::new(8));
        let mut bulkheads: HashMap<String, Arc<Bulkhead>> = ["served", "gone", "hung"]
            .into_iter()
            .map(|name| (name.to_string(), Arc::new(Bulkhead::new(2, server.clone(), 8))))
            .collect();
        let endpoint = bulkheads["served"].clone();
        let later = Instant::now() + Duration::from_secs(1);
        let hung = bulkheads["hung"].admit(later).await.expect("a free slot");
        prune(&mut bulkheads);
        let mut left: Vec<&str> = bulkheads.keys().map(String::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["hung", "served"], "the one nothing holds went");
        drop(hung);
        prune(&mut bulkheads);
        assert_eq!(bulkheads.keys().collect::<Vec<_>>(), ["served"]);
        drop(endpoint);
        prune(&mut bulkheads);
        assert!(bulkheads.is_empty());
    }
}
