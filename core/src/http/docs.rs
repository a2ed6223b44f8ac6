//! The live API documentation: the admin API's OpenAPI document (built once by poem-openapi)
//! merged with the routes of every served plugin, rebuilt whenever the plugin set changes, and
//! the Swagger UI page that embeds it.
//!
//! poem-openapi renders its Swagger UI page with the document embedded verbatim; we split that
//! page once around the static document and embed the merged one instead (no CDN, no template
//! of our own). poem-openapi is pinned because of this.

use arc_swap::ArcSwap;
use kiln_types::PluginDescription;
use serde_json::{Map, Value, json};
use std::sync::Arc;

/// The current merged document and UI page.
struct Snapshot {
    json: String,
    html: String,
}

/// Builds and serves the merged documentation.
pub struct Docs {
    base: Value,
    html_prefix: String,
    html_suffix: String,
    current: ArcSwap<Snapshot>,
}

impl Docs {
    /// `spec` is poem-openapi's document; `html` its Swagger UI page, which embeds `spec`.
    /// `bearer`: the admin API needs a bearer token (declared on every admin operation but
    /// /health, so Swagger UI offers "Authorize").
    pub fn new(spec: &str, html: &str, bearer: bool) -> anyhow::Result<Self> {
        let mut base: Value = serde_json::from_str(spec)?;
        if bearer {
            base["components"]["securitySchemes"]["adminToken"] =
                json!({ "type": "http", "scheme": "bearer", "description": "KILN_ADMIN_TOKEN" });
            if let Some(paths) = base["paths"].as_object_mut() {
                for (_, item) in paths.iter_mut().filter(|(p, _)| p.as_str() != "/health") {
                    for op in item.as_object_mut().into_iter().flat_map(|o| o.values_mut()) {
                        op["security"] = json!([{ "adminToken": [] }]);
                    }
                }
            }
        }
        let at = html
            .find(spec)
            .ok_or_else(|| anyhow::anyhow!("the Swagger UI page does not embed the spec (poem-openapi changed?)"))?;
        let docs = Self {
            base,
            html_prefix: html[..at].to_string(),
            html_suffix: html[at + spec.len()..].to_string(),
            current: ArcSwap::from_pointee(Snapshot { json: String::new(), html: String::new() }),
        };
        docs.update(std::iter::empty());
        Ok(docs)
    }

    /// The merged OpenAPI document (JSON).
    pub fn json(&self) -> String {
        self.current.load().json.clone()
    }

    /// The Swagger UI page.
    pub fn html(&self) -> String {
        self.current.load().html.clone()
    }

    /// Rebuilds the document for this set of plugins.
    pub fn update<'a>(&self, plugins: impl Iterator<Item = &'a PluginDescription>) {
        let mut doc = self.base.clone();
        let mut tags: Vec<Value> = doc["tags"].as_array().cloned().unwrap_or_default();
        for plugin in plugins {
            // The schemas route schemas refer to (recursive types), under the plugin's own
            // prefix only: a plugin cannot replace kiln's schemas or another plugin's.
            let own = format!("{}.", plugin.name);
            let schemas = plugin.schemas.iter().filter(|(name, _)| name.starts_with(&own));
            if let Some(components) = doc["components"]["schemas"].as_object_mut() {
                components.extend(schemas.map(|(name, schema)| (name.clone(), schema.clone())));
            }
            tags.push(json!({ "name": plugin.name, "description": format!("Plugin {} {}: {}", plugin.name, plugin.version, plugin.description) }));
            for route in &plugin.routes {
                let op = operation(plugin, route);
                let paths = doc["paths"].as_object_mut().expect("an OpenAPI document has paths");
                let item = paths.entry(route.path.clone()).or_insert_with(|| Value::Object(Map::new()));
                item[route.method.to_ascii_lowercase()] = op;
            }
        }
        doc["tags"] = Value::Array(tags);
        let json = serde_json::to_string_pretty(&doc).expect("a Value always serializes");
        // The document goes inside a <script>: a "</" in a plugin's text must not close it.
        let html = format!("{}{}{}", self.html_prefix, json.replace("</", "<\\/"), self.html_suffix);
        self.current.store(Arc::new(Snapshot { json, html }));
    }
}

/// Answers kiln itself may give on any plugin route, with its error shape.
const KILN_ANSWERS: &[(u16, &str)] = &[
    (404, "NotFound: the plugin no longer serves this route"),
    (405, "MethodNotAllowed: the path exists with other methods"),
    (408, "RequestTimeout: the body stopped arriving"),
    (413, "BodyTooLarge: the body is over the limit"),
    (500, "PluginError: the handler panicked or answered something invalid"),
    (504, "Timeout: the handler ran past its deadline"),
];

/// The OpenAPI operation of one plugin route: what the plugin documents, and what kiln may
/// answer in its place.
fn operation(plugin: &PluginDescription, route: &kiln_types::RouteDescription) -> Value {
    let mut params: Vec<Value> = route
        .path
        .split('/')
        .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| {
            let schema = route.params.get(name).cloned().unwrap_or_else(|| json!({ "type": "string" }));
            json!({ "name": name, "in": "path", "required": true, "schema": schema })
        })
        .collect();
    params.extend(
        (route.query.iter())
            .map(|q| json!({ "name": q.name, "in": "query", "required": q.required, "schema": q.schema })),
    );
    let error = json!({ "application/json": { "schema": { "$ref": "#/components/schemas/ApiError" } } });
    let mut responses = Map::new();
    if !route.responses.iter().any(|r| (200..300).contains(&r.status)) {
        let mut ok = json!({ "description": "Success" });
        if let Some(schema) = &route.response_schema {
            ok["content"] = json!({ "application/json": { "schema": schema } });
        }
        responses.insert("200".into(), ok);
    }
    for r in &route.responses {
        let mut answer = json!({ "description": r.description });
        match &r.schema {
            Some(schema) => answer["content"] = json!({ "application/json": { "schema": schema } }),
            None if r.status >= 400 => answer["content"] = error.clone(),
            None => {}
        }
        responses.insert(r.status.to_string(), answer);
    }
    for (status, description) in KILN_ANSWERS {
        responses
            .entry(status.to_string())
            .or_insert_with(|| json!({ "description": description, "content": error.clone() }));
    }
    let mut op = json!({
        "tags": [plugin.name],
        "summary": route.summary,
        "operationId": format!("{}.{}", plugin.name, route.handler),
        "parameters": params,
        "responses": responses,
    });
    if let Some(schema) = &route.request_schema {
        op["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": schema } } });
    }
    op
}
