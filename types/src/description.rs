//! What a plugin says about itself: metadata and routes, sent once at load as JSON.
//!
//! JSON (not a C struct) because it is read once per load, carries optional JSON Schemas, and
//! can grow fields without an ABI bump: unknown fields are ignored, missing ones default.

use serde::{Deserialize, Serialize};

/// Metadata and routes of a plugin, as the library describes itself.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PluginDescription {
    /// Cargo package name of the plugin; must match the plugin's name in the `plugins` table.
    pub name: String,
    /// Cargo package version.
    pub version: String,
    /// Cargo package description.
    pub description: String,
    /// Cargo package authors, joined with `, `.
    pub author: String,
    /// The routes the plugin serves, in order; a request names its route by index.
    pub routes: Vec<RouteDescription>,
    /// The event subscriptions the plugin declares, in order; an event names its subscription
    /// by index.
    pub subscriptions: Vec<SubscriptionDescription>,
    /// The services the plugin offers the plugins that depend on it, in order; a call names
    /// its service by index.
    pub services: Vec<ServiceDescription>,
    /// Schemas that route schemas refer to by `$ref` (`#/components/schemas/<name>`; recursive
    /// types), named `<plugin>.<Type>`.
    pub schemas: std::collections::BTreeMap<String, serde_json::Value>,
}

/// One query parameter of a route.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ParamDescription {
    pub name: String,
    pub required: bool,
    /// JSON Schema of its value.
    pub schema: serde_json::Value,
}

/// One service a plugin offers: JSON in, JSON out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServiceDescription {
    pub name: String,
}

/// One event subscription of a plugin: a topic pattern and the handler it goes to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SubscriptionDescription {
    /// Dot-separated topic segments, `*` matching any one (`notes.*`).
    pub pattern: String,
    /// Name of the handler (unique within the plugin): with the pattern, what identifies the
    /// subscription across versions.
    pub handler: String,
    /// How long the handler may take over one event, in milliseconds (default: the server's).
    pub timeout_ms: Option<u64>,
}

/// One route of a plugin.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RouteDescription {
    /// HTTP method, upper case (`GET`, `POST`, …).
    pub method: String,
    /// OpenAPI-style path, e.g. `/powertable/{id}`.
    pub path: String,
    /// One line for the API docs.
    pub summary: String,
    /// Name of the handler, for the `plugin_endpoints` table.
    pub handler: String,
    /// JSON Schema of the request body, if any.
    pub request_schema: Option<serde_json::Value>,
    /// JSON Schema of the successful response body, if any.
    pub response_schema: Option<serde_json::Value>,
    /// The handler may block (I/O, sleeps, heavy work): the server runs it on its blocking
    /// thread pool instead of inline on an async worker.
    pub blocking: bool,
    /// The answers the handler gives, by status (in the API docs). When empty, a `200` with
    /// `response_schema` is documented.
    pub responses: Vec<ResponseDescription>,
    /// JSON Schemas of path parameters, by name (default: a string).
    pub params: std::collections::BTreeMap<String, serde_json::Value>,
    /// The query parameters the route reads.
    pub query: Vec<ParamDescription>,
    /// The route's deadline in milliseconds (default: the server's `--route-deadline-ms`).
    pub deadline_ms: Option<u64>,
}

/// One answer a route documents.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ResponseDescription {
    pub status: u16,
    pub description: String,
    /// JSON Schema of the body, if it has one.
    pub schema: Option<serde_json::Value>,
}
