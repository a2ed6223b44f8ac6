//! Scoped database access: each plugin that declares tables (or ships migrations, or is granted
//! `resources`) gets a PostgreSQL schema and a role of its own, and its queries run as that role.
//!
//! **Trust model.** Isolation is PostgreSQL's, not kiln's: kiln never inspects a plugin's SQL.
//! The plugin's queries run on connections *logged in as its role* (not `SET ROLE` on kiln's
//! own connections: a plugin could `RESET ROLE` out of that). The role:
//! - owns its schema (`plugin_<name>`), which is first and alone on its `search_path`, so
//!   `notes` means the plugin's own table; it may create, alter and drop anything in it;
//! - has no other rights but those PostgreSQL gives every role (`PUBLIC`): it can read the
//!   system catalogs (other schemas' table names and view and function definitions, not their
//!   rows), call ordinary functions, and create temporary tables; it cannot read or write
//!   kiln's tables or another plugin's schema;
//! - gets what the row's `resources` grants (tables, read or write; names as views), revoked
//!   when the row stops granting it;
//! - is limited by the database: `CONNECTION LIMIT` (resources.connections), a statement
//!   timeout (the handler's deadline, else 30 s), and an idle-in-transaction timeout;
//! - is `NOSUPERUSER NOCREATEDB NOCREATEROLE`, a member of no role (a role or schema of its
//!   name that kiln did not make is refused, never adopted), with a random password kiln sets as
//!   a SCRAM verifier whenever it applies the plugin's scope.
//!
//! kiln's own database user must be able to create roles (`CREATEROLE`, or a superuser, as in
//! the quick start and docker-compose) and `pg_hba.conf` must let those roles log in with a
//! password (or trust) over the same address as kiln.
//!
//! - `resources.rs`: a row's `resources`, checked.
//! - `provision.rs`: the role, the schema, grants and name views.
//! - `migrations.rs`: the plugin's `migrations/*.sql`, each applied once under its role.
//! - `query.rs`: running a plugin's statement: JSON parameters in, rows as JSON out.

mod migrations;
mod provision;
mod query;
mod resources;

pub use query::QueryError;
pub use resources::{Resources, check_identifier};

use crate::error_code::ErrorCode;
use crate::manifest::Manifest;
use crate::repo::{PluginRow, RepoError};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::NoTls;

/// Longest a plugin connection may take to open, or to be waited for.
const POOL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a plugin's scope could not be brought to what its row and manifest ask.
#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    #[error("{0}")]
    InvalidResources(String),
    #[error("{0}")]
    Migration(String),
    /// PostgreSQL refused to create or change the role or schema (kiln's user lacks CREATEROLE?).
    #[error("could not set up the plugin's database role and schema: {0}")]
    Provision(String),
    #[error(transparent)]
    Database(#[from] RepoError),
}

impl ScopeError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ScopeError::InvalidResources(_) => ErrorCode::InvalidResources,
            ScopeError::Migration(_) => ErrorCode::MigrationFailed,
            ScopeError::Provision(_) => ErrorCode::DatabaseError,
            ScopeError::Database(e) => ErrorCode::from(e),
        }
    }
}

impl From<tokio_postgres::Error> for ScopeError {
    fn from(e: tokio_postgres::Error) -> Self {
        ScopeError::Database(e.into())
    }
}

impl From<deadpool_postgres::PoolError> for ScopeError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        ScopeError::Database(e.into())
    }
}

/// The PostgreSQL names of one plugin's scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pub plugin: String,
    /// `kiln<database oid>_<plugin>`: roles belong to the whole cluster, so the database's oid
    /// keeps two kiln databases on one cluster apart.
    pub role: String,
    /// `plugin_<plugin>`.
    pub schema: String,
}

impl Names {
    fn new(plugin: &str, database_oid: u32) -> Self {
        Self {
            plugin: plugin.into(),
            role: fit(&format!("kiln{database_oid}_"), plugin),
            schema: fit("plugin_", plugin),
        }
    }
}

/// `prefix` + `name`, within PostgreSQL's 63 bytes: a long name is cut and made unique by a
/// hash of the whole name, after a `$`, which no plugin name holds, so that no other plugin's
/// uncut name can equal it. (Plugin names are ASCII.)
fn fit(prefix: &str, name: &str) -> String {
    let full = format!("{prefix}{name}");
    if full.len() <= 63 {
        return full;
    }
    use sha2::Digest;
    let hash = hex::encode(sha2::Sha256::digest(name.as_bytes()));
    format!("{prefix}{}${}", &name[..63 - prefix.len() - 9], &hash[..8])
}

/// An identifier, double-quoted for SQL.
pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// One plugin's scope, as this process serves it.
pub struct Scope {
    pub names: Names,
    /// Connections logged in as the plugin's role.
    pool: Pool,
    /// The role's password, as this process set it.
    password: String,
}

impl std::fmt::Debug for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scope").field("names", &self.names).finish_non_exhaustive() // not the password
    }
}

impl Scope {
    /// Runs one statement of the plugin (see `query.rs`), at most until `deadline`.
    pub async fn run(
        &self,
        returns_rows: bool,
        sql: &str,
        params: &[serde_json::Value],
        deadline: Option<Instant>,
    ) -> Result<serde_json::Value, QueryError> {
        query::run(&self.pool, returns_rows, sql, params, deadline).await
    }
}

/// Every plugin's scope in this process, and how to make them.
#[derive(Debug)]
pub struct PluginDatabases {
    /// kiln's own connection settings (plugin connections differ in user and password only).
    base: tokio_postgres::Config,
    /// kiln's own connections (to create roles and schemas, and record migrations).
    admin: Pool,
    database_oid: tokio::sync::OnceCell<u32>,
    scopes: Mutex<HashMap<String, Arc<Scope>>>,
    /// The version (source hash) and resources last brought into effect for each plugin, with a
    /// scope or without one. The hash covers the crate's every file (migrations and manifest
    /// included), so a pass with the same pair has nothing to do and reads nothing.
    applied: Mutex<HashMap<String, (String, Resources)>>,
}

impl PluginDatabases {
    pub fn new(base: tokio_postgres::Config, admin: Pool) -> Self {
        let (database_oid, scopes, applied) = Default::default();
        Self { base, admin, database_oid, scopes, applied }
    }

    /// Closes every plugin's connections (at shutdown, before the database may go away: a
    /// connection closed by the server instead is logged as an error).
    pub fn close(&self) {
        for scope in self.scopes.lock().expect("scopes lock").values() {
            scope.pool.close();
        }
    }

    /// The scope plugin `plugin` may query through, if it has one.
    pub fn scope(&self, plugin: &str) -> Option<Arc<Scope>> {
        self.scopes.lock().expect("scopes lock").get(plugin).cloned()
    }

    async fn names(&self, plugin: &str) -> Result<Names, ScopeError> {
        let oid = self
            .database_oid
            .get_or_try_init(|| async {
                let c = self.admin.get().await?;
                let row = c.query_one("SELECT oid FROM pg_database WHERE datname = current_database()", &[]).await?;
                Ok::<u32, ScopeError>(row.get(0))
            })
            .await?;
        Ok(Names::new(plugin, *oid))
    }

    /// Brings the scope of `row`'s plugin to what the row and `manifest` (version `hash`) ask:
    /// the role and schema exist, the grants are exactly the row's, every migration has run
    /// once, and every declared table exists. Before the version's init; does nothing when
    /// the same version and resources were applied already.
    pub async fn ensure(&self, row: &PluginRow, manifest: &Manifest, hash: &str) -> Result<(), ScopeError> {
        let resources = Resources::parse(&row.resources).map_err(ScopeError::InvalidResources)?;
        let wanted = (hash.to_string(), resources);
        if self.applied.lock().expect("applied lock").get(&row.name) == Some(&wanted) {
            return Ok(());
        }
        let resources = &wanted.1;
        let files = migrations::read_off_worker(&manifest.dir).await?;
        let existing = self.scope(&row.name);
        if manifest.tables.is_empty() && files.is_empty() && resources.is_empty() {
            // No database use declared: queries are refused (the schema and its data stay).
            if let Some(scope) = self.scopes.lock().expect("scopes lock").remove(&row.name) {
                scope.pool.close();
            }
            self.applied.lock().expect("applied lock").insert(row.name.clone(), wanted);
            return Ok(());
        }
        let names = self.names(&row.name).await?;
        // The password of this process's pool, set again on every apply (a role dropped and
        // made again in between would have none).
        let password = match &existing {
            Some(scope) => scope.password.clone(),
            None => random_password()?,
        };
        let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
        {
            let mut admin = self.admin.get().await?;
            provision::apply(&mut admin, &names, &verifier, resources).await?;
        }
        let scope = match existing {
            Some(scope) => {
                scope.pool.resize(resources.connection_limit() as usize);
                scope
            }
            None => Arc::new(Scope {
                pool: self.pool_for(&names, &password, resources.connection_limit())?,
                password,
                names: names.clone(),
            }),
        };
        {
            let mut admin = self.admin.get().await?;
            let mut own = scope.pool.get().await.map_err(|e| {
                ScopeError::Provision(format!("logging in as the plugin's role {:?} failed: {e}", names.role))
            })?;
            if migrations::apply(&names, &mut admin, &mut own, &files).await? > 0 {
                // Statements prepared before the migration may describe tables it changed.
                scope.pool.manager().statement_caches.clear();
            }
            provision::check_tables(&own, &names, &manifest.tables).await?;
        }
        self.scopes.lock().expect("scopes lock").insert(row.name.clone(), scope);
        self.applied.lock().expect("applied lock").insert(row.name.clone(), wanted);
        Ok(())
    }

    /// The plugin was uninstalled: its schema (its tables and data), its role and its record of
    /// migrations go with it.
    pub async fn forget(&self, plugin: &str) -> Result<(), ScopeError> {
        self.applied.lock().expect("applied lock").remove(plugin);
        if let Some(scope) = self.scopes.lock().expect("scopes lock").remove(plugin) {
            scope.pool.close();
        }
        let names = self.names(plugin).await?;
        let mut admin = self.admin.get().await?;
        provision::drop(&mut admin, &names).await
    }

    fn pool_for(&self, names: &Names, password: &str, size: u32) -> Result<Pool, ScopeError> {
        let mut config = self.base.clone();
        config.user(&names.role).password(password).application_name(format!("kiln plugin {}", names.plugin));
        // PostgreSQL's warnings are not sent to these sessions: the recycle's ROLLBACK outside a
        // transaction would log "there is no transaction in progress" at every checkout. (The
        // plugin gets its rows and errors as before; `RESET ALL` keeps this default.)
        let options = match config.get_options() {
            Some(existing) => format!("{existing} -c client_min_messages=error"),
            None => "-c client_min_messages=error".to_string(),
        };
        config.options(options);
        // Each checkout starts clean: whatever a previous call left on the connection (an open or
        // failed transaction, settings, advisory locks, LISTENs, temporary tables) is undone.
        let recycling_method = RecyclingMethod::Custom(
            "ROLLBACK; CLOSE ALL; RESET ALL; UNLISTEN *; SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES;"
                .into(),
        );
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method });
        Pool::builder(manager)
            .max_size(size as usize)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .recycle_timeout(Some(POOL_TIMEOUT))
            .build()
            .map_err(|e| ScopeError::Provision(e.to_string()))
    }
}

/// 32 random hex digits from the kernel.
fn random_password() -> Result<String, ScopeError> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .map_err(|e| ScopeError::Provision(format!("reading /dev/urandom: {e}")))?;
    Ok(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_postgres_and_stay_apart() {
        let n = Names::new("notes", 16384);
        assert_eq!((n.role.as_str(), n.schema.as_str()), ("kiln16384_notes", "plugin_notes"));
        let long_a = Names::new(&format!("{}a", "x".repeat(63)), 4_294_967_295);
        let long_b = Names::new(&format!("{}b", "x".repeat(63)), 4_294_967_295);
        assert!(long_a.role.len() <= 63 && long_a.schema.len() <= 63, "{long_a:?}");
        assert_ne!(long_a.role, long_b.role);
        assert_ne!(long_a.schema, long_b.schema);
        // A plugin named like a cut name cannot take its role or schema: names hold no `$`.
        let cut = long_a.schema.strip_prefix("plugin_").unwrap().to_string();
        assert!(crate::manifest::validate_name(&cut).is_err(), "{cut}");
        assert_eq!(quote("a\"b"), "\"a\"\"b\"");
    }
}
