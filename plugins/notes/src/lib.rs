//! notes: what a plugin does with kiln's host.
//! - `POST /notes` with `{"text": "..."}` stores a note in the plugin's own `notes` table
//!   (created by `migrations/001_notes.sql`), answers 201 with `{"id": n, "text": "..."}` and
//!   publishes the note as event `notes.created`;
//! - `GET /notes` lists them, `GET /notes/{id}` answers one or 404;
//! - `GET /notes/stats` answers `{"created": n}`, a counter in the plugin's key-value storage;
//! - service `count` answers `{"notes": n}` to the plugins that depend on notes (audit does);
//! - `GET /notes/forbidden` reads kiln's own `plugins` table, which PostgreSQL refuses: 403 with
//!   the `TableAccessDenied` error it got.
//!
//! Every route that reaches the database is `.blocking()`: database calls wait on a round trip.
//! kiln would keep them from stalling other requests anyway (it moves the worker out of its
//! async pool during a host call), but the blocking pool is where waiting code belongs.

use kiln_types::serde_json::{Value, json};
use kiln_types::{HostError, InitContext, Plugin, Request, Response, Route, Service, db, events, log, storage};

pub struct Notes;

/// The longest note, in characters (the table's CHECK says the same).
const MAX_TEXT: usize = 10_000;

impl Plugin for Notes {
    fn init(_: &InitContext) -> Result<Self, String> {
        Ok(Notes)
    }

    fn routes() -> Vec<Route<Self>> {
        let note = || {
            json!({
                "type": "object",
                "properties": { "id": { "type": "integer" }, "text": { "type": "string" } },
                "required": ["id", "text"]
            })
        };
        vec![
            Route::post("/notes", Self::create)
                .blocking()
                .summary("Store a note")
                .request_schema(json!({
                    "type": "object",
                    "properties": { "text": { "type": "string", "minLength": 1, "maxLength": 10000 } },
                    "required": ["text"]
                }))
                .response(201, "The stored note", Some(note()))
                .response(400, "No text", None),
            Route::get("/notes", Self::list).blocking().summary("Every note, oldest first").response(
                200,
                "The notes",
                Some(json!({ "type": "array", "items": note() })),
            ),
            Route::get("/notes/stats", Self::stats).blocking().summary("How many notes were created").response(
                200,
                "The count",
                Some(json!({ "type": "object", "properties": { "created": { "type": "integer" } } })),
            ),
            Route::get("/notes/forbidden", Self::forbidden)
                .blocking()
                .summary("Tries to read kiln's plugins table (refused by PostgreSQL)")
                .response(403, "TableAccessDenied", None),
            Route::get("/notes/{id}", Self::one)
                .blocking()
                .summary("One note")
                .param_schema("id", json!({ "type": "integer", "format": "int64" }))
                .response(200, "The note", Some(note()))
                .response(404, "No such note", None),
        ]
    }

    fn services() -> Vec<Service<Self>> {
        vec![Service::new("count", Self::count)]
    }
}

/// The answer for a failed host call: 403 for a refused table, 504 past the deadline, else 500.
fn failed(e: &HostError) -> Response {
    let status = match e.code() {
        Some("TableAccessDenied") => 403,
        Some("Timeout") => 504,
        Some("DatabaseUnavailable") => 503,
        _ => 500,
    };
    let body = json!({ "error": e.code().unwrap_or("HostError"), "message": e.to_string(), "details": {} });
    Response::json(status, &body)
}

impl Notes {
    fn create(&self, req: &Request) -> Response {
        let text = match req.json::<Value>() {
            Ok(v) => match v.get("text").and_then(Value::as_str) {
                Some(t) if !t.is_empty() && t.chars().count() <= MAX_TEXT => t.to_string(),
                _ => return Response::error(400, "send {\"text\": \"...\"} with 1 to 10000 characters"),
            },
            Err(e) => return Response::error(400, &format!("the body is not JSON: {e}")),
        };
        let note = match db::query("INSERT INTO notes (text) VALUES ($1) RETURNING id, text", &[json!(text)]) {
            Ok(rows) => rows.into_iter().next().unwrap_or(Value::Null),
            Err(e) => return failed(&e),
        };
        if let Err(e) = count_one() {
            log::warn(&format!("the note was stored but not counted: {e}"));
        }
        log::with_fields(log::Level::Info, "note created", &json!({ "id": note["id"] }));
        if let Err(e) = events::emit("notes.created", &note) {
            log::warn(&format!("the note was stored but not announced: {e}"));
        }
        Response::json(201, &note)
    }

    fn list(&self, _: &Request) -> Response {
        match db::query("SELECT id, text FROM notes ORDER BY id LIMIT 1000", &[]) {
            Ok(rows) => Response::json(200, &rows),
            Err(e) => failed(&e),
        }
    }

    fn one(&self, req: &Request) -> Response {
        let Some(id) = req.param("id").and_then(|id| id.parse::<i64>().ok()) else {
            return Response::error(404, "no such note");
        };
        match db::query_opt("SELECT id, text FROM notes WHERE id = $1", &[json!(id)]) {
            Ok(Some(note)) => Response::json(200, &note),
            Ok(None) => Response::error(404, "no such note"),
            Err(e) => failed(&e),
        }
    }

    /// Service `count` (for plugins that depend on notes): `{"notes": n}`.
    fn count(&self, _: Value) -> Result<Value, String> {
        let row = db::query_opt("SELECT count(*) AS notes FROM notes", &[]).map_err(|e| e.to_string())?;
        Ok(row.unwrap_or_else(|| json!({ "notes": 0 })))
    }

    fn stats(&self, _: &Request) -> Response {
        match storage::get("created") {
            Ok(v) => Response::json(200, &json!({ "created": v.as_ref().and_then(Value::as_u64).unwrap_or(0) })),
            Err(e) => failed(&e),
        }
    }

    fn forbidden(&self, _: &Request) -> Response {
        match db::query("SELECT name FROM public.plugins", &[]) {
            Ok(rows) => Response::json(200, &rows), // only if an operator granted it in `resources`
            Err(e) => failed(&e),
        }
    }
}

/// Adds one to `created` in storage, without losing a concurrent increment.
fn count_one() -> Result<(), HostError> {
    loop {
        let current = storage::get("created")?;
        let next = current.as_ref().and_then(Value::as_u64).unwrap_or(0) + 1;
        if storage::compare_and_set("created", current.as_ref(), &json!(next))? {
            return Ok(());
        }
    }
}

kiln_types::export_plugin!(Notes);
