//! `plugin_libraries`: libraries built once and shared by every replica, and the advisory lock
//! their builder holds.

use super::{Repo, Result};

/// How long a replica waits for another's build of a library before building it itself.
pub const BUILD_LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(600);

/// A library another replica (or this one) built and stored.
#[derive(Debug, Clone)]
pub struct StoredLibrary {
    /// Hex sha256 of `bytes`, as the builder computed it.
    pub sha256: String,
    pub bytes: Vec<u8>,
    /// The replica that built it.
    pub built_by: String,
}

/// A session holding the advisory lock of one build key (see [`Repo::lock_build`]). Released by
/// [`BuildLock::release`]; dropped without it, its connection is closed, and PostgreSQL releases
/// the lock with the session — as it does when the replica dies.
pub struct BuildLock {
    client: Option<deadpool_postgres::Object>,
    key: String,
}

impl std::fmt::Debug for BuildLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildLock").field("key", &self.key).finish()
    }
}

impl BuildLock {
    pub async fn release(mut self) {
        let client = self.client.take().expect("a BuildLock has its client until released");
        let unlocked = client.query_one("SELECT pg_advisory_unlock(hashtextextended($1, 0))", &[&self.key]).await;
        let reset = client.batch_execute("RESET lock_timeout").await;
        if !matches!(unlocked, Ok(row) if row.get::<_, bool>(0)) || reset.is_err() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

impl Drop for BuildLock {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            // Still holding the lock (or waiting for it): never hand it back to the pool.
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

impl Repo {
    /// The stored library of `key`, if one was stored.
    pub async fn stored_library(&self, key: &str) -> Result<Option<StoredLibrary>> {
        let c = self.pool.get().await?;
        let row =
            c.query_opt("SELECT sha256, library, built_by FROM plugin_libraries WHERE build_key = $1", &[&key]).await?;
        Ok(row.map(|r| StoredLibrary { sha256: r.get(0), bytes: r.get(1), built_by: r.get(2) }))
    }

    /// Stores a library this replica built, under the build lock of `key` (replacing a stored
    /// one: that did not match its sha256, or the builder would have fetched it).
    pub async fn store_library(
        &self,
        key: &str,
        name: &str,
        source_hash: &str,
        sha256: &str,
        bytes: &[u8],
    ) -> Result<()> {
        let c = self.pool.get().await?;
        c.execute(
            "INSERT INTO plugin_libraries (build_key, name, source_hash, sha256, size, library, built_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (build_key) DO UPDATE SET sha256 = excluded.sha256, size = excluded.size,
                 library = excluded.library, built_by = excluded.built_by, built_at = now()",
            &[&key, &name, &source_hash, &sha256, &(bytes.len() as i64), &bytes, &&*self.replica],
        )
        .await?;
        // Keep the newest few of each plugin: older ones serve nowhere any more, or are built
        // again by whoever needs them.
        c.execute(
            "DELETE FROM plugin_libraries WHERE name = $1 AND build_key NOT IN
                 (SELECT build_key FROM plugin_libraries WHERE name = $1 ORDER BY built_at DESC LIMIT 4)",
            &[&name],
        )
        .await?;
        Ok(())
    }

    /// Takes the advisory lock of build `key`, waiting while another replica holds it (it is
    /// building that library).
    pub async fn lock_build(&self, key: &str) -> Result<BuildLock> {
        let client = self.pool.get().await?;
        let lock = BuildLock { client: Some(client), key: key.to_string() };
        let c = lock.client.as_ref().expect("just set");
        // A backend waiting for a lock does not notice that its client went away: a replica
        // killed while it waited would stay queued for the lock until its turn came. Checking
        // the connection every second while the statement runs drops such a waiter (PostgreSQL
        // 14 and later; older servers only lack the clean-up). It stays set on the pooled
        // connection: a poll(2) per second of a running statement.
        if let Err(e) = c.batch_execute("SET client_connection_check_interval = 1000").await {
            tracing::debug!("client_connection_check_interval not set: {e}");
        }
        // A holder that is alive but stuck (a paused process whose session stays open) is not
        // waited for forever: past this, the wait fails and this replica builds by itself.
        c.batch_execute(&format!("SET lock_timeout = {}", BUILD_LOCK_PATIENCE.as_millis())).await?;
        c.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", &[&key]).await?;
        Ok(lock)
    }
}
