//! The served set and who owns which path.
//!
//! The rule: patterns overlap when some request path matches both. Of plugins whose routes
//! overlap, the one whose row is older (smaller id) serves, whichever loaded first, so the
//! outcome is the same after every restart. A younger claimant is refused (`RouteConflict`,
//! state `waiting`); a younger owner gives way when an older claimant publishes. Waiting plugins
//! are retried whenever a version stops serving or is replaced, so a freed path is taken at once.
//! Paths under the admin API's roots belong to kiln.

use super::served_set::Routed;
use super::{Inner, ReconcileError};
use crate::loader::LoadedPlugin;
use crate::repo::PluginRow;
use crate::routes::{Pattern, RouteProblem};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use tokio::sync::Notify;

/// The task that builds route tables when changes wait to be shown (see [`Inner::show`]). It
/// ends when the reconciler is dropped.
pub(super) async fn publisher(inner: Weak<Inner>, wanted: Arc<Notify>) {
    loop {
        wanted.notified().await;
        // Passes woken with the one that asked (one statement's rows) make their changes
        // first, and go out in this table.
        tokio::task::yield_now().await;
        let Some(inner) = inner.upgrade() else { return };
        // Here, on the async worker: a table is made from the previous one and what changed
        // (`PluginRouter`), so it costs the changed plugins' routes (tens of microseconds for a
        // toggle among 1,000 plugins); handing it to the blocking pool cost more than that.
        // A panic must not end this task: every pass would wait for it forever.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.build_table())).is_err() {
            tracing::error!("building the route table panicked; the previous table stays");
            inner.shown.send_replace(inner.changes.load(Ordering::SeqCst));
        }
    }
}

/// A plugin version being served.
pub(super) struct Served {
    pub hash: String,
    /// The row's `generation` it was loaded for (a higher one asks for a fresh instance).
    pub generation: i64,
    /// The configuration the instance was created with (defaults applied).
    pub config: serde_json::Value,
    pub plugin: Arc<LoadedPlugin>,
    /// Its routes' paths, parsed once (what ownership is decided on).
    pub patterns: Vec<Pattern>,
}

impl Routed for Served {
    fn patterns(&self) -> &[Pattern] {
        &self.patterns
    }
}

/// What a publish displaced, kept until the publish is recorded so that it can be put back.
pub(super) struct Displaced {
    /// The version of the same plugin that served before.
    pub previous: Option<Served>,
    /// Younger plugins that gave way, with the reason for their rows.
    pub evicted: Vec<(i64, Served, String)>,
}

impl Inner {
    /// Checks the new version's routes and, if they are sound, serves it in place of the old
    /// one; younger plugins on its paths give way (see the module docs). Returns what it
    /// displaced and the change, which the route table shows once [`Inner::show`] returns.
    pub(super) fn take_paths(
        &self,
        row: &PluginRow,
        hash: &str,
        config: serde_json::Value,
        plugin: Arc<LoadedPlugin>,
    ) -> Result<(Displaced, u64), ReconcileError> {
        let description = plugin.description();
        if description.name != row.name {
            return Err(ReconcileError::NameMismatch {
                dir: PathBuf::from(&row.source_path),
                package: description.name.clone(),
                row: row.name.clone(),
            });
        }
        let mine = crate::routes::own_patterns(&description.routes).map_err(|e| match e {
            RouteProblem::Invalid(why) => ReconcileError::InvalidRoute(why),
            RouteProblem::Conflict(why) => ReconcileError::RouteConflict(why),
        })?;
        // What the route table could refuse is refused here, for this plugin alone, so that a
        // table built from the served set (with others' changes) is never refused.
        self.sink.check(&plugin).map_err(ReconcileError::InvalidRoute)?;
        let patterns: Vec<Pattern> = mine.into_iter().map(|(_, p)| p).collect();
        let mut served = self.served.lock().expect("served lock");
        if self.closed.load(Ordering::SeqCst) {
            return Err(ReconcileError::ShuttingDown);
        }
        let mut evict: Vec<(i64, String)> = Vec::new();
        for p in &patterns {
            for (other_id, theirs) in served.overlapping(p) {
                if other_id == row.id || evict.iter().any(|(id, _)| *id == other_id) {
                    continue;
                }
                if other_id < row.id {
                    let theirs_name = &served.get(&other_id).expect("indexed").plugin.description().name;
                    return Err(ReconcileError::RouteConflict(format!(
                        "path {p} overlaps {theirs}, served by plugin {theirs_name:?}, whose row is older; \
                         this plugin waits and takes the path when it is free"
                    )));
                }
                let why = format!(
                    "RouteConflict: route conflict: path {theirs} overlaps {p} of plugin {:?}, whose row is older; \
                     this plugin waits and takes the path when it is free",
                    row.name
                );
                evict.push((other_id, why));
            }
        }
        // An older plugin's conflict is found whichever pattern comes first; evict younger
        // ones only once none is older.
        let evicted: Vec<(i64, Served, String)> = evict
            .into_iter()
            .map(|(id, why)| (id, served.remove(&id).expect("listed from the served set"), why))
            .collect();
        // Never lower: a row read a moment before another pass's can show an older generation.
        let generation = served.get(&row.id).map_or(row.generation, |s| s.generation.max(row.generation));
        let previous = served.insert(row.id, Served { hash: hash.to_string(), generation, config, plugin, patterns });
        Ok((Displaced { previous, evicted }, self.changed()))
    }

    /// Counts a change of the served set; called with the `served` lock held.
    pub(super) fn changed(&self) -> u64 {
        self.changes.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Returns once the route table shows the served set as of change `change` or later.
    ///
    /// Tables are built by one task ([`publisher`]), one at a time, each with every change made
    /// before it started: N passes that change the served set at once (a start, a bulk edit)
    /// cost a few table builds, not N.
    pub(super) async fn show(&self, change: u64) {
        let mut shown = self.shown.subscribe();
        if *shown.borrow_and_update() >= change {
            return;
        }
        self.table_wanted.notify_one();
        // The sender lives in `self`: it cannot be dropped while we wait.
        let _ = shown.wait_for(|shown| *shown >= change).await;
    }

    /// Builds and swaps in a route table of the served set, unless it is shown already.
    fn build_table(&self) {
        let (now, all) = {
            let served = self.served.lock().expect("served lock");
            let all: Vec<Arc<LoadedPlugin>> = served.values().map(|s| s.plugin.clone()).collect();
            (self.changes.load(Ordering::SeqCst), all)
        };
        if now <= *self.shown.borrow() {
            return;
        }
        if let Err(e) = self.sink.publish(&all) {
            // Each plugin passed `RouteSink::check` and the ownership rule before it entered the
            // set, so this is a bug. The previous table stays; nobody waits forever for it.
            tracing::error!("could not publish the route table: {e}");
        }
        self.tables_built.fetch_add(1, Ordering::Relaxed);
        self.shown.send_replace(now);
        drop(all); // a retired version's last reference may go here (its cleanup is queued)
    }

    /// Undoes a publish of `published` (its recording failed): the displaced versions serve
    /// again, and the new one is dropped. What changed meanwhile stays: if an older plugin has
    /// evicted `published` already, or a displaced plugin serves again, nothing is put back there.
    pub(super) async fn unpublish(&self, id: i64, published: &Arc<LoadedPlugin>, displaced: Displaced) {
        let (new, change, lost) = self.put_back(id, published, displaced);
        self.show(change).await;
        drop(new);
        // Their paths were taken meanwhile: their passes decide again who serves.
        for other in lost {
            self.hint(other);
        }
    }

    /// The served-set half of [`Inner::unpublish`]. A displaced version whose paths another
    /// plugin took meanwhile is not put back (two owners of a path would make every later
    /// table fail): its id is returned, for a pass.
    fn put_back(
        &self,
        id: i64,
        published: &Arc<LoadedPlugin>,
        displaced: Displaced,
    ) -> (Option<Served>, u64, Vec<i64>) {
        let mut served = self.served.lock().expect("served lock");
        let ours = served.get(&id).is_some_and(|s| Arc::ptr_eq(&s.plugin, published));
        let mut lost = Vec::new();
        let new = match ours {
            true => served.remove(&id),
            false => None,
        };
        let mut back: Vec<(i64, Served)> = Vec::new();
        if ours && let Some(previous) = displaced.previous {
            back.push((id, previous));
        }
        back.extend(displaced.evicted.into_iter().map(|(other, s, _)| (other, s)));
        for (other, s) in back {
            if served.contains_key(&other) {
                continue; // it serves again already
            }
            if s.patterns.iter().any(|p| served.overlapping(p).any(|(owner, _)| owner != other)) {
                lost.push(other);
            } else {
                served.insert(other, s);
            }
        }
        (new, self.changed(), lost)
    }

    /// Recorded publishes (of plugins `ids`, which displaced `displaced`): the displaced
    /// versions retire (after their last requests), evicted plugins wait, and waiting plugins
    /// are retried (a path may be free, a dependency serves).
    pub(super) fn published(&self, ids: &[i64], displaced: Vec<Displaced>) {
        let mut skip = ids.to_vec();
        let mut retiring = Vec::with_capacity(displaced.len());
        {
            let mut waiting = self.waiting.lock().expect("waiting lock");
            for Displaced { previous, evicted } in displaced {
                for (other, s, _) in evicted {
                    waiting.insert(other);
                    skip.push(other);
                    tracing::warn!(plugin = %s.plugin.description().name, plugin_id = other, "gave way to an older plugin's path");
                    retiring.push(s);
                }
                retiring.extend(previous);
            }
            // After the evicted: a plugin whose old version gave way may have published a new
            // one in the same batch, on other paths.
            for id in ids {
                waiting.remove(id);
            }
        }
        // A path may have been freed (a version was replaced), or a plugin waiting for this one
        // as a dependency may load now.
        self.hint_waiting(&skip);
        drop(retiring); // the displaced versions retire here
    }

    /// Stops serving plugin `id`, if it serves, and retries plugins waiting for a path. Returns
    /// the name of what it served.
    pub(super) async fn retire(&self, id: i64) -> Option<String> {
        let (old, change) = {
            let mut served = self.served.lock().expect("served lock");
            (served.remove(&id)?, self.changed())
        };
        self.show(change).await;
        let name = old.plugin.description().name.clone();
        tracing::info!(plugin = %name, "unloaded");
        drop(old.plugin);
        self.hint_waiting(&[id]);
        Some(name)
    }

    /// The library files of every version served now.
    pub(super) fn served_libraries(&self) -> Vec<PathBuf> {
        let served = self.served.lock().expect("served lock");
        served.values().map(|s| s.plugin.binary_path().to_path_buf()).collect()
    }
}
