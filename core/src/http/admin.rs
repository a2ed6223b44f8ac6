//! The admin API: list and inspect plugins, reload and toggle them, report health.
//!
//! It never changes what is served by itself: a toggle writes the row (as psql would) and asks
//! the reconciler for a pass; a reload asks for a forced pass. Wire types live here and are
//! converted from the repository's rows.

use super::error::{ApiError, ErrorResponse};
use crate::manifest::validate_name;
use crate::reconciler::{Failure, Reconciler};
use crate::repo::{EndpointRow, PluginRow, Repo, RepoError};
use chrono::{DateTime, Utc};
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Tags)]
enum Tag {
    /// Plugins known to kiln, and their lifecycle.
    Plugins,
    /// The server itself.
    Server,
}

/// A plugin: what the row asks for (`status`) and what the server did (`state`, `error`, …).
#[derive(Debug, Object)]
pub struct Plugin {
    pub id: i64,
    pub name: String,
    pub description: String,
    pub version: String,
    pub author: String,
    #[oai(rename = "type")]
    pub kind: String,
    /// Desired: `active` or `inactive`.
    pub status: String,
    /// Observed: `pending`, `building`, `loaded`, `inactive` or `failed`.
    pub state: String,
    /// Directory of the plugin's crate.
    pub source_path: String,
    /// The manifest (Cargo.toml) last read.
    pub path: Option<String>,
    /// The library serving now.
    pub binary_path: Option<String>,
    /// Why the last attempt failed, with compiler diagnostics for build failures.
    pub error: Option<String>,
    /// Content hash of the sources of the library serving now.
    pub loaded_hash: Option<String>,
    pub loaded_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<PluginRow> for Plugin {
    fn from(r: PluginRow) -> Self {
        Self {
            id: r.id,
            name: r.name,
            description: r.description,
            version: r.version,
            author: r.author,
            kind: r.kind,
            status: r.status,
            state: r.state,
            source_path: r.source_path,
            path: r.path,
            binary_path: r.binary_path,
            error: r.error,
            loaded_hash: r.loaded_hash,
            loaded_at: r.loaded_at,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// An HTTP endpoint a plugin serves.
#[derive(Debug, Object)]
pub struct Endpoint {
    pub id: i64,
    pub plugin_id: i64,
    pub method: String,
    /// OpenAPI-style path, e.g. `/powertable/{id}`.
    pub path: String,
    pub handler: String,
    #[oai(rename = "type")]
    pub kind: String,
}

impl From<EndpointRow> for Endpoint {
    fn from(e: EndpointRow) -> Self {
        Self { id: e.id, plugin_id: e.plugin_id, method: e.method, path: e.path, handler: e.handler, kind: e.kind }
    }
}

/// The server's health.
#[derive(Debug, Object)]
pub struct Health {
    /// `ok` when the database answers and the listener is connected, else `degraded`.
    pub status: String,
    /// `up` or `down`.
    pub database: String,
    /// `connected` or `disconnected`: whether row edits reach the server now.
    pub listener: String,
    /// Plugin versions serving now.
    pub plugins_served: u64,
    /// Plugin builds (cargo runs) since the server started.
    pub builds_run: u64,
    pub version: String,
}

#[derive(ApiResponse)]
enum HealthResponse {
    /// Everything works.
    #[oai(status = 200)]
    Ok(Json<Health>),
    /// Plugins still serve, but the database or the listener is down.
    #[oai(status = 503)]
    Degraded(Json<Health>),
}

/// The admin API.
pub struct AdminApi {
    pub repo: Repo,
    pub reconciler: Reconciler,
    /// Set by the listener while its connection is up.
    pub listener_up: Arc<AtomicBool>,
}

type Result<T> = std::result::Result<Json<T>, ErrorResponse>;

#[OpenApi]
impl AdminApi {
    /// List every plugin.
    #[oai(path = "/plugins", method = "get", tag = "Tag::Plugins")]
    async fn list(&self) -> Result<Vec<Plugin>> {
        let rows = self.repo.list().await.map_err(db_error)?;
        Ok(Json(rows.into_iter().map(Plugin::from).collect()))
    }

    /// One plugin.
    #[oai(path = "/plugins/:name", method = "get", tag = "Tag::Plugins")]
    async fn get(&self, name: Path<String>) -> Result<Plugin> {
        Ok(Json(self.row(&name).await?.into()))
    }

    /// The endpoints a plugin serves now.
    #[oai(path = "/plugins/:name/endpoints", method = "get", tag = "Tag::Plugins")]
    async fn endpoints(&self, name: Path<String>) -> Result<Vec<Endpoint>> {
        let row = self.row(&name).await?;
        let eps = self.repo.endpoints(row.id).await.map_err(db_error)?;
        Ok(Json(eps.into_iter().map(Endpoint::from).collect()))
    }

    /// Rebuild the plugin if its source changed, then load a fresh instance in place of the
    /// serving one. On failure the previous version keeps serving and the answer says why.
    #[oai(path = "/plugins/:name/reload", method = "post", tag = "Tag::Plugins")]
    async fn reload(&self, name: Path<String>) -> Result<Plugin> {
        let row = self.row(&name).await?;
        if !row.wants_active() {
            return Err(ErrorResponse::Unprocessable(Json(ApiError::new(
                "PluginInactive",
                format!("plugin {} is inactive; toggle it (or set status = 'active') to load it", row.name),
            ))));
        }
        self.reconciler.reconcile(row.id, true).await.map_err(failure)?;
        Ok(Json(self.row(&name).await?.into()))
    }

    /// Switch a plugin between active and inactive, and wait until that took effect.
    #[oai(path = "/plugins/:name/toggle", method = "post", tag = "Tag::Plugins")]
    async fn toggle(&self, name: Path<String>) -> Result<Plugin> {
        let row = self.row(&name).await?;
        let status = if row.wants_active() { "inactive" } else { "active" };
        self.repo.set_status(row.id, status).await.map_err(db_error)?;
        self.reconciler.reconcile(row.id, false).await.map_err(failure)?;
        Ok(Json(self.row(&name).await?.into()))
    }

    /// Health of the server, the database and the listener.
    #[oai(path = "/health", method = "get", tag = "Tag::Server")]
    async fn health(&self) -> HealthResponse {
        let db_up = self.repo.ping().await;
        let listener_up = self.listener_up.load(Ordering::Relaxed);
        let health = Health {
            status: if db_up && listener_up { "ok" } else { "degraded" }.into(),
            database: if db_up { "up" } else { "down" }.into(),
            listener: if listener_up { "connected" } else { "disconnected" }.into(),
            plugins_served: self.reconciler.served_count() as u64,
            builds_run: self.reconciler.builds_run(),
            version: env!("CARGO_PKG_VERSION").into(),
        };
        if db_up && listener_up { HealthResponse::Ok(Json(health)) } else { HealthResponse::Degraded(Json(health)) }
    }
}

impl AdminApi {
    async fn row(&self, name: &str) -> std::result::Result<PluginRow, ErrorResponse> {
        validate_name(name).map_err(|msg| ErrorResponse::BadRequest(Json(ApiError::new("InvalidName", msg))))?;
        self.repo.get_by_name(name).await.map_err(db_error)?.ok_or_else(|| {
            ErrorResponse::NotFound(Json(ApiError::new("PluginNotFound", format!("no plugin named {name:?}"))))
        })
    }
}

fn db_error(e: RepoError) -> ErrorResponse {
    tracing::warn!("{e}");
    ErrorResponse::Unavailable(Json(ApiError::new("DatabaseUnavailable", e.to_string())))
}

fn failure(f: Failure) -> ErrorResponse {
    let body = Json(ApiError::new(f.code, f.message));
    match f.code {
        "DatabaseUnavailable" => ErrorResponse::Unavailable(body),
        "Internal" => ErrorResponse::Internal(body),
        _ => ErrorResponse::Unprocessable(body),
    }
}
