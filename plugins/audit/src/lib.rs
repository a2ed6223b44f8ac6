//! audit: a kiln plugin that listens. It subscribes to `notes.*` (the notes example publishes
//! `notes.created`), `orders.*` (a trigger on a user's table can publish these through
//! `pg_notify('kiln_events', …)`: see the README) and `kiln.plugin.*` (kiln's own lifecycle
//! events), and `GET /audit` answers the last 100 events it received, oldest first, as
//! `[{"topic": …, "data": …}]`. It depends on notes: `GET /audit/notes` answers what notes'
//! `count` service says (`{"notes": n}`).

use kiln_types::serde_json::{Value, json};
use kiln_types::{ApiError, Event, InitContext, Json, Plugin, Route, Subscription, plugins};
use schemars::JsonSchema;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Mutex;

/// How many events `GET /audit` shows.
pub const KEEP: usize = 100;

/// One event heard.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct Heard {
    pub topic: String,
    /// The event's data, as published.
    pub data: Value,
}

/// What notes' `count` service answers.
#[derive(Debug, Serialize, JsonSchema)]
pub struct NoteCount {
    pub notes: i64,
}

pub struct Audit {
    heard: Mutex<VecDeque<(String, Value)>>,
}

impl Plugin for Audit {
    fn init(_: &InitContext) -> Result<Self, String> {
        Ok(Audit { heard: Mutex::new(VecDeque::with_capacity(KEEP)) })
    }

    fn routes() -> Vec<Route<Self>> {
        vec![
            Route::get("/audit/notes", Self::notes)
                .blocking()
                .summary("How many notes there are, as the notes plugin's count service says")
                .response(409, "The notes plugin does not serve now, or its service failed", None),
            Route::get("/audit", Self::list).summary("The last 100 events heard, oldest first"),
        ]
    }

    fn events() -> Vec<Subscription<Self>> {
        ["notes.*", "orders.*", "kiln.plugin.*"].into_iter().map(|p| Subscription::on(p, Self::heard)).collect()
    }
}

impl Audit {
    fn heard(&self, event: &Event) -> Result<(), String> {
        let data: Value = event.data().map_err(|e| format!("the data is not JSON: {e}"))?;
        // A handler that panicked while holding the lock must not silence the audit.
        let mut heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        if heard.len() == KEEP {
            heard.pop_front();
        }
        heard.push_back((event.topic().to_string(), data));
        Ok(())
    }

    /// 409 when notes cannot answer: the request is fine, the state it depends on is not
    /// (`DependencyUnavailable` while notes does not serve).
    fn notes(&self) -> Result<Json<NoteCount>, ApiError> {
        let refused = |message: String| ApiError::conflict(message).with_code("DependencyUnavailable");
        let answer = plugins::call("notes", "count", &json!({})).map_err(|e| {
            let code = e.code().unwrap_or("DependencyUnavailable").to_string();
            refused(format!("the notes plugin did not answer: {e}")).with_code(code)
        })?;
        let notes = answer["notes"].as_i64().ok_or_else(|| refused(format!("notes answered {answer}")))?;
        Ok(Json(NoteCount { notes }))
    }

    fn list(&self) -> Json<Vec<Heard>> {
        let heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        Json(heard.iter().map(|(topic, data)| Heard { topic: topic.clone(), data: data.clone() }).collect())
    }
}

kiln_types::export_plugin!(Audit);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_hundred_events_in_order() {
        let audit = Audit::init(&InitContext { config: json!({}) }).unwrap();
        for i in 0..(KEEP + 5) {
            let data = json!({ "n": i }).to_string();
            audit.heard(&Event::new("orders.created", data.as_bytes())).unwrap();
        }
        let heard = audit.heard.lock().unwrap();
        assert_eq!(heard.len(), KEEP);
        assert_eq!(heard.front().unwrap().1["n"], 5);
        assert_eq!(heard.back().unwrap().1["n"], KEEP + 4);
        drop(heard);
        assert!(audit.heard(&Event::new("orders.created", b"not json")).is_err());
    }

    #[test]
    fn answers_what_it_heard_and_what_notes_counts() {
        use kiln_types::testing::TestPlugin;
        let audit = TestPlugin::<Audit>::new().unwrap();
        audit.event("notes.created", &json!({ "id": 1 })).unwrap();
        audit.event("unrelated.topic", &json!({})).unwrap();
        let heard = audit.get("/audit").send().json::<Value>().unwrap();
        assert_eq!(heard, json!([{ "topic": "notes.created", "data": { "id": 1 } }]));
        let refused = audit.get("/audit/notes").send();
        assert_eq!(refused.status, 409, "{}", refused.text());
        audit.on_host_call("plugin.call", |args| {
            assert_eq!((args["plugin"].as_str(), args["service"].as_str()), (Some("notes"), Some("count")));
            Ok(json!({ "answer": { "notes": 3 } }))
        });
        assert_eq!(audit.get("/audit/notes").send().json::<Value>().unwrap(), json!({ "notes": 3 }));
    }
}
