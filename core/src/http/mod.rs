//! The HTTP edge: the only module that knows poem.
//!
//! One endpoint fronts everything. Paths under the admin roots (`/plugins`, `/health`,
//! `/openapi.json`, `/docs`) go to the admin API; every other path goes to the current plugin
//! route table. Plugins may not declare paths under the admin roots (see `routes`), so the split
//! is exact and costs one comparison per request.

mod admin;
mod admin_page;
mod body;
mod docs;
mod error;
mod head_deadline;
mod log_tail;
mod path_router;
mod plugin_routes;
mod request_headers;

pub use admin::AdminApi;
pub use docs::Docs;
pub use head_deadline::HeadDeadlineAcceptor;
pub use plugin_routes::{Limits, PluginRouter};

use crate::error_code::ErrorCode;
use crate::routes::{ADMIN_ROOTS, Pattern};
use error::json_error;
use poem::http::StatusCode;
use poem::web::Html;
use poem::{Endpoint, EndpointExt, Request, Response, Route, handler};
use poem_openapi::OpenApiService;
use std::sync::Arc;

/// Builds the HTTP application: the admin API, the live docs and the plugin routes.
pub fn app(
    api: AdminApi,
    catalog: Arc<crate::catalog::Catalog>,
    router: Arc<PluginRouter>,
    admin_token: Option<String>,
    body_timeout: std::time::Duration,
) -> anyhow::Result<impl Endpoint<Output = Response>> {
    let (repo, logs) = (api.repo.clone(), api.logs.clone());
    let catalog = admin::catalog::CatalogApi { admin: api.clone(), catalog };
    let service = OpenApiService::new((api, catalog), "kiln", env!("CARGO_PKG_VERSION"))
        .description("Admin API of kiln, and the endpoints of every plugin it serves now (tagged by plugin).");
    let admin_token = admin_token.filter(|t| !t.is_empty());
    let docs = Arc::new(Docs::new(&service.spec(), &service.swagger_ui_html(), admin_token.is_some())?);
    router.attach_docs(docs.clone());
    let methods = admin_methods(&service.spec())?;
    let spec_docs = docs.clone();
    let admin = admin_page::routes(Route::new())
        .at("/openapi.json", spec_endpoint(spec_docs))
        .at("/docs", ui_endpoint(docs))
        .nest("/", service)
        .catch_all_error(|err| async move {
            // Our own answers (ErrorResponse) already carry a JSON body: keep them. The rest
            // are poem-openapi's (unknown path, bad parameter): give them the same shape.
            if err.is_from_response() {
                return err.into_response();
            }
            if let Some(e) = err.downcast_ref::<poem_openapi::error::ParseParamError>()
                && e.name == "name"
            {
                let msg = "invalid plugin name: use 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-', starting with a letter or digit";
                return json_error(ErrorCode::InvalidName, msg);
            }
            let code = match err.status() {
                StatusCode::NOT_FOUND => ErrorCode::NotFound,
                StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
                StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
                StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::TooLarge,
                s if s.is_server_error() => ErrorCode::Internal,
                _ => ErrorCode::BadRequest,
            };
            json_error(code, &err.to_string())
        })
        .boxed();
    let admin = AdminGate { inner: admin, token: admin_token, methods, body_timeout, repo, logs }.boxed();
    Ok(Front { admin, router })
}

// The document may have to be rendered first (after a change of the plugin set): that runs on
// the blocking pool, not on an async worker.

fn spec_endpoint(docs: Arc<Docs>) -> impl Endpoint<Output = Response> {
    #[handler]
    async fn spec(docs: poem::web::Data<&Arc<Docs>>) -> poem::Result<Response> {
        let docs = Arc::clone(&docs);
        let json = tokio::task::spawn_blocking(move || docs.json()).await.map_err(poem::error::InternalServerError)?;
        Ok(Response::builder().content_type("application/json").body(json))
    }
    spec.data(docs).map_to_response()
}

fn ui_endpoint(docs: Arc<Docs>) -> impl Endpoint<Output = Response> {
    #[handler]
    async fn ui(docs: poem::web::Data<&Arc<Docs>>) -> poem::Result<Html<String>> {
        let docs = Arc::clone(&docs);
        Ok(Html(tokio::task::spawn_blocking(move || docs.html()).await.map_err(poem::error::InternalServerError)?))
    }
    ui.data(docs).map_to_response()
}

/// The methods of every admin path, from the admin API's OpenAPI document (for `Allow`).
fn admin_methods(spec: &str) -> anyhow::Result<Vec<(Pattern, String)>> {
    let spec: serde_json::Value = serde_json::from_str(spec)?;
    let mut out = Vec::new();
    for (path, item) in spec["paths"].as_object().into_iter().flatten() {
        let methods: Vec<String> = item.as_object().into_iter().flatten().map(|(m, _)| m.to_uppercase()).collect();
        out.push((Pattern::parse(path).map_err(anyhow::Error::msg)?, methods.join(", ")));
    }
    Ok(out)
}

/// Largest plugin archive accepted by `POST /plugins/install`.
const MAX_UPLOAD: usize = 32 << 20;
/// Largest body of any other admin request (a config is small).
const MAX_ADMIN_BODY: usize = 1 << 20;

/// Guards the admin API: the bearer token (when configured) and the upload size.
struct AdminGate<E> {
    inner: E,
    token: Option<String>,
    /// (path pattern, `Allow` value) of every admin path: a 405 names the methods it allows.
    methods: Vec<(Pattern, String)>,
    /// How long a request body may take to arrive.
    body_timeout: std::time::Duration,
    /// For the live tail of plugin logs (an event stream, outside poem-openapi).
    repo: crate::repo::Repo,
    logs: Arc<crate::host::logs::LogStore>,
}

impl<E: Endpoint<Output = Response>> Endpoint for AdminGate<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        let path = req.uri().path();
        let public = path == "/health"
            || path == "/openapi.json"
            || path == "/docs"
            || path.starts_with("/docs/")
            || path == "/admin"
            || path.starts_with("/admin/");
        if let Some(token) = &self.token
            && !public
        {
            let given = req.header("authorization").and_then(|h| h.strip_prefix("Bearer ")).unwrap_or("");
            // Constant time: the comparison must not reveal how much of a guess was right.
            let ok: bool = subtle::ConstantTimeEq::ct_eq(given.as_bytes(), token.as_bytes()).into();
            if !ok {
                let mut resp =
                    json_error(ErrorCode::Unauthorized, "this endpoint needs Authorization: Bearer <KILN_ADMIN_TOKEN>");
                resp.headers_mut().insert("www-authenticate", poem::http::HeaderValue::from_static("Bearer"));
                return Ok(resp);
            }
        }
        if let Some(name) = log_tail::wants_tail(&req) {
            return Ok(log_tail::tail(&self.repo, &self.logs, &req, &name).await);
        }
        let upload = req.method() == poem::http::Method::POST && path == "/plugins/install";
        if upload {
            let length = req.header("content-length").and_then(|l| l.parse::<usize>().ok());
            match length {
                None => {
                    return Ok(json_error(ErrorCode::LengthRequired, "uploads need a Content-Length"));
                }
                Some(n) if n > MAX_UPLOAD => {
                    let msg = format!("the upload is {n} bytes; at most {MAX_UPLOAD} are accepted");
                    return Ok(json_error(ErrorCode::TooLarge, &msg));
                }
                Some(_) => {}
            }
        }
        // The body is read here, with a limit and a deadline, before the API sees it: a client
        // that declares a huge body or stops sending cannot hold the connection.
        let mut req = req;
        let limit = if upload { MAX_UPLOAD } else { MAX_ADMIN_BODY };
        match body::read(&mut req, limit, self.body_timeout).await {
            Ok(Some(bytes)) => req.set_body(bytes),
            Ok(None) => {}
            Err(answer) => return Ok(answer),
        }
        // Cloning the Uri shares its bytes: kept to name the allowed methods of a 405.
        let uri = req.uri().clone();
        let mut resp = self.inner.call(req).await?;
        if resp.status() == StatusCode::METHOD_NOT_ALLOWED
            && let Some((_, allow)) = self.methods.iter().find(|(p, _)| p.matches(uri.path()))
            && let Ok(allow) = poem::http::HeaderValue::from_str(allow)
        {
            resp.headers_mut().insert(poem::http::header::ALLOW, allow);
        }
        Ok(resp)
    }
}

/// The front endpoint: admin or plugins, by first path segment.
struct Front {
    admin: poem::endpoint::BoxEndpoint<'static, Response>,
    router: Arc<PluginRouter>,
}

impl Endpoint for Front {
    type Output = Response;

    async fn call(&self, mut req: Request) -> poem::Result<Response> {
        let first = req.uri().path().trim_start_matches('/').split('/').next().unwrap_or("");
        if ADMIN_ROOTS.contains(&first) {
            // Boxed: its future, inline, would make this one (which poem moves and boxes for
            // every request, plugin requests included) about 1 KiB larger.
            return Box::pin(self.admin.call(req)).await;
        }
        // Hold this table (and the plugin versions in it) until the request is done. Its
        // catch-all answers every path no plugin serves.
        let table = self.router.table();
        Ok(table.call(&mut req).await)
    }
}

#[cfg(test)]
mod tests {
    use poem::{Endpoint, EndpointExt};
    use std::sync::Arc;
    use std::time::Duration;

    /// poem moves and boxes the front endpoint's future for every request: it holds the
    /// request (472 bytes) once, and neither the admin API's future nor the plugin route's
    /// holds it again. It was 4,616 bytes when each level of a plugin route held the request by
    /// value, and 1,976 with the admin API's future inline.
    #[test]
    fn a_requests_future_stays_small() {
        let limits = super::plugin_routes::Limits {
            max_body: 1,
            body_timeout: Duration::from_secs(1),
            default_deadline: Duration::from_secs(1),
            blocking_calls: 1,
            server_blocking_calls: 1,
        };
        let logs = Arc::new(crate::host::logs::LogStore::default());
        let router = Arc::new(super::plugin_routes::PluginRouter::new(limits, logs, None));
        let front = super::Front { admin: poem::Route::new().map_to_response().boxed(), router };
        let future = front.call(poem::Request::builder().finish());
        let size = std::mem::size_of_val(&future);
        assert!(size <= 1536, "the front endpoint's future is {size} bytes");
    }
}
