//! Typed results of a handler: [`Json`](crate::Json) (200), [`Created`] (201), [`NoContent`]
//! (204), [`ApiError`] (kiln's error shape), a `Result` of two of them, or a raw [`Response`].
//! Each documents the answers it gives.

use crate::extract::Json;
use crate::host::HostError;
use crate::route::RouteDocs;
use crate::sdk::Response;
use schemars::JsonSchema;
use serde::Serialize;
use serde_json::{Value, json};

/// What a handler answers.
pub trait IntoResponse {
    /// The HTTP response.
    fn into_response(self) -> Response;

    /// Documents the answers this result gives.
    fn document(docs: &mut RouteDocs) {
        let _ = docs;
    }
}

impl IntoResponse for Response {
    fn into_response(self) -> Response {
        self
    }
}

impl<T: Serialize + JsonSchema> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        Response::json(200, &self.0)
    }

    fn document(docs: &mut RouteDocs) {
        let schema = docs.response_schema_of::<T>();
        docs.response(200, "Success", Some(schema));
    }
}

/// A JSON answer with status 201.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Created<T>(pub T);

impl<T: Serialize + JsonSchema> IntoResponse for Created<T> {
    fn into_response(self) -> Response {
        Response::json(201, &self.0)
    }

    fn document(docs: &mut RouteDocs) {
        let schema = docs.response_schema_of::<T>();
        docs.response(201, "Created", Some(schema));
    }
}

/// An answer with status 204 and no body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoContent;

impl IntoResponse for NoContent {
    fn into_response(self) -> Response {
        Response::status(204)
    }

    fn document(docs: &mut RouteDocs) {
        docs.response(204, "No content", None);
    }
}

impl<T: IntoResponse, E: IntoResponse> IntoResponse for Result<T, E> {
    fn into_response(self) -> Response {
        match self {
            Ok(ok) => ok.into_response(),
            Err(e) => e.into_response(),
        }
    }

    fn document(docs: &mut RouteDocs) {
        T::document(docs);
        E::document(docs);
    }
}

/// An error answer in kiln's shape: `{"error": <code>, "message": …, "details": {…}}`.
///
/// Its statuses vary, so it documents none: name the ones a route gives with
/// [`Route::response`](crate::Route::response). A host call's error converts into it (`?`):
/// a refused table is 403 `TableAccessDenied`, a passed deadline 504 `Timeout`, an unreachable
/// database or dependency 503, anything else 500, each with the host's code.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    /// A stable code for programs (`NotFound`, `NoSuchNote`, …).
    pub code: String,
    /// For humans.
    pub message: String,
    /// A JSON object with more (an empty one by default).
    pub details: Value,
}

impl ApiError {
    /// An error with `status`, its code named after the status as kiln names its own
    /// (`NotFound`, `Conflict`, …).
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        let code = crate::sdk::reason(status).to_string();
        Self { status, code, message: message.into(), details: json!({}) }
    }

    /// 400 `BadRequest`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    /// 404 `NotFound`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, message)
    }

    /// 409 `Conflict`.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, message)
    }

    /// 500 `Internal`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, message)
    }

    /// Replaces the code.
    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = code.into();
        self
    }

    /// Replaces the details (a JSON object).
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        Response::json(self.status, &json!({ "error": self.code, "message": self.message, "details": self.details }))
    }
}

impl From<HostError> for ApiError {
    fn from(e: HostError) -> Self {
        let status = match e.code() {
            Some("TableAccessDenied" | "DependencyNotDeclared") => 403,
            Some("Timeout") => 504,
            Some("DatabaseUnavailable" | "DependencyUnavailable") => 503,
            _ => 500,
        };
        let code = e.code().unwrap_or("HostError").to_string();
        Self { status, code, message: e.to_string(), details: json!({}) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_api_error_answers_in_kilns_shape() {
        let r = ApiError::not_found("no note 7").with_code("NoSuchNote").into_response();
        assert_eq!(r.status, 404);
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body, json!({ "error": "NoSuchNote", "message": "no note 7", "details": {} }));
    }

    #[test]
    fn host_errors_keep_their_code_under_a_fitting_status() {
        let denied = HostError::Service { code: "TableAccessDenied".into(), message: "no".into() };
        assert_eq!(ApiError::from(denied).status, 403);
        let late = ApiError::from(HostError::Service { code: "Timeout".into(), message: "late".into() });
        assert_eq!((late.status, late.code.as_str()), (504, "Timeout"));
        assert_eq!(ApiError::from(HostError::NoHost).status, 500);
    }

    #[test]
    fn a_result_documents_both_sides() {
        let mut docs = RouteDocs::default();
        <Result<Created<u32>, NoContent> as IntoResponse>::document(&mut docs);
        let statuses: Vec<u16> = docs.responses.iter().map(|r| r.status).collect();
        assert_eq!(statuses, [201, 204]);
        assert_eq!(docs.responses[0].schema.as_ref().unwrap()["type"], "integer");
    }
}
