//! powertable: a kiln plugin serving a small in-memory table of appliances and their power draw.
//!
//! `GET /powertable` lists the rows, `POST /powertable` adds one, `GET /powertable/{id}` reads one.

use kiln_types::serde_json::json;
use kiln_types::{InitContext, Plugin, Request, Response, Route};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

/// One row of the table.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub id: u64,
    pub name: String,
    pub watts: f64,
}

/// The body of `POST /powertable`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewRow {
    pub name: String,
    pub watts: f64,
}

/// The plugin: rows behind a mutex, because requests arrive concurrently.
#[derive(Debug)]
pub struct PowerTable {
    rows: Mutex<Vec<Row>>,
}

impl PowerTable {
    /// A table seeded with a few rows.
    pub fn new() -> Self {
        let seed = [("kettle", 2200.0), ("fridge", 150.0), ("laptop", 65.0)];
        let rows = seed
            .iter()
            .enumerate()
            .map(|(i, (name, watts))| Row { id: i as u64 + 1, name: name.to_string(), watts: *watts })
            .collect();
        Self { rows: Mutex::new(rows) }
    }

    fn rows(&self) -> std::sync::MutexGuard<'_, Vec<Row>> {
        // A handler that panicked while holding the lock must not take the table down with it.
        self.rows.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `GET /powertable`
    pub fn list(&self, _req: &Request) -> Response {
        Response::json(200, &*self.rows())
    }

    /// `GET /powertable/{id}`
    pub fn get(&self, req: &Request) -> Response {
        let Some(id) = req.param("id").and_then(|id| id.parse::<u64>().ok()) else {
            return Response::error(400, "id must be a non-negative integer");
        };
        match self.rows().iter().find(|r| r.id == id) {
            Some(row) => Response::json(200, row),
            None => Response::error(404, &format!("no row with id {id}")),
        }
    }

    /// `POST /powertable`
    pub fn create(&self, req: &Request) -> Response {
        let new: NewRow = match req.json() {
            Ok(new) => new,
            Err(e) => return Response::error(400, &format!("invalid row: {e}")),
        };
        if new.name.trim().is_empty() || !new.watts.is_finite() || new.watts < 0.0 {
            return Response::error(422, "name must not be empty and watts must be a non-negative number");
        }
        let mut rows = self.rows();
        let id = rows.iter().map(|r| r.id).max().unwrap_or(0) + 1;
        let row = Row { id, name: new.name, watts: new.watts };
        rows.push(row.clone());
        Response::json(201, &row)
    }
}

impl Default for PowerTable {
    fn default() -> Self {
        Self::new()
    }
}

fn row_schema() -> kiln_types::serde_json::Value {
    json!({
        "type": "object",
        "required": ["id", "name", "watts"],
        "properties": {
            "id": { "type": "integer", "minimum": 1 },
            "name": { "type": "string" },
            "watts": { "type": "number", "minimum": 0 }
        }
    })
}

impl Plugin for PowerTable {
    fn init(_ctx: &InitContext) -> Result<Self, String> {
        Ok(Self::new())
    }

    fn routes() -> Vec<Route<Self>> {
        vec![
            Route::get("/powertable", Self::list)
                .summary("List the appliances and their power draw")
                .handler_name("list")
                .response(200, "Every appliance", Some(json!({ "type": "array", "items": row_schema() }))),
            Route::post("/powertable", Self::create)
                .summary("Add an appliance")
                .handler_name("create")
                .request_schema(json!({
                    "type": "object",
                    "required": ["name", "watts"],
                    "additionalProperties": false,
                    "properties": {
                        "name": { "type": "string", "pattern": "\\S" },
                        "watts": { "type": "number", "minimum": 0 }
                    }
                }))
                .response(201, "Added", Some(row_schema()))
                .response(400, "The body is not a row", None)
                .response(422, "An empty name or a negative power", None),
            Route::get("/powertable/{id}", Self::get)
                .summary("Read one appliance")
                .handler_name("get")
                .param_schema("id", json!({ "type": "integer", "minimum": 0, "maximum": 9007199254740991_u64 }))
                .response(200, "The appliance", Some(row_schema()))
                .response(400, "The id is not a number", None)
                .response(404, "No appliance has this id", None),
        ]
    }
}

kiln_types::export_plugin!(PowerTable);
