//! The reconciler: the heart of kiln. It brings what the server serves (actual state) to what the
//! `plugins` table asks for (desired state), one plugin at a time.
//!
//! Everything else only feeds it: the listener forwards NOTIFY hints, startup and reconnects ask
//! for a full resync, the admin API asks for a pass and waits for its result. A hint only means
//! "look at plugin X again": each pass re-reads the row, so handling a hint twice is harmless.
//!
//! Each plugin id has a worker task. Hints that arrive while a pass runs are coalesced into one
//! further pass (no timers), and different plugins proceed independently: a long build of one
//! does not delay a toggle of another (builds themselves queue in the compiler).
//!
//! A new version is built, loaded, initialized and checked for route conflicts before one atomic
//! publish of the route table. Until then the previous version serves; after it, the previous
//! version is dropped here, and its cleanup runs when its last in-flight request ends (on the
//! blocking pool: see `LoadedPlugin`'s `Drop`).

use crate::compiler::{BuildError, Compiler};
use crate::error_code::ErrorCode;
use crate::loader::{Configured, LoadError, LoadedPlugin};
use crate::manifest::{Manifest, ManifestError};
use crate::repo::{Loaded, NewEndpoint, PluginRow, Repo, RepoError};
use crate::routes::{Pattern, RouteSink};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// Why a pass could not bring a plugin to its desired state.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Database(#[from] RepoError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The crate at `source_path` is a different package than the row names.
    #[error("the crate at {dir} is the package {package:?}, but the row is named {row:?}")]
    NameMismatch { dir: PathBuf, package: String, row: String },
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A route is malformed.
    #[error("invalid route: {0}")]
    InvalidRoute(String),
    /// A route overlaps another plugin's or the admin API's.
    #[error("route conflict: {0}")]
    RouteConflict(String),
    /// The plugin's `configure` hook refused the new configuration.
    #[error("the plugin refused the new config: {0}")]
    ConfigRejected(String),
    /// The row's config does not match the plugin's configSchema.
    #[error("invalid config: {}", .0.iter().map(|v| format!("{} {}", if v.path.is_empty() { "(root)" } else { &v.path }, v.message)).collect::<Vec<_>>().join("; "))]
    InvalidConfig(Vec<crate::plugin_config::Violation>),
}

impl ReconcileError {
    /// A stable code for API answers and rows.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Database(e) => ErrorCode::from(e),
            Self::Manifest(ManifestError::NotFound(_)) => ErrorCode::ManifestNotFound,
            Self::Manifest(_) | Self::NameMismatch { .. } => ErrorCode::InvalidManifest,
            Self::Build(_) => ErrorCode::BuildFailed,
            Self::Load(LoadError::AbiMismatch { .. }) => ErrorCode::AbiMismatch,
            Self::Load(LoadError::EntrypointNotFound { .. }) => ErrorCode::EntrypointNotFound,
            Self::Load(LoadError::Init(_)) => ErrorCode::InitFailed,
            Self::Load(_) => ErrorCode::LoadError,
            Self::InvalidRoute(_) => ErrorCode::InvalidRoute,
            Self::RouteConflict(_) => ErrorCode::RouteConflict,
            Self::InvalidConfig(_) | Self::ConfigRejected(_) => ErrorCode::InvalidConfig,
        }
    }
}

/// What a pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A new version (or a fresh instance) now serves; `built` says whether cargo ran.
    Loaded { built: bool },
    /// The version already serving is the wanted one.
    Unchanged,
    /// The serving instance applied a new configuration in place.
    Configured,
    /// The plugin is disabled and serves nothing.
    Inactive,
    /// The row is gone and nothing serves for it.
    Gone,
}

/// A failed pass, as reported to waiters (cloneable: several waiters may share one pass).
#[derive(Debug, Clone)]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
}

type Reply = oneshot::Sender<Result<Outcome, Failure>>;

/// A request for a pass over one plugin.
struct Job {
    /// Reload even if the source is unchanged (a fresh instance).
    force: bool,
    reply: Option<Reply>,
}

/// A plugin version being served.
struct Served {
    hash: String,
    /// The configuration the instance was created with (defaults applied).
    config: serde_json::Value,
    plugin: Arc<LoadedPlugin>,
}

/// Handle to the reconciler; cheap to clone.
#[derive(Clone)]
pub struct Reconciler {
    inner: Arc<Inner>,
}

struct Inner {
    repo: Repo,
    compiler: Arc<Compiler>,
    sink: Arc<dyn RouteSink>,
    /// The versions served now, by plugin id. The lock is held across conflict check and publish
    /// so that two plugins loading at once cannot both claim a path.
    served: Mutex<BTreeMap<i64, Served>>,
    /// The worker of each plugin id.
    workers: Mutex<HashMap<i64, mpsc::UnboundedSender<Job>>>,
    /// Plugins with a pass running or queued (reported by /health; 0 means settled).
    busy: std::sync::atomic::AtomicUsize,
}

impl Reconciler {
    pub fn new(repo: Repo, compiler: Arc<Compiler>, sink: Arc<dyn RouteSink>) -> Self {
        Self {
            inner: Arc::new(Inner {
                repo,
                compiler,
                sink,
                served: Mutex::new(BTreeMap::new()),
                workers: Mutex::new(HashMap::new()),
                busy: Default::default(),
            }),
        }
    }

    /// "Look at plugin `id` again", without waiting.
    pub fn hint(&self, id: i64) {
        self.send(id, Job { force: false, reply: None });
    }

    /// Runs a pass over plugin `id` (starting after this call) and waits for its result.
    /// `force` reloads a fresh instance even when the source did not change.
    pub async fn reconcile(&self, id: i64, force: bool) -> Result<Outcome, Failure> {
        let (tx, rx) = oneshot::channel();
        self.send(id, Job { force, reply: Some(tx) });
        rx.await
            .unwrap_or_else(|_| Err(Failure { code: ErrorCode::Internal, message: "the reconciler stopped".into() }))
    }

    /// Hints every plugin that has a row or is served: after startup, a reconnect, or as the
    /// periodic safety net.
    pub async fn resync_all(&self) -> Result<usize, RepoError> {
        let rows = self.inner.repo.list().await?;
        let mut ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        ids.extend(self.inner.served.lock().expect("served lock").keys());
        ids.sort_unstable();
        ids.dedup();
        for &id in &ids {
            self.hint(id);
        }
        Ok(ids.len())
    }

    /// Stops serving every plugin and runs their cleanup (at shutdown).
    pub async fn retire_all(&self) {
        let served = std::mem::take(&mut *self.inner.served.lock().expect("served lock"));
        if let Err(e) = self.inner.sink.publish(&[]) {
            tracing::error!("could not clear the route table: {e}");
        }
        // At shutdown the cleanups run here and are waited for: a cleanup merely queued on the
        // blocking pool could be cancelled as the runtime exits.
        let plugins: Vec<Arc<LoadedPlugin>> = served.into_values().map(|s| s.plugin).collect();
        let retire = move || {
            for plugin in plugins {
                match Arc::try_unwrap(plugin) {
                    Ok(p) => p.retire_now(),
                    Err(still_used) => drop(still_used),
                }
            }
        };
        let _ = tokio::task::spawn_blocking(retire).await;
    }

    /// How many plugins have a pass running or queued.
    pub fn reconciling(&self) -> usize {
        self.inner.busy.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many plugin builds ran since start.
    pub fn builds_run(&self) -> u64 {
        self.inner.compiler.builds_run()
    }

    /// How many plugin versions serve now.
    pub fn served_count(&self) -> usize {
        self.inner.served.lock().expect("served lock").len()
    }

    fn send(&self, id: i64, job: Job) {
        let mut workers = self.inner.workers.lock().expect("workers lock");
        let tx = workers.entry(id).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(worker(self.inner.clone(), id, rx));
            tx
        });
        // Counted before it is queued, so /health never shows 0 while a hint waits.
        self.inner.busy.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // The worker lives as long as the reconciler, so the send cannot fail.
        let _ = tx.send(job);
    }
}

/// The loop of one plugin's worker: take every pending job, run one pass, answer them all.
async fn worker(inner: Arc<Inner>, id: i64, mut rx: mpsc::UnboundedReceiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut force = first.force;
        let mut replies: Vec<Reply> = first.reply.into_iter().collect();
        let mut jobs = 1;
        while let Ok(more) = rx.try_recv() {
            force |= more.force;
            replies.extend(more.reply);
            jobs += 1;
        }
        let result = inner.pass(id, force).await.map_err(|e| {
            let failure = Failure { code: e.code(), message: e.to_string() };
            tracing::warn!(plugin_id = id, code = failure.code.as_str(), "{}", failure.message);
            failure
        });
        inner.busy.fetch_sub(jobs, std::sync::atomic::Ordering::Relaxed);
        for reply in replies {
            let _ = reply.send(result.clone());
        }
    }
}

impl Inner {
    /// One pass over plugin `id`.
    async fn pass(&self, id: i64, force: bool) -> Result<Outcome, ReconcileError> {
        let Some(row) = self.repo.get(id).await? else {
            // Deleted: its endpoint rows went with it (ON DELETE CASCADE); its libraries go too.
            if let Some(name) = self.retire(id) {
                self.compiler.collect_garbage(&name, None);
            }
            return Ok(Outcome::Gone);
        };
        if !row.wants_active() {
            self.retire(id);
            if row.state != "inactive" || row.binary_path.is_some() {
                self.repo.record_unloaded(id).await?;
            }
            return Ok(Outcome::Inactive);
        }
        let mut serving = self.served.lock().expect("served lock").contains_key(&id);
        match self.load_wanted(&row, force).await {
            Ok(outcome) => Ok(outcome),
            Err(e) => {
                if matches!(e, ReconcileError::Manifest(ManifestError::NotFound(_)))
                    && crate::manifest::exists_off_worker(std::path::Path::new(&row.source_path)).await == Some(false)
                {
                    // The crate was removed: that is a decision, not a failed build. Unload.
                    self.retire(id);
                    serving = false;
                }
                let text = format!("{}: {e}", e.code());
                if let Err(db) = self.repo.record_failed(id, &text, serving).await {
                    tracing::warn!(plugin = %row.name, "could not record the failure: {db}");
                }
                Err(e)
            }
        }
    }

    /// Makes the wanted version of an active plugin serve.
    async fn load_wanted(&self, row: &PluginRow, force: bool) -> Result<Outcome, ReconcileError> {
        let manifest = Manifest::read_off_worker(&PathBuf::from(&row.source_path)).await?;
        if manifest.name != row.name {
            return Err(ReconcileError::NameMismatch {
                dir: manifest.dir,
                package: manifest.name,
                row: row.name.clone(),
            });
        }
        // An invalid config is not applied: the instance serving keeps its last good one.
        let config = match &manifest.config_schema {
            Some(schema) => {
                crate::plugin_config::validate(schema, &row.config).map_err(ReconcileError::InvalidConfig)?
            }
            None => row.config.clone(),
        };
        let hash = self.compiler.source_hash(&manifest).await?;
        let current = self
            .served
            .lock()
            .expect("served lock")
            .get(&row.id)
            .map(|s| (s.hash.clone(), s.config.clone(), s.plugin.clone()));
        if let Some((current_hash, current_config, plugin)) = &current
            && !force
            && *current_hash == hash
            && *current_config == config
        {
            // Serving the wanted version; make sure the row says so (it may show an old error).
            if row.state != "loaded" || row.error.is_some() || row.loaded_hash.as_deref() != Some(hash.as_str()) {
                self.record_loaded(row.id, &manifest, &hash, plugin).await?;
            }
            return Ok(Outcome::Unchanged);
        }
        // Same code, new config: the plugin's hook may apply it in place (no reload at all).
        if let Some((current_hash, current_config, plugin)) = &current
            && !force
            && *current_hash == hash
            && *current_config != config
            && !manifest.reload_on_config_change
        {
            let (hook_plugin, json) = (plugin.clone(), serde_json::to_vec(&config).expect("a Value always serializes"));
            let answer = tokio::task::spawn_blocking(move || hook_plugin.configure(&json))
                .await
                .map_err(|e| ReconcileError::ConfigRejected(format!("the configure task failed: {e}")))?;
            match answer.map_err(ReconcileError::ConfigRejected)? {
                Configured::Applied => {
                    if let Some(s) = self.served.lock().expect("served lock").get_mut(&row.id)
                        && Arc::ptr_eq(&s.plugin, plugin)
                    {
                        s.config = config;
                    }
                    self.record_loaded(row.id, &manifest, &hash, plugin).await?;
                    tracing::info!(plugin = %row.name, "configuration applied in place");
                    return Ok(Outcome::Configured);
                }
                Configured::Reload => {} // a fresh instance below
            }
        }
        if current.is_none() {
            self.repo.record_building(row.id).await?;
        }
        let artifact = self.build(row.id, &manifest, &hash).await?;
        let path = artifact.path.clone();
        let config_json = serde_json::to_vec(&config).expect("a Value always serializes");
        let plugin = tokio::task::spawn_blocking(move || LoadedPlugin::load(&path, &config_json))
            .await
            .map_err(|e| LoadError::Init(format!("the load task failed: {e}")))??;
        let plugin = Arc::new(plugin);
        if let Err(e) = self.publish(row, &hash, config, plugin.clone()) {
            drop(plugin);
            return Err(e);
        }
        self.record_loaded(row.id, &manifest, &hash, &plugin).await?;
        tracing::info!(plugin = %row.name, built = artifact.built, library = %artifact.path.display(), "serving");
        self.compiler.collect_garbage(&row.name, Some(&artifact.path));
        Ok(Outcome::Loaded { built: artifact.built })
    }

    /// Checks the new version's routes and, if they are sound, serves it in place of the old one.
    fn publish(
        &self,
        row: &PluginRow,
        hash: &str,
        config: serde_json::Value,
        plugin: Arc<LoadedPlugin>,
    ) -> Result<(), ReconcileError> {
        let description = plugin.description();
        if description.name != row.name {
            return Err(ReconcileError::NameMismatch {
                dir: PathBuf::from(&row.source_path),
                package: description.name.clone(),
                row: row.name.clone(),
            });
        }
        let mut mine = Vec::new();
        for r in &description.routes {
            let p = Pattern::parse(&r.path).map_err(ReconcileError::InvalidRoute)?;
            if let Some(why) = p.admin_conflict() {
                return Err(ReconcileError::RouteConflict(why));
            }
            if mine.iter().any(|(m, q): &(&str, Pattern)| *m == r.method && *q == p) {
                return Err(ReconcileError::InvalidRoute(format!("{} {} is declared twice", r.method, r.path)));
            }
            mine.push((r.method.as_str(), p));
        }
        let mut served = self.served.lock().expect("served lock");
        for (other_id, other) in served.iter() {
            if *other_id == row.id {
                continue;
            }
            for r in &other.plugin.description().routes {
                let theirs = Pattern::parse(&r.path).map_err(ReconcileError::InvalidRoute)?;
                if let Some((_, p)) = mine.iter().find(|(_, p)| p.overlaps(&theirs)) {
                    return Err(ReconcileError::RouteConflict(format!(
                        "path {p} overlaps {theirs}, served by plugin {:?}",
                        other.plugin.description().name
                    )));
                }
            }
        }
        let previous = served.insert(row.id, Served { hash: hash.to_string(), config, plugin });
        let all: Vec<Arc<LoadedPlugin>> = served.values().map(|s| s.plugin.clone()).collect();
        if let Err(e) = self.sink.publish(&all) {
            // Put back what served before: the route table did not change.
            let failed = match previous {
                Some(p) => served.insert(row.id, p),
                None => served.remove(&row.id),
            };
            drop(served);
            if let Some(f) = failed {
                drop(f.plugin);
            }
            return Err(ReconcileError::InvalidRoute(e));
        }
        drop(served);
        if let Some(old) = previous {
            drop(old.plugin);
        }
        Ok(())
    }

    /// Builds through the compiler and records every build that ran in the history.
    async fn build(
        &self,
        id: i64,
        manifest: &Manifest,
        hash: &str,
    ) -> Result<crate::compiler::Artifact, ReconcileError> {
        let started_at = chrono::Utc::now();
        let clock = std::time::Instant::now();
        let result = self.compiler.build(manifest, hash).await;
        let diagnostics = match &result {
            Ok(a) if !a.built => return Ok(a.clone()),
            Ok(_) => None,
            Err(e) => Some(e.to_string()),
        };
        let ms = clock.elapsed().as_millis() as i64;
        if let Err(e) = self.repo.record_build(id, hash, started_at, ms, diagnostics.as_deref()).await {
            tracing::warn!(plugin = %manifest.name, "could not record the build: {e}");
        }
        Ok(result?)
    }

    /// Stops serving plugin `id`, if it serves. Returns the name of what it served.
    fn retire(&self, id: i64) -> Option<String> {
        let mut served = self.served.lock().expect("served lock");
        let old = served.remove(&id)?;
        let all: Vec<Arc<LoadedPlugin>> = served.values().map(|s| s.plugin.clone()).collect();
        if let Err(e) = self.sink.publish(&all) {
            // Removing routes from a valid table cannot create a conflict.
            tracing::error!("could not publish the route table without plugin {id}: {e}");
        }
        drop(served);
        let name = old.plugin.description().name.clone();
        tracing::info!(plugin = %name, "unloaded");
        drop(old.plugin);
        Some(name)
    }

    async fn record_loaded(
        &self,
        id: i64,
        manifest: &Manifest,
        hash: &str,
        plugin: &LoadedPlugin,
    ) -> Result<(), ReconcileError> {
        let d = plugin.description();
        let endpoints: Vec<NewEndpoint> = d
            .routes
            .iter()
            .map(|r| NewEndpoint { method: r.method.clone(), path: r.path.clone(), handler: r.handler.clone() })
            .collect();
        self.repo
            .record_loaded(
                id,
                &Loaded {
                    manifest_path: &manifest.manifest_path.to_string_lossy(),
                    binary_path: &plugin.binary_path().to_string_lossy(),
                    hash,
                    description: &d.description,
                    version: &d.version,
                    author: &d.author,
                    kind: &manifest.kind,
                    endpoints: &endpoints,
                },
            )
            .await?;
        Ok(())
    }
}
