//! Schema migrations: the ordered SQL files of `sql/`, embedded in the binary, applied at startup.
//!
//! All pending migrations run in one transaction under an advisory lock, and each is recorded in
//! `kiln_migrations`: running twice, or from two servers at once, applies each file exactly once.

use anyhow::Context;
use deadpool_postgres::Pool;

/// (version, name, SQL) of every migration, in order.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "001_plugins.sql", include_str!("../../sql/001_plugins.sql")),
    (2, "002_config_origin_builds.sql", include_str!("../../sql/002_config_origin_builds.sql")),
    (3, "003_uninstalled.sql", include_str!("../../sql/003_uninstalled.sql")),
    (4, "004_waiting.sql", include_str!("../../sql/004_waiting.sql")),
    (5, "005_quarantine.sql", include_str!("../../sql/005_quarantine.sql")),
    (6, "006_storage.sql", include_str!("../../sql/006_storage.sql")),
    (7, "007_database.sql", include_str!("../../sql/007_database.sql")),
    (8, "008_events.sql", include_str!("../../sql/008_events.sql")),
    (9, "009_build_messages.sql", include_str!("../../sql/009_build_messages.sql")),
    (10, "010_statement_notify.sql", include_str!("../../sql/010_statement_notify.sql")),
    (11, "011_replicas.sql", include_str!("../../sql/011_replicas.sql")),
    (12, "012_plugin_archives.sql", include_str!("../../sql/012_plugin_archives.sql")),
    (13, "013_isolation.sql", include_str!("../../sql/013_isolation.sql")),
    (14, "014_catalog.sql", include_str!("../../sql/014_catalog.sql")),
    (15, "015_draft_builds.sql", include_str!("../../sql/015_draft_builds.sql")),
];

/// Arbitrary key of the advisory lock that serializes migrations.
const LOCK_KEY: i64 = 0x6b69_6c6e; // "kiln"

/// Applies every migration not yet applied. Returns how many ran.
pub async fn run(pool: &Pool) -> anyhow::Result<usize> {
    let mut client = pool.get().await.context("connecting to PostgreSQL")?;
    let tx = client.transaction().await?;
    // Bounded: a session holding the key (any role may take any advisory lock) fails the start
    // with a message instead of hanging it.
    tx.batch_execute("SET LOCAL lock_timeout = '60s'").await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY]).await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS kiln_migrations (
             version    INT PRIMARY KEY,
             name       TEXT NOT NULL,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let applied: Vec<i32> =
        tx.query("SELECT version FROM kiln_migrations", &[]).await?.iter().map(|r| r.get(0)).collect();
    let mut ran = 0;
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(sql).await.with_context(|| format!("applying migration {name}"))?;
        tx.execute("INSERT INTO kiln_migrations (version, name) VALUES ($1, $2)", &[version, name]).await?;
        tracing::info!(migration = name, "applied");
        ran += 1;
    }
    tx.commit().await?;
    Ok(ran)
}
