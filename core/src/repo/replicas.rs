//! The `replicas` table and each replica's observed rows, as the other replicas see them.

use super::{Repo, Result};
use chrono::{DateTime, Utc};
use std::time::Duration;

/// A row of `replicas`.
#[derive(Debug, Clone)]
pub struct ReplicaRow {
    pub id: String,
    pub hostname: String,
    pub pid: Option<i32>,
    pub address: String,
    pub kiln_version: String,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    /// When it stopped or was found silent; `None` while it is live.
    pub gone_at: Option<DateTime<Utc>>,
    pub builds: i64,
    pub fetches: i64,
}

/// What one live replica observed of one plugin (a row of `plugin_replicas`).
#[derive(Debug, Clone)]
pub struct ObservedRow {
    pub plugin_id: i64,
    pub replica_id: String,
    pub state: String,
    pub error: Option<String>,
    pub loaded_hash: Option<String>,
    pub loaded_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

/// Who this process is, as written in its `replicas` row.
#[derive(Debug, Clone)]
pub struct Registration<'a> {
    pub incarnation: &'a str,
    pub hostname: &'a str,
    pub address: &'a str,
    /// Boot id and pid namespace: where this process's pid means this process.
    pub host_identity: &'a str,
}

/// A live process holding a replica id (it heartbeat within the timeout).
#[derive(Debug, Clone)]
pub struct Holder {
    pub hostname: String,
    pub pid: i32,
    pub host_identity: String,
    /// Seconds since its last heartbeat.
    pub age: f64,
}

/// What a heartbeat found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Beat {
    /// The row is ours and was live.
    Live,
    /// The row is ours but had been marked gone (this process was silent past the timeout):
    /// its observed rows were removed and must be written again.
    Returned,
    /// The row is gone (pruned), or another process took the id.
    Lost {
        /// The process now holding the id, if any: `host (pid N)`.
        holder: Option<String>,
    },
}

impl Repo {
    /// Registers this replica (taking over its id from an earlier process). Returns the earlier
    /// holder when it was still live by its heartbeat, which usually means two processes were
    /// given one id.
    /// Writes this replica's row as `r` (a new incarnation), unless a live process holds the id
    /// and `may_take` says no: then the holder, and nothing is written. One transaction under a
    /// lock on the id, so two servers starting with one id cannot both claim it.
    pub async fn claim_replica(
        &self,
        r: &Registration<'_>,
        timeout: Duration,
        may_take: impl FnOnce(&Holder) -> bool,
    ) -> Result<std::result::Result<Option<Holder>, Holder>> {
        let mut c = self.pool.get().await?;
        let tx = c.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock(hashtextextended('kiln-replica:' || $1, 0))", &[&&*self.replica])
            .await?;
        let holder = tx
            .query_opt(
                "SELECT hostname, coalesce(pid, 0), host_identity, extract(epoch FROM now() - heartbeat_at)::float8
                 FROM replicas
                 WHERE id = $1 AND gone_at IS NULL AND heartbeat_at > now() - make_interval(secs => $2)",
                &[&&*self.replica, &timeout.as_secs_f64()],
            )
            .await?
            .map(|row| Holder { hostname: row.get(0), pid: row.get(1), host_identity: row.get(2), age: row.get(3) });
        if let Some(h) = holder.clone()
            && !may_take(&h)
        {
            return Ok(Err(h));
        }
        tx.execute(
            "INSERT INTO replicas (id, incarnation, hostname, pid, address, kiln_version, host_identity)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (id) DO UPDATE
             SET incarnation = $2, hostname = $3, pid = $4, address = $5, kiln_version = $6, host_identity = $7,
                 started_at = now(), heartbeat_at = now(), gone_at = NULL, builds = 0, fetches = 0",
            &[
                &&*self.replica,
                &r.incarnation,
                &r.hostname,
                &(std::process::id() as i32),
                &r.address,
                &env!("CARGO_PKG_VERSION"),
                &r.host_identity,
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(Ok(holder))
    }

    /// Says this replica is alive, with its counters.
    pub async fn heartbeat(&self, incarnation: &str, builds: i64, fetches: i64) -> Result<Beat> {
        let mut c = self.pool.get().await?;
        // The row is locked before it is read: a sweep committing meanwhile (which removed this
        // replica's observed rows) is seen as `gone_at`, and answered with a resync.
        let tx = c.transaction().await?;
        let was_gone = tx
            .query_opt(
                "SELECT gone_at IS NOT NULL FROM replicas WHERE id = $1 AND incarnation = $2 FOR UPDATE",
                &[&&*self.replica, &incarnation],
            )
            .await?
            .map(|row| row.get::<_, bool>(0));
        if let Some(was_gone) = was_gone {
            tx.execute(
                "UPDATE replicas SET heartbeat_at = now(), gone_at = NULL, builds = $2, fetches = $3 WHERE id = $1",
                &[&&*self.replica, &builds, &fetches],
            )
            .await?;
            tx.commit().await?;
            return Ok(if was_gone { Beat::Returned } else { Beat::Live });
        }
        drop(tx);
        let holder = c
            .query_opt("SELECT hostname, pid FROM replicas WHERE id = $1", &[&&*self.replica])
            .await?
            .map(|row| format!("{} (pid {})", row.get::<_, String>(0), row.get::<_, Option<i32>>(1).unwrap_or(0)));
        Ok(Beat::Lost { holder })
    }

    /// Marks every replica silent for longer than `timeout` as gone and removes its observed
    /// rows and endpoint rows; forgets replicas gone for a day. Any replica may run it, any
    /// number of times. Returns the ids it found gone.
    pub async fn sweep_replicas(&self, timeout: Duration) -> Result<Vec<String>> {
        let c = self.pool.get().await?;
        let rows = c
            .query(
                "WITH gone AS (
                     UPDATE replicas SET gone_at = now()
                     WHERE gone_at IS NULL AND heartbeat_at < now() - make_interval(secs => $1)
                     RETURNING id
                 ), observed AS (
                     DELETE FROM plugin_replicas WHERE replica_id IN (SELECT id FROM gone)
                 ), endpoints AS (
                     DELETE FROM plugin_endpoints WHERE replica_id IN (SELECT id FROM gone)
                 ), forgotten AS (
                     DELETE FROM replicas WHERE gone_at < now() - interval '1 day'
                 )
                 SELECT id FROM gone",
                &[&timeout.as_secs_f64()],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// This replica stops: it is shown gone at once and its observed rows go.
    pub async fn retire_replica(&self, incarnation: &str) -> Result<()> {
        let mut c = self.pool.get().await?;
        let tx = c.transaction().await?;
        let ours = tx
            .execute(
                "UPDATE replicas SET gone_at = now() WHERE id = $1 AND incarnation = $2",
                &[&&*self.replica, &incarnation],
            )
            .await?;
        if ours == 1 {
            tx.execute("DELETE FROM plugin_replicas WHERE replica_id = $1", &[&&*self.replica]).await?;
            tx.execute("DELETE FROM plugin_endpoints WHERE replica_id = $1", &[&&*self.replica]).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Every replica known, live ones first.
    pub async fn replicas(&self) -> Result<Vec<ReplicaRow>> {
        let c = self.pool.get().await?;
        let rows = c.query("SELECT * FROM replicas ORDER BY gone_at IS NOT NULL, id", &[]).await?;
        Ok(rows
            .iter()
            .map(|r| ReplicaRow {
                id: r.get("id"),
                hostname: r.get("hostname"),
                pid: r.get("pid"),
                address: r.get("address"),
                kiln_version: r.get("kiln_version"),
                started_at: r.get("started_at"),
                heartbeat_at: r.get("heartbeat_at"),
                gone_at: r.get("gone_at"),
                builds: r.get("builds"),
                fetches: r.get("fetches"),
            })
            .collect())
    }

    /// What every live replica observed of these plugins (all plugins: `None`), and the ids of
    /// the live replicas (a live replica without a row for a plugin has not looked at it yet).
    pub async fn observed(&self, plugins: Option<&[i64]>) -> Result<(Vec<ObservedRow>, Vec<String>)> {
        let c = self.pool.get().await?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&plugins];
        let observed = c.query(
            "SELECT o.* FROM plugin_replicas o JOIN replicas r ON r.id = o.replica_id AND r.gone_at IS NULL
             WHERE $1::bigint[] IS NULL OR o.plugin_id = ANY($1)
             ORDER BY o.plugin_id, o.replica_id",
            &params,
        );
        let live = c.query("SELECT id FROM replicas WHERE gone_at IS NULL ORDER BY id", &[]);
        let (observed, live) = tokio::try_join!(observed, live)?;
        let observed = observed
            .iter()
            .map(|r| ObservedRow {
                plugin_id: r.get("plugin_id"),
                replica_id: r.get("replica_id"),
                state: r.get("state"),
                error: r.get("error"),
                loaded_hash: r.get("loaded_hash"),
                loaded_at: r.get("loaded_at"),
                updated_at: r.get("updated_at"),
            })
            .collect();
        Ok((observed, live.iter().map(|r| r.get(0)).collect()))
    }
}
