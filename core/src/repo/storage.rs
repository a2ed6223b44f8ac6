//! Each plugin's key-value storage (`plugin_storage`), for the host's `storage.*` services.

use super::{Repo, Result};

impl Repo {
    /// Plugin `plugin`'s stored value under `key`.
    pub async fn storage_get(&self, plugin: &str, key: &str) -> Result<Option<serde_json::Value>> {
        let c = self.pool.get().await?;
        let row =
            c.query_opt("SELECT value FROM plugin_storage WHERE plugin = $1 AND key = $2", &[&plugin, &key]).await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Stores `value` under `key` for `plugin`.
    pub async fn storage_put(&self, plugin: &str, key: &str, value: &serde_json::Value) -> Result<()> {
        let c = self.pool.get().await?;
        c.execute(
            "INSERT INTO plugin_storage (plugin, key, value) VALUES ($1, $2, $3)
             ON CONFLICT (plugin, key) DO UPDATE SET value = EXCLUDED.value",
            &[&plugin, &key, value],
        )
        .await?;
        Ok(())
    }

    /// Removes `key` of `plugin`; whether it was there.
    pub async fn storage_delete(&self, plugin: &str, key: &str) -> Result<bool> {
        let c = self.pool.get().await?;
        Ok(c.execute("DELETE FROM plugin_storage WHERE plugin = $1 AND key = $2", &[&plugin, &key]).await? == 1)
    }

    /// `plugin`'s (key, value) pairs whose key starts with `prefix`, in key order, at most `limit`.
    pub async fn storage_list(
        &self,
        plugin: &str,
        prefix: &str,
        limit: i64,
    ) -> Result<Vec<(String, serde_json::Value)>> {
        let c = self.pool.get().await?;
        // starts_with, not LIKE: a prefix may hold % and _.
        let rows = c
            .query(
                "SELECT key, value FROM plugin_storage WHERE plugin = $1 AND starts_with(key, $2)
                 ORDER BY key LIMIT $3",
                &[&plugin, &prefix, &limit],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Stores `value` under `key` if the stored value equals `expected` (`None`: absent);
    /// whether it did. One statement each way, so concurrent callers cannot both win.
    pub async fn storage_compare_and_set(
        &self,
        plugin: &str,
        key: &str,
        expected: Option<&serde_json::Value>,
        value: &serde_json::Value,
    ) -> Result<bool> {
        let c = self.pool.get().await?;
        let n = match expected {
            None => {
                c.execute(
                    "INSERT INTO plugin_storage (plugin, key, value) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    &[&plugin, &key, value],
                )
                .await?
            }
            Some(expected) => {
                c.execute(
                    "UPDATE plugin_storage SET value = $4 WHERE plugin = $1 AND key = $2 AND value = $3",
                    &[&plugin, &key, expected, value],
                )
                .await?
            }
        };
        Ok(n == 1)
    }

    /// Forgets everything `plugin` stored (it was uninstalled).
    pub async fn storage_forget(&self, plugin: &str) -> Result<()> {
        let c = self.pool.get().await?;
        c.execute("DELETE FROM plugin_storage WHERE plugin = $1", &[&plugin]).await?;
        Ok(())
    }
}
