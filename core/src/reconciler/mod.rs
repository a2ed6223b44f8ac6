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
//! - `pass.rs`: one pass over one plugin (build → load → init → publish → record).
//! - `ownership.rs`: the served set, path ownership and the atomic publish.
//! - `publishing.rs`: publishing and recording loaded versions, many in one transaction.
//! - `served_set.rs`: the served versions, with their route patterns indexed by shape.
//!
//! This folder is the one place where what kiln serves changes.

mod finishing;
mod ownership;
mod pass;
mod publishing;
mod served_set;

use crate::compiler::{BuildError, Compiler};
use crate::error_code::ErrorCode;
use crate::events::EventBus;
use crate::host::logs::LogStore;
use crate::load_marker::LoadMarkers;
use crate::loader::{LoadError, LoadedPlugin, Retirements};
use crate::manifest::ManifestError;
use crate::plugin_db::{PluginDatabases, ScopeError};
use crate::repo::{PluginRow, Repo, RepoError};
use crate::routes::RouteSink;
use ownership::Served;
use served_set::ServedSet;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
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
    /// The plugin's database scope (role, schema, grants, migrations) could not be applied.
    #[error(transparent)]
    Scope(#[from] ScopeError),
    /// A route is malformed.
    #[error("invalid route: {0}")]
    InvalidRoute(String),
    /// A route overlaps an older plugin's or the admin API's.
    #[error("route conflict: {0}")]
    RouteConflict(String),
    /// The plugin's `configure` hook refused the new configuration.
    #[error("the plugin refused the new config: {0}")]
    ConfigRejected(String),
    /// The row's config does not match the plugin's configSchema.
    #[error("invalid config: {}", .0.iter().map(|v| format!("{} {}", if v.path.is_empty() { "(root)" } else { &v.path }, v.message)).collect::<Vec<_>>().join("; "))]
    InvalidConfig(Vec<crate::plugin_config::Violation>),
    /// The row changed (or went) while the pass worked: the pass starts over. Never reported.
    #[error("the row changed during the pass")]
    Superseded,
    /// This version took the server down while it was loaded; it is skipped until the row or
    /// the source changes.
    #[error("{0}")]
    Quarantined(String),
    /// Its process crashed too often (process isolation); it is not restarted until the row or
    /// the source changes. The message starts with how it last died.
    #[error("{0}")]
    CrashLoop(String),
    /// The server is shutting down: nothing more is published.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// A fault in kiln (logged where it happened).
    #[error("{0}")]
    Internal(String),
    /// A plugin it depends on does not serve (in a version that will do): it waits.
    #[error("{0}")]
    DependencyMissing(String),
    /// It depends on itself through others: the cycle, named.
    #[error("{0}")]
    DependencyCycle(String),
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
            Self::Load(LoadError::InHost { code, .. }) => match *code {
                crate::isolation::child::LOAD_ABI => ErrorCode::AbiMismatch,
                crate::isolation::child::LOAD_ENTRYPOINT => ErrorCode::EntrypointNotFound,
                _ => ErrorCode::LoadError,
            },
            Self::Quarantined(_) => ErrorCode::CrashedDuringLoad,
            Self::CrashLoop(_) => ErrorCode::CrashLoop,
            Self::Load(_) => ErrorCode::LoadError,
            Self::Scope(e) => e.code(),
            Self::InvalidRoute(_) => ErrorCode::InvalidRoute,
            Self::RouteConflict(_) => ErrorCode::RouteConflict,
            Self::InvalidConfig(_) | Self::ConfigRejected(_) => ErrorCode::InvalidConfig,
            Self::DependencyMissing(_) => ErrorCode::DependencyMissing,
            Self::DependencyCycle(_) => ErrorCode::DependencyCycle,
            Self::Superseded | Self::ShuttingDown | Self::Internal(_) => ErrorCode::Internal,
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
    /// The plugin's row (`None`: no such row), read in a batch after whatever caused this job;
    /// the pass uses it instead of reading the row itself. See [`Reconciler::hint_rows`].
    read: Option<Read>,
}

/// A row read in a batch, and the stamp taken just before the read (see `Inner::stamp`).
type Read = (u64, Option<PluginRow>);

/// A plugin's worker: where its jobs go, and its task.
type Worker = (mpsc::UnboundedSender<Job>, tokio::task::JoinHandle<()>);

/// Handle to the reconciler; cheap to clone.
#[derive(Clone)]
pub struct Reconciler {
    inner: Arc<Inner>,
}

struct Inner {
    repo: Repo,
    /// Counts builds, loads and passes (`GET /metrics`).
    metrics: Arc<crate::metrics::Metrics>,
    compiler: Arc<Compiler>,
    /// The compiler as the replicas share it: a library built once among them.
    builds: Arc<crate::shared_builds::SharedBuilds>,
    sink: Arc<dyn RouteSink>,
    /// The versions served now, by plugin id. The lock is held across conflict check and
    /// insertion so that two plugins loading at once cannot both claim a path.
    served: Mutex<ServedSet<Served>>,
    /// Counts the changes of `served` (bumped under its lock).
    changes: AtomicU64,
    /// The change the route table shows (`ownership::show`).
    shown: tokio::sync::watch::Sender<u64>,
    /// Wakes the task that builds route tables (`ownership::publisher`).
    table_wanted: Arc<tokio::sync::Notify>,
    /// Route tables built so far.
    tables_built: AtomicU64,
    /// Where passes hand loaded versions over to be published and recorded in batches
    /// (`publishing::recorder`).
    to_publish: mpsc::UnboundedSender<publishing::Publish>,
    /// Stamps of row reads, in the order the reads started: a pass never acts on a row read
    /// before the one its plugin's last pass acted on (a resync's list can be older than the
    /// row a hint's pass read meanwhile).
    stamps: AtomicU64,
    /// The worker of each plugin id, and its task (awaited at shutdown).
    workers: Mutex<HashMap<i64, Worker>>,
    /// Plugins with a pass running or queued (reported by /health; 0 means settled).
    busy: AtomicUsize,
    /// Plugins whose hints the listener holds during a NOTIFY storm (`crate::storm`): not
    /// settled either.
    held: AtomicUsize,
    /// Plugins refused a path an older plugin owns. Hinted whenever a version stops serving or
    /// is replaced, so that a freed path goes to its claimant at once (not at the next resync).
    waiting: Mutex<BTreeSet<i64>>,
    /// Counts the hints of waiting plugins (`hint_waiting`). A pass that ends up waiting checks
    /// it against the count it saw when it began: if it moved, what it waits for may have been
    /// freed after it looked and before it joined `waiting`, and it passes again.
    freed: AtomicU64,
    /// Set when shutdown begins (under the `served` lock): no job is taken and nothing is
    /// published any more.
    closed: AtomicBool,
    /// Every loaded instance until its cleanup ran (awaited at shutdown).
    retirements: Arc<Retirements>,
    /// Where a load in progress is recorded, for the next start if this process dies in it.
    markers: LoadMarkers,
    /// Every plugin's recent logs, panics and init errors (the host keeps them).
    logs: Arc<LogStore>,
    /// Every plugin's database scope.
    databases: Arc<PluginDatabases>,
    /// The dependencies each plugin's manifest declared when its pass last read it, by name:
    /// what cycles are found in.
    declared: Mutex<HashMap<String, Vec<String>>>,
    /// Where kiln announces failures and config changes (`kiln.plugin.*`), and plugins publish.
    events: Arc<EventBus>,
    /// The `kiln` binary run as the process of an isolated plugin.
    host_exe: std::path::PathBuf,
    /// Where isolated instances report their crashes (see `crash_reports`).
    crashes: mpsc::UnboundedSender<crate::isolation::CrashReport>,
    /// Plugins with a higher id were added while this server ran: a staged build serves their
    /// first version from a draft too (see [`Reconciler::draft_new_plugins_after`]).
    new_after: std::sync::atomic::AtomicI64,
    /// The optimized builds of drafts that serve (a staged build).
    finishing: finishing::Finishing,
    /// This `Inner` itself, to start workers from `&self`.
    me: Weak<Inner>,
}

/// Records what isolated instances report of their crashes: the restart count and last crash
/// on this replica's row, and for a crash loop the quarantine of that version, then a pass that
/// retires the instance (the row is `failed` until it or the source changes).
async fn record_crashes(me: Weak<Inner>, mut reports: mpsc::UnboundedReceiver<crate::isolation::CrashReport>) {
    while let Some(report) = reports.recv().await {
        let Some(inner) = me.upgrade() else { return };
        inner.metrics.crashes.with_label_values(&[&report.name]).inc();
        let written = if report.failed {
            let error = format!("{}: {}", ErrorCode::CrashLoop, report.last_crash);
            inner.repo.record_crashed(report.plugin_id, &report.hash, &error).await
        } else {
            let restarts = i32::try_from(report.restarts).unwrap_or(i32::MAX);
            inner.repo.record_restart(report.plugin_id, restarts, &report.last_crash).await
        };
        if let Err(e) = written {
            tracing::warn!(plugin = %report.name, "could not record the crash: {e}");
        }
        let data = serde_json::json!({
            "name": report.name, "restarts": report.restarts, "error": report.last_crash, "failed": report.failed
        });
        let _ = inner.events.publish("kiln.plugin.crashed", data, crate::events::Source::Kiln);
        if report.failed {
            inner.hint(report.plugin_id);
        }
    }
}

/// Where the reconciler reports what happens: plugins' logs, the event bus (`kiln.plugin.*`),
/// and the metrics.
pub struct Reporting {
    pub logs: Arc<LogStore>,
    pub events: Arc<EventBus>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The `kiln` binary that isolated plugins run in (`kiln plugin-host`).
    pub host_exe: std::path::PathBuf,
}

impl Reconciler {
    pub fn new(
        repo: Repo,
        builds: Arc<crate::shared_builds::SharedBuilds>,
        sink: Arc<dyn RouteSink>,
        markers: LoadMarkers,
        databases: Arc<PluginDatabases>,
        reporting: Reporting,
    ) -> Self {
        let Reporting { logs, events, metrics, host_exe } = reporting;
        let (crashes, crash_reports) = mpsc::unbounded_channel();
        let (to_publish, handed) = mpsc::unbounded_channel();
        let reconciler = Self {
            inner: Arc::new_cyclic(|me| Inner {
                repo,
                metrics,
                compiler: builds.compiler().clone(),
                builds,
                sink,
                served: Default::default(),
                changes: Default::default(),
                shown: tokio::sync::watch::Sender::new(0),
                table_wanted: Default::default(),
                tables_built: Default::default(),
                to_publish,
                stamps: Default::default(),
                workers: Mutex::new(HashMap::new()),
                busy: Default::default(),
                held: Default::default(),
                waiting: Default::default(),
                freed: Default::default(),
                closed: Default::default(),
                retirements: Default::default(),
                markers,
                logs,
                databases,
                declared: Default::default(),
                events,
                host_exe,
                crashes,
                finishing: Default::default(),
                new_after: std::sync::atomic::AtomicI64::new(i64::MAX),
                me: me.clone(),
            }),
        };
        let (me, wanted) = (Arc::downgrade(&reconciler.inner), reconciler.inner.table_wanted.clone());
        tokio::spawn(ownership::publisher(me.clone(), wanted));
        tokio::spawn(publishing::recorder(me.clone(), handed));
        tokio::spawn(record_crashes(me, crash_reports));
        reconciler
    }

    /// "Look at plugin `id` again", without waiting.
    pub fn hint(&self, id: i64) {
        self.inner.hint(id);
    }

    /// "Look at these plugins again" (the rows of one statement): their rows are read in one
    /// query, here, and each pass starts from its plugin's row instead of reading it (a bulk
    /// edit of 1,000 rows: one query, not 1,000). The rows are read after the change that
    /// caused the hint, so they are as true as a read in the pass.
    pub async fn hint_rows(&self, ids: &[i64]) {
        let stamp = self.inner.stamp();
        match self.inner.repo.get_many(ids).await {
            Ok(rows) => {
                let mut rows: HashMap<i64, PluginRow> = rows.into_iter().map(|r| (r.id, r)).collect();
                for &id in ids {
                    self.inner.send(id, Job { force: false, reply: None, read: Some((stamp, rows.remove(&id))) });
                }
            }
            Err(e) => {
                tracing::warn!("could not read {} plugin rows at once ({e}); each pass reads its own", ids.len());
                for &id in ids {
                    self.hint(id);
                }
            }
        }
    }

    /// Runs a pass over plugin `id` (starting after this call) and waits for its result.
    /// `force` reloads a fresh instance even when the source did not change.
    pub async fn reconcile(&self, id: i64, force: bool) -> Result<Outcome, Failure> {
        let (tx, rx) = oneshot::channel();
        self.inner.send(id, Job { force, reply: Some(tx), read: None });
        rx.await.unwrap_or_else(|_| Err(shutting_down()))
    }

    /// Hints every plugin that has a row or is served: after startup, a reconnect, or as the
    /// periodic safety net. Each pass starts from the row read here (one query for all).
    pub async fn resync_all(&self) -> Result<usize, RepoError> {
        let stamp = self.inner.stamp();
        let rows = self.inner.repo.list().await?;
        let served: Vec<i64> = self.inner.served.lock().expect("served lock").keys().copied().collect();
        // Served but not listed: its row went, or came after the list (its pass reads it).
        let unlisted: Vec<i64> =
            served.into_iter().filter(|id| rows.binary_search_by_key(id, |r| r.id).is_err()).collect();
        let n = rows.len() + unlisted.len();
        for row in rows {
            self.inner.send(row.id, Job { force: false, reply: None, read: Some((stamp, Some(row))) });
        }
        for id in unlisted {
            self.hint(id);
        }
        Ok(n)
    }

    /// Shutdown, once what feeds the reconciler has stopped: takes no more jobs, lets the passes
    /// in progress end (none publishes any more), stops serving every plugin, and waits until
    /// every instance ever loaded has run its cleanup, exactly once. Instances still held by
    /// requests are waited for at most `patience`.
    pub async fn shut_down(&self, patience: Duration) {
        {
            let _served = self.inner.served.lock().expect("served lock");
            self.inner.closed.store(true, Ordering::SeqCst);
        }
        // A draft serves until the end; builds in progress are stopped (a cold build could take
        // minutes), so the passes waiting for them end now.
        self.inner.finishing.cancel_all();
        self.inner.compiler.stop();
        let workers: Vec<_> = self.inner.workers.lock().expect("workers lock").drain().map(|(_, w)| w).collect();
        for (tx, task) in workers {
            drop(tx); // the worker ends after the jobs it has
            let _ = task.await;
        }
        self.inner.retire_all().await;
        if tokio::time::timeout(patience, self.inner.retirements.all_done()).await.is_err() {
            tracing::warn!(
                pending = self.inner.retirements.pending(),
                "plugin instances still in use after {patience:?}: their cleanup did not run"
            );
        }
    }

    /// With a staged build profile, serve from a draft first not only edits of plugins that
    /// serve but also plugins whose rows have an id above `id` (those added while the server
    /// runs: a start, whose plugins all come at once, builds them optimized directly).
    pub fn draft_new_plugins_after(&self, id: i64) {
        self.inner.new_after.store(id, Ordering::Relaxed);
    }

    /// How many plugins have a pass running or queued, or a hint held back by the listener
    /// during a storm.
    pub fn reconciling(&self) -> usize {
        self.inner.busy.load(Ordering::Relaxed) + self.inner.held.load(Ordering::Relaxed)
    }

    /// The listener holds the hints of `n` plugins (a storm; see `crate::storm`).
    pub fn set_held(&self, n: usize) {
        self.inner.held.store(n, Ordering::Relaxed);
    }

    /// How many plugin builds ran since start.
    pub fn builds_run(&self) -> u64 {
        self.inner.compiler.builds_run()
    }

    /// This server's metrics.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.inner.metrics
    }

    /// How many route tables were built since start (one per batch of changes).
    pub fn tables_built(&self) -> u64 {
        self.inner.tables_built.load(Ordering::Relaxed)
    }

    /// How many plugin versions serve now.
    pub fn served_count(&self) -> usize {
        self.inner.served.lock().expect("served lock").len()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.table_wanted.notify_one(); // the publisher finds no reconciler and ends
    }
}

fn shutting_down() -> Failure {
    Failure { code: ErrorCode::Internal, message: "the server is shutting down".into() }
}

impl Inner {
    /// Queues a pass over plugin `id` that reads its row itself, without waiting.
    fn hint(&self, id: i64) {
        self.send(id, Job { force: false, reply: None, read: None });
    }

    /// A stamp for a row read about to start.
    fn stamp(&self) -> u64 {
        self.stamps.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Queues a job for plugin `id`'s worker (started on first use).
    fn send(&self, id: i64, job: Job) {
        let Some(me) = self.me.upgrade() else { return };
        let mut workers = self.workers.lock().expect("workers lock");
        if self.closed.load(Ordering::SeqCst) {
            if let Some(reply) = job.reply {
                let _ = reply.send(Err(shutting_down()));
            }
            return;
        }
        let (tx, _) = workers.entry(id).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            (tx, tokio::spawn(worker(me, id, rx)))
        });
        // Counted before it is queued, so /health never shows 0 while a hint waits.
        self.busy.fetch_add(1, Ordering::Relaxed);
        // The worker lives until shutdown drains this map, so the send cannot fail.
        let _ = tx.send(job);
    }

    /// Hints every plugin waiting for a path but those in `except` (after a version stopped
    /// serving or was replaced, which may have freed one).
    fn hint_waiting(&self, except: &[i64]) {
        // Before the waiting set is read: a pass that joins it later sees the count moved.
        self.freed.fetch_add(1, Ordering::SeqCst);
        let waiting: Vec<i64> = self.waiting.lock().expect("waiting lock").iter().copied().collect();
        for id in waiting.into_iter().filter(|id| !except.contains(id)) {
            self.hint(id);
        }
    }

    /// Stops serving every plugin and runs their cleanup, here, waiting for it: a cleanup merely
    /// queued on the blocking pool could be cancelled as the runtime exits.
    async fn retire_all(&self) {
        let (served, change) = {
            let mut served = self.served.lock().expect("served lock");
            (served.take_all(), self.changed())
        };
        self.show(change).await;
        let retire = |plugins: Vec<Arc<LoadedPlugin>>| {
            move || {
                for plugin in plugins {
                    match Arc::try_unwrap(plugin) {
                        Ok(p) => p.retire_now(),
                        Err(still_used) => drop(still_used), // its last request retires it
                    }
                }
            }
        };
        // In-process cleanups one after another; each plugin process's at once (a hung one
        // takes seconds to be given up on, and must not hold up the others).
        let (isolated, in_process): (Vec<_>, Vec<_>) =
            served.into_values().map(|s| s.plugin).partition(|p| p.isolation().is_some());
        let mut tasks = vec![tokio::task::spawn_blocking(retire(in_process))];
        tasks.extend(isolated.into_iter().map(|p| tokio::task::spawn_blocking(retire(vec![p]))));
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// The loop of one plugin's worker: take every pending job, run one pass, answer them all.
/// It ends when its sender is dropped (at shutdown), after the jobs it has.
async fn worker(inner: Arc<Inner>, id: i64, mut rx: mpsc::UnboundedReceiver<Job>) {
    // The stamp of the row this plugin's last pass acted on.
    let mut acted: u64 = 0;
    while let Some(first) = rx.recv().await {
        let mut force = first.force;
        let mut replies: Vec<Reply> = first.reply.into_iter().collect();
        let mut read = first.read;
        let mut jobs = 1;
        while let Ok(more) = rx.try_recv() {
            force |= more.force;
            replies.extend(more.reply);
            // A job without a row may follow a write the others' rows predate (the admin API
            // writes, then asks): the pass reads the row itself then. Of rows, the newest read.
            read = match (read, more.read) {
                (Some(a), Some(b)) => Some(if b.0 >= a.0 { b } else { a }),
                _ => None,
            };
            jobs += 1;
        }
        // A row read before the one the last pass acted on could undo what that pass did.
        let read = read.filter(|(stamp, _)| *stamp > acted);
        let result = inner.pass(id, force, read, &mut acted).await;
        inner.metrics.passed(match &result {
            Ok(_) => "ok",
            Err(ReconcileError::ShuttingDown) => "shutdown",
            Err(_) => "error",
        });
        let result = result.map_err(|e| {
            let failure = Failure { code: e.code(), message: e.to_string() };
            match e {
                ReconcileError::ShuttingDown => {}
                // Waiting for a dependency is normal (at a start, the order passes run in): it
                // loads by itself once the dependency serves.
                ReconcileError::DependencyMissing(_) => {
                    tracing::info!(
                        plugin_id = id,
                        "waits for a dependency that does not serve yet: {}",
                        failure.message
                    )
                }
                _ => tracing::warn!(plugin_id = id, code = failure.code.as_str(), "{}", failure.message),
            }
            failure
        });
        inner.busy.fetch_sub(jobs, Ordering::Relaxed);
        for reply in replies {
            let _ = reply.send(result.clone());
        }
    }
}
