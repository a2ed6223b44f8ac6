//! Watch mode: file changes under the plugin directories, and under every plugin's source
//! directory, become reconciler hints.
//!
//! Events are debounced: a batch is processed once no event arrived for [`DEBOUNCE`], so an
//! editor's save burst (write, rename, chmod) costs one pass. In a batch, a change inside a known
//! plugin's crate hints that plugin (a removed crate is unloaded by its pass), and a change
//! anywhere else under a plugin directory runs discovery, which inserts rows for new crates.
//!
//! The OS watcher (inotify) is used when it works; polling is the fallback (and can be forced):
//! inotify is unavailable on some filesystems and limited in watch count.

use crate::config::FileConfig;
use crate::discovery;
use crate::reconciler::Reconciler;
use crate::repo::{PluginRow, Repo};
use notify::{Event, PollWatcher, RecommendedWatcher, RecursiveMode, Watcher};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Quiet time that ends a batch of events.
pub const DEBOUNCE: Duration = Duration::from_millis(150);
/// Scan interval of the polling watcher.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How often the set of watched directories is brought up to date with the table.
const REFRESH: Duration = Duration::from_secs(5);

/// How to watch files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WatchMode {
    /// The OS watcher, falling back to polling when it fails.
    Auto,
    /// Polling only.
    Poll,
    /// No watching: changes are picked up by reload, row edits and discovery only.
    Off,
}

type Events = mpsc::UnboundedSender<notify::Result<Event>>;

/// Starts watching in a background task (nothing when `mode` is `Off`); aborting the task stops
/// the watcher.
pub fn spawn(
    mode: WatchMode,
    plugin_dirs: Vec<PathBuf>,
    policy: Arc<FileConfig>,
    repo: Repo,
    reconciler: Reconciler,
) -> Option<tokio::task::JoinHandle<()>> {
    if mode == WatchMode::Off {
        return None;
    }
    Some(tokio::spawn(async move {
        let (tx, rx) = mpsc::unbounded_channel();
        let watcher = match make_watcher(mode, tx) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!("watch mode is off: no file watcher could be created: {e}");
                return;
            }
        };
        Watch { watcher, watched: BTreeSet::new(), plugin_dirs, policy, repo, reconciler }.run(rx).await;
    }))
}

fn make_watcher(mode: WatchMode, tx: Events) -> notify::Result<Box<dyn Watcher + Send>> {
    let handler = {
        let tx = tx.clone();
        move |e| {
            let _ = tx.send(e);
        }
    };
    if mode == WatchMode::Auto {
        match RecommendedWatcher::new(handler, notify::Config::default()) {
            Ok(w) => return Ok(Box::new(w)),
            Err(e) => tracing::warn!("the OS file watcher is unavailable ({e}); polling instead"),
        }
    }
    let handler = move |e| {
        let _ = tx.send(e);
    };
    Ok(Box::new(PollWatcher::new(handler, notify::Config::default().with_poll_interval(POLL_INTERVAL))?))
}

struct Watch {
    watcher: Box<dyn Watcher + Send>,
    /// Directories watched now (recursively).
    watched: BTreeSet<PathBuf>,
    plugin_dirs: Vec<PathBuf>,
    policy: Arc<FileConfig>,
    repo: Repo,
    reconciler: Reconciler,
}

impl Watch {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<notify::Result<Event>>) {
        self.refresh().await;
        let mut tick = tokio::time::interval(REFRESH);
        loop {
            tokio::select! {
                first = rx.recv() => {
                    let Some(first) = first else { return };
                    let mut paths = BTreeSet::new();
                    collect(first, &mut paths);
                    // Debounce: keep collecting until the events stop for a while.
                    while let Ok(Some(more)) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                        collect(more, &mut paths);
                    }
                    self.process(paths).await;
                }
                _ = tick.tick() => self.refresh().await,
            }
        }
    }

    /// Hints the plugins whose crates changed; runs discovery for changes outside known crates.
    async fn process(&mut self, paths: BTreeSet<PathBuf>) {
        let rows = match self.repo.list().await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!("watch: cannot read the plugins table: {e}");
                return;
            }
        };
        let mut hinted = BTreeSet::new();
        let mut unknown = false;
        for path in &paths {
            // The innermost crate containing the path (crates may nest).
            let owner = rows.iter().filter(|r| path.starts_with(&r.source_path)).max_by_key(|r| r.source_path.len());
            match owner {
                Some(row) => {
                    if !is_build_output(path.strip_prefix(&row.source_path).unwrap_or(path)) {
                        hinted.insert(row.id);
                    }
                }
                None => {
                    if let Some(dir) = self.plugin_dirs.iter().find(|d| path.starts_with(d)) {
                        unknown |= !is_build_output(path.strip_prefix(dir).unwrap_or(path));
                    }
                }
            }
        }
        for id in &hinted {
            tracing::info!(plugin_id = id, "source changed");
            self.reconciler.hint(*id);
        }
        if unknown && let Err(e) = discovery::record(&self.repo, &self.plugin_dirs, &self.policy).await {
            tracing::warn!("watch: discovery failed: {e}");
        }
        // Rows discovery adds sit under the plugin directories, watched already: the rows read
        // above are enough to bring the watch set up to date.
        self.watch_for(&rows);
    }

    /// Brings the watch set up to date with the table.
    async fn refresh(&mut self) {
        match self.repo.list().await {
            Ok(rows) => self.watch_for(&rows),
            Err(e) => tracing::warn!("watch: cannot read the plugins table: {e}"),
        }
    }

    /// Watches every plugin directory and every plugin's source directory outside them.
    fn watch_for(&mut self, rows: &[PluginRow]) {
        let mut wanted: BTreeSet<PathBuf> = self.plugin_dirs.iter().filter(|d| d.is_dir()).cloned().collect();
        for row in rows {
            let dir = PathBuf::from(&row.source_path);
            if dir.is_dir() && !self.plugin_dirs.iter().any(|d| dir.starts_with(d)) {
                wanted.insert(dir);
            }
        }
        for gone in self.watched.difference(&wanted).cloned().collect::<Vec<_>>() {
            let _ = self.watcher.unwatch(&gone);
            self.watched.remove(&gone);
        }
        for dir in wanted.difference(&self.watched.clone()) {
            match self.watcher.watch(dir, RecursiveMode::Recursive) {
                Ok(()) => {
                    tracing::debug!(dir = %dir.display(), "watching");
                    self.watched.insert(dir.clone());
                }
                Err(e) => tracing::warn!(dir = %dir.display(), "cannot watch: {e}"),
            }
        }
    }
}

fn collect(event: notify::Result<Event>, into: &mut BTreeSet<PathBuf>) {
    match event {
        Ok(e) if !e.kind.is_access() => into.extend(e.paths),
        Ok(_) => {}
        Err(e) => tracing::warn!("watch: {e}"),
    }
}

/// Build output and hidden files (editor swap files, `.git`) are not sources. `path` is
/// relative to the crate or plugin directory.
fn is_build_output(path: &Path) -> bool {
    path.components().any(|c| {
        let c = c.as_os_str().to_string_lossy();
        c == "target" || (c.starts_with('.') && c != "." && c != "..")
    })
}

#[cfg(test)]
mod tests {
    use super::is_build_output;
    use std::path::Path;

    #[test]
    fn build_output_and_hidden_files_are_ignored() {
        assert!(is_build_output(Path::new("target/release/libx.so")));
        assert!(is_build_output(Path::new("src/.lib.rs.swp")));
        assert!(!is_build_output(Path::new("src/lib.rs")));
    }
}
