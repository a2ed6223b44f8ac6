//! A plugin's SQL migrations: `migrations/*.sql` in its crate, applied in file-name order, each
//! once, in its own schema and as its own role, before the init of the version that ships it.
//!
//! Each file runs in one transaction on the plugin's connection, while kiln holds a transaction
//! that records it in `plugin_migrations` (under the plugin's advisory lock): kiln commits its
//! record only after the file committed. A file changed after it was applied is refused (add a
//! new file instead), as sqlx and refinery do. A crash between the two commits leaves a file
//! applied but unrecorded: it runs again, so write migrations that tolerate that
//! (`CREATE TABLE IF NOT EXISTS`).

use super::{Names, ScopeError};
use sha2::Digest;
use std::path::Path;

/// Most migration files a plugin may ship, and the largest one, in bytes.
const MAX_FILES: usize = 1000;
const MAX_FILE: u64 = 1024 * 1024;
/// How long one migration may run.
const STATEMENT_TIMEOUT: &str = "300s";

/// One migration file.
#[derive(Debug, Clone)]
pub(super) struct Migration {
    pub name: String,
    pub sql: String,
    pub sha256: String,
}

/// The migrations of the crate in `dir`, read on the blocking pool (it is a user's directory:
/// see `manifest::READ_TIMEOUT`). None when the crate has no `migrations/`.
pub(super) async fn read_off_worker(dir: &Path) -> Result<Vec<Migration>, ScopeError> {
    let owned = dir.join("migrations");
    let read = tokio::task::spawn_blocking(move || read(&owned));
    match tokio::time::timeout(crate::manifest::READ_TIMEOUT, read).await {
        Ok(Ok(result)) => result.map_err(ScopeError::Migration),
        Ok(Err(e)) => Err(ScopeError::Migration(format!("reading migrations/ failed: {e}"))),
        Err(_) => Err(ScopeError::Migration("reading migrations/ did not finish in time (a hung mount?)".into())),
    }
}

fn read(dir: &Path) -> Result<Vec<Migration>, String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("reading {}: {e}", dir.display())),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("reading {}: {e}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".sql") {
            continue;
        }
        // Regular files only: a FIFO would block, a link could point anywhere.
        let meta = entry.metadata().map_err(|e| format!("{name}: {e}"))?;
        if !meta.file_type().is_file() {
            return Err(format!("migrations/{name} is not a regular file"));
        }
        if meta.len() > MAX_FILE {
            return Err(format!("migrations/{name} is over {MAX_FILE} bytes"));
        }
        let sql = std::fs::read_to_string(entry.path()).map_err(|e| format!("migrations/{name}: {e}"))?;
        let sha256 = hex::encode(sha2::Sha256::digest(sql.as_bytes()));
        files.push(Migration { name, sql, sha256 });
        if files.len() > MAX_FILES {
            return Err(format!("more than {MAX_FILES} files in migrations/"));
        }
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// Applies every file of `files` not yet applied for `names.plugin`: `admin` is kiln's
/// connection, `own` one logged in as the plugin's role. Returns how many ran.
pub(super) async fn apply(
    names: &Names,
    admin: &mut deadpool_postgres::Client,
    own: &mut deadpool_postgres::Client,
    files: &[Migration],
) -> Result<usize, ScopeError> {
    let mut ran = 0;
    for file in files {
        let record = admin.transaction().await?;
        super::provision::lock(&record, names).await?;
        let applied = record
            .query_opt(
                "SELECT sha256 FROM plugin_migrations WHERE plugin = $1 AND name = $2",
                &[&names.plugin, &file.name],
            )
            .await?;
        match applied {
            Some(row) if row.get::<_, String>(0) == file.sha256 => continue,
            Some(row) => {
                return Err(ScopeError::Migration(format!(
                    "migrations/{} changed after it was applied (sha256 {} then, {} now): add a new migration instead",
                    file.name,
                    &row.get::<_, String>(0)[..12],
                    &file.sha256[..12]
                )));
            }
            None => {}
        }
        let started = std::time::Instant::now();
        let run = own.transaction().await?;
        let failed = |e: tokio_postgres::Error| {
            let why = match e.as_db_error() {
                Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
                None => e.to_string(),
            };
            ScopeError::Migration(format!("migrations/{} failed: {why}", file.name))
        };
        run.batch_execute(&format!("SET LOCAL statement_timeout = '{STATEMENT_TIMEOUT}'")).await.map_err(failed)?;
        run.batch_execute(&file.sql).await.map_err(failed)?;
        record
            .execute(
                "INSERT INTO plugin_migrations (plugin, name, sha256) VALUES ($1, $2, $3)",
                &[&names.plugin, &file.name, &file.sha256],
            )
            .await?;
        run.commit().await.map_err(failed)?;
        record.commit().await?;
        ran += 1;
        tracing::info!(plugin = %names.plugin, migration = %file.name, took = ?started.elapsed(), "migration applied");
    }
    Ok(ran)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sql_files_in_name_order_and_refuses_odd_ones() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(&dir.path().join("migrations")).unwrap().is_empty());
        let m = dir.path().join("migrations");
        std::fs::create_dir(&m).unwrap();
        std::fs::write(m.join("002_b.sql"), "SELECT 2").unwrap();
        std::fs::write(m.join("001_a.sql"), "SELECT 1").unwrap();
        std::fs::write(m.join("README.md"), "not sql").unwrap();
        let files = read(&m).unwrap();
        assert_eq!(files.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), ["001_a.sql", "002_b.sql"]);
        assert_eq!(files[0].sha256.len(), 64);
        std::fs::create_dir(m.join("003_dir.sql")).unwrap();
        assert!(read(&m).unwrap_err().contains("not a regular file"));
    }
}
