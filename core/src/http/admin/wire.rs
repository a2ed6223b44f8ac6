//! The admin API's wire types: what its answers and requests look like, converted from the
//! repository's rows (so that the domain does not bend to the API).

use crate::repo::{EndpointRow, ObservedRow, PluginRow, ReplicaRow};
use chrono::{DateTime, Utc};
use poem_openapi::payload::Json;
use poem_openapi::types::multipart::Upload;
use poem_openapi::{ApiResponse, Multipart, Object};

/// A plugin: what the row asks for (`status`), what the answering replica did (`state`,
/// `error`, …), and what every live replica did (`replicas`, summed up in `rollout`).
#[derive(Debug, Object)]
pub struct Plugin {
    pub id: i64,
    pub name: String,
    pub description: String,
    pub version: String,
    pub author: String,
    #[oai(rename = "type")]
    pub kind: String,
    /// Desired: `active` or `inactive`.
    pub status: String,
    /// Observed by the replica that answers: `pending`, `building`, `loaded`, `inactive`,
    /// `waiting` or `failed`.
    pub state: String,
    /// Directory of the plugin's crate.
    pub source_path: String,
    /// How it came: `discovered` (a plugin directory), `sql` (a row inserted by hand), `upload`
    /// or `catalog` (from an archive kiln keeps).
    pub origin: String,
    /// The manifest (Cargo.toml) last read.
    #[oai(nullable)]
    pub path: Option<String>,
    /// The library serving now.
    #[oai(nullable)]
    pub binary_path: Option<String>,
    /// Why the last attempt failed, with compiler diagnostics for build failures.
    #[oai(nullable)]
    pub error: Option<String>,
    /// Content hash of the sources of the library serving now.
    #[oai(nullable)]
    pub loaded_hash: Option<String>,
    #[oai(nullable)]
    pub loaded_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Desired: what the plugin may reach in the database beyond its own schema (`tables`,
    /// `names`, `connections`; edit the row to change it).
    pub resources: serde_json::Value,
    /// Desired: the route deadline in milliseconds for routes that set none (null: the server's).
    #[oai(nullable)]
    pub deadline_ms: Option<i32>,
    /// Desired: `process` (a process of its own) or `in_process`, over the manifest's
    /// `isolation` (null: the manifest's; edit the row to change it).
    #[oai(nullable)]
    pub isolation: Option<String>,
    /// Desired, with process isolation: MiB the process may map beyond the loaded library
    /// (null: the manifest's `memoryLimitMb`, or none).
    #[oai(nullable)]
    pub memory_limit_mb: Option<i32>,
    /// Desired, with process isolation: CPU seconds before a restart (null: the manifest's
    /// `cpuLimitSeconds`, or none).
    #[oai(nullable)]
    pub cpu_limit_s: Option<i32>,
    /// Observed by the replica that answers: restarts of the serving instance's process.
    pub restarts: i32,
    /// How that process last died (signal or exit code, its last lines of output).
    #[oai(nullable)]
    pub last_crash: Option<String>,
    /// The event subscriptions of the version serving now, with their counters.
    pub events: Vec<Subscription>,
    /// The replica that answers (the one `state`, `error`, `binary_path`, … are from).
    pub replica: String,
    /// Every live replica at once: `converged` (each does what the row asks, in one version),
    /// `failed` (one reports an error), or `rolling` (some are not there yet).
    pub rollout: String,
    /// What each live replica observed.
    pub replicas: Vec<ReplicaState>,
}

/// What one replica observed of a plugin.
#[derive(Debug, Object, Clone)]
pub struct ReplicaState {
    pub replica: String,
    /// `pending` (not looked at yet), `building`, `loaded`, `inactive`, `waiting` or `failed`.
    pub state: String,
    #[oai(nullable)]
    pub error: Option<String>,
    /// Content hash of the sources of the library it serves.
    #[oai(nullable)]
    pub loaded_hash: Option<String>,
    #[oai(nullable)]
    pub loaded_at: Option<DateTime<Utc>>,
    #[oai(nullable)]
    pub updated_at: Option<DateTime<Utc>>,
}

impl Plugin {
    /// Fills `replicas` and `rollout` from what the live replicas observed of this plugin.
    pub fn with_replicas(mut self, live: &[String], observed: &[&ObservedRow]) -> Self {
        self.replicas = live
            .iter()
            .map(|id| match observed.iter().find(|o| o.replica_id == *id) {
                Some(o) => ReplicaState {
                    replica: id.clone(),
                    state: o.state.clone(),
                    error: o.error.clone(),
                    loaded_hash: o.loaded_hash.clone(),
                    loaded_at: o.loaded_at,
                    updated_at: Some(o.updated_at),
                },
                None => ReplicaState {
                    replica: id.clone(),
                    state: "pending".into(),
                    error: None,
                    loaded_hash: None,
                    loaded_at: None,
                    updated_at: None,
                },
            })
            .collect();
        self.rollout = rollout(&self.status, &self.replicas).into();
        self
    }
}

/// The replicas' states summed up (see [`Plugin::rollout`]).
pub fn rollout(status: &str, replicas: &[ReplicaState]) -> &'static str {
    if replicas.iter().any(|r| r.state == "failed" || r.error.is_some()) {
        return "failed";
    }
    let wanted = if status == "active" { "loaded" } else { "inactive" };
    let mut hashes = replicas.iter().map(|r| &r.loaded_hash);
    let first = hashes.next();
    let one_version = hashes.all(|h| Some(h) == first);
    if replicas.iter().all(|r| r.state == wanted) && one_version { "converged" } else { "rolling" }
}

/// A kiln server sharing this database.
#[derive(Debug, Object)]
pub struct Replica {
    pub id: String,
    /// `live`, or `gone` (stopped, or silent past the timeout; its observed rows are removed).
    pub state: String,
    /// Whether it is the replica answering.
    pub this: bool,
    pub hostname: String,
    #[oai(nullable)]
    pub pid: Option<i32>,
    /// Where it serves HTTP.
    pub address: String,
    pub kiln_version: String,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    #[oai(nullable)]
    pub gone_at: Option<DateTime<Utc>>,
    /// Plugin builds it ran since it started.
    pub builds: i64,
    /// Libraries it fetched from the database, built by another replica, since it started.
    pub fetches: i64,
}

impl Replica {
    pub fn new(r: ReplicaRow, this: &str) -> Self {
        Self {
            state: if r.gone_at.is_some() { "gone" } else { "live" }.into(),
            this: r.id == this,
            id: r.id,
            hostname: r.hostname,
            pid: r.pid,
            address: r.address,
            kiln_version: r.kiln_version,
            started_at: r.started_at,
            heartbeat_at: r.heartbeat_at,
            gone_at: r.gone_at,
            builds: r.builds,
            fetches: r.fetches,
        }
    }
}

/// One event subscription of a plugin, and what became of the events it matched.
#[derive(Object, Debug, Clone)]
pub struct Subscription {
    /// Topic pattern (`notes.*`).
    pub pattern: String,
    /// The plugin's handler.
    pub handler: String,
    pub delivered: u64,
    pub failed: u64,
    pub timed_out: u64,
    /// Not delivered: the subscriber's queue was full, or it went away first.
    pub dropped: u64,
}

/// A published event and what became of it at each subscriber so far.
#[derive(Object, Debug, Clone)]
pub struct EventView {
    pub id: u64,
    pub topic: String,
    pub data: serde_json::Value,
    /// `kiln`, `api`, `postgres` or `plugin:<name>`.
    pub source: String,
    /// How many events led to this one (0, or one more than the event whose handler emitted
    /// it); a chain deeper than 16 is refused.
    pub depth: u8,
    pub at: DateTime<Utc>,
    /// How many subscriptions matched it when it was published.
    pub subscribers: u32,
    /// What became of it at each of them so far (delivery is asynchronous).
    pub deliveries: Vec<DeliveryView>,
}

/// What became of an event at one subscriber.
#[derive(Object, Debug, Clone)]
pub struct DeliveryView {
    pub plugin: String,
    pub handler: String,
    /// `delivered`, `failed`, `timed_out` or `dropped`.
    pub outcome: String,
    #[oai(nullable)]
    pub error: Option<String>,
}

impl From<&crate::events::Event> for EventView {
    fn from(e: &crate::events::Event) -> Self {
        Self {
            id: e.id,
            topic: e.topic.clone(),
            data: e.data(),
            source: e.source.to_string(),
            depth: e.depth,
            at: e.at.into(),
            subscribers: e.subscribers.load(std::sync::atomic::Ordering::Relaxed),
            deliveries: e
                .deliveries()
                .into_iter()
                .map(|d| DeliveryView {
                    plugin: d.plugin,
                    handler: d.handler,
                    outcome: d.outcome.as_str().into(),
                    error: d.error,
                })
                .collect(),
        }
    }
}

/// The answer to `POST /events/{topic}`.
#[derive(ApiResponse)]
pub enum PublishResponse {
    /// Published: queued for every subscriber whose pattern matches.
    #[oai(status = 202)]
    Accepted(Json<EventView>),
}

impl From<PluginRow> for Plugin {
    fn from(r: PluginRow) -> Self {
        Self {
            id: r.id,
            name: r.name,
            description: r.description,
            version: r.version,
            author: r.author,
            kind: r.kind,
            status: r.status,
            state: r.state,
            source_path: r.source_path,
            origin: r.origin,
            path: r.path,
            binary_path: r.binary_path,
            error: r.error,
            loaded_hash: r.loaded_hash,
            loaded_at: r.loaded_at,
            created_at: r.created_at,
            updated_at: r.updated_at,
            resources: r.resources,
            deadline_ms: r.deadline_ms,
            isolation: r.isolation,
            memory_limit_mb: r.memory_limit_mb,
            cpu_limit_s: r.cpu_limit_s,
            restarts: r.restarts,
            last_crash: r.last_crash,
            events: Vec::new(),
            replica: String::new(),
            rollout: String::new(),
            replicas: Vec::new(),
        }
    }
}

/// An HTTP endpoint a plugin serves.
#[derive(Debug, Object)]
pub struct Endpoint {
    pub id: i64,
    pub plugin_id: i64,
    pub method: String,
    /// OpenAPI-style path, e.g. `/powertable/{id}`.
    pub path: String,
    pub handler: String,
    #[oai(rename = "type")]
    pub kind: String,
}

impl From<EndpointRow> for Endpoint {
    fn from(e: EndpointRow) -> Self {
        Self { id: e.id, plugin_id: e.plugin_id, method: e.method, path: e.path, handler: e.handler, kind: e.kind }
    }
}

/// The server's health.
#[derive(Debug, Object)]
pub struct Health {
    /// `ok` when the database answers and the listener is connected, else `degraded`.
    pub status: String,
    /// This server's replica id.
    pub replica: String,
    /// `up` or `down`.
    pub database: String,
    /// `connected` or `disconnected`: whether row edits reach the server now.
    pub listener: String,
    /// Plugin versions serving now.
    pub plugins_served: u64,
    /// Plugin builds (cargo runs) since the server started.
    pub builds_run: u64,
    /// Reconcile passes running or queued: 0 when every plugin is settled.
    pub reconciling: u64,
    /// Plugin route tables built since the server started. Each change of what serves needs
    /// one; changes made together (a start, a bulk edit) share one.
    pub route_tables_built: u64,
    /// Plugins by observed state, from their rows (absent while the database is down). A
    /// server with failed plugins still answers 200: it serves; these counts show what does not.
    #[oai(nullable)]
    pub plugins: Option<PluginCounts>,
    pub version: String,
}

/// How many plugins are in each observed state.
#[derive(Debug, Default, Object)]
pub struct PluginCounts {
    pub loaded: u64,
    /// The last attempt failed and nothing serves for them (see each row's `error`).
    pub failed: u64,
    /// Refused for now, and retried by themselves when what they wait for changes (a path
    /// another plugin owns).
    pub waiting: u64,
    pub building: u64,
    pub pending: u64,
    pub inactive: u64,
    /// Loaded, but their last change failed: an older version serves (see `error`).
    pub loaded_with_error: u64,
}

/// `GET /metrics`.
#[derive(ApiResponse)]
pub enum MetricsResponse {
    /// Every metric, in the Prometheus text format (0.0.4).
    #[oai(status = 200, content_type = "text/plain; version=0.0.4; charset=utf-8")]
    Ok(poem_openapi::payload::PlainText<String>),
}

#[derive(ApiResponse)]
pub enum HealthResponse {
    /// Everything works.
    #[oai(status = 200)]
    Ok(Json<Health>),
    /// Plugins still serve, but the database or the listener is down.
    #[oai(status = 503)]
    Degraded(Json<Health>),
}

/// A log level, as a query parameter.
#[derive(Debug, Clone, Copy, poem_openapi::Enum)]
#[oai(rename_all = "lowercase")]
pub enum LevelParam {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// One line of a plugin's log.
#[derive(Debug, Object)]
pub struct LogLine {
    /// Increases with every line the server keeps.
    pub seq: u64,
    pub at: DateTime<Utc>,
    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub level: String,
    /// `log` (the plugin logged it), `panic` (one of its calls panicked), `init` (its init failed
    /// or took the server down).
    pub kind: String,
    pub message: String,
    /// The fields the plugin logged with the line (a JSON object).
    pub fields: serde_json::Value,
    /// The route being handled (`METHOD /path`), for a handler's lines.
    #[oai(nullable)]
    pub route: Option<String>,
}

/// A plugin's configuration, sensitive values masked.
#[derive(Debug, Object)]
pub struct PluginConfig {
    /// The configuration in effect (defaults applied), sensitive values replaced by `********`.
    pub config: serde_json::Value,
    /// The plugin's configSchema, if it declares one.
    #[oai(nullable)]
    pub schema: Option<serde_json::Value>,
}

/// A build kiln ran.
#[derive(Debug, Object)]
pub struct Build {
    pub id: i64,
    pub source_hash: String,
    pub started_at: DateTime<Utc>,
    pub duration_ms: i64,
    pub success: bool,
    /// The compiler's diagnostics, for a failed build: a line per error with its place, then
    /// rustc's rendering and cargo's own errors.
    #[oai(nullable)]
    pub diagnostics: Option<String>,
    /// Each error and warning of a failed build, with its place.
    pub messages: Vec<BuildMessage>,
    /// The replica that ran it (other replicas fetch its library instead of building).
    #[oai(nullable)]
    pub replica: Option<String>,
    /// A draft (`--build-profile staged`): the plugin crate unoptimized, served at once after an
    /// edit until the optimized build of the same version (recorded next) replaces it.
    pub draft: bool,
}

/// One compiler message of a failed build.
#[derive(Debug, Object)]
pub struct BuildMessage {
    /// `error` or `warning`.
    pub level: String,
    pub message: String,
    /// rustc's code (`E0308`).
    #[oai(nullable)]
    pub code: Option<String>,
    /// The file, relative to the plugin crate.
    #[oai(nullable)]
    pub file: Option<String>,
    /// 1-based.
    #[oai(nullable)]
    pub line: Option<u32>,
    /// 1-based.
    #[oai(nullable)]
    pub column: Option<u32>,
    /// rustc's own rendering of it.
    pub rendered: String,
}

impl From<crate::diagnostics::Diagnostic> for BuildMessage {
    fn from(d: crate::diagnostics::Diagnostic) -> Self {
        let crate::diagnostics::Diagnostic { level, message, code, file, line, column, rendered } = d;
        Self { level, message, code, file, line, column, rendered }
    }
}

/// What a discovery pass found.
#[derive(Debug, Object)]
pub struct DiscoverReport {
    /// Plugin crates found in the plugin directories.
    pub found: Vec<String>,
    /// Of those, the ones that got a new row.
    pub added: Vec<String>,
    /// Discovered plugins whose crate is gone (they are unloaded).
    pub removed: Vec<String>,
    /// Crates or directories that could not be used, and why.
    pub failed: Vec<DiscoverFailure>,
}

#[derive(Debug, Object)]
pub struct DiscoverFailure {
    pub path: String,
    pub error: String,
}

/// An uploaded plugin archive.
#[derive(Debug, Multipart)]
pub struct InstallForm {
    /// A `.tar.gz` of a plugin crate (Cargo.toml at its top, or in its one top-level directory).
    pub file: Upload,
}
