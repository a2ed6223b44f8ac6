//! Each plugin's recent log lines, panics and init errors, kept in memory (the newest
//! [`KEEP`] per plugin) and served at `GET /plugins/{name}/logs`. Every entry is also a
//! tracing event tagged with the plugin's name and version (and route, for a handler's).

use chrono::{DateTime, Utc};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Entries kept per plugin.
pub const KEEP: usize = 1000;

pub use kiln_types::Level;

/// What an entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A line the plugin logged.
    Log,
    /// A panic in one of its calls (the message says where).
    Panic,
    /// Its init refused, panicked or took the process down.
    Init,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Log => "log",
            Kind::Panic => "panic",
            Kind::Init => "init",
        }
    }
}

/// One entry.
#[derive(Debug, Clone)]
pub struct LogEntry {
    /// Increases with every entry of the server (for tailing: `since` an entry's time).
    pub seq: u64,
    pub at: DateTime<Utc>,
    pub level: Level,
    pub kind: Kind,
    pub message: String,
    pub fields: serde_json::Value,
    /// The route (`METHOD /path`) being handled, for a handler's entries.
    pub route: Option<String>,
}

static SEQ: AtomicU64 = AtomicU64::new(1);

impl LogEntry {
    pub fn new(level: Level, kind: Kind, message: String, fields: serde_json::Value, route: Option<String>) -> Self {
        Self { seq: SEQ.fetch_add(1, Ordering::Relaxed), at: Utc::now(), level, kind, message, fields, route }
    }

    /// The entry as a tracing event under the plugin's name.
    pub fn trace(&self, plugin: &str, version: &str) {
        let route = self.route.as_deref().unwrap_or("");
        let fields = &self.fields;
        let msg = &self.message;
        match self.level {
            Level::Error => tracing::error!(plugin, version, route, %fields, "{msg}"),
            Level::Warn => tracing::warn!(plugin, version, route, %fields, "{msg}"),
            Level::Info => tracing::info!(plugin, version, route, %fields, "{msg}"),
            Level::Debug => tracing::debug!(plugin, version, route, %fields, "{msg}"),
            Level::Trace => tracing::trace!(plugin, version, route, %fields, "{msg}"),
        }
    }
}

/// The entries of every plugin, by name, and a feed of new ones for live tails.
#[derive(Debug)]
pub struct LogStore {
    by_plugin: Mutex<HashMap<String, VecDeque<LogEntry>>>,
    /// Every new entry, with its plugin's name. Bounded: a tail that falls behind is told how
    /// many entries it missed, and memory stays bounded.
    feed: tokio::sync::broadcast::Sender<(std::sync::Arc<str>, LogEntry)>,
}

impl Default for LogStore {
    fn default() -> Self {
        Self { by_plugin: Default::default(), feed: tokio::sync::broadcast::channel(1024).0 }
    }
}

impl LogStore {
    /// New entries of every plugin, from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<(std::sync::Arc<str>, LogEntry)> {
        self.feed.subscribe()
    }

    /// Keeps `entry` for `plugin`, dropping its oldest beyond [`KEEP`].
    pub fn push(&self, plugin: &str, entry: LogEntry) {
        if self.feed.receiver_count() > 0 {
            let _ = self.feed.send((plugin.into(), entry.clone()));
        }
        let mut all = self.by_plugin.lock().expect("log store lock");
        let entries = all.entry(plugin.to_string()).or_default();
        if entries.len() == KEEP {
            entries.pop_front();
        }
        entries.push_back(entry);
    }

    /// Records a panic or an init failure of `plugin` (also as a tracing event).
    pub fn record(&self, plugin: &str, kind: Kind, message: String, route: Option<String>) {
        let entry = LogEntry::new(Level::Error, kind, message, serde_json::Value::Object(Default::default()), route);
        self.push(plugin, entry);
    }

    /// `plugin`'s entries at `level` or more severe, after `since`, oldest first, the newest
    /// `limit` of them.
    pub fn query(&self, plugin: &str, level: Level, since: Option<DateTime<Utc>>, limit: usize) -> Vec<LogEntry> {
        let all = self.by_plugin.lock().expect("log store lock");
        let Some(entries) = all.get(plugin) else { return Vec::new() };
        let mut found: Vec<LogEntry> = entries
            .iter()
            .rev()
            .filter(|e| e.level <= level && since.is_none_or(|s| e.at > s))
            .take(limit)
            .cloned()
            .collect();
        found.reverse();
        found
    }

    /// Forgets `plugin`'s entries (it was uninstalled).
    pub fn forget(&self, plugin: &str) {
        self.by_plugin.lock().expect("log store lock").remove(plugin);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_entries_are_kept_and_filtered() {
        let store = LogStore::default();
        for i in 0..KEEP + 5 {
            let level = if i % 2 == 0 { Level::Info } else { Level::Debug };
            store.push("p", LogEntry::new(level, Kind::Log, format!("{i}"), serde_json::json!({}), None));
        }
        let all = store.query("p", Level::Trace, None, usize::MAX);
        assert_eq!(all.len(), KEEP);
        assert_eq!(all.last().unwrap().message, format!("{}", KEEP + 4));
        let info = store.query("p", Level::Info, None, 3);
        assert_eq!(info.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(), ["1000", "1002", "1004"]);
        assert!(store.query("q", Level::Trace, None, 10).is_empty());
    }
}
