//! The served set and who owns which path.
//!
//! The rule: patterns overlap when some request path matches both. Of plugins whose routes
//! overlap, the one whose row is older (smaller id) serves, whichever loaded first, so the
//! outcome is the same after every restart. A younger claimant is refused (`RouteConflict`,
//! state `waiting`); a younger owner gives way when an older claimant publishes. Waiting plugins
//! are retried whenever a version stops serving or is replaced, so a freed path is taken at once.
//! Paths under the admin API's roots belong to kiln.

use super::{Inner, ReconcileError};
use crate::loader::LoadedPlugin;
use crate::repo::PluginRow;
use crate::routes::{Pattern, RouteProblem};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// A plugin version being served.
pub(super) struct Served {
    pub hash: String,
    /// The configuration the instance was created with (defaults applied).
    pub config: serde_json::Value,
    pub plugin: Arc<LoadedPlugin>,
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
    /// one; younger plugins on its paths give way (see the module docs). One atomic swap.
    pub(super) fn publish(
        &self,
        row: &PluginRow,
        hash: &str,
        config: serde_json::Value,
        plugin: Arc<LoadedPlugin>,
    ) -> Result<Displaced, ReconcileError> {
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
        let mut served = self.served.lock().expect("served lock");
        if self.closed.load(Ordering::SeqCst) {
            return Err(ReconcileError::ShuttingDown);
        }
        let mut evict = Vec::new();
        for (other_id, other) in served.iter() {
            if *other_id == row.id {
                continue;
            }
            let theirs_name = &other.plugin.description().name;
            for r in &other.plugin.description().routes {
                let theirs = Pattern::parse(&r.path).map_err(ReconcileError::InvalidRoute)?;
                let Some((_, p)) = mine.iter().find(|(_, p)| p.overlaps(&theirs)) else { continue };
                if *other_id < row.id {
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
                evict.push((*other_id, why));
                break;
            }
        }
        let evicted: Vec<(i64, Served, String)> = evict
            .into_iter()
            .map(|(id, why)| (id, served.remove(&id).expect("listed from the served set"), why))
            .collect();
        let previous = served.insert(row.id, Served { hash: hash.to_string(), config, plugin: plugin.clone() });
        let all: Vec<Arc<LoadedPlugin>> = served.values().map(|s| s.plugin.clone()).collect();
        let displaced = Displaced { previous, evicted };
        if let Err(e) = self.sink.publish(&all) {
            // The route table did not change: put back what served before.
            drop(served);
            self.unpublish(row.id, &plugin, displaced);
            return Err(ReconcileError::InvalidRoute(e));
        }
        Ok(displaced)
    }

    /// Undoes a publish of `published` (its recording failed): the displaced versions serve
    /// again, and the new one is dropped. What changed meanwhile stays: if an older plugin has
    /// evicted `published` already, or a displaced plugin serves again, nothing is put back there.
    pub(super) fn unpublish(&self, id: i64, published: &Arc<LoadedPlugin>, displaced: Displaced) {
        let mut served = self.served.lock().expect("served lock");
        let ours = served.get(&id).is_some_and(|s| Arc::ptr_eq(&s.plugin, published));
        let new = match (ours, displaced.previous) {
            (true, Some(p)) => served.insert(id, p),
            (true, None) => served.remove(&id),
            (false, _) => None,
        };
        for (other, s, _) in displaced.evicted {
            served.entry(other).or_insert(s);
        }
        let all: Vec<Arc<LoadedPlugin>> = served.values().map(|s| s.plugin.clone()).collect();
        if let Err(e) = self.sink.publish(&all) {
            // The table that served before this publish was valid; this cannot happen.
            tracing::error!("could not restore the route table: {e}");
        }
        drop(served);
        drop(new);
    }

    /// A recorded publish: the displaced versions retire (after their last requests), evicted
    /// plugins wait, and waiting plugins are retried (a path may be free, a dependency serves).
    pub(super) fn published(&self, id: i64, displaced: Displaced) {
        // The displaced version retires when `_previous` drops, at the end.
        let Displaced { previous: _previous, evicted } = displaced;
        let mut skip = vec![id];
        {
            let mut waiting = self.waiting.lock().expect("waiting lock");
            waiting.remove(&id);
            for (other, _, _) in &evicted {
                waiting.insert(*other);
                skip.push(*other);
            }
        }
        for (other, s, _) in evicted {
            tracing::warn!(plugin = %s.plugin.description().name, plugin_id = other, "gave way to an older plugin's path");
        }
        // A path may have been freed (a version was replaced), or a plugin waiting for this one
        // as a dependency may load now.
        self.hint_waiting(&skip);
    }

    /// Stops serving plugin `id`, if it serves, and retries plugins waiting for a path. Returns
    /// the name of what it served.
    pub(super) fn retire(&self, id: i64) -> Option<String> {
        let mut served = self.served.lock().expect("served lock");
        let old = served.remove(&id)?;
        let all: Vec<Arc<LoadedPlugin>> = served.values().map(|s| s.plugin.clone()).collect();
        if let Err(e) = self.sink.publish(&all) {
            // Removing routes from a valid table cannot create a conflict.
            tracing::error!("could not publish the route table without plugin {id}: {e}");
        }
        drop(served);
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
