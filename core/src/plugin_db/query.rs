//! Running one statement of a plugin, on a connection logged in as its role.
//!
//! - **Parameters** are JSON values bound as `$1`, `$2`, … (never spliced into the SQL), sent in
//!   PostgreSQL's text format so that the server parses them as whatever type the statement
//!   wants: `42` binds to an `int`, a `numeric` or a `text`; `"2026-11-23"` to a `date`; an
//!   object or array to `json`/`jsonb` as JSON; an array to an SQL array (`= ANY($1)`).
//! - **Rows** come back as JSON objects, converted by PostgreSQL itself (`to_jsonb`), so every
//!   column type has its natural JSON form. A statement that returns rows (`SELECT`, `VALUES`,
//!   `… RETURNING`) goes through `db.query`; anything else through `db.execute`.
//! - **Deadline**: the statement's `statement_timeout` is what remains of the handler's
//!   deadline (PostgreSQL cancels it there), else 30 s.
//! - Each call stands alone: the pool undoes what a previous call left on the connection (an open
//!   transaction, settings, locks) before handing it out again (see `PluginDatabases::pool_for`).

use crate::error_code::ErrorCode;
use bytes::BufMut;
use futures_util::{StreamExt, pin_mut};
use serde_json::Value;
use std::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{Format, IsNull, Kind, ToSql, Type, to_sql_checked};

/// Most rows one query answers (more is an error: page with LIMIT).
pub const MAX_ROWS: usize = 10_000;
/// A statement's timeout outside a handler (init, a plugin's own thread).
const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Most prepared statements kept per connection.
const MAX_CACHED: usize = 256;
/// Longest statement, in bytes, and most parameters.
const MAX_SQL: usize = 1024 * 1024;
const MAX_PARAMS: usize = 1000;

/// A refused statement: a code of kiln's table and a message for the plugin.
#[derive(Debug)]
pub struct QueryError {
    pub code: ErrorCode,
    pub message: String,
}

fn error(code: ErrorCode, message: impl Into<String>) -> QueryError {
    QueryError { code, message: message.into() }
}

impl From<tokio_postgres::Error> for QueryError {
    fn from(e: tokio_postgres::Error) -> Self {
        let Some(db) = e.as_db_error() else {
            return error(ErrorCode::DatabaseUnavailable, e.to_string());
        };
        let code = match db.code() {
            c if *c == SqlState::INSUFFICIENT_PRIVILEGE => ErrorCode::TableAccessDenied,
            c if *c == SqlState::QUERY_CANCELED => ErrorCode::Timeout,
            _ => ErrorCode::QueryFailed,
        };
        error(code, format!("{} (SQLSTATE {})", db.message(), db.code().code()))
    }
}

impl From<deadpool_postgres::PoolError> for QueryError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            e => error(ErrorCode::DatabaseUnavailable, format!("no connection for the plugin's role: {e}")),
        }
    }
}

/// Runs `sql` with `params` on a connection of `pool`: its rows (`{"rows": [...]}`) when
/// `returns_rows`, else how many rows it touched (`{"rows_affected": n}`).
pub(super) async fn run(
    pool: &deadpool_postgres::Pool,
    returns_rows: bool,
    sql: &str,
    params: &[Value],
    deadline: Option<Instant>,
) -> Result<Value, QueryError> {
    if sql.len() > MAX_SQL || params.len() > MAX_PARAMS {
        return Err(error(
            ErrorCode::BadRequest,
            format!("at most {MAX_SQL} bytes of SQL and {MAX_PARAMS} parameters"),
        ));
    }
    // Always set, never inherited: the role's own default is something a plugin can change.
    let timeout = match deadline {
        Some(d) => {
            let left = d.checked_duration_since(Instant::now()).filter(|l| !l.is_zero());
            left.ok_or_else(|| error(ErrorCode::Timeout, "the handler's deadline has passed"))?
        }
        None => DEFAULT_TIMEOUT,
    };
    let client = pool.get().await?;
    if client.statement_cache.size() > MAX_CACHED {
        client.statement_cache.clear(); // SQL built on the fly must not grow it without bound
    }
    let text = if returns_rows { wrap(sql) } else { sql.to_string() };
    let statement = client.prepare_cached(&text).await?;
    let bound: Vec<JsonParam<'_>> = params.iter().map(JsonParam).collect();
    // One round trip: the setting and the statement are pipelined on the connection, in order.
    let setup_sql = format!("SET statement_timeout = {}", timeout.as_millis().max(1));
    let setup = client.batch_execute(&setup_sql);
    if returns_rows {
        let rows = client.query_raw(&statement, bound.iter().map(|p| p as &dyn ToSql));
        let (_, rows) = tokio::try_join!(setup, rows)?;
        pin_mut!(rows);
        let mut out = Vec::new();
        while let Some(row) = rows.next().await {
            if out.len() == MAX_ROWS {
                return Err(error(ErrorCode::QueryFailed, format!("more than {MAX_ROWS} rows: page with LIMIT")));
            }
            out.push(row?.try_get::<_, Value>(0)?);
        }
        Ok(serde_json::json!({ "rows": out }))
    } else {
        let params: Vec<&(dyn ToSql + Sync)> = bound.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let (_, n) = tokio::try_join!(setup, client.execute(&statement, &params))?;
        Ok(serde_json::json!({ "rows_affected": n }))
    }
}

/// A row-returning statement, made to return each row as one JSON object. The newline ends a
/// trailing `--` comment; a trailing `;` would end the statement early.
fn wrap(sql: &str) -> String {
    let sql = sql.trim_end().trim_end_matches(';');
    format!("WITH kiln_rows AS (\n{sql}\n) SELECT to_jsonb(kiln_rows) FROM kiln_rows")
}

/// A JSON value bound as a parameter, in text format.
#[derive(Debug)]
struct JsonParam<'a>(&'a Value);

impl ToSql for JsonParam<'_> {
    fn to_sql(&self, ty: &Type, out: &mut bytes::BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        if self.0.is_null() {
            return Ok(IsNull::Yes);
        }
        out.put_slice(text(self.0, ty)?.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(_: &Type) -> bool {
        true // PostgreSQL parses the text as the parameter's type, and says when it cannot
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    to_sql_checked!();
}

/// The text form of `v` as a parameter of type `ty`.
fn text(v: &Value, ty: &Type) -> Result<String, String> {
    if *ty == Type::JSON || *ty == Type::JSONB {
        return Ok(v.to_string());
    }
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Array(items) if matches!(ty.kind(), Kind::Array(_)) => {
            let items: Vec<String> = items
                .iter()
                .map(|item| match item {
                    Value::Null => "NULL".to_string(),
                    Value::String(s) => array_quote(s),
                    Value::Number(_) | Value::Bool(_) => item.to_string(),
                    nested => array_quote(&nested.to_string()),
                })
                .collect();
            Ok(format!("{{{}}}", items.join(",")))
        }
        other => Err(format!("a JSON {} binds to json, jsonb or an array, not {ty}", kind_of(other))),
    }
}

/// An element of an array literal, quoted.
fn array_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Array(_) => "array",
        Value::Object(_) => "object",
        _ => "value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parameters_take_the_text_form_of_their_type() {
        assert_eq!(text(&json!("a'b"), &Type::TEXT).unwrap(), "a'b");
        assert_eq!(text(&json!(42), &Type::INT4).unwrap(), "42");
        assert_eq!(text(&json!("x"), &Type::JSONB).unwrap(), "\"x\"");
        assert_eq!(text(&json!({"a": 1}), &Type::JSON).unwrap(), "{\"a\":1}");
        assert_eq!(text(&json!([1, null, "a\"b", "c\\d"]), &Type::TEXT_ARRAY).unwrap(), r#"{1,NULL,"a\"b","c\\d"}"#);
        assert!(text(&json!({"a": 1}), &Type::TEXT).is_err());
        assert!(text(&json!([1]), &Type::INT4).is_err());
    }

    #[test]
    fn wrapping_survives_trailing_comments_and_semicolons() {
        let w = wrap("SELECT 1 -- one\n;  ");
        assert!(w.contains("SELECT 1 -- one\n\n)"), "{w}");
    }
}
