//! The admin page (`GET /admin`): one HTML page, its script and its style, compiled into the
//! binary and served by kiln itself (no CDN, no build step). The page is public, like `/docs`;
//! everything it shows comes from the admin API, which needs the admin token when one is set
//! (the page asks for it). A strict Content-Security-Policy allows only these files and calls
//! to this server.

use poem::http::{HeaderValue, header};
use poem::{Endpoint, EndpointExt, Response, Route};

const INDEX: &str = include_str!("admin_page/index.html");
const SCRIPT: &str = include_str!("admin_page/app.js");
const STYLE: &str = include_str!("admin_page/app.css");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'none'; \
                   form-action 'none'; base-uri 'none'; frame-ancestors 'none'";

/// The page's three files, under `/admin`.
pub fn routes(route: Route) -> Route {
    route
        .at("/admin", file(INDEX, "text/html; charset=utf-8"))
        .at("/admin/app.js", file(SCRIPT, "text/javascript; charset=utf-8"))
        .at("/admin/app.css", file(STYLE, "text/css; charset=utf-8"))
}

fn file(body: &'static str, content_type: &'static str) -> impl Endpoint<Output = Response> {
    poem::get(poem::endpoint::make_sync(move |_| Response::builder().content_type(content_type).body(body))).with(
        poem::middleware::SetHeader::new()
            .overriding(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP))
            .overriding(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"))
            .overriding(header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    )
}
