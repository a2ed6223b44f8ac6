//! `plugin_archives`: the archive of each plugin installed by upload, so that a replica that
//! does not share the uploader's disk can unpack it.

use super::{Discovered, Repo, Result};

impl Repo {
    /// Inserts the row of an uploaded plugin and stores its archive, in one transaction: every
    /// replica the insert notifies finds the archive. False when the name is taken, or the path
    /// uninstalled (nothing is written then), as [`Repo::insert_discovered`].
    pub async fn insert_upload(&self, d: &Discovered<'_>, archive: &[u8], sha256: &str) -> Result<bool> {
        let mut c = self.pool.get().await?;
        let tx = c.transaction().await?;
        let id = tx
            .query_opt(
                "INSERT INTO plugins (name, source_path, description, version, author, type, origin, status)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8
                 WHERE NOT EXISTS (SELECT 1 FROM plugin_tombstones WHERE source_path = $2)
                 ON CONFLICT (name) DO NOTHING
                 RETURNING id",
                &[&d.name, &d.source_path, &d.description, &d.version, &d.author, &d.kind, &d.origin, &d.status],
            )
            .await?;
        let Some(id) = id.map(|r| r.get::<_, i64>(0)) else { return Ok(false) };
        tx.execute(
            "INSERT INTO plugin_archives (plugin_id, sha256, size, archive, uploaded_by) VALUES ($1, $2, $3, $4, $5)",
            &[&id, &sha256, &(archive.len() as i64), &archive, &&*self.replica],
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// The sha256 of plugin `id`'s stored archive, if it was uploaded.
    pub async fn archive_sha256(&self, id: i64) -> Result<Option<String>> {
        let c = self.pool.get().await?;
        Ok(c.query_opt("SELECT sha256 FROM plugin_archives WHERE plugin_id = $1", &[&id]).await?.map(|r| r.get(0)))
    }

    /// Plugin `id`'s stored archive: (sha256 as stored, bytes).
    pub async fn archive(&self, id: i64) -> Result<Option<(String, Vec<u8>)>> {
        let c = self.pool.get().await?;
        let row = c.query_opt("SELECT sha256, archive FROM plugin_archives WHERE plugin_id = $1", &[&id]).await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }
}
