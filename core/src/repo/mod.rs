//! The `plugins` and `plugin_endpoints` tables: every query kiln runs lives here.
//!
//! Writes come in two kinds, kept apart on purpose: desired state (status, a discovered row),
//! which users also write and which notifies the server; and observed state (build and load
//! results), which each replica writes for itself into `plugin_replicas` and its own endpoint
//! rows, and which never notifies (see sql/011_replicas.sql). A [`Repo`] belongs to one replica:
//! the rows it reads carry that replica's observed state, and it writes no other's.

mod archives;
mod catalog;
mod events;
mod libraries;
mod replicas;
mod row_lock;
mod storage;

pub use catalog::{CatalogEntry, CatalogSource, ListedEntry, Replaced};
pub use events::DueEvent;
pub use libraries::BuildLock;
pub use libraries::StoredLibrary;
pub use replicas::{Beat, Holder, ObservedRow, Registration, ReplicaRow};

pub use row_lock::RowLock;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use deadpool_postgres::Pool;
use tokio_postgres::Row;

/// A row of `plugins`.
#[derive(Debug, Clone)]
pub struct PluginRow {
    pub id: i64,
    pub name: String,
    pub description: String,
    pub version: String,
    pub author: String,
    pub kind: String,
    /// Observed by this replica: the manifest it last read.
    pub path: Option<String>,
    /// Observed by this replica: the library it serves.
    pub binary_path: Option<String>,
    pub source_path: String,
    pub status: String,
    /// Observed by this replica (`pending` until it wrote one).
    pub state: String,
    /// Observed by this replica.
    pub error: Option<String>,
    /// Observed by this replica.
    pub loaded_hash: Option<String>,
    pub loaded_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Desired configuration (a JSON object).
    pub config: serde_json::Value,
    /// `discovered`, `sql`, `upload` or `catalog`.
    pub origin: String,
    /// A version that took a server down while loading (see `load_marker`), and why.
    pub quarantined_hash: Option<String>,
    pub quarantine_reason: Option<String>,
    /// Desired: what the operator grants the plugin in the database beyond its own schema
    /// (see `plugin_db::Resources`).
    pub resources: serde_json::Value,
    /// Desired: the plugin's route deadline in milliseconds, for routes that set none.
    pub deadline_ms: Option<i32>,
    /// Desired: raised to have every replica load a fresh instance (a reload).
    pub generation: i64,
    /// Desired: `in_process` or `process`, over the manifest's `isolation`; and the limits of
    /// process isolation over the manifest's.
    pub isolation: Option<String>,
    pub memory_limit_mb: Option<i32>,
    pub cpu_limit_s: Option<i32>,
    /// Observed here: restarts of the serving instance's process, and how it last died.
    pub restarts: i32,
    pub last_crash: Option<String>,
}

impl PluginRow {
    fn from_row(r: &Row) -> Self {
        Self {
            id: r.get("id"),
            name: r.get("name"),
            description: r.get("description"),
            version: r.get("version"),
            author: r.get("author"),
            kind: r.get("type"),
            path: r.get("path"),
            binary_path: r.get("binary_path"),
            source_path: r.get("source_path"),
            status: r.get("status"),
            state: r.get("state"),
            error: r.get("error"),
            loaded_hash: r.get("loaded_hash"),
            loaded_at: r.get("loaded_at"),
            created_at: r.get("created_at"),
            updated_at: r.get("updated_at"),
            config: r.get("config"),
            origin: r.get("origin"),
            quarantined_hash: r.get("quarantined_hash"),
            quarantine_reason: r.get("quarantine_reason"),
            resources: r.get("resources"),
            deadline_ms: r.get("deadline_ms"),
            generation: r.get("generation"),
            isolation: r.get("isolation"),
            memory_limit_mb: r.get("memory_limit_mb"),
            cpu_limit_s: r.get("cpu_limit_s"),
            restarts: r.get("restarts"),
            last_crash: r.get("last_crash"),
        }
    }

    /// Whether it was installed from an archive (an upload or a catalog), which kiln keeps in
    /// `plugin_archives` and unpacks into its install directory.
    pub fn from_archive(&self) -> bool {
        matches!(self.origin.as_str(), "upload" | "catalog")
    }

    /// Whether the user wants this plugin served.
    pub fn wants_active(&self) -> bool {
        self.status == "active"
    }
}

/// A row of `plugin_endpoints`.
#[derive(Debug, Clone)]
pub struct EndpointRow {
    pub id: i64,
    pub plugin_id: i64,
    pub method: String,
    pub path: String,
    pub handler: String,
    pub kind: String,
}

/// An endpoint to record for a loaded plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEndpoint {
    pub method: String,
    pub path: String,
    pub handler: String,
}

/// What the server observed after loading a plugin version.
#[derive(Debug, Clone)]
pub struct Loaded<'a> {
    pub manifest_path: std::borrow::Cow<'a, str>,
    pub binary_path: std::borrow::Cow<'a, str>,
    pub hash: &'a str,
    pub description: &'a str,
    pub version: &'a str,
    pub author: &'a str,
    pub kind: &'a str,
    /// The endpoints now served (replacing the previous version's).
    pub endpoints: &'a [NewEndpoint],
    /// The endpoint rows hold these endpoints already (the replaced version's were the same):
    /// they are not rewritten.
    pub keep_endpoints: bool,
    /// A new instance: its process's restart count and last crash start over.
    pub fresh: bool,
}

/// A build kiln ran, for the history.
#[derive(Debug, Clone)]
pub struct BuildRecord {
    pub id: i64,
    pub source_hash: String,
    pub started_at: DateTime<Utc>,
    pub duration_ms: i64,
    pub success: bool,
    pub diagnostics: Option<String>,
    /// Each compiler message of a failed build, with its place.
    pub messages: Vec<crate::diagnostics::Diagnostic>,
    /// The replica that ran it (none for builds recorded before replicas).
    pub replica: Option<String>,
    /// A draft: the plugin crate unoptimized, served until the optimized build replaces it.
    pub draft: bool,
}

/// A build that ran, to record (see [`Repo::record_build`]).
#[derive(Debug)]
pub struct NewBuild<'a> {
    pub started_at: DateTime<Utc>,
    pub duration_ms: i64,
    /// What the compiler said of a failed build (`None`: it succeeded).
    pub diagnostics: Option<&'a str>,
    pub messages: &'a [crate::diagnostics::Diagnostic],
    pub draft: bool,
}

/// Metadata of a discovered or installed plugin, written with its row when it is inserted.
#[derive(Debug, Clone)]
pub struct Discovered<'a> {
    pub name: &'a str,
    pub source_path: &'a str,
    pub description: &'a str,
    pub version: &'a str,
    pub author: &'a str,
    pub kind: &'a str,
    /// `discovered` or `upload`.
    pub origin: &'a str,
    /// `active` or `inactive`.
    pub status: &'a str,
}

/// A plugin row with this replica's observed state (`$1`: the replica). Callers add the `WHERE`.
const SELECT_ROW: &str = "SELECT p.*, coalesce(o.state, 'pending') AS state, o.error, o.path, o.binary_path,
            o.loaded_hash, o.loaded_at, coalesce(o.restarts, 0) AS restarts, o.last_crash
     FROM plugins p LEFT JOIN plugin_replicas o ON o.plugin_id = p.id AND o.replica_id = $1";

/// Queries over the connection pool, as one replica.
#[derive(Clone)]
pub struct Repo {
    pool: Pool,
    replica: std::sync::Arc<str>,
}

pub(super) type Result<T> = std::result::Result<T, RepoError>;

/// A database failure: either PostgreSQL could not be reached, or it refused the statement.
/// They call for different answers (retry later, 503; or fix the input, 4xx) and logs.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// No connection could be had, or it broke (SQLSTATE classes 08, 53, 57 count as this too:
    /// connection failures, a server out of resources or shutting down).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// PostgreSQL refused the statement, with its own message.
    #[error("the database refused the statement: {message} (SQLSTATE {code}{})", constraint.as_deref().map(|c| format!(", constraint {c}")).unwrap_or_default())]
    Refused {
        /// SQLSTATE, e.g. `22P05` (untranslatable character), `23505` (unique violation).
        code: String,
        message: String,
        constraint: Option<String>,
    },
}

impl RepoError {
    /// Whether the statement itself was at fault (bad data, a violated constraint), not the
    /// database's availability or kiln: SQLSTATE classes 22 and 23.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, Self::Refused { code, .. } if code.starts_with("22") || code.starts_with("23"))
    }

    /// Whether a statement gave up waiting for a lock (`lock_timeout`, SQLSTATE 55P03).
    pub fn is_lock_timeout(&self) -> bool {
        matches!(self, Self::Refused { code, .. } if code == "55P03")
    }
}

impl From<deadpool_postgres::PoolError> for RepoError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            e => Self::Unavailable(e.to_string()),
        }
    }
}

impl From<tokio_postgres::Error> for RepoError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) if !["08", "53", "57"].iter().any(|c| db.code().code().starts_with(c)) => Self::Refused {
                code: db.code().code().to_string(),
                message: db.message().to_string(),
                constraint: db.constraint().map(str::to_string),
            },
            Some(db) => Self::Unavailable(db.message().to_string()),
            None => Self::Unavailable(e.to_string()),
        }
    }
}

impl Repo {
    /// The queries of replica `replica` (see [`replicas`]).
    pub fn new(pool: Pool, replica: &str) -> Self {
        Self { pool, replica: replica.into() }
    }

    /// The replica this repository reads and writes observed state as.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// The pool, for health checks.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub async fn get(&self, id: i64) -> Result<Option<PluginRow>> {
        let c = self.pool.get().await?;
        let select = c.prepare_cached(&format!("{SELECT_ROW} WHERE p.id = $2")).await?;
        let row = c.query_opt(&select, &[&&*self.replica, &id]).await?;
        Ok(row.as_ref().map(PluginRow::from_row))
    }

    pub async fn get_by_name(&self, name: &str) -> Result<Option<PluginRow>> {
        let c = self.pool.get().await?;
        let row = c.query_opt(&format!("{SELECT_ROW} WHERE p.name = $2"), &[&&*self.replica, &name]).await?;
        Ok(row.as_ref().map(PluginRow::from_row))
    }

    /// The highest plugin id so far (0 with no plugins): rows inserted later have higher ones.
    pub async fn max_plugin_id(&self) -> Result<i64> {
        let c = self.pool.get().await?;
        Ok(c.query_one("SELECT coalesce(max(id), 0)::bigint FROM plugins", &[]).await?.get(0))
    }

    pub async fn list(&self) -> Result<Vec<PluginRow>> {
        let c = self.pool.get().await?;
        let rows = c.query(&format!("{SELECT_ROW} ORDER BY p.id"), &[&&*self.replica]).await?;
        Ok(rows.iter().map(PluginRow::from_row).collect())
    }

    /// Inserts a discovered plugin unless a row of that name exists or a user uninstalled this
    /// crate (a row of `plugin_tombstones`). Returns whether it inserted.
    pub async fn insert_discovered(&self, d: &Discovered<'_>) -> Result<bool> {
        Ok(self.insert_discovered_all(std::slice::from_ref(d)).await?[0])
    }

    /// [`Repo::insert_discovered`] for many crates, pipelined on one connection (a start with
    /// 1,000 plugin crates: one round trip's wait, not 2,000). Each is its own statement.
    pub async fn insert_discovered_all(&self, all: &[Discovered<'_>]) -> Result<Vec<bool>> {
        let c = self.pool.get().await?;
        let insert = c
            .prepare_cached(
                "INSERT INTO plugins (name, source_path, description, version, author, type, origin, status)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8
                 WHERE NOT EXISTS (SELECT 1 FROM plugin_tombstones WHERE source_path = $2)
                 ON CONFLICT (name) DO NOTHING",
            )
            .await?;
        let params: Vec<[&(dyn tokio_postgres::types::ToSql + Sync); 8]> = all
            .iter()
            .map(|d| {
                [
                    &d.name as &(dyn tokio_postgres::types::ToSql + Sync),
                    &d.source_path,
                    &d.description,
                    &d.version,
                    &d.author,
                    &d.kind,
                    &d.origin,
                    &d.status,
                ]
            })
            .collect();
        let inserted = futures_util::future::try_join_all(params.iter().map(|p| c.execute(&insert, p))).await?;
        Ok(inserted.into_iter().map(|n| n == 1).collect())
    }

    /// Sets the desired status (this notifies the server, as any user edit does).
    pub async fn set_status(&self, id: i64, status: &str) -> Result<()> {
        let c = self.pool.get().await?;
        c.execute("UPDATE plugins SET status = $2 WHERE id = $1", &[&id, &status]).await?;
        Ok(())
    }

    /// Asks every replica for a fresh instance of the plugin (this notifies them all).
    pub async fn request_reload(&self, id: i64) -> Result<()> {
        let c = self.pool.get().await?;
        c.execute("UPDATE plugins SET generation = generation + 1 WHERE id = $1", &[&id]).await?;
        Ok(())
    }

    /// Sets the desired configuration (this notifies the server, as any user edit does).
    pub async fn set_config(&self, id: i64, config: &serde_json::Value) -> Result<()> {
        let c = self.pool.get().await?;
        c.execute("UPDATE plugins SET config = $2 WHERE id = $1", &[&id, config]).await?;
        Ok(())
    }

    /// Deletes a plugin's row (its endpoints and builds go with it).
    pub async fn delete(&self, id: i64) -> Result<bool> {
        let c = self.pool.get().await?;
        Ok(c.execute("DELETE FROM plugins WHERE id = $1", &[&id]).await? == 1)
    }

    /// Records a build kiln ran.
    pub async fn record_build(&self, plugin_id: i64, source_hash: &str, build: &NewBuild<'_>) -> Result<()> {
        let c = self.pool.get().await?;
        let messages = serde_json::to_value(build.messages).unwrap_or_else(|_| serde_json::json!([]));
        c.execute(
            "INSERT INTO plugin_builds (plugin_id, source_hash, started_at, duration_ms, success, diagnostics, messages,
                                        replica_id, draft)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[
                &plugin_id,
                &source_hash,
                &build.started_at,
                &build.duration_ms,
                &build.diagnostics.is_none(),
                &build.diagnostics,
                &messages,
                &&*self.replica,
                &build.draft,
            ],
        )
        .await?;
        Ok(())
    }

    /// The latest builds of a plugin, newest first.
    pub async fn builds(&self, plugin_id: i64, limit: i64) -> Result<Vec<BuildRecord>> {
        let c = self.pool.get().await?;
        let rows = c
            .query(
                "SELECT * FROM plugin_builds WHERE plugin_id = $1 ORDER BY started_at DESC, id DESC LIMIT $2",
                &[&plugin_id, &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| BuildRecord {
                id: r.get("id"),
                source_hash: r.get("source_hash"),
                started_at: r.get("started_at"),
                duration_ms: r.get("duration_ms"),
                success: r.get("success"),
                diagnostics: r.get("diagnostics"),
                messages: serde_json::from_value(r.get("messages")).unwrap_or_default(),
                replica: r.get("replica_id"),
                draft: r.get("draft"),
            })
            .collect())
    }

    /// Observed: a version is loaded and serving these endpoints (its row's observed columns
    /// refreshed when nothing changed in what it serves). Returns whether the row exists.
    pub async fn record_loaded(&self, id: i64, l: &Loaded<'_>) -> Result<bool> {
        let mut lock = match self.lock_row(id).await? {
            Some((lock, _)) => lock,
            None => return Ok(false),
        };
        lock.record_loaded(id, l).await?;
        lock.commit().await?;
        Ok(true)
    }

    /// Opens a transaction holding plugin `id`'s row `FOR KEY SHARE` (a delete of it waits for
    /// the commit; an edit does not, and its notification brings another pass), and returns the
    /// row as it is now; `None` when it is gone.
    pub async fn lock_row(&self, id: i64) -> Result<Option<(RowLock, PluginRow)>> {
        let (lock, mut rows) = self.lock_rows(&[id], false).await?;
        match rows.pop() {
            Some(row) => Ok(Some((lock, row))),
            None => {
                lock.rollback().await;
                Ok(None)
            }
        }
    }

    /// As [`Repo::lock_row`], for the rows of these ids that exist. With `skip_locked`, a row
    /// locked by another transaction that would make this one wait (one deleting it, say) is
    /// left out instead, and every statement of the transaction gives up on a lock after 200 ms
    /// (SQLSTATE 55P03): a transaction that waits for a row while holding others could deadlock
    /// with a user's statement that takes the same rows in another order.
    pub async fn lock_rows(&self, ids: &[i64], skip_locked: bool) -> Result<(RowLock, Vec<PluginRow>)> {
        let client = self.pool.get().await?;
        let lock = RowLock { client: Some(client), replica: self.replica.clone() };
        let c = lock.client();
        let skip = if skip_locked { " SKIP LOCKED" } else { "" };
        let select = c.prepare_cached(&format!("{SELECT_ROW} WHERE p.id = ANY($2) FOR KEY SHARE OF p{skip}")).await?;
        // Pipelined: one round trip.
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&&*self.replica, &ids];
        let begin = if skip_locked { "BEGIN; SET LOCAL lock_timeout = '200ms'" } else { "BEGIN" };
        let ((), rows) = tokio::try_join!(c.batch_execute(begin), c.query(&select, &params))?;
        Ok((lock, rows.iter().map(PluginRow::from_row).collect()))
    }

    /// Observed, at startup: this replica serves nothing yet, whatever it recorded before.
    /// Other replicas' rows are theirs.
    pub async fn reset_observed(&self) -> Result<()> {
        let c = self.pool.get().await?;
        c.execute(
            "UPDATE plugin_replicas SET state = 'pending', updated_at = now()
             WHERE replica_id = $1 AND state IN ('loaded', 'building')",
            &[&&*self.replica],
        )
        .await?;
        Ok(())
    }

    /// Observed: the plugin is being built.
    pub async fn record_building(&self, id: i64) -> Result<()> {
        let c = self.pool.get().await?;
        c.execute(
            "INSERT INTO plugin_replicas (plugin_id, replica_id, state)
             SELECT $1, $2, 'building' WHERE EXISTS (SELECT 1 FROM plugins WHERE id = $1 FOR KEY SHARE)
             ON CONFLICT (plugin_id, replica_id) DO UPDATE SET state = 'building', updated_at = now()
             WHERE plugin_replicas.state <> 'loaded'",
            &[&id, &&*self.replica],
        )
        .await?;
        Ok(())
    }

    /// Observed: the last attempt failed. When an older version still serves (`still_loaded`),
    /// the state stays 'loaded' and only the error is shown. Otherwise nothing serves: the state
    /// is `state` ('failed', or 'waiting' for what retries by itself) and the plugin's endpoint
    /// rows and library go, since endpoint rows always equal what is served.
    pub async fn record_failed(&self, id: i64, error: &str, still_loaded: bool, state: &str) -> Result<()> {
        let mut c = self.pool.get().await?;
        if still_loaded {
            c.execute(
                "INSERT INTO plugin_replicas (plugin_id, replica_id, state, error)
                 SELECT $1, $2, 'loaded', $3 WHERE EXISTS (SELECT 1 FROM plugins WHERE id = $1 FOR KEY SHARE)
                 ON CONFLICT (plugin_id, replica_id) DO UPDATE SET state = 'loaded', error = $3, updated_at = now()",
                &[&id, &&*self.replica, &error],
            )
            .await?;
            return Ok(());
        }
        let tx = c.transaction().await?;
        record_not_serving(&tx, &self.replica, id, state, error).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Observed: version `hash` of plugin `id` took this replica's previous process down while
    /// it was loaded; no replica loads it again until the row or the source changes.
    pub async fn record_crashed(&self, id: i64, hash: &str, error: &str) -> Result<()> {
        let mut c = self.pool.get().await?;
        let tx = c.transaction().await?;
        record_not_serving(&tx, &self.replica, id, "failed", error).await?;
        tx.execute(
            "UPDATE plugins SET quarantined_hash = $2, quarantine_reason = $3 WHERE id = $1",
            &[&id, &hash, &error],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Observed: the serving instance's process was restarted `restarts` times, last after
    /// `last_crash`.
    pub async fn record_restart(&self, id: i64, restarts: i32, last_crash: &str) -> Result<()> {
        let c = self.pool.get().await?;
        c.execute(
            "UPDATE plugin_replicas SET restarts = $3, last_crash = $4, updated_at = now()
             WHERE plugin_id = $1 AND replica_id = $2",
            &[&id, &&*self.replica, &restarts, &last_crash],
        )
        .await?;
        Ok(())
    }

    /// Observed: nothing is loaded for this plugin (it was disabled).
    /// One statement: it writes nothing when the row says so already (a resync of inactive
    /// plugins costs a round trip each, not a write).
    pub async fn record_unloaded(&self, id: i64) -> Result<()> {
        let c = self.pool.get().await?;
        let statement = c
            .prepare_cached(
                "WITH row AS (
                     INSERT INTO plugin_replicas (plugin_id, replica_id, state)
                     SELECT $1, $2, 'inactive' WHERE EXISTS (SELECT 1 FROM plugins WHERE id = $1 FOR KEY SHARE)
                     ON CONFLICT (plugin_id, replica_id) DO UPDATE
                     SET state = 'inactive', error = NULL, binary_path = NULL, loaded_hash = NULL, loaded_at = NULL,
                         updated_at = now()
                     WHERE plugin_replicas.state <> 'inactive' OR plugin_replicas.error IS NOT NULL
                        OR plugin_replicas.binary_path IS NOT NULL OR plugin_replicas.loaded_hash IS NOT NULL
                        OR plugin_replicas.loaded_at IS NOT NULL
                 )
                 DELETE FROM plugin_endpoints WHERE plugin_id = $1 AND replica_id = $2",
            )
            .await?;
        c.execute(&statement, &[&id, &&*self.replica]).await?;
        Ok(())
    }

    /// The rows of these ids that exist (one query).
    pub async fn get_many(&self, ids: &[i64]) -> Result<Vec<PluginRow>> {
        let c = self.pool.get().await?;
        let rows = c.query(&format!("{SELECT_ROW} WHERE p.id = ANY($2)"), &[&&*self.replica, &ids]).await?;
        Ok(rows.iter().map(PluginRow::from_row).collect())
    }

    /// The endpoints this replica serves for a plugin.
    pub async fn endpoints(&self, plugin_id: i64) -> Result<Vec<EndpointRow>> {
        let c = self.pool.get().await?;
        let rows = c
            .query(
                "SELECT * FROM plugin_endpoints WHERE plugin_id = $1 AND replica_id = $2 ORDER BY path, method",
                &[&plugin_id, &&*self.replica],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| EndpointRow {
                id: r.get("id"),
                plugin_id: r.get("plugin_id"),
                method: r.get("method"),
                path: r.get("path"),
                handler: r.get("handler"),
                kind: r.get("type"),
            })
            .collect())
    }

    /// (state, has an error, count) of every plugin row as this replica observed it: one query,
    /// which also tells whether the database answers.
    pub async fn state_counts(&self) -> Result<Vec<(String, bool, i64)>> {
        let c = self.pool.get().await?;
        let rows = c
            .query(
                "SELECT coalesce(o.state, 'pending') AS state, o.error IS NOT NULL AS with_error, count(*) AS n
                 FROM plugins p LEFT JOIN plugin_replicas o ON o.plugin_id = p.id AND o.replica_id = $1
                 GROUP BY 1, 2",
                &[&&*self.replica],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get("state"), r.get("with_error"), r.get("n"))).collect())
    }
}

/// Marks plugin `id` as serving nothing on `replica`: `state`, `error`, no library, no endpoint
/// rows.
pub(super) async fn record_not_serving(
    c: &impl GenericClient,
    replica: &str,
    id: i64,
    state: &str,
    error: &str,
) -> Result<()> {
    c.execute(
        "INSERT INTO plugin_replicas (plugin_id, replica_id, state, error)
         SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM plugins WHERE id = $1 FOR KEY SHARE)
         ON CONFLICT (plugin_id, replica_id) DO UPDATE
         SET state = $3, error = $4, binary_path = NULL, loaded_hash = NULL, loaded_at = NULL, updated_at = now()",
        &[&id, &replica, &state, &error],
    )
    .await?;
    c.execute("DELETE FROM plugin_endpoints WHERE plugin_id = $1 AND replica_id = $2", &[&id, &replica]).await?;
    Ok(())
}
