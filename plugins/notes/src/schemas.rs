//! What notes' routes take and answer; kiln's API docs show their schemas.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A note to store.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct NewNote {
    #[schemars(length(min = 1, max = 10000))]
    pub text: String,
}

/// A stored note.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct Note {
    pub id: i64,
    pub text: String,
}

/// `GET /notes`' query.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct Page {
    /// At most this many notes (at most 1000).
    #[schemars(range(min = 1, max = 1000))]
    pub limit: Option<u32>,
}

/// `GET /notes/stats`' answer.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Stats {
    /// Notes created since the plugin was installed.
    pub created: u64,
}
