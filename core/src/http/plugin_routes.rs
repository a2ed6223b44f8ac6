//! The plugin route table: a complete poem [`Route`] of every served plugin endpoint, rebuilt on
//! each change and swapped in atomically (poem's router cannot be changed once built).
//!
//! Each endpoint holds the `Arc` of the plugin version it belongs to, so a request that started
//! on an old version finishes on it, and the old version is retired after its last request.

use super::docs::Docs;
use super::error::json_error;
use crate::error_code::ErrorCode;
use crate::host::logs::{Kind, Level, LogEntry, LogStore};
use crate::loader::{CallError, CallRequest, LoadedPlugin};
use crate::routes::{Pattern, RouteSink};
use arc_swap::ArcSwap;
use poem::http::{HeaderName, HeaderValue, Method, StatusCode};
use poem::{Endpoint, Request, Response, Route, RouteMethod};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// One published table: poem's router, and the methods of each path (for `Allow` on a 405).
pub struct Table {
    pub route: Route,
    methods: Vec<(Pattern, HeaderValue)>,
}

impl Table {
    /// The `Allow` value for a request path that exists with other methods.
    pub fn allowed(&self, path: &str) -> Option<HeaderValue> {
        self.methods.iter().find(|(p, _)| p.matches(path)).map(|(_, m)| m.clone())
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
}

impl PluginRouter {
    pub fn new(limits: Limits, logs: Arc<LogStore>) -> Self {
        let empty = Table { route: Route::new(), methods: Vec::new() };
        Self { current: ArcSwap::from_pointee(empty), docs: OnceLock::new(), limits, logs }
    }

    /// Connects the docs that every publish updates.
    pub fn attach_docs(&self, docs: Arc<Docs>) {
        let _ = self.docs.set(docs);
    }

    /// The table in effect now.
    pub fn table(&self) -> Arc<Table> {
        self.current.load_full()
    }
}

impl RouteSink for PluginRouter {
    fn publish(&self, plugins: &[Arc<LoadedPlugin>]) -> Result<(), String> {
        let mut route = Route::new();
        let mut methods = Vec::new();
        for plugin in plugins {
            let description = plugin.description();
            // One RouteMethod per path: a plugin may serve GET and POST on the same path.
            let mut by_path: Vec<(String, RouteMethod)> = Vec::new();
            let mut allow: Vec<(Pattern, Vec<&str>)> = Vec::new();
            for (index, r) in description.routes.iter().enumerate() {
                let pattern = Pattern::parse(&r.path)?;
                let method =
                    Method::from_bytes(r.method.as_bytes()).map_err(|_| format!("bad method {:?}", r.method))?;
                let endpoint = PluginEndpoint {
                    plugin: plugin.clone(),
                    route: index as u32,
                    params: pattern.params().map(str::to_string).collect(),
                    blocking: r.blocking,
                    max_body: self.limits.max_body,
                    body_timeout: self.limits.body_timeout,
                    route_deadline: r.deadline_ms.map(Duration::from_millis),
                    server_deadline: self.limits.default_deadline,
                    logs: self.logs.clone(),
                    label: format!("{} {}", r.method, r.path).into(),
                };
                match allow.iter_mut().find(|(p, _)| *p == pattern) {
                    Some((_, m)) => m.push(&r.method),
                    None => allow.push((pattern.clone(), vec![&r.method])),
                }
                let poem_path = pattern.to_poem();
                match by_path.iter_mut().find(|(p, _)| *p == poem_path) {
                    Some((_, rm)) => *rm = std::mem::take(rm).method(method, endpoint),
                    None => by_path.push((poem_path, RouteMethod::new().method(method, endpoint))),
                }
            }
            for (path, rm) in by_path {
                route = route.try_at(&path, rm).map_err(|e| format!("{}: {e}", description.name))?;
            }
            for (pattern, m) in allow {
                let value = HeaderValue::from_str(&m.join(", ")).map_err(|e| format!("{}: {e}", description.name))?;
                methods.push((pattern, value));
            }
        }
        if let Some(docs) = self.docs.get() {
            docs.update(plugins.iter().map(|p| p.description()));
        }
        self.current.store(Arc::new(Table { route, methods }));
        Ok(())
    }
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
    max_body: usize,
    body_timeout: Duration,
    /// How long the handler may take, if the route says (`Route::deadline` in the SDK); else
    /// the plugin's row says (`deadline_ms`); else the server (`--route-deadline-ms`).
    route_deadline: Option<Duration>,
    server_deadline: Duration,
    logs: Arc<LogStore>,
    /// `METHOD /path` of the route, for logs.
    label: Arc<str>,
}

impl PluginEndpoint {
    /// The answer for a handler that ran past its deadline.
    fn timed_out(&self, limit: Duration, took: Duration) -> Response {
        let name = &self.plugin.description().name;
        let msg = format!("plugin {name}: {} ran past its deadline of {limit:?} ({took:?})", self.label);
        tracing::warn!(plugin = %name, route = %self.label, "{msg}");
        let entry =
            LogEntry::new(Level::Warn, Kind::Log, msg.clone(), serde_json::json!({}), Some(self.label.to_string()));
        self.logs.push(name, entry);
        json_error(ErrorCode::Timeout, &msg)
    }
}

impl Endpoint for PluginEndpoint {
    type Output = Response;

    async fn call(&self, mut req: Request) -> poem::Result<Response> {
        let name = &self.plugin.description().name;
        let body = match super::body::read(&mut req, self.max_body, self.body_timeout).await {
            Ok(b) => b.unwrap_or_default(),
            Err(answer) => return Ok(answer),
        };
        let started = std::time::Instant::now();
        let limit = self.route_deadline.or_else(|| self.plugin.deadline()).unwrap_or(self.server_deadline);
        let deadline = started + limit;
        let result = if self.blocking {
            // Off the async workers: the request is copied so it can move to another thread.
            let owned = OwnedRequest::new(&req, &self.params);
            let plugin = self.plugin.clone();
            let route = self.route;
            let label = self.label.clone();
            let call = move || {
                let _route = crate::host::on_route(&label, deadline);
                let params: Vec<(&str, &str)> = owned.params.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
                let headers: Vec<(&str, &[u8])> = owned.headers.iter().map(|(n, v)| (n.as_str(), &v[..])).collect();
                plugin.call(&CallRequest {
                    route,
                    method: &owned.method,
                    path: &owned.path,
                    query: &owned.query,
                    params: &params,
                    headers: &headers,
                    body: &body,
                })
            };
            // Past the deadline the client is answered; the handler runs on to its end on its
            // thread (nothing can stop it in the middle), and its answer is dropped.
            match tokio::time::timeout_at(deadline.into(), tokio::task::spawn_blocking(call)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => Err(CallError::Panic(format!("the handler task failed: {e}"))),
                Err(_) => return Ok(self.timed_out(limit, started.elapsed())),
            }
        } else {
            // Inline, with the request borrowed: the fastest path, as for a linked-in handler.
            let params: Vec<(&str, &str)> =
                self.params.iter().map(|n| (n.as_str(), req.raw_path_param(n).unwrap_or(""))).collect();
            let headers: Vec<(&str, &[u8])> = req.headers().iter().map(|(n, v)| (n.as_str(), v.as_bytes())).collect();
            let _route = crate::host::on_route(&self.label, deadline);
            let result = self.plugin.call(&CallRequest {
                route: self.route,
                method: req.method().as_str(),
                path: req.uri().path(),
                query: req.uri().query().unwrap_or(""),
                params: &params,
                headers: &headers,
                body: &body,
            });
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
            Err(e) => {
                tracing::error!(plugin = %name, path = %req.uri().path(), "{e}");
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
        let pairs = match response.headers() {
            Ok(p) => p,
            Err(e) => return invalid(e.to_string()),
        };
        // Names and values are checked as HTTP defines them: a value holding CR or LF is refused,
        // it cannot become another header.
        for (n, v) in pairs {
            match (HeaderName::from_bytes(n), HeaderValue::from_bytes(v)) {
                (Ok(n), Ok(v)) => builder = builder.header(n, v),
                _ => return invalid(format!("an invalid header {:?}", String::from_utf8_lossy(n))),
            }
        }
        Ok(builder.body(response.into_body()))
    }
}

/// The parts of a request a blocking handler sees, owned so they can move to another thread.
struct OwnedRequest {
    method: String,
    path: String,
    query: String,
    params: Vec<(String, String)>,
    headers: Vec<(String, Vec<u8>)>,
}

impl OwnedRequest {
    fn new(req: &Request, params: &[String]) -> Self {
        Self {
            method: req.method().as_str().to_string(),
            path: req.uri().path().to_string(),
            query: req.uri().query().unwrap_or("").to_string(),
            params: params.iter().map(|n| (n.clone(), req.raw_path_param(n).unwrap_or("").to_string())).collect(),
            headers: req.headers().iter().map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec())).collect(),
        }
    }
}
