//! notes: what a plugin does with kiln's host, written with typed handlers.
//! - `POST /notes` with `{"text": "..."}` stores a note in the plugin's own `notes` table
//!   (created by `migrations/001_notes.sql`), answers 201 with `{"id": n, "text": "..."}` and
//!   publishes the note as event `notes.created`;
//! - `GET /notes` lists them (`?limit=`, at most 1000), `GET /notes/{id}` answers one or 404;
//! - `GET /notes/stats` answers `{"created": n}`, a counter in the plugin's key-value storage;
//! - service `count` answers `{"notes": n}` to the plugins that depend on notes (audit does);
//! - `GET /notes/forbidden` reads kiln's own `plugins` table, which PostgreSQL refuses: 403 with
//!   the `TableAccessDenied` error it got.
//!
//! The request and response schemas in kiln's API docs come from the types below. Every route
//! that reaches the database is `.blocking()`: database calls wait on a round trip. kiln would
//! keep them from stalling other requests anyway (it moves the worker out of its async pool
//! during a host call), but the blocking pool is where waiting code belongs.

use kiln_types::serde_json::{Value, json};
use kiln_types::{
    ApiError, Created, HostError, InitContext, Json, Path, Plugin, Query, Route, Service, db, events, log, storage,
};
use schemas::{NewNote, Note, Page, Stats};

mod schemas;

pub struct Notes;

/// The longest note, in characters (the table's CHECK says the same).
const MAX_TEXT: usize = 10_000;

impl Plugin for Notes {
    fn init(_: &InitContext) -> Result<Self, String> {
        Ok(Notes)
    }

    fn routes() -> Vec<Route<Self>> {
        vec![
            Route::post("/notes", Self::create).blocking().summary("Store a note"),
            Route::get("/notes", Self::list).blocking().summary("The notes, oldest first"),
            Route::get("/notes/stats", Self::stats).blocking().summary("How many notes were created"),
            Route::get("/notes/forbidden", Self::forbidden)
                .blocking()
                .summary("Tries to read kiln's plugins table (refused by PostgreSQL)")
                .response(403, "TableAccessDenied", None),
            Route::get("/notes/{id}", Self::one).blocking().summary("One note").response(404, "No such note", None),
        ]
    }

    fn services() -> Vec<Service<Self>> {
        vec![Service::new("count", Self::count)]
    }
}

impl Notes {
    fn create(&self, Json(new): Json<NewNote>) -> Result<Created<Note>, ApiError> {
        if new.text.is_empty() || new.text.chars().count() > MAX_TEXT {
            return Err(ApiError::bad_request("send {\"text\": \"...\"} with 1 to 10000 characters"));
        }
        let rows = db::query("INSERT INTO notes (text) VALUES ($1) RETURNING id, text", &[json!(new.text)])?;
        let note: Note = row(rows.into_iter().next())?;
        if let Err(e) = count_one() {
            log::warn(&format!("the note was stored but not counted: {e}"));
        }
        log::with_fields(log::Level::Info, "note created", &json!({ "id": note.id }));
        if let Err(e) = events::emit("notes.created", &note) {
            log::warn(&format!("the note was stored but not announced: {e}"));
        }
        Ok(Created(note))
    }

    fn list(&self, Query(page): Query<Page>) -> Result<Json<Vec<Note>>, ApiError> {
        let limit = page.limit.unwrap_or(1000);
        if !(1..=1000).contains(&limit) {
            return Err(ApiError::bad_request("limit: 1 to 1000"));
        }
        let rows = db::query("SELECT id, text FROM notes ORDER BY id LIMIT $1", &[json!(limit)])?;
        rows.into_iter().map(|r| row(Some(r))).collect::<Result<_, _>>().map(Json)
    }

    fn one(&self, Path(id): Path<i64>) -> Result<Json<Note>, ApiError> {
        match db::query_opt("SELECT id, text FROM notes WHERE id = $1", &[json!(id)])? {
            Some(note) => row(Some(note)).map(Json),
            None => Err(ApiError::not_found(format!("no note {id}"))),
        }
    }

    /// Service `count` (for plugins that depend on notes): `{"notes": n}`.
    fn count(&self, _: Value) -> Result<Value, String> {
        let row = db::query_opt("SELECT count(*) AS notes FROM notes", &[]).map_err(|e| e.to_string())?;
        Ok(row.unwrap_or_else(|| json!({ "notes": 0 })))
    }

    fn stats(&self) -> Result<Json<Stats>, ApiError> {
        let created = storage::get("created")?;
        Ok(Json(Stats { created: created.as_ref().and_then(Value::as_u64).unwrap_or(0) }))
    }

    /// Only answers 200 if an operator granted the table in the row's `resources`.
    fn forbidden(&self) -> Result<Json<Vec<Value>>, ApiError> {
        Ok(Json(db::query("SELECT name FROM public.plugins", &[])?))
    }
}

/// A row as a typed value (a row that does not fit is kiln's or the migration's fault: 500).
fn row<T: serde::de::DeserializeOwned>(row: Option<Value>) -> Result<T, ApiError> {
    let row = row.ok_or_else(|| ApiError::internal("the statement returned no row"))?;
    kiln_types::serde_json::from_value(row).map_err(|e| ApiError::internal(format!("an unexpected row: {e}")))
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

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_types::testing::TestPlugin;

    #[test]
    fn a_note_is_stored_counted_and_announced() {
        let notes = TestPlugin::<Notes>::new().unwrap();
        notes.on_host_call("db.query", |args| {
            assert_eq!(args["params"], json!(["buy milk"]));
            Ok(json!({ "rows": [{ "id": 1, "text": "buy milk" }] }))
        });
        let created = notes.post("/notes").json(&json!({ "text": "buy milk" })).send();
        assert_eq!(created.status, 201, "{}", created.text());
        assert_eq!(created.json::<Value>().unwrap(), json!({ "id": 1, "text": "buy milk" }));
        assert_eq!(notes.storage()["created"], json!(1));
        assert_eq!(notes.emitted()[0].0, "notes.created");
        assert_eq!(notes.get("/notes/stats").send().json::<Value>().unwrap(), json!({ "created": 1 }));
    }

    #[test]
    fn bad_notes_are_refused_before_the_database() {
        let notes = TestPlugin::<Notes>::new().unwrap();
        assert_eq!(notes.post("/notes").json(&json!({ "text": "" })).send().status, 400);
        let wrong = notes.post("/notes").json(&json!({ "text": 5 })).send();
        assert_eq!((wrong.status, wrong.error_details()["field"].as_str()), (400, Some("text")));
        assert_eq!(notes.get("/notes/x").send().status, 400);
        assert_eq!(notes.get("/notes?limit=0").send().status, 400, "the documented range is enforced");
    }
}
