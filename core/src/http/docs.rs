//! The live API documentation: the admin API's OpenAPI document (built once by poem-openapi)
//! merged with the routes of every served plugin, and the Swagger UI page that embeds it. A
//! change of the plugin set only records the new set (a publish stays cheap however many plugins
//! serve); the document is rendered when it is next asked for, once per change.
//!
//! poem-openapi renders its Swagger UI page with the document embedded verbatim; we split that
//! page once around the static document and embed the merged one instead (no CDN, no template
//! of our own). poem-openapi is pinned because of this.

use arc_swap::ArcSwap;
use kiln_types::PluginDescription;
use serde_json::{Map, Value, json};
use std::sync::{Arc, Mutex};

/// A rendered document and UI page, and the generation of the plugin set it shows.
struct Snapshot {
    generation: u64,
    json: String,
    html: String,
}

/// The plugin set the document should show.
struct Wanted {
    generation: u64,
    plugins: Vec<Arc<PluginDescription>>,
}

/// Builds and serves the merged documentation.
pub struct Docs {
    base: Value,
    html_prefix: String,
    html_suffix: String,
    wanted: Mutex<Wanted>,
    current: ArcSwap<Snapshot>,
    /// Held while rendering, so that concurrent requests render a change once.
    render: Mutex<()>,
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
            wanted: Mutex::new(Wanted { generation: 1, plugins: Vec::new() }),
            current: ArcSwap::from_pointee(Snapshot { generation: 0, json: String::new(), html: String::new() }),
            render: Mutex::new(()),
        };
        Ok(docs)
    }

    /// The merged OpenAPI document (JSON).
    pub fn json(&self) -> String {
        self.snapshot().json.clone()
    }

    /// The Swagger UI page.
    pub fn html(&self) -> String {
        self.snapshot().html.clone()
    }

    /// Records the set of plugins the document shows from now on (rendered when next asked for).
    pub fn update(&self, plugins: Vec<Arc<PluginDescription>>) {
        let mut wanted = self.wanted.lock().expect("docs lock");
        wanted.generation += 1;
        wanted.plugins = plugins;
    }

    /// The document of the current plugin set, rendered now if the set changed since.
    fn snapshot(&self) -> Arc<Snapshot> {
        let current = self.current.load_full();
        let (generation, plugins) = {
            let wanted = self.wanted.lock().expect("docs lock");
            (wanted.generation, wanted.plugins.clone())
        };
        if current.generation == generation {
            return current;
        }
        let _rendering = self.render.lock().expect("docs render lock");
        let current = self.current.load_full();
        if current.generation >= generation {
            return current; // rendered by the request we waited for
        }
        let (json, html) = self.render(plugins.iter().map(|p| &**p));
        let snapshot = Arc::new(Snapshot { generation, json, html });
        self.current.store(snapshot.clone());
        snapshot
    }

    /// The document and UI page for this set of plugins.
    fn render<'a>(&self, plugins: impl Iterator<Item = &'a PluginDescription>) -> (String, String) {
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
        (json, html)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(name: &str, path: &str) -> Arc<PluginDescription> {
        let route = kiln_types::RouteDescription { method: "GET".into(), path: path.into(), ..Default::default() };
        Arc::new(PluginDescription { name: name.into(), routes: vec![route], ..Default::default() })
    }

    #[test]
    fn the_document_shows_the_latest_plugin_set_when_asked_for() {
        let spec = r#"{"openapi":"3.0.0","paths":{"/health":{}},"components":{"schemas":{}}}"#;
        let docs = Docs::new(spec, &format!("<script>{spec}</script>"), false).unwrap();
        assert!(docs.json().contains("/health") && !docs.json().contains("/a"));
        docs.update(vec![plugin("a", "/a")]);
        docs.update(vec![plugin("a", "/a"), plugin("b", "/b")]);
        let (json, html) = (docs.json(), docs.html());
        assert!(json.contains("\"/a\"") && json.contains("\"/b\""), "{json}");
        assert!(html.starts_with("<script>") && html.contains("\"/b\""), "{html}");
        docs.update(vec![plugin("b", "/b")]);
        assert!(!docs.json().contains("\"/a\"") && docs.json().contains("\"/b\""));
        assert!(!docs.html().contains("\"/a\""), "the page follows the document");
    }
}
