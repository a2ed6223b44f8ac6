//! kiln-types: the interface between the kiln server and its plugins, and the SDK plugins use.
//!
//! A plugin implements [`Plugin`] and calls [`export_plugin!`] once:
//!
//! ```
//! use kiln_types::{InitContext, Plugin, Request, Response, Route};
//!
//! #[derive(Default)]
//! struct Hello;
//!
//! impl Plugin for Hello {
//!     fn init(_: &InitContext) -> Result<Self, String> { Ok(Hello) }
//!     fn routes() -> Vec<Route<Self>> { vec![Route::get("/hello", Self::hello)] }
//! }
//!
//! impl Hello {
//!     fn hello(&self, _: &Request) -> Response { Response::text(200, "hello") }
//! }
//!
//! kiln_types::export_plugin!(Hello);
//! ```
//!
//! The crate has three parts: [`abi`] (the `#[repr(C)]` boundary, which only the macro and the
//! server touch), [`description`] (the JSON a plugin describes itself with) and the SDK types
//! re-exported at the root. The macro catches every panic inside the plugin, because a panic
//! must never unwind into the server.

pub mod abi;
pub mod description;
#[doc(hidden)]
pub mod export;
mod extract;
mod host;
mod reply;
mod route;
mod schema;
mod sdk;
pub mod testing;

pub use description::{
    ParamDescription, PluginDescription, ResponseDescription, RouteDescription, ServiceDescription,
    SubscriptionDescription,
};
pub use extract::{FromRequest, Json, Path, Query};
pub use host::{Host, HostError, Level, db, events, log, plugins, storage};
pub use reply::{ApiError, Created, IntoResponse, NoContent};
pub use route::{Handler, IntoHandler, Route, RouteDocs};
pub use schemars::{self, JsonSchema};
pub use sdk::{
    ConfigChange, Event, EventHandler, InitContext, Plugin, Request, Response, Service, ServiceHandler, Subscription,
};
pub use {serde, serde_json};

/// Version of this crate, exported by every plugin so that skew can be reported by version.
pub const TYPES_VERSION: &str = env!("CARGO_PKG_VERSION");
