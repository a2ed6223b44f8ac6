//! Which plugin kiln is calling into while it loads one, kept where the next start finds it.
//!
//! A plugin whose `init` aborts, segfaults or calls `exit` takes the whole process down, and on
//! every start it would do so again. So before kiln opens a library and runs its init, it writes
//! a marker file naming the plugin and version, and empties it when the call returns. A marker
//! found at startup names the plugin that took the previous process down: kiln marks its row
//! `failed` (`CrashedDuringLoad`) and quarantines that version until the row or the source
//! changes. The supervisor of `kiln serve` passes the previous process's signal or exit code
//! along (`KILN_LAST_EXIT`), so the row can say how it died.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The environment variable through which the supervisor tells a restarted server how the
/// previous one ended ("killed by signal 6 (SIGABRT)", "exited with code 3").
pub const LAST_EXIT_ENV: &str = "KILN_LAST_EXIT";

/// What a marker says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Marker {
    pub plugin_id: i64,
    pub name: String,
    /// Content hash of the version being loaded.
    pub hash: String,
    /// The process that was loading it.
    pub pid: u32,
    /// When the load began (RFC 3339).
    pub started: String,
}

/// The directory of markers: one file per plugin id, empty unless that plugin is being loaded.
/// A file is emptied, not removed, when its load ends, and written again at the plugin's next
/// load: creating and removing a file at every load was a third of kiln's CPU samples while
/// 1,000 plugins were turned on at once (ext4 searched its inode bitmap past the inodes just
/// freed, under the directory's lock). A plugin's file goes with its row
/// ([`LoadMarkers::forget`]).
#[derive(Debug, Clone)]
pub struct LoadMarkers {
    dir: PathBuf,
}

/// Empties its marker when dropped (the call into the plugin returned, one way or another).
#[derive(Debug)]
pub struct Guard {
    path: PathBuf,
}

impl Drop for Guard {
    fn drop(&mut self) {
        empty(&self.path);
    }
}

/// Empties the marker file at `path`, if it exists (not made again once removed).
fn empty(path: &std::path::Path) {
    let _ = std::fs::OpenOptions::new().write(true).truncate(true).open(path);
}

impl LoadMarkers {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// Records that plugin `plugin_id` (`name`, version `hash`) is about to be called into.
    /// Blocking (a small file write). The marker stays if the process dies before the guard drops.
    ///
    /// Written in place, not through a renamed temporary file: a marker cut short can only be
    /// left by a process that died while writing it, before it called into the plugin, and
    /// [`LoadMarkers::take_all`] passes over a marker that does not parse. The directory is
    /// made when a write finds it missing (the first, or after it was removed), not each time.
    pub fn begin(&self, plugin_id: i64, name: &str, hash: &str) -> std::io::Result<Guard> {
        let marker = Marker {
            plugin_id,
            name: name.to_string(),
            hash: hash.to_string(),
            pid: std::process::id(),
            started: chrono::Utc::now().to_rfc3339(),
        };
        let path = self.dir.join(plugin_id.to_string());
        let bytes = serde_json::to_vec(&marker).expect("a marker serializes");
        match std::fs::write(&path, &bytes) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(&self.dir)?;
                std::fs::write(&path, &bytes)?;
            }
            written => written?,
        }
        Ok(Guard { path })
    }

    /// The markers left by a process that ended while loading, emptied as they are read.
    pub fn take_all(&self) -> Vec<Marker> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut markers = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(bytes) = std::fs::read(&path) else { continue };
            if bytes.is_empty() {
                continue;
            }
            if let Ok(m) = serde_json::from_slice(&bytes) {
                markers.push(m);
            }
            empty(&path);
        }
        markers.sort_by_key(|m: &Marker| m.plugin_id);
        markers
    }

    /// Whether a marker is left (a file that is not empty): the process ended while loading.
    pub fn any_pending(&self) -> bool {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return false };
        entries.flatten().any(|e| e.metadata().is_ok_and(|m| m.len() > 0))
    }

    /// Removes plugin `plugin_id`'s file (its row is gone). Blocking (a small file operation).
    pub fn forget(&self, plugin_id: i64) {
        let _ = std::fs::remove_file(self.dir.join(plugin_id.to_string()));
    }
}

/// The row's message for a version that took the process down while loading.
pub fn crash_message(marker: &Marker, last_exit: Option<&str>) -> String {
    let how = last_exit.map_or_else(|| "ended".to_string(), |e| format!("was {e}"));
    format!(
        "the kiln process (pid {}) {how} while loading this version ({}) at {}; it is not loaded \
         again until the plugin's row or source changes",
        marker.pid,
        &marker.hash[..marker.hash.len().min(16)],
        marker.started
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_outlives_only_a_call_that_never_returned() {
        let dir = tempfile::tempdir().unwrap();
        let markers = LoadMarkers::new(dir.path().join("loading"));
        drop(markers.begin(1, "returned", "aaaa").unwrap());
        assert!(!markers.any_pending(), "a load that returned leaves nothing pending");
        let guard = markers.begin(2, "crashed", "bbbb").unwrap();
        std::mem::forget(guard); // as a process that died inside the call leaves it
        assert!(markers.any_pending());
        let left = markers.take_all();
        assert!(!markers.any_pending(), "taken");
        assert_eq!(left.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["crashed"]);
        assert!(markers.take_all().is_empty(), "taken once");
        // A load that returned leaves its file empty, for the plugin's next load; the file
        // goes with the plugin.
        let file = dir.path().join("loading/1");
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 0);
        drop(markers.begin(1, "returned", "aaaa").unwrap());
        assert!(markers.take_all().is_empty());
        markers.forget(1);
        assert!(!file.exists());
        let msg = crash_message(&left[0], Some("killed by signal 6 (SIGABRT)"));
        assert!(msg.contains("was killed by signal 6 (SIGABRT)") && msg.contains("bbbb"), "{msg}");
    }

    /// A marker is written in place: one cut short (its process died while writing it, before
    /// it called into the plugin) names nobody, and is emptied.
    #[test]
    fn a_marker_cut_short_names_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let markers = LoadMarkers::new(dir.path().join("loading"));
        std::mem::forget(markers.begin(4, "crashed", "cccc").unwrap());
        std::fs::write(dir.path().join("loading/3"), br#"{"plugin_id": 3, "na"#).unwrap();
        let left = markers.take_all();
        assert_eq!(left.iter().map(|m| m.plugin_id).collect::<Vec<_>>(), [4]);
        let sizes: Vec<u64> = std::fs::read_dir(dir.path().join("loading"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .collect();
        assert_eq!(sizes, [0, 0], "both emptied");
        // Removed while the server runs, the directory is made again.
        std::fs::remove_dir_all(dir.path().join("loading")).unwrap();
        std::mem::forget(markers.begin(5, "crashed", "dddd").unwrap());
        assert_eq!(markers.take_all().iter().map(|m| m.plugin_id).collect::<Vec<_>>(), [5]);
    }
}
