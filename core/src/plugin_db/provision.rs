//! The role, the schema, the grants and the name views of one plugin, made to match its row.
//!
//! Everything runs in one transaction of kiln's, under an advisory lock per plugin (two kiln
//! servers, or two passes, never interleave), so a plugin sees its old grants or its new ones.
//! Identifiers come from checked names (`Names`, `Resources`) and are quoted; nothing a user
//! wrote is spliced into SQL otherwise.

use super::resources::{QualifiedTable, Resources};
use super::{Names, ScopeError, quote};
use deadpool_postgres::GenericClient;
use std::collections::BTreeSet;

/// The comment on the views kiln makes for `resources.names` (how it knows which are its own).
const VIEW_MARK: &str = "kiln: resources.names";

/// Creates or updates `names`' role and schema and applies `resources`; `verifier` is the
/// role's password (a SCRAM verifier), set every time.
///
/// A role or schema of that name that kiln did not make for this plugin (its comment says so) is
/// refused, never adopted: it may be an operator's, with rights a plugin must not get.
pub(super) async fn apply(
    admin: &mut deadpool_postgres::Client,
    names: &Names,
    verifier: &str,
    resources: &Resources,
) -> Result<(), ScopeError> {
    let tx = admin.transaction().await?;
    lock(&tx, names).await?;
    let (role, schema, mark) = (quote(&names.role), quote(&names.schema), mark(names));
    let refused = |e: tokio_postgres::Error| match e.as_db_error() {
        Some(db) => ScopeError::Provision(format!("{} (SQLSTATE {})", db.message(), db.code().code())),
        None => e.into(),
    };
    let existing = tx
        .query_opt(
            "SELECT shobj_description(r.oid, 'pg_authid'),
                    r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication OR r.rolbypassrls
                    OR EXISTS (SELECT 1 FROM pg_auth_members m WHERE m.member = r.oid)
               FROM pg_roles r WHERE r.rolname = $1",
            &[&names.role],
        )
        .await?;
    match existing {
        None => {
            let sql = format!("CREATE ROLE {role} NOLOGIN; COMMENT ON ROLE {role} IS '{mark}'");
            tx.batch_execute(&sql).await.map_err(refused)?;
        }
        Some(r) if r.get::<_, Option<String>>(0).as_deref() != Some(mark.as_str()) => {
            return Err(ScopeError::Provision(format!(
                "a role named {} exists that kiln did not make for plugin {}: rename or drop it",
                names.role, names.plugin
            )));
        }
        Some(r) if r.get::<_, bool>(1) => {
            return Err(ScopeError::Provision(format!(
                "role {} has rights a plugin's role must not have (superuser, createrole, createdb, replication, bypassrls or a role membership)",
                names.role
            )));
        }
        Some(_) => {}
    }
    let schema_mark = tx
        .query_opt("SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = $1", &[&names.schema])
        .await?;
    let create_schema = match schema_mark {
        None => format!("CREATE SCHEMA {schema} AUTHORIZATION {role}; COMMENT ON SCHEMA {schema} IS '{mark}';"),
        Some(r) if r.get::<_, Option<String>>(0).as_deref() == Some(mark.as_str()) => {
            format!("ALTER SCHEMA {schema} OWNER TO {role};")
        }
        Some(_) => {
            return Err(ScopeError::Provision(format!(
                "a schema named {} exists that kiln did not make for plugin {}: rename or drop it",
                names.schema, names.plugin
            )));
        }
    };
    // A SCRAM verifier, not the password: the password never reaches the server's logs.
    debug_assert!(!verifier.contains('\''));
    let sql = format!(
        "GRANT {role} TO CURRENT_USER;
         ALTER ROLE {role} WITH LOGIN CONNECTION LIMIT {limit} PASSWORD '{verifier}';
         ALTER ROLE {role} SET search_path = {schema};
         ALTER ROLE {role} SET statement_timeout = '30s';
         ALTER ROLE {role} SET idle_in_transaction_session_timeout = '60s';
         {create_schema}",
        limit = resources.connection_limit()
    );
    tx.batch_execute(&sql).await.map_err(refused)?;
    grants(&tx, names, resources).await?;
    views(&tx, names, resources).await?;
    tx.commit().await?;
    Ok(())
}

/// The comment on a role and a schema kiln made for a plugin (plugin names need no quoting).
fn mark(names: &Names) -> String {
    format!("kiln: plugin {}", names.plugin)
}

/// Takes the plugin's lock (in the transaction `tx`), waiting at most 10 s: a lock that long
/// held is a stuck or hostile session, and the pass fails (and is retried) instead of hanging.
pub(super) async fn lock(tx: &impl GenericClient, names: &Names) -> Result<(), ScopeError> {
    tx.batch_execute("SET LOCAL lock_timeout = '10s'").await?;
    tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&format!("kiln-plugin-db:{}", names.plugin)]).await?;
    Ok(())
}

/// Makes the role's rights on tables outside its schema exactly `resources.tables`.
async fn grants(tx: &impl GenericClient, names: &Names, resources: &Resources) -> Result<(), ScopeError> {
    let role = quote(&names.role);
    let held = tx
        .query(
            "SELECT DISTINCT n.nspname, c.relname
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(c.relacl) a
              WHERE a.grantee = to_regrole($1)::oid AND n.nspname <> $2",
            &[&quote(&names.role), &names.schema],
        )
        .await?;
    let mut old_schemas = BTreeSet::new();
    for r in &held {
        let table = QualifiedTable { schema: r.get(0), table: r.get(1) };
        tx.batch_execute(&format!("REVOKE ALL ON TABLE {} FROM {role}", table.sql())).await?;
        old_schemas.insert(table.schema);
    }
    let new_schemas: BTreeSet<&str> = resources.tables.keys().map(|t| t.schema.as_str()).collect();
    for schema in old_schemas.iter().filter(|s| !new_schemas.contains(s.as_str())) {
        tx.batch_execute(&format!("REVOKE USAGE ON SCHEMA {} FROM {role}", quote(schema))).await?;
    }
    for (table, access) in &resources.tables {
        let sql = format!(
            "GRANT USAGE ON SCHEMA {} TO {role}; GRANT {} ON TABLE {} TO {role}",
            quote(&table.schema),
            access.privileges(),
            table.sql()
        );
        tx.batch_execute(&sql).await.map_err(|e| refused_grant(&format!("resources.tables.{table}"), e))?;
    }
    Ok(())
}

/// Makes the views of `resources.names` in the plugin's schema exactly the row's.
async fn views(tx: &impl GenericClient, names: &Names, resources: &Resources) -> Result<(), ScopeError> {
    let (role, schema) = (quote(&names.role), quote(&names.schema));
    let ours = tx
        .query(
            "SELECT c.relname FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_description d ON d.objoid = c.oid AND d.classoid = 'pg_class'::regclass
              WHERE n.nspname = $1 AND c.relkind = 'v' AND d.description = $2",
            &[&names.schema, &VIEW_MARK],
        )
        .await?;
    for r in &ours {
        let view: String = r.get(0);
        tx.batch_execute(&format!("DROP VIEW {schema}.{}", quote(&view)))
            .await
            .map_err(|e| refused_grant(&format!("resources.names.{view}"), e))?;
    }
    for (name, target) in &resources.names {
        let taken = tx
            .query_one("SELECT to_regclass(format('%I.%I', $1::text, $2::text)) IS NOT NULL", &[&names.schema, name])
            .await?
            .get::<_, bool>(0);
        if taken {
            return Err(ScopeError::InvalidResources(format!(
                "resources.names.{name}: the plugin's schema has a relation of its own named {name}"
            )));
        }
        let view = format!("{schema}.{}", quote(name));
        let sql = format!(
            "CREATE VIEW {view} AS SELECT * FROM {target};
             ALTER VIEW {view} OWNER TO {role};
             COMMENT ON VIEW {view} IS '{VIEW_MARK}'",
            target = target.sql()
        );
        tx.batch_execute(&sql).await.map_err(|e| refused_grant(&format!("resources.names.{name}"), e))?;
    }
    Ok(())
}

fn refused_grant(what: &str, e: tokio_postgres::Error) -> ScopeError {
    match e.as_db_error() {
        Some(db) => ScopeError::InvalidResources(format!("{what}: {}", db.message())),
        None => e.into(),
    }
}

/// Fails unless every table the manifest declares exists in the plugin's schema (its
/// migrations create them).
pub(super) async fn check_tables(own: &impl GenericClient, names: &Names, tables: &[String]) -> Result<(), ScopeError> {
    let missing = own
        .query(
            "SELECT t FROM unnest($2::text[]) t WHERE to_regclass(format('%I.%I', $1::text, t)) IS NULL",
            &[&names.schema, &tables],
        )
        .await?;
    if missing.is_empty() {
        return Ok(());
    }
    let missing: Vec<String> = missing.iter().map(|r| r.get(0)).collect();
    Err(ScopeError::Migration(format!(
        "the manifest declares table(s) {} but schema {} has none of that name: add a migration (migrations/*.sql) that creates it",
        missing.join(", "),
        names.schema
    )))
}

/// Drops `names`' schema (with everything in it), the role's sessions, remaining rights and the
/// role itself, and the record of its migrations: only what kiln made for this plugin (their
/// comments say so). Harmless when they do not exist.
pub(super) async fn drop(admin: &mut deadpool_postgres::Client, names: &Names) -> Result<(), ScopeError> {
    let tx = admin.transaction().await?;
    lock(&tx, names).await?;
    let mark = mark(names);
    let ours = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace
                             WHERE nspname = $1 AND obj_description(oid, 'pg_namespace') = $3),
                    EXISTS (SELECT 1 FROM pg_roles
                             WHERE rolname = $2 AND shobj_description(oid, 'pg_authid') = $3)",
            &[&names.schema, &names.role, &mark],
        )
        .await?;
    let (schema_ours, role_ours): (bool, bool) = (ours.get(0), ours.get(1));
    if schema_ours {
        tx.batch_execute(&format!("DROP SCHEMA {} CASCADE", quote(&names.schema))).await?;
    }
    if role_ours {
        let role = quote(&names.role);
        // Its open sessions (this or another server's pool) end first: they would keep running
        // as a dropped role.
        tx.batch_execute(&format!("ALTER ROLE {role} NOLOGIN")).await?;
        tx.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", &[&names.role]).await?;
        tx.batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}")).await?;
    }
    tx.execute("DELETE FROM plugin_migrations WHERE plugin = $1", &[&names.plugin]).await?;
    tx.commit().await?;
    Ok(())
}
