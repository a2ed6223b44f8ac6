//! hello: the smallest useful kiln plugin. `GET /hello` and `GET /hello/{name}` greet;
//! it counts the greetings it has given since it was loaded.

use kiln_types::serde_json::json;
use kiln_types::{InitContext, Plugin, Request, Response, Route};
use std::sync::atomic::{AtomicU64, Ordering};

/// The plugin's state: how many greetings this instance has given.
#[derive(Debug, Default)]
pub struct Hello {
    greetings: AtomicU64,
}

impl Hello {
    fn greet(&self, who: &str) -> Response {
        let n = self.greetings.fetch_add(1, Ordering::Relaxed) + 1;
        kiln_types::log::with_fields(kiln_types::Level::Info, "greeted", &json!({ "who": who, "greetings": n }));
        Response::json(200, &json!({ "message": format!("hello, {who}"), "greetings": n }))
    }

    /// `GET /hello`
    pub fn hello(&self, _req: &Request) -> Response {
        self.greet("world")
    }

    /// `GET /hello/{name}`
    pub fn hello_name(&self, req: &Request) -> Response {
        self.greet(req.param("name").unwrap_or("world"))
    }
}

impl Plugin for Hello {
    fn init(_ctx: &InitContext) -> Result<Self, String> {
        Ok(Self::default())
    }

    fn routes() -> Vec<Route<Self>> {
        let greeting = || {
            json!({
                "type": "object",
                "properties": { "message": { "type": "string" }, "greetings": { "type": "integer" } }
            })
        };
        vec![
            Route::get("/hello", Self::hello).summary("Greet the world").response(200, "A greeting", Some(greeting())),
            Route::get("/hello/{name}", Self::hello_name).summary("Greet someone").response(
                200,
                "A greeting",
                Some(greeting()),
            ),
        ]
    }
}

kiln_types::export_plugin!(Hello);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greetings_are_counted() {
        let hello = Hello::default();
        let first = hello.greet("kiln");
        assert_eq!(first.status, 200);
        let body: kiln_types::serde_json::Value = kiln_types::serde_json::from_slice(&first.body).unwrap();
        assert_eq!(body, json!({ "message": "hello, kiln", "greetings": 1 }));
        let second: kiln_types::serde_json::Value = kiln_types::serde_json::from_slice(&hello.greet("x").body).unwrap();
        assert_eq!(second["greetings"], 2);
    }
}
