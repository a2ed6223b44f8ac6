//! Routes: a method, a path and a handler, with what the API docs say about them.
//!
//! A handler is a function of the plugin and either the raw [`Request`] or typed inputs
//! ([`Json`](crate::Json), [`Path`](crate::Path), [`Query`](crate::Query)), answering anything
//! that is [`IntoResponse`]. The docs of a typed handler derive from its types: the request
//! body's schema, each path and query parameter's, and the responses its result type gives.

use crate::description::{ParamDescription, ResponseDescription};
use crate::extract::FromRequest;
use crate::reply::IntoResponse;
use crate::schema;
use crate::sdk::{Request, Response};
use schemars::JsonSchema;
use schemars::generate::Contract;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// A raw request handler: a plain function of the plugin and the request.
pub type Handler<P> = fn(&P, &Request<'_>) -> Response;

/// A handler as the export glue calls it.
pub(crate) type BoxHandler<P> = Box<dyn Fn(&P, &Request<'_>) -> Response + Send + Sync>;

/// What the API docs say about one route. Typed inputs and results fill it in (see
/// [`FromRequest::document`] and [`IntoResponse::document`]); the route's own builder methods
/// ([`Route::response`], …) have the last word.
#[derive(Debug, Clone, Default)]
pub struct RouteDocs {
    pub(crate) path_params: Vec<String>,
    pub(crate) request_schema: Option<Value>,
    pub(crate) params: BTreeMap<String, Value>,
    pub(crate) query: Vec<ParamDescription>,
    pub(crate) responses: Vec<ResponseDescription>,
    /// Definitions that derived schemas refer to (recursive types), by their own names.
    pub(crate) definitions: Map<String, Value>,
}

impl RouteDocs {
    /// The schema of `T` as a request carries it (`Deserialize` rules: a field with a default is
    /// not required).
    pub fn request_schema_of<T: JsonSchema + ?Sized>(&mut self) -> Value {
        schema::schema_for::<T>(Contract::Deserialize, &mut self.definitions)
    }

    /// The schema of `T` as a response carries it (`Serialize` rules).
    pub fn response_schema_of<T: JsonSchema + ?Sized>(&mut self) -> Value {
        schema::schema_for::<T>(Contract::Serialize, &mut self.definitions)
    }

    /// Documents the request body's schema.
    pub fn set_request_schema(&mut self, schema: Value) {
        self.request_schema = Some(schema);
    }

    /// Documents an answer (replacing one documented before with the same status). `schema`
    /// `None`: no body, or kiln's error shape for a 4xx or 5xx.
    pub fn response(&mut self, status: u16, description: impl Into<String>, schema: Option<Value>) {
        let answer = ResponseDescription { status, description: description.into(), schema };
        match self.responses.iter_mut().find(|r| r.status == status) {
            Some(r) => *r = answer,
            None => self.responses.push(answer),
        }
    }

    /// The names of the route's path parameters, in order.
    pub fn path_params(&self) -> &[String] {
        &self.path_params
    }

    /// Documents path parameter `name`'s schema.
    pub fn param(&mut self, name: &str, schema: Value) {
        self.params.insert(name.to_string(), schema);
    }

    /// Documents a query parameter (replacing one of the same name).
    pub fn query_param(&mut self, name: &str, required: bool, schema: Value) {
        self.query.retain(|q| q.name != name);
        self.query.push(ParamDescription { name: name.to_string(), required, schema });
    }
}

/// Something that handles a route's requests: a function of the plugin and the raw request,
/// or of up to three typed inputs (with or without the raw request first), or of nothing
/// else, answering anything [`IntoResponse`]. `M` only tells the implementations
/// apart; it is inferred.
///
/// ```
/// use kiln_types::{ApiError, Created, Json, Path, Plugin, Request, Response, Route};
/// # use kiln_types::InitContext;
/// #[derive(serde::Deserialize, schemars::JsonSchema)]
/// struct NewNote { text: String }
/// #[derive(serde::Serialize, schemars::JsonSchema)]
/// struct Note { id: i64, text: String }
///
/// struct Notes;
/// impl Notes {
///     fn raw(&self, _: &Request) -> Response { Response::text(200, "raw") }
///     fn create(&self, Json(new): Json<NewNote>) -> Result<Created<Note>, ApiError> {
///         Ok(Created(Note { id: 1, text: new.text }))
///     }
///     fn one(&self, Path(id): Path<i64>) -> Result<Json<Note>, ApiError> {
///         Err(ApiError::not_found(format!("no note {id}")))
///     }
/// }
/// # impl Plugin for Notes {
/// #     fn init(_: &InitContext) -> Result<Self, String> { Ok(Notes) }
/// fn routes() -> Vec<Route<Self>> {
///     vec![
///         Route::get("/raw", Self::raw),
///         Route::post("/notes", Self::create),
///         Route::get("/notes/{id}", Self::one).response(404, "No such note", None),
///     ]
/// }
/// # }
/// ```
pub trait IntoHandler<P, M>: Send + Sync + 'static {
    /// The handler as kiln calls it: inputs extracted (a request they do not fit is answered
    /// 400 before the function runs), the result turned into a response.
    fn into_handler(self) -> BoxHandler<P>;

    /// Documents what the inputs and the result say about the route.
    fn document(docs: &mut RouteDocs);
}

/// Marks a handler that takes the raw request.
#[doc(hidden)]
#[derive(Debug)]
pub enum Raw {}

impl<P, F, R> IntoHandler<P, (Raw, R)> for F
where
    F: Fn(&P, &Request<'_>) -> R + Send + Sync + 'static,
    R: IntoResponse,
{
    fn into_handler(self) -> BoxHandler<P> {
        Box::new(move |p, req| self(p, req).into_response())
    }

    fn document(docs: &mut RouteDocs) {
        R::document(docs);
    }
}

impl<P, F, R> IntoHandler<P, (R,)> for F
where
    F: Fn(&P) -> R + Send + Sync + 'static,
    R: IntoResponse,
{
    fn into_handler(self) -> BoxHandler<P> {
        Box::new(move |p, _| self(p).into_response())
    }

    fn document(docs: &mut RouteDocs) {
        R::document(docs);
    }
}

/// Documents the answer kiln's SDK gives when typed inputs do not fit.
fn document_bad_request(docs: &mut RouteDocs) {
    if !docs.responses.iter().any(|r| r.status == 400) {
        docs.response(
            400,
            "BadRequest: the body, a path parameter or the query does not fit (details.in, details.field)",
            None,
        );
    }
}

macro_rules! typed_handler {
    ($($input:ident),+) => {
        impl<P, F, R, $($input),+> IntoHandler<P, (R, $($input,)+)> for F
        where
            F: Fn(&P, $($input),+) -> R + Send + Sync + 'static,
            R: IntoResponse,
            $($input: FromRequest,)+
        {
            #[allow(non_snake_case)]
            fn into_handler(self) -> BoxHandler<P> {
                Box::new(move |p, req| {
                    $(let $input = match $input::from_request(req) {
                        Ok(v) => v,
                        Err(answer) => return answer,
                    };)+
                    self(p, $($input),+).into_response()
                })
            }

            fn document(docs: &mut RouteDocs) {
                $($input::document(docs);)+
                document_bad_request(docs);
                R::document(docs);
            }
        }

        impl<P, F, R, $($input),+> IntoHandler<P, (Raw, R, $($input,)+)> for F
        where
            F: Fn(&P, &Request<'_>, $($input),+) -> R + Send + Sync + 'static,
            R: IntoResponse,
            $($input: FromRequest,)+
        {
            #[allow(non_snake_case)]
            fn into_handler(self) -> BoxHandler<P> {
                Box::new(move |p, req| {
                    $(let $input = match $input::from_request(req) {
                        Ok(v) => v,
                        Err(answer) => return answer,
                    };)+
                    self(p, req, $($input),+).into_response()
                })
            }

            fn document(docs: &mut RouteDocs) {
                $($input::document(docs);)+
                document_bad_request(docs);
                R::document(docs);
            }
        }
    };
}

typed_handler!(A);
typed_handler!(A, B);
typed_handler!(A, B, C);

/// One HTTP route: method, OpenAPI-style path (`/items/{id}`) and handler.
pub struct Route<P> {
    pub(crate) meta: RouteMeta,
    pub(crate) handler: BoxHandler<P>,
}

/// Everything about a route but its handler. Not generic over the plugin, so the code that
/// builds and describes it is compiled once, in this crate, rather than in every plugin (a new
/// plugin's first build compiles what is generic over its type).
#[derive(Debug)]
pub(crate) struct RouteMeta {
    pub(crate) method: &'static str,
    pub(crate) path: String,
    pub(crate) handler_name: String,
    pub(crate) summary: String,
    pub(crate) response_schema: Option<Value>,
    pub(crate) blocking: bool,
    pub(crate) docs: RouteDocs,
    pub(crate) deadline: Option<std::time::Duration>,
}

impl RouteMeta {
    fn new(method: &'static str, path: String) -> Self {
        let path_params = path.split('/').filter_map(|s| s.strip_prefix('{')?.strip_suffix('}')).map(String::from);
        Self {
            method,
            handler_name: format!("{method} {path}"),
            docs: RouteDocs { path_params: path_params.collect(), ..RouteDocs::default() },
            path,
            summary: String::new(),
            response_schema: None,
            blocking: false,
            deadline: None,
        }
    }
}

impl<P> Route<P> {
    fn new<M, H: IntoHandler<P, M>>(method: &'static str, path: impl Into<String>, handler: H) -> Self {
        let mut meta = RouteMeta::new(method, path.into());
        H::document(&mut meta.docs);
        Self { meta, handler: handler.into_handler() }
    }

    /// A `GET` route.
    pub fn get<M>(path: impl Into<String>, handler: impl IntoHandler<P, M>) -> Self {
        Self::new("GET", path, handler)
    }

    /// A `POST` route.
    pub fn post<M>(path: impl Into<String>, handler: impl IntoHandler<P, M>) -> Self {
        Self::new("POST", path, handler)
    }

    /// A `PUT` route.
    pub fn put<M>(path: impl Into<String>, handler: impl IntoHandler<P, M>) -> Self {
        Self::new("PUT", path, handler)
    }

    /// A `PATCH` route.
    pub fn patch<M>(path: impl Into<String>, handler: impl IntoHandler<P, M>) -> Self {
        Self::new("PATCH", path, handler)
    }

    /// A `DELETE` route.
    pub fn delete<M>(path: impl Into<String>, handler: impl IntoHandler<P, M>) -> Self {
        Self::new("DELETE", path, handler)
    }

    /// One line describing the route in the API docs.
    pub fn summary(mut self, summary: impl Into<String>) -> Self {
        self.meta.summary = summary.into();
        self
    }

    /// The handler's name, as recorded in `plugin_endpoints` (default: `METHOD path`).
    pub fn handler_name(mut self, name: impl Into<String>) -> Self {
        self.meta.handler_name = name.into();
        self
    }

    /// Marks a handler that may block (file or network I/O, sleeps, long computations). The
    /// server then runs it on a blocking thread pool, so it cannot stall other requests.
    /// Unmarked handlers run inline on the server's async workers: the fastest path, for
    /// handlers that only compute briefly.
    pub fn blocking(mut self) -> Self {
        self.meta.blocking = true;
        self
    }

    /// How long the handler may take (default: the server's `--route-deadline-ms`, 30 s). Past
    /// it the client gets 504 `Timeout`, and host calls the handler makes fail at once. kiln
    /// cannot stop a handler in the middle: a blocking one runs on to its end on its thread (its
    /// answer is dropped); an inline one holds its worker until it returns.
    pub fn deadline(mut self, deadline: std::time::Duration) -> Self {
        self.meta.deadline = Some(deadline);
        self
    }

    /// JSON Schema of the request body, shown in the API docs (a [`Json`](crate::Json) input
    /// documents its own).
    pub fn request_schema(mut self, schema: Value) -> Self {
        self.meta.docs.set_request_schema(schema);
        self
    }

    /// JSON Schema of the response body, shown in the API docs when no answer is documented
    /// with [`Route::response`] (and the handler's result type documents none).
    pub fn response_schema(mut self, schema: Value) -> Self {
        self.meta.response_schema = Some(schema);
        self
    }

    /// Documents an answer the handler gives: its status, what it means, and the JSON Schema
    /// of its body (`None`: no body, or kiln's error shape for a 4xx or 5xx). Once any is
    /// documented, the docs list exactly these (and the answers kiln itself may give). It
    /// replaces what the result type documented for the same status.
    pub fn response(mut self, status: u16, description: impl Into<String>, schema: Option<Value>) -> Self {
        self.meta.docs.response(status, description, schema);
        self
    }

    /// JSON Schema of path parameter `name` in the API docs (by default a string, or what a
    /// [`Path`](crate::Path) input says), e.g. `json!({"type": "integer", "minimum": 0})`.
    pub fn param_schema(mut self, name: &str, schema: Value) -> Self {
        self.meta.docs.param(name, schema);
        self
    }
}
