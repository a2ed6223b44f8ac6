//! hello: the smallest useful kiln plugin. `GET /hello` and `GET /hello/{name}` greet;
//! it counts the greetings it has given since it was loaded.

use kiln_types::serde_json::json;
use kiln_types::{InitContext, Json, Path, Plugin, Route};
use schemars::JsonSchema;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};

/// The plugin's state: how many greetings this instance has given.
#[derive(Debug, Default)]
pub struct Hello {
    greetings: AtomicU64,
}

/// What a greeting answers.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Greeting {
    pub message: String,
    /// How many greetings this instance has given, this one included.
    pub greetings: u64,
}

impl Hello {
    fn greet(&self, who: &str) -> Json<Greeting> {
        let n = self.greetings.fetch_add(1, Ordering::Relaxed) + 1;
        kiln_types::log::with_fields(kiln_types::Level::Info, "greeted", &json!({ "who": who, "greetings": n }));
        Json(Greeting { message: format!("hello, {who}"), greetings: n })
    }

    /// `GET /hello`
    pub fn hello(&self) -> Json<Greeting> {
        self.greet("world")
    }

    /// `GET /hello/{name}`
    pub fn hello_name(&self, Path(name): Path<String>) -> Json<Greeting> {
        self.greet(&name)
    }
}

impl Plugin for Hello {
    fn init(_ctx: &InitContext) -> Result<Self, String> {
        Ok(Self::default())
    }

    fn routes() -> Vec<Route<Self>> {
        vec![
            Route::get("/hello", Self::hello).summary("Greet the world"),
            Route::get("/hello/{name}", Self::hello_name).summary("Greet someone"),
        ]
    }
}

kiln_types::export_plugin!(Hello);

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_types::serde_json::Value;
    use kiln_types::testing::TestPlugin;

    #[test]
    fn greetings_are_counted() {
        let hello = TestPlugin::<Hello>::new().unwrap();
        let first = hello.get("/hello/kiln").send();
        assert_eq!(first.status, 200);
        assert_eq!(first.json::<Value>().unwrap(), json!({ "message": "hello, kiln", "greetings": 1 }));
        assert_eq!(hello.get("/hello/J%C3%B6rg").send().json::<Value>().unwrap()["message"], "hello, Jörg");
        assert_eq!(hello.get("/hello").send().json::<Value>().unwrap()["greetings"], 3);
        assert_eq!(hello.logs().len(), 3);
    }
}
