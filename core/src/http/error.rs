//! One error shape for every answer kiln itself gives:
//! `{"error": <stable code>, "message": <for humans>, "details": {…}}`.

use crate::error_code::ErrorCode;
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
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { error: code.as_str().into(), message: message.into(), details: Value::Object(Default::default()) }
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }
}

/// Error answers of the admin API. Every code's status comes from [`ErrorCode`]; build them with
/// [`ErrorResponse::new`].
#[derive(Debug, ApiResponse)]
pub enum ErrorResponse {
    /// The request is malformed (`BadRequest`, `InvalidName`, `InvalidArchive`).
    #[oai(status = 400)]
    BadRequest(Json<ApiError>),
    /// `KILN_ADMIN_TOKEN` is set and the request lacks `Authorization: Bearer <token>`.
    #[oai(status = 401)]
    Unauthorized(Json<ApiError>),
    /// Something only kiln may do (`TopicReserved`: publishing a `kiln.` event).
    #[oai(status = 403)]
    Forbidden(Json<ApiError>),
    /// No such plugin (`PluginNotFound`), catalog entry (`NotInCatalog`), or path (`NotFound`).
    #[oai(status = 404)]
    NotFound(Json<ApiError>),
    /// The path exists with other methods (`MethodNotAllowed`), named in `Allow`.
    #[oai(status = 405)]
    MethodNotAllowed(Json<ApiError>),
    /// A plugin of that name exists already (`PluginExists`).
    #[oai(status = 409)]
    Conflict(Json<ApiError>),
    /// An upload without a Content-Length (`LengthRequired`).
    #[oai(status = 411)]
    LengthRequired(Json<ApiError>),
    /// The upload is larger than allowed (`TooLarge`).
    #[oai(status = 413)]
    TooLarge(Json<ApiError>),
    /// A body without the content type the endpoint takes (`UnsupportedMediaType`).
    #[oai(status = 415)]
    UnsupportedMediaType(Json<ApiError>),
    /// The plugin could not be built, loaded, configured or served; the previous version, if any,
    /// still serves. Codes: `ManifestNotFound`, `InvalidManifest`, `BuildFailed`, `AbiMismatch`,
    /// `EntrypointNotFound`, `LoadError`, `InitFailed`, `RouteConflict`, `InvalidRoute`,
    /// `InvalidConfig` (with `details.violations`), `PluginInactive`, `DatabaseRefused`; an
    /// event kiln refuses (`InvalidEvent`); a catalog archive refused (`ChecksumMismatch`,
    /// `SignatureInvalid`, `CatalogMismatch`).
    #[oai(status = 422)]
    Unprocessable(Json<ApiError>),
    /// An unexpected failure (`Internal`, `DatabaseError`).
    #[oai(status = 500)]
    Internal(Json<ApiError>),
    /// Something kiln fetches from elsewhere could not be had (`CatalogUnavailable`).
    #[oai(status = 502)]
    BadGateway(Json<ApiError>),
    /// The database is unavailable (`DatabaseUnavailable`).
    #[oai(status = 503)]
    Unavailable(Json<ApiError>),
}

impl ErrorResponse {
    /// The answer for `code`, with the status the code has.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::from_error(code, ApiError::new(code, message))
    }

    /// The answer for `code` with a prepared body (details).
    pub fn from_error(code: ErrorCode, body: ApiError) -> Self {
        let body = Json(body);
        match code.status() {
            400 => Self::BadRequest(body),
            401 => Self::Unauthorized(body),
            403 => Self::Forbidden(body),
            404 => Self::NotFound(body),
            405 => Self::MethodNotAllowed(body),
            409 => Self::Conflict(body),
            411 => Self::LengthRequired(body),
            413 => Self::TooLarge(body),
            415 => Self::UnsupportedMediaType(body),
            422 => Self::Unprocessable(body),
            502 => Self::BadGateway(body),
            503 => Self::Unavailable(body),
            _ => Self::Internal(body),
        }
    }
}

/// A complete JSON error response, for places outside poem-openapi.
pub fn json_error(code: ErrorCode, message: &str) -> poem::Response {
    let body = serde_json::json!({ "error": code.as_str(), "message": message, "details": {} });
    let status = StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    poem::Response::builder().status(status).content_type("application/json").body(body.to_string())
}
