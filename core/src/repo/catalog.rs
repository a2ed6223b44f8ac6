//! `catalog_repositories` and `catalog_plugins`: where catalogs are, and what their last sync
//! found. And the one write an upgrade from a catalog makes: a plugin's stored archive replaced.

use super::{Repo, Result};
use chrono::{DateTime, Utc};

/// A catalog source and how its last sync went.
#[derive(Debug, Clone)]
pub struct CatalogSource {
    pub id: i64,
    pub url: String,
    pub synced_at: Option<DateTime<Utc>>,
    pub sync_error: Option<String>,
    /// The entries the last sync refused, with why (`[{"entry": …, "error": …}]`).
    pub refused: serde_json::Value,
    pub entries: i64,
}

/// An entry of a catalog, as synced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogEntry {
    pub name: String,
    pub version: String,
    pub description: String,
    /// Absolute: a URL, or a path for a catalog in a directory.
    pub archive_url: String,
    /// Lowercase hex.
    pub sha256: String,
    /// base64 of an ed25519 signature over the `sha256` text.
    pub signature: Option<String>,
}

/// A synced entry, with the catalog it came from.
#[derive(Debug, Clone)]
pub struct ListedEntry {
    pub entry: CatalogEntry,
    pub repository: String,
    pub repository_id: i64,
}

impl Repo {
    /// Adds catalog sources (the server's configured ones); those already there are kept.
    pub async fn add_catalog_sources(&self, urls: &[String]) -> Result<()> {
        if urls.is_empty() {
            return Ok(());
        }
        let c = self.pool.get().await?;
        c.execute(
            "INSERT INTO catalog_repositories (url) SELECT unnest($1::text[]) ON CONFLICT (url) DO NOTHING",
            &[&urls],
        )
        .await?;
        Ok(())
    }

    /// Every catalog source, oldest first, with its number of entries.
    pub async fn catalog_sources(&self) -> Result<Vec<CatalogSource>> {
        let c = self.pool.get().await?;
        let rows = c
            .query(
                "SELECT r.id, r.url, r.synced_at, r.sync_error, r.refused,
                        (SELECT count(*) FROM catalog_plugins p WHERE p.repository_id = r.id) AS entries
                 FROM catalog_repositories r ORDER BY r.id",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| CatalogSource {
                id: r.get("id"),
                url: r.get("url"),
                synced_at: r.get("synced_at"),
                sync_error: r.get("sync_error"),
                refused: r.get("refused"),
                entries: r.get("entries"),
            })
            .collect())
    }

    /// A good sync of source `id`: its entries become exactly `entries`, in one transaction.
    pub async fn replace_catalog_entries(
        &self,
        id: i64,
        entries: &[CatalogEntry],
        refused: &serde_json::Value,
    ) -> Result<()> {
        let mut c = self.pool.get().await?;
        let tx = c.transaction().await?;
        // Replicas syncing at once take turns (each deletes what the other inserted).
        tx.execute("SELECT 1 FROM catalog_repositories WHERE id = $1 FOR UPDATE", &[&id]).await?;
        tx.execute("DELETE FROM catalog_plugins WHERE repository_id = $1", &[&id]).await?;
        let insert = tx
            .prepare(
                "INSERT INTO catalog_plugins (repository_id, name, version, description, archive_url, sha256, signature)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .await?;
        for e in entries {
            tx.execute(&insert, &[&id, &e.name, &e.version, &e.description, &e.archive_url, &e.sha256, &e.signature])
                .await?;
        }
        tx.execute(
            "UPDATE catalog_repositories SET synced_at = now(), sync_error = NULL, refused = $2 WHERE id = $1",
            &[&id, refused],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A failed sync of source `id`: its last good entries stay.
    pub async fn record_catalog_failure(&self, id: i64, error: &str) -> Result<()> {
        let c = self.pool.get().await?;
        c.execute("UPDATE catalog_repositories SET synced_at = now(), sync_error = $2 WHERE id = $1", &[&id, &error])
            .await?;
        Ok(())
    }

    /// Every synced entry (of `name` only, if given), by name, then by source.
    pub async fn catalog_entries(&self, name: Option<&str>) -> Result<Vec<ListedEntry>> {
        let c = self.pool.get().await?;
        let rows = c
            .query(
                "SELECT p.name, p.version, p.description, p.archive_url, p.sha256, p.signature,
                        r.url AS repository, r.id AS repository_id
                 FROM catalog_plugins p JOIN catalog_repositories r ON r.id = p.repository_id
                 WHERE $1::text IS NULL OR p.name = $1
                 ORDER BY p.name, r.id",
                &[&name],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| ListedEntry {
                entry: CatalogEntry {
                    name: r.get("name"),
                    version: r.get("version"),
                    description: r.get("description"),
                    archive_url: r.get("archive_url"),
                    sha256: r.get("sha256"),
                    signature: r.get("signature"),
                },
                repository: r.get("repository"),
                repository_id: r.get("repository_id"),
            })
            .collect())
    }

    /// Replaces the stored archive of plugin `id` (installed from an upload or a catalog), in one
    /// transaction with its origin. The replacement notifies every replica (a trigger): each
    /// unpacks the new archive, builds and loads it (see `shared_sources`), keeping the old
    /// instance serving if that fails. With `only_if`, nothing is written unless the stored
    /// archive's sha256 is that one (a roll-back does not undo another install's work).
    pub async fn replace_archive(
        &self,
        id: i64,
        archive: &[u8],
        sha256: &str,
        origin: &str,
        only_if: Option<&str>,
    ) -> Result<Replaced> {
        let mut c = self.pool.get().await?;
        let tx = c.transaction().await?;
        let old = tx
            .query_opt(
                "SELECT a.sha256, a.archive, p.origin FROM plugin_archives a JOIN plugins p ON p.id = a.plugin_id
                 WHERE a.plugin_id = $1 FOR UPDATE",
                &[&id],
            )
            .await?;
        let Some(old) = old else { return Ok(Replaced::NoArchive) };
        let (old_sha256, old_archive, old_origin): (String, Vec<u8>, String) = (old.get(0), old.get(1), old.get(2));
        if only_if.is_some_and(|expected| expected != old_sha256) {
            return Ok(Replaced::NotThat(old_sha256));
        }
        tx.execute(
            "UPDATE plugin_archives SET sha256 = $2, size = $3, archive = $4, uploaded_by = $5, uploaded_at = now()
             WHERE plugin_id = $1",
            &[&id, &sha256, &(archive.len() as i64), &archive, &&*self.replica],
        )
        .await?;
        tx.execute("UPDATE plugins SET origin = $2 WHERE id = $1", &[&id, &origin]).await?;
        tx.commit().await?;
        Ok(Replaced::Done { sha256: old_sha256, archive: old_archive, origin: old_origin })
    }
}

/// What [`Repo::replace_archive`] did.
#[derive(Debug)]
pub enum Replaced {
    /// The plugin has no stored archive (it was installed before kiln kept them): nothing written.
    NoArchive,
    /// The stored archive is another than `only_if` asked for (its sha256): nothing written.
    NotThat(String),
    /// Replaced; what was stored before.
    Done { sha256: String, archive: Vec<u8>, origin: String },
}
