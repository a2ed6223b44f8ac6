//! The optimized builds of drafts that serve (the `staged` build profile): one task per plugin at
//! most, which builds the version's library and then has a pass swap it in.
//!
//! Per plugin, what is known of the version its draft serves: its optimized build runs, or it
//! (or the swap to it) failed, which is not tried again for that version: the draft keeps
//! serving, the row shows the error, and the next version starts over. A pass for another
//! version (or for none: the plugin went or was turned off) cancels a running build.

use super::Inner;
use crate::shared_builds::Finisher;
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::task::{AbortHandle, Id};

/// What became of a version's optimized build.
enum State {
    Running(AbortHandle),
    Failed,
}

/// The optimized build of each plugin whose draft serves, by plugin id, with its version.
#[derive(Default)]
pub(super) struct Finishing {
    builds: Mutex<HashMap<i64, (String, State)>>,
}

impl Finishing {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, (String, State)>> {
        self.builds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets plugin `id`'s version unless it is `keep`, cancelling its build if it runs.
    pub(super) fn forget_other(&self, id: i64, keep: Option<&str>) {
        let mut builds = self.lock();
        if builds.get(&id).is_some_and(|(hash, _)| Some(hash.as_str()) != keep)
            && let Some((hash, State::Running(task))) = builds.remove(&id)
        {
            tracing::debug!(plugin_id = id, hash = %hash, "optimized build cancelled: another version is wanted");
            task.abort();
        }
    }

    /// Whether version `hash` of plugin `id` has an optimized build running, or had one fail.
    pub(super) fn known(&self, id: i64, hash: &str) -> bool {
        self.lock().get(&id).is_some_and(|(h, _)| h == hash)
    }

    /// Whether version `hash` of plugin `id` has its optimized build running.
    pub(super) fn running(&self, id: i64, hash: &str) -> bool {
        self.lock().get(&id).is_some_and(|(h, s)| h == hash && matches!(s, State::Running(_)))
    }

    /// Whether the optimized build of version `hash` of plugin `id`, or the swap to it, failed.
    pub(super) fn failed(&self, id: i64, hash: &str) -> bool {
        self.lock().get(&id).is_some_and(|(h, s)| h == hash && matches!(s, State::Failed))
    }

    /// Marks version `hash` of plugin `id` failed: its draft keeps serving.
    pub(super) fn mark_failed(&self, id: i64, hash: &str) {
        if let Some((_, State::Running(task))) = self.lock().insert(id, (hash.to_string(), State::Failed)) {
            task.abort();
        }
    }

    /// The build task `task` of plugin `id` ended: forgotten if it was the plugin's current one
    /// and `done` (it succeeded, and the swap pass follows; or its version is no longer the
    /// sources'), marked failed otherwise.
    fn ended(&self, id: i64, task: Id, done: bool) {
        let mut builds = self.lock();
        if builds.get(&id).is_some_and(|(_, s)| matches!(s, State::Running(t) if t.id() == task)) {
            if done {
                builds.remove(&id);
            } else if let Some(entry) = builds.get_mut(&id) {
                entry.1 = State::Failed;
            }
        }
    }

    /// Cancels every build (at shutdown).
    pub(super) fn cancel_all(&self) {
        for (_, (_, state)) in self.lock().drain() {
            if let State::Running(task) = state {
                task.abort();
            }
        }
    }
}

impl Inner {
    /// Builds the optimized library of a draft that serves, in a task of its own, then has a
    /// pass swap it in. A failure is recorded on the row (the draft serves on) and in the
    /// build history, and not tried again for this version.
    pub(super) fn finish_later(&self, id: i64, name: &str, finisher: Finisher) {
        let (me, builds, name, hash) =
            (self.me.clone(), self.builds.clone(), name.to_string(), finisher.hash().to_string());
        let mut finishing = self.finishing.lock();
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return; // shutting down: the draft serves until the end
        }
        let task_hash = hash.clone();
        let task = tokio::spawn(async move {
            let (started_at, clock) = (chrono::Utc::now(), std::time::Instant::now());
            let result = finisher.finish(&builds).await;
            let Some(inner) = me.upgrade() else { return };
            let task = tokio::task::id();
            // Sources edited meanwhile (a pass for what they are now comes with the edit), or
            // the server stopping: nothing to record.
            if matches!(result, Err(crate::compiler::BuildError::SourcesChanged))
                || (result.is_err() && inner.closed.load(std::sync::atomic::Ordering::SeqCst))
            {
                inner.finishing.ended(id, task, true);
                return;
            }
            inner.record_build(id, &name, &task_hash, started_at, clock, result.as_ref(), false).await;
            match result {
                Ok(_) => {
                    inner.finishing.ended(id, task, true);
                    inner.hint(id);
                }
                Err(e) => {
                    // Recorded while the task can still be cancelled (a pass for another
                    // version, or none, aborts it), then marked failed.
                    let code = crate::error_code::ErrorCode::BuildFailed;
                    let text = format!("{code}: the optimized build failed; the draft serves on: {e}");
                    tracing::warn!(plugin = %name, "{text}");
                    if let Err(db) = inner.repo.record_failed(id, &text, true, "loaded").await {
                        tracing::warn!(plugin = %name, "could not record the failure: {db}");
                    }
                    inner.finishing.ended(id, task, false);
                }
            }
        });
        if let Some((_, State::Running(stale))) = finishing.insert(id, (hash, State::Running(task.abort_handle()))) {
            stale.abort();
        }
    }
}
