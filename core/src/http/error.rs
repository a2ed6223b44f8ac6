//! One error shape for every answer kiln itself gives:
//! `{"error": <stable code>, "message": <for humans>, "details": {…}}`.

use poem::http::StatusCode;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object};
use serde_json::Value;

/// The JSON body of every error.
#[derive(Debug, Clone, Object)]
pub struct ApiError {
    /// Stable, machine-readable code (e.g. `PluginNotFound`, `BuildFailed`).
    pub error: String,
    /// What went wrong, for a human.
    pub message: String,
    /// Extra facts, such as compiler diagnostics.
    pub details: Value,
}

impl ApiError {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self { error: code.into(), message: message.into(), details: Value::Object(Default::default()) }
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }
}

/// Error answers of the admin API.
#[derive(Debug, ApiResponse)]
pub enum ErrorResponse {
    /// The request is malformed (`BadRequest`, `InvalidName`, `InvalidArchive`).
    #[oai(status = 400)]
    BadRequest(Json<ApiError>),
    /// `KILN_ADMIN_TOKEN` is set and the request lacks `Authorization: Bearer <token>`.
    #[oai(status = 401)]
    Unauthorized(Json<ApiError>),
    /// No such plugin.
    #[oai(status = 404)]
    NotFound(Json<ApiError>),
    /// A plugin of that name exists already (`PluginExists`).
    #[oai(status = 409)]
    Conflict(Json<ApiError>),
    /// The upload is larger than allowed.
    #[oai(status = 413)]
    TooLarge(Json<ApiError>),
    /// The plugin could not be built, loaded, configured or served; the previous version, if any,
    /// still serves. Codes: `ManifestNotFound`, `InvalidManifest`, `BuildFailed`, `AbiMismatch`,
    /// `EntrypointNotFound`, `LoadError`, `InitFailed`, `RouteConflict`, `InvalidRoute`,
    /// `InvalidConfig` (with `details.violations`), `PluginInactive`.
    #[oai(status = 422)]
    Unprocessable(Json<ApiError>),
    /// An unexpected failure.
    #[oai(status = 500)]
    Internal(Json<ApiError>),
    /// The database is unavailable.
    #[oai(status = 503)]
    Unavailable(Json<ApiError>),
}

/// A complete JSON error response, for places outside poem-openapi.
pub fn json_error(status: StatusCode, code: &str, message: &str) -> poem::Response {
    let body = serde_json::json!({ "error": code, "message": message, "details": {} });
    poem::Response::builder().status(status).content_type("application/json").body(body.to_string())
}
