//! The host's service calls (`KilnHost::call`): what a plugin asks kiln to do for it, by name
//! with JSON arguments: its key-value storage (`storage.get`, `.put`, `.delete`, `.list`,
//! `.cas`), kept in PostgreSQL under the plugin's name, and its scoped database access
//! (`db.query`, `db.execute`: see `plugin_db`), and events it publishes (`events.emit`) or subscribes to at runtime
//! (`events.on`, `events.off`), and services of the plugins it depends on (`plugin.call`).
//!
//! A plugin calls synchronously, on whatever thread runs it: an async worker (an inline
//! handler), a blocking-pool thread, or a thread of its own. The database is asynchronous, so a
//! call runs its query on kiln's runtime and waits: on an async worker through
//! `block_in_place`, which hands the worker's other tasks to another thread first, so that a
//! plugin's database call never stalls other requests.

use crate::events::{EventBus, Source};
use crate::plugin_db::PluginDatabases;
use crate::repo::{Repo, RepoError};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Instant;

/// Most entries `storage.list` answers.
const LIST_LIMIT: i64 = 1000;
/// Longest key, in bytes (as the table's check says).
const MAX_KEY: usize = 512;

/// What the host's service calls use.
#[derive(Clone)]
pub struct Services {
    pub repo: Repo,
    pub databases: Arc<PluginDatabases>,
    pub events: Arc<EventBus>,
    /// The plugins this one's manifest depends on: the ones whose services it may call.
    pub dependencies: Vec<String>,
    pub runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services").finish_non_exhaustive()
    }
}

/// A refused call: `code` (kiln's error table) and a message for the plugin.
#[derive(Debug)]
pub struct CallError {
    pub code: &'static str,
    pub message: String,
}

impl From<RepoError> for CallError {
    fn from(e: RepoError) -> Self {
        Self { code: crate::error_code::ErrorCode::from(&e).as_str(), message: e.to_string() }
    }
}

fn bad(message: impl Into<String>) -> CallError {
    CallError { code: "BadRequest", message: message.into() }
}

impl Services {
    /// Runs service `op` for `plugin` with `args`, waiting on this (synchronous) thread, and at
    /// most until `deadline` (the handler's): past it, the call fails with `Timeout` at once.
    /// `instance` identifies the calling instance (`HostCtx::key`).
    pub fn call(
        &self,
        plugin: &str,
        instance: usize,
        op: &str,
        args: &Value,
        deadline: Option<Instant>,
    ) -> Result<Value, CallError> {
        let timeout = || CallError { code: "Timeout", message: "the handler's deadline has passed".into() };
        if op == "plugin.call" {
            // Another plugin's code, run on this thread (as the caller's own would be).
            if deadline.is_some_and(|d| d <= Instant::now()) {
                return Err(timeout());
            }
            return self.call_plugin(plugin, args, deadline);
        }
        let remaining = match deadline {
            Some(d) => Some(d.checked_duration_since(Instant::now()).ok_or_else(timeout)?),
            None => None,
        };
        let run = || {
            self.runtime.block_on(async {
                match remaining {
                    Some(r) => tokio::time::timeout(r, self.dispatch(plugin, instance, op, args, deadline))
                        .await
                        .map_err(|_| timeout())?,
                    None => self.dispatch(plugin, instance, op, args, deadline).await,
                }
            })
        };
        match tokio::runtime::Handle::try_current() {
            // On one of the runtime's threads: free the worker for other tasks meanwhile.
            Ok(_) => tokio::task::block_in_place(run),
            Err(_) => run(),
        }
    }

    /// `plugin.call`: service `args.service` of plugin `args.plugin`, which `caller` must depend
    /// on, with `args.args`, within the caller's deadline (30 s when it has none).
    fn call_plugin(&self, caller: &str, args: &Value, deadline: Option<Instant>) -> Result<Value, CallError> {
        let provider = args["plugin"].as_str().ok_or_else(|| bad("`plugin` must be a string"))?;
        let service = args["service"].as_str().ok_or_else(|| bad("`service` must be a string"))?;
        if !self.dependencies.iter().any(|d| d == provider) {
            return Err(CallError {
                code: "DependencyNotDeclared",
                message: format!(
                    "plugin {caller} does not depend on {provider}: add it to `dependencies` in its manifest"
                ),
            });
        }
        let serving = self.events.serving(provider).ok_or_else(|| CallError {
            code: "DependencyUnavailable",
            message: format!("plugin {provider} does not serve now"),
        })?;
        let input = serde_json::to_vec(&args["args"]).expect("a Value serializes");
        let deadline = deadline.unwrap_or_else(|| Instant::now() + std::time::Duration::from_secs(30));
        let answer = serving.service(service, &input, deadline).map_err(|message| CallError {
            code: "PluginError",
            message: format!("{provider}.{service}: {message}"),
        })?;
        let answer: Value = serde_json::from_slice(&answer).map_err(|e| CallError {
            code: "PluginError",
            message: format!("{provider}.{service} answered something that is not JSON: {e}"),
        })?;
        Ok(json!({ "answer": answer }))
    }

    async fn dispatch(
        &self,
        plugin: &str,
        instance: usize,
        op: &str,
        args: &Value,
        deadline: Option<Instant>,
    ) -> Result<Value, CallError> {
        // The id a plugin chose for a runtime subscription.
        let subscription_id = || -> Result<u32, CallError> {
            args["id"].as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(|| bad("`id` must be a u32"))
        };
        let key = || -> Result<&str, CallError> {
            let key = args["key"].as_str().ok_or_else(|| bad("`key` must be a string"))?;
            if key.is_empty() || key.len() > MAX_KEY {
                return Err(bad(format!("a key has 1 to {MAX_KEY} bytes")));
            }
            Ok(key)
        };
        match op {
            "storage.get" => Ok(json!({ "value": self.repo.storage_get(plugin, key()?).await? })),
            "storage.put" => {
                self.repo.storage_put(plugin, key()?, &args["value"]).await?;
                Ok(json!({}))
            }
            "storage.delete" => Ok(json!({ "deleted": self.repo.storage_delete(plugin, key()?).await? })),
            "storage.list" => {
                let prefix = args["prefix"].as_str().unwrap_or("");
                let entries = self.repo.storage_list(plugin, prefix, LIST_LIMIT).await?;
                let entries: Vec<Value> = entries.into_iter().map(|(k, v)| json!({ "key": k, "value": v })).collect();
                Ok(json!({ "entries": entries }))
            }
            "storage.cas" => {
                let expected = args.get("expected").filter(|v| !v.is_null());
                let swapped = self.repo.storage_compare_and_set(plugin, key()?, expected, &args["value"]).await?;
                Ok(json!({ "swapped": swapped }))
            }
            "db.query" | "db.execute" => {
                let scope = self.databases.scope(plugin).ok_or_else(|| CallError {
                    code: "TableAccessDenied",
                    message: format!(
                        "plugin {plugin} has no database scope: declare its tables in [package.metadata.kiln] (tables = [...])"
                    ),
                })?;
                let sql = args["sql"].as_str().ok_or_else(|| bad("`sql` must be a string"))?;
                let params = match &args["params"] {
                    Value::Null => &[][..],
                    Value::Array(a) => &a[..],
                    _ => return Err(bad("`params` must be an array")),
                };
                let answer = scope.run(op == "db.query", sql, params, deadline).await;
                answer.map_err(|e| CallError { code: e.code.as_str(), message: e.message })
            }
            "events.emit" => {
                let topic = args["topic"].as_str().ok_or_else(|| bad("`topic` must be a string"))?;
                let data = args.get("data").cloned().unwrap_or(Value::Null);
                let event = self
                    .events
                    .publish(topic, data, Source::Plugin(plugin.to_string()))
                    .map_err(|message| CallError { code: "InvalidEvent", message })?;
                Ok(json!({ "id": event.id }))
            }
            "events.on" => {
                let pattern = args["pattern"].as_str().ok_or_else(|| bad("`pattern` must be a string"))?;
                let id = subscription_id()?;
                let once = args["once"].as_bool().unwrap_or(false);
                self.events
                    .subscribe_runtime(plugin, instance, pattern, id, once)
                    .map_err(|message| CallError { code: "InvalidEvent", message })?;
                Ok(json!({}))
            }
            "events.off" => {
                let id = subscription_id()?;
                Ok(json!({ "removed": self.events.unsubscribe_runtime(instance, id) }))
            }
            _ => Err(CallError { code: "NotFound", message: format!("no host service {op:?}") }),
        }
    }
}
