//! The admin API: list and inspect plugins, reload and toggle them, report health.
//!
//! It never changes what is served by itself: a toggle writes the row (as psql would) and asks
//! the reconciler for a pass; a reload asks for a forced pass. Wire types live here and are
//! converted from the repository's rows.

pub mod catalog;
mod install;
mod wire;

use super::error::{ApiError, ErrorResponse};
use crate::discovery;
use crate::error_code::ErrorCode;
use crate::events::{EventBus, Source};
use crate::host::logs::{Level as LogLevel, LogStore};
use crate::manifest::{Manifest, ManifestError, validate_name};
use crate::plugin_config::{self, mask};
use crate::reconciler::{Failure, Reconciler};
use crate::repo::{PluginRow, Repo, RepoError};
use chrono::{DateTime, Utc};
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{OpenApi, Tags};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use wire::*;

#[derive(Tags)]
enum Tag {
    /// Plugins known to kiln, and their lifecycle.
    Plugins,
    /// Events: publish one, see the recent ones and where they went.
    Events,
    /// The server itself.
    Server,
    /// Plugin catalogs: what they offer, and installs and upgrades from them.
    Catalog,
}

/// The admin API.
#[derive(Clone)]
pub struct AdminApi {
    pub repo: Repo,
    pub reconciler: Reconciler,
    /// Set by the listener while its connection is up.
    pub listener_up: Arc<AtomicBool>,
    /// Where discovery looks (`POST /plugins/discover`).
    pub plugin_dirs: Vec<PathBuf>,
    /// Where uploaded plugins are unpacked, one directory each.
    pub install_dir: PathBuf,
    /// The initial status of discovered plugins (config file lists).
    pub policy: Arc<crate::config::FileConfig>,
    /// Every plugin's recent logs, panics and init errors.
    pub logs: Arc<LogStore>,
    /// The event bus (`/events`, and each plugin's subscriptions).
    pub events: Arc<EventBus>,
}

type Result<T> = std::result::Result<Json<T>, ErrorResponse>;

#[OpenApi]
impl AdminApi {
    /// List every plugin.
    #[oai(path = "/plugins", method = "get", tag = "Tag::Plugins")]
    async fn list(&self) -> Result<Vec<Plugin>> {
        let rows = self.repo.list().await.map_err(db_error)?;
        Ok(Json(self.plugins(rows, None).await?))
    }

    /// One plugin.
    #[oai(path = "/plugins/:name", method = "get", tag = "Tag::Plugins")]
    async fn get(
        &self,
        #[oai(validator(pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"))] name: Path<String>,
    ) -> Result<Plugin> {
        let row = self.row(&name).await?;
        Ok(Json(self.view(row).await?))
    }

    /// The endpoints a plugin serves now.
    #[oai(path = "/plugins/:name/endpoints", method = "get", tag = "Tag::Plugins")]
    async fn endpoints(
        &self,
        #[oai(validator(pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"))] name: Path<String>,
    ) -> Result<Vec<Endpoint>> {
        let row = self.row(&name).await?;
        let eps = self.repo.endpoints(row.id).await.map_err(db_error)?;
        Ok(Json(eps.into_iter().map(Endpoint::from).collect()))
    }

    /// Rebuild the plugin if its source changed, then load a fresh instance in place of the
    /// serving one. On failure the previous version keeps serving and the answer says why.
    #[oai(path = "/plugins/:name/reload", method = "post", tag = "Tag::Plugins")]
    async fn reload(
        &self,
        #[oai(validator(pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"))] name: Path<String>,
    ) -> Result<Plugin> {
        let row = self.row(&name).await?;
        if !row.wants_active() {
            return Err(ErrorResponse::new(
                ErrorCode::PluginInactive,
                format!("plugin {} is inactive; toggle it (or set status = 'active') to load it", row.name),
            ));
        }
        // Every replica reloads (the raised generation reaches them as a row edit); this one
        // answers when its own reload is done. Not a forced pass: the raised generation is what
        // asks for the fresh instance, so this pass and the one the notification wakes load one
        // between them, not two.
        self.repo.request_reload(row.id).await.map_err(db_error)?;
        self.reconciler.reconcile(row.id, false).await.map_err(failure)?;
        Ok(Json(self.view(self.row(&name).await?).await?))
    }

    /// Switch a plugin between active and inactive, and wait until that took effect.
    #[oai(path = "/plugins/:name/toggle", method = "post", tag = "Tag::Plugins")]
    async fn toggle(
        &self,
        #[oai(validator(pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"))] name: Path<String>,
    ) -> Result<Plugin> {
        let row = self.row(&name).await?;
        let status = if row.wants_active() { "inactive" } else { "active" };
        self.repo.set_status(row.id, status).await.map_err(db_error)?;
        self.reconciler.reconcile(row.id, false).await.map_err(failure)?;
        Ok(Json(self.view(self.row(&name).await?).await?))
    }

    /// A plugin's configuration (sensitive values masked) and its schema.
    #[oai(path = "/plugins/:name/config", method = "get", tag = "Tag::Plugins")]
    async fn get_config(
        &self,
        #[oai(validator(pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"))] name: Path<String>,
    ) -> Result<PluginConfig> {
        let row = self.row(&name).await?;
        let schema =
            Manifest::read_off_worker(std::path::Path::new(&row.source_path)).await.ok().and_then(|m| m.config_schema);
        let config = match &schema {
            Some(s) => plugin_config::with_defaults(s, &row.config),
            None => row.config.clone(),
        };
        Ok(Json(PluginConfig { config: mask(schema.as_ref(), &config), schema }))
    }

    /// Replace a plugin's configuration. It is validated against the plugin's configSchema;
    /// if invalid, nothing is stored and every violation is listed. Otherwise the plugin's
    /// `configure` hook applies it in place, or (if the plugin asks, or its manifest says
    /// `reloadOnConfigChange`) a fresh instance is loaded with it, the old one serving until then.
    /// A config the hook refuses is not stored either.
    #[oai(path = "/plugins/:name/config", method = "put", tag = "Tag::Plugins")]
    async fn put_config(
        &self,
        #[oai(validator(pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"))] name: Path<String>,
        config: Json<std::collections::BTreeMap<String, serde_json::Value>>,
    ) -> Result<PluginConfig> {
        let config = Json(serde_json::Value::Object(config.0.into_iter().collect()));
        let row = self.row(&name).await?;
        let manifest = Manifest::read_off_worker(std::path::Path::new(&row.source_path))
            .await
            .map_err(|e| ErrorResponse::new(manifest_code(&e), e.to_string()))?;
        // A masked value sent back (as GET showed it) keeps the stored secret.
        let config = Json(plugin_config::unmask(manifest.config_schema.as_ref(), &config.0, &row.config));
        if let Some(schema) = &manifest.config_schema
            && let Err(violations) = plugin_config::validate(schema, &config.0)
        {
            let details = serde_json::json!({ "violations": violations });
            let msg =
                format!("the config does not match the configSchema of {} ({} violations)", row.name, violations.len());
            return Err(ErrorResponse::from_error(
                ErrorCode::InvalidConfig,
                ApiError::new(ErrorCode::InvalidConfig, msg).with_details(details),
            ));
        }
        self.repo.set_config(row.id, &config.0).await.map_err(db_error)?;
        if row.wants_active()
            && let Err(f) = self.reconciler.reconcile(row.id, false).await
        {
            // Refused by the plugin: through the API, nothing is stored either.
            if f.code == ErrorCode::InvalidConfig {
                self.repo.set_config(row.id, &row.config).await.map_err(db_error)?;
                self.reconciler.hint(row.id);
            }
            return Err(failure(f));
        }
        self.get_config(name).await
    }

    /// A plugin's recent log lines (the newest 1,000 are kept), oldest first: what it logged
    /// through the host, its panics (with file and line) and its init errors. `level` keeps
    /// lines at that level or more severe (default `trace`: all); `since` keeps lines after that
    /// time (RFC 3339); `limit` keeps the newest so many (default 100, at most 1,000). With
    /// `Accept: text/event-stream`, the same path is a live tail (server-sent events, one `log`
    /// event per line: the recent ones, then each new one as it is logged; `level` applies).
    #[oai(path = "/plugins/:name/logs", method = "get", tag = "Tag::Plugins")]
    async fn logs(
        &self,
        #[oai(validator(pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"))] name: Path<String>,
        level: Query<Option<LevelParam>>,
        since: Query<Option<DateTime<Utc>>>,
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))] limit: Query<Option<u32>>,
    ) -> Result<Vec<LogLine>> {
        let row = self.row(&name).await?;
        let level = match level.0 {
            Some(LevelParam::Error) => LogLevel::Error,
            Some(LevelParam::Warn) => LogLevel::Warn,
            Some(LevelParam::Info) => LogLevel::Info,
            Some(LevelParam::Debug) => LogLevel::Debug,
            Some(LevelParam::Trace) | None => LogLevel::Trace,
        };
        let lines = self.logs.query(&row.name, level, since.0, limit.0.unwrap_or(100) as usize);
        Ok(Json(
            lines
                .into_iter()
                .map(|e| LogLine {
                    seq: e.seq,
                    at: e.at,
                    level: e.level.as_str().into(),
                    kind: e.kind.as_str().into(),
                    message: e.message,
                    fields: e.fields,
                    route: e.route,
                })
                .collect(),
        ))
    }

    /// The latest builds of a plugin (at most 50), newest first.
    #[oai(path = "/plugins/:name/builds", method = "get", tag = "Tag::Plugins")]
    async fn builds(
        &self,
        #[oai(validator(pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"))] name: Path<String>,
    ) -> Result<Vec<Build>> {
        let row = self.row(&name).await?;
        let builds = self.repo.builds(row.id, 50).await.map_err(db_error)?;
        Ok(Json(
            builds
                .into_iter()
                .map(|b| Build {
                    id: b.id,
                    source_hash: b.source_hash,
                    started_at: b.started_at,
                    duration_ms: b.duration_ms,
                    success: b.success,
                    diagnostics: b.diagnostics,
                    messages: b.messages.into_iter().map(Into::into).collect(),
                    replica: b.replica,
                    draft: b.draft,
                })
                .collect(),
        ))
    }

    /// Load a plugin now: mark it active if it is not, and wait until it serves (or say why not).
    #[oai(path = "/plugins/:name/load", method = "post", tag = "Tag::Plugins")]
    async fn load(
        &self,
        #[oai(validator(pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"))] name: Path<String>,
    ) -> Result<Plugin> {
        let row = self.row(&name).await?;
        if !row.wants_active() {
            self.repo.set_status(row.id, "active").await.map_err(db_error)?;
        }
        self.reconciler.reconcile(row.id, false).await.map_err(failure)?;
        Ok(Json(self.view(self.row(&name).await?).await?))
    }

    /// Uninstall a plugin: unload it, delete its row (endpoints, builds) and libraries, and its
    /// source if it was installed from an archive (an upload or a catalog).
    #[oai(path = "/plugins/:name", method = "delete", tag = "Tag::Plugins")]
    async fn uninstall(
        &self,
        #[oai(validator(pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"))] name: Path<String>,
    ) -> Result<Plugin> {
        let row = self.row(&name).await?;
        self.repo.delete(row.id).await.map_err(db_error)?;
        self.reconciler.reconcile(row.id, false).await.map_err(failure)?;
        let source = PathBuf::from(&row.source_path);
        // Only a directory kiln created itself, inside its install directory, is removed.
        if row.from_archive()
            && source.starts_with(&self.install_dir)
            && source != self.install_dir
            && let Err(e) = tokio::fs::remove_dir_all(&source).await
        {
            tracing::warn!(plugin = %row.name, "could not remove its source {}: {e}", source.display());
        }
        if row.from_archive() {
            let _ = tokio::fs::remove_file(crate::shared_sources::stamp_path(&self.install_dir, &row.name)).await;
        }
        Ok(Json(self.plugin(row)))
    }

    /// Rescan the plugin directories now: new crates get rows (and load), removed ones unload.
    #[oai(path = "/plugins/discover", method = "post", tag = "Tag::Plugins")]
    async fn discover(&self) -> Result<DiscoverReport> {
        let (scan, added) = discovery::record(&self.repo, &self.plugin_dirs, &self.policy).await.map_err(db_error)?;
        let mut removed = Vec::new();
        for row in self.repo.list().await.map_err(db_error)? {
            if row.origin == "discovered"
                && crate::manifest::exists_off_worker(std::path::Path::new(&row.source_path)).await == Some(false)
            {
                self.reconciler.hint(row.id);
                removed.push(row.name);
            }
        }
        Ok(Json(DiscoverReport {
            found: scan.plugins.iter().map(|m| m.name.clone()).collect(),
            added,
            removed,
            failed: scan
                .errors
                .into_iter()
                .map(|(p, e)| DiscoverFailure { path: p.to_string_lossy().into_owned(), error: e })
                .collect(),
        }))
    }

    /// Install a plugin from a `.tar.gz` of its crate: unpack it safely, build, register and
    /// load it. All or nothing: if any step fails, nothing is left behind and the answer says
    /// why (with the compiler's diagnostics for a failed build).
    #[oai(path = "/plugins/install", method = "post", tag = "Tag::Plugins")]
    async fn install(&self, form: InstallForm) -> Result<Plugin> {
        let bytes =
            form.file.into_vec().await.map_err(|e| {
                ErrorResponse::new(ErrorCode::InvalidArchive, format!("could not read the upload: {e}"))
            })?;
        let (extracted, manifest, bytes) = self.unpack(bytes, None).await?;
        Ok(Json(self.install_new(extracted, manifest, bytes, "upload").await?))
    }

    /// Publish an event: the body (any JSON) is its data. Topics are dot-separated segments of
    /// letters, digits, `_` and `-`; those under `kiln.` are kiln's own.
    #[oai(path = "/events/:topic", method = "post", tag = "Tag::Events")]
    async fn publish(
        &self,
        #[oai(validator(pattern = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$", max_length = 200))] topic: Path<String>,
        data: Json<serde_json::Value>,
    ) -> std::result::Result<PublishResponse, ErrorResponse> {
        if topic.starts_with(crate::events::topic::KILN_PREFIX) {
            let msg = format!("{:?}: topics under {:?} are kiln's own", topic.0, crate::events::topic::KILN_PREFIX);
            return Err(ErrorResponse::new(ErrorCode::TopicReserved, msg));
        }
        let event = self
            .events
            .publish(&topic, data.0, Source::Api)
            .map_err(|msg| ErrorResponse::new(ErrorCode::InvalidEvent, msg))?;
        Ok(PublishResponse::Accepted(Json(EventView::from(&*event))))
    }

    /// The most recent events (newest first, at most 500 are kept), with their deliveries.
    #[oai(path = "/events", method = "get", tag = "Tag::Events")]
    async fn events(
        &self,
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))] limit: Query<Option<u32>>,
        /// Only events whose topic matches this pattern (`orders.*`).
        #[oai(validator(pattern = r"^(\*|[A-Za-z0-9_-]+)(\.(\*|[A-Za-z0-9_-]+))*$", max_length = 200))]
        topic: Query<Option<String>>,
    ) -> Result<Vec<EventView>> {
        let pattern = match &topic.0 {
            Some(p) => Some(
                crate::events::topic::Pattern::parse(p)
                    .map_err(|msg| ErrorResponse::new(ErrorCode::InvalidEvent, msg))?,
            ),
            None => None,
        };
        let limit = limit.0.unwrap_or(100) as usize;
        let events = self.events.recent(500);
        let matching = events.iter().filter(|e| pattern.as_ref().is_none_or(|p| p.matches(&e.topic)));
        Ok(Json(matching.take(limit).map(|e| EventView::from(&**e)).collect()))
    }

    /// Every kiln server sharing this database: live ones (heartbeating) first, then those gone
    /// in the last day.
    #[oai(path = "/replicas", method = "get", tag = "Tag::Server")]
    async fn replicas(&self) -> Result<Vec<Replica>> {
        let rows = self.repo.replicas().await.map_err(db_error)?;
        Ok(Json(rows.into_iter().map(|r| Replica::new(r, self.repo.replica())).collect()))
    }

    /// Metrics in the Prometheus text format: requests per plugin, route pattern and status
    /// class, their latency, panics, timeouts, crashes, builds, loads and reloads, reconcile
    /// passes, listener connects, route tables built, events published.
    #[oai(path = "/metrics", method = "get", tag = "Tag::Server")]
    async fn metrics(&self) -> MetricsResponse {
        let metrics = self.reconciler.metrics();
        metrics.catch_up(self.reconciler.tables_built(), self.events.published());
        MetricsResponse::Ok(poem_openapi::payload::PlainText(metrics.render()))
    }

    /// Health of the server, the database and the listener.
    #[oai(path = "/health", method = "get", tag = "Tag::Server")]
    async fn health(&self) -> HealthResponse {
        let counts = self.repo.state_counts().await.ok();
        let db_up = counts.is_some();
        let listener_up = self.listener_up.load(Ordering::Relaxed);
        let plugins = counts.map(|rows| {
            let mut c = PluginCounts::default();
            for (state, with_error, n) in rows {
                let n = n as u64;
                match state.as_str() {
                    "loaded" if with_error => c.loaded_with_error += n,
                    "loaded" => c.loaded += n,
                    "failed" => c.failed += n,
                    "waiting" => c.waiting += n,
                    "building" => c.building += n,
                    "pending" => c.pending += n,
                    _ => c.inactive += n,
                }
            }
            c
        });
        let health = Health {
            status: if db_up && listener_up { "ok" } else { "degraded" }.into(),
            replica: self.repo.replica().to_string(),
            database: if db_up { "up" } else { "down" }.into(),
            listener: if listener_up { "connected" } else { "disconnected" }.into(),
            plugins_served: self.reconciler.served_count() as u64,
            builds_run: self.reconciler.builds_run(),
            reconciling: self.reconciler.reconciling() as u64,
            route_tables_built: self.reconciler.tables_built(),
            plugins,
            version: env!("CARGO_PKG_VERSION").into(),
        };
        if db_up && listener_up { HealthResponse::Ok(Json(health)) } else { HealthResponse::Degraded(Json(health)) }
    }
}

impl AdminApi {
    /// The API's view of one row (see [`AdminApi::plugins`]).
    async fn view(&self, row: PluginRow) -> std::result::Result<Plugin, ErrorResponse> {
        let id = row.id;
        Ok(self.plugins(vec![row], Some(&[id])).await?.pop().expect("one row in, one plugin out"))
    }

    /// The API's view of rows (`ids`: theirs, `None` for all): with what every live replica
    /// observed, and the subscriptions of the version serving here.
    async fn plugins(
        &self,
        rows: Vec<PluginRow>,
        ids: Option<&[i64]>,
    ) -> std::result::Result<Vec<Plugin>, ErrorResponse> {
        let (observed, live) = self.repo.observed(ids).await.map_err(db_error)?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let id = row.id;
                let mine: Vec<_> = observed.iter().filter(|o| o.plugin_id == id).collect();
                self.plugin(row).with_replicas(&live, &mine)
            })
            .collect())
    }

    /// The API's view of a row, with the subscriptions of the version serving now.
    fn plugin(&self, row: PluginRow) -> Plugin {
        let mut plugin = Plugin::from(row);
        plugin.replica = self.repo.replica().to_string();
        plugin.events = self
            .events
            .stats(&plugin.name)
            .into_iter()
            .map(|s| Subscription {
                pattern: s.pattern,
                handler: s.handler,
                delivered: s.delivered,
                failed: s.failed,
                timed_out: s.timed_out,
                dropped: s.dropped,
            })
            .collect();
        plugin
    }

    async fn row(&self, name: &str) -> std::result::Result<PluginRow, ErrorResponse> {
        validate_name(name).map_err(|msg| ErrorResponse::new(ErrorCode::InvalidName, msg))?;
        self.repo
            .get_by_name(name)
            .await
            .map_err(db_error)?
            .ok_or_else(|| ErrorResponse::new(ErrorCode::PluginNotFound, format!("no plugin named {name:?}")))
    }
}

fn db_error(e: RepoError) -> ErrorResponse {
    let code = ErrorCode::from(&e);
    match code {
        ErrorCode::DatabaseRefused => tracing::info!("{e}"),
        _ => tracing::warn!("{e}"),
    }
    ErrorResponse::new(code, e.to_string())
}

fn internal(msg: String) -> ErrorResponse {
    tracing::error!("{msg}");
    ErrorResponse::new(ErrorCode::Internal, msg)
}

fn manifest_code(e: &ManifestError) -> ErrorCode {
    match e {
        ManifestError::NotFound(_) => ErrorCode::ManifestNotFound,
        _ => ErrorCode::InvalidManifest,
    }
}

fn failure(f: Failure) -> ErrorResponse {
    ErrorResponse::new(f.code, f.message)
}
