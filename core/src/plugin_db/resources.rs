//! A row's `resources`: what an operator grants a plugin in the database beyond its own schema.
//!
//! ```json
//! {"tables": {"public.users": "read", "public.audit": "write"},
//!  "names":  {"users": "public.users"},
//!  "connections": 4}
//! ```
//!
//! - `tables`: schema-qualified tables and what the plugin's role may do with them (`read`:
//!   SELECT; `write`: SELECT, INSERT, UPDATE, DELETE). PostgreSQL enforces it.
//! - `names`: a name in the plugin's SQL that means another table (a view in the plugin's
//!   schema). The view reads with the plugin's own rights: a name needs a `tables` grant too.
//! - `connections`: the most connections the plugin's role may hold (1 to 64, default 4).

use serde_json::Value;
use std::collections::BTreeMap;

/// kiln's own tables (in `public`): never granted to a plugin.
const KILN_TABLES: &[&str] = &[
    "plugins",
    "plugin_endpoints",
    "plugin_builds",
    "plugin_tombstones",
    "plugin_storage",
    "plugin_migrations",
    "kiln_migrations",
    "events",
    "replicas",
    "plugin_replicas",
    // A plugin that could write here could have every replica load its code.
    "plugin_libraries",
    "plugin_archives",
    "plugin_status",
];

/// Most connections a plugin may ask for.
const MAX_CONNECTIONS: u32 = 64;
/// Connections a plugin gets unless its row says otherwise.
pub const DEFAULT_CONNECTIONS: u32 = 4;

/// What a table grant allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

impl Access {
    /// The privileges to grant, as SQL.
    pub fn privileges(self) -> &'static str {
        match self {
            Access::Read => "SELECT",
            Access::Write => "SELECT, INSERT, UPDATE, DELETE",
        }
    }
}

/// A schema-qualified table name, each part a plain identifier.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct QualifiedTable {
    pub schema: String,
    pub table: String,
}

impl QualifiedTable {
    fn parse(s: &str) -> Result<Self, String> {
        let (schema, table) =
            s.split_once('.').ok_or_else(|| format!("{s:?}: name a table with its schema (\"public.users\")"))?;
        check_identifier(schema)?;
        check_identifier(table)?;
        if schema == "information_schema" || schema.starts_with("pg_") {
            return Err(format!("{s}: the system catalogs are not grantable (they hold every role's secrets)"));
        }
        if schema.starts_with("plugin_") {
            return Err(format!(
                "{s}: another plugin's schema is not grantable (plugins share data through tables of yours)"
            ));
        }
        if schema == "public" && KILN_TABLES.contains(&table) {
            return Err(format!("{s}: kiln's own tables are not grantable (a plugin could change what kiln runs)"));
        }
        Ok(Self { schema: schema.into(), table: table.into() })
    }

    /// `"schema"."table"`.
    pub fn sql(&self) -> String {
        format!("{}.{}", super::quote(&self.schema), super::quote(&self.table))
    }
}

impl std::fmt::Display for QualifiedTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

/// A row's `resources`, checked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resources {
    pub tables: BTreeMap<QualifiedTable, Access>,
    pub names: BTreeMap<String, QualifiedTable>,
    pub connections: Option<u32>,
}

impl Resources {
    /// Reads a row's `resources`; an error names what is wrong.
    pub fn parse(v: &Value) -> Result<Self, String> {
        let Value::Object(map) = v else { return Err("resources must be a JSON object".into()) };
        let mut r = Resources::default();
        for (key, value) in map {
            match key.as_str() {
                "tables" => {
                    let Value::Object(tables) = value else {
                        return Err("resources.tables must map \"schema.table\" to \"read\" or \"write\"".into());
                    };
                    for (name, access) in tables {
                        let access = match access.as_str() {
                            Some("read") => Access::Read,
                            Some("write") => Access::Write,
                            _ => {
                                return Err(format!(
                                    "resources.tables.{name}: use \"read\" or \"write\", not {access}"
                                ));
                            }
                        };
                        r.tables
                            .insert(QualifiedTable::parse(name).map_err(|e| format!("resources.tables: {e}"))?, access);
                    }
                }
                "names" => {
                    let Value::Object(names) = value else {
                        return Err("resources.names must map a name to \"schema.table\"".into());
                    };
                    for (name, target) in names {
                        check_identifier(name).map_err(|e| format!("resources.names: {e}"))?;
                        let target =
                            target.as_str().ok_or_else(|| format!("resources.names.{name} must be a string"))?;
                        r.names.insert(
                            name.clone(),
                            QualifiedTable::parse(target).map_err(|e| format!("resources.names.{name}: {e}"))?,
                        );
                    }
                }
                "connections" => match value.as_u64() {
                    Some(n @ 1..) if n <= u64::from(MAX_CONNECTIONS) => r.connections = Some(n as u32),
                    _ => return Err(format!("resources.connections must be 1 to {MAX_CONNECTIONS}, not {value}")),
                },
                other => return Err(format!("unknown key resources.{other} (known: tables, names, connections)")),
            }
        }
        Ok(r)
    }

    /// The connection limit of the plugin's role.
    pub fn connection_limit(&self) -> u32 {
        self.connections.unwrap_or(DEFAULT_CONNECTIONS)
    }

    /// Whether the row grants anything (so the plugin needs a scope even without tables).
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty() && self.names.is_empty()
    }
}

/// A plain SQL identifier: a letter or `_`, then letters, digits and `_` (at most 63 bytes).
/// Anything else is refused rather than quoted, so names read the same in SQL and in the row.
pub fn check_identifier(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!("{s:?} is not a plain lowercase SQL identifier ([a-z_][a-z0-9_]*, at most 63 bytes)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_tables_names_and_connections() {
        let r = Resources::parse(&json!({
            "tables": {"public.users": "read", "shared.audit": "write"},
            "names": {"users": "public.users"},
            "connections": 8
        }))
        .unwrap();
        let users = QualifiedTable { schema: "public".into(), table: "users".into() };
        assert_eq!(r.tables[&users], Access::Read);
        assert_eq!(r.names["users"], users);
        assert_eq!(r.connection_limit(), 8);
        assert_eq!(users.sql(), "\"public\".\"users\"");
        assert!(Resources::parse(&json!({})).unwrap().is_empty());
    }

    #[test]
    fn refuses_what_it_cannot_apply_exactly() {
        for bad in [
            json!([]),
            json!({"tables": ["public.users"]}),
            json!({"tables": {"users": "read"}}),
            json!({"tables": {"public.users": "all"}}),
            json!({"tables": {"public.Users; DROP": "read"}}),
            json!({"names": {"u": 3}}),
            json!({"names": {"Users": "public.users"}}),
            json!({"connections": 0}),
            json!({"connections": 65}),
            json!({"grants": {}}),
            json!({"tables": {"pg_catalog.pg_authid": "read"}}),
            json!({"tables": {"information_schema.tables": "read"}}),
            json!({"tables": {"plugin_other.notes": "read"}}),
            json!({"tables": {"public.plugins": "write"}}),
            json!({"tables": {"public.plugin_libraries": "read"}}),
            json!({"tables": {"public.replicas": "write"}}),
            json!({"names": {"secrets": "public.plugin_storage"}}),
        ] {
            assert!(Resources::parse(&bad).is_err(), "{bad}");
        }
    }
}
