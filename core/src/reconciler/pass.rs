//! One pass over one plugin: re-read its row, then unload it, keep it, reconfigure it, or build,
//! load, publish and record its wanted version.

use super::publishing::{endpoints_of, loaded};
use super::{Inner, Outcome, ReconcileError};
use crate::compiler::{Artifact, BuildError};
use crate::error_code::ErrorCode;
use crate::events::Source;
use crate::host::HostCtx;
use crate::host::logs::Kind;
use crate::host::services::Services;
use crate::isolation::{Isolation, Spawn};
use crate::loader::{Configured, LoadError, LoadedPlugin};
use crate::manifest::{Manifest, ManifestError};
use crate::repo::PluginRow;
use crate::shared_builds::Finisher;
use std::sync::Arc;

impl Inner {
    /// One pass over plugin `id`, started over while the row changes under it.
    /// `read`: the row as read in a batch after the cause of this pass (see `Job::read`).
    /// `acted` becomes the stamp of the row the pass acted on.
    pub(super) async fn pass(
        &self,
        id: i64,
        force: bool,
        mut read: Option<super::Read>,
        acted: &mut u64,
    ) -> Result<Outcome, ReconcileError> {
        loop {
            let (stamp, row) = match read.take() {
                Some(read) => (read.0, Some(read.1)),
                None => (self.stamp(), None),
            };
            *acted = stamp;
            match self.pass_once(id, force, row).await {
                Err(ReconcileError::Superseded) => tracing::debug!(plugin_id = id, "the row changed; passing again"),
                other => return other,
            }
        }
    }

    async fn pass_once(
        &self,
        id: i64,
        force: bool,
        read: Option<Option<PluginRow>>,
    ) -> Result<Outcome, ReconcileError> {
        // A row read in a batch shows what the user wants as of the hint. What kiln observed
        // (state, error) may have been written since by an earlier pass: decisions to skip a
        // write of observed state read the row again, or are made by the statement itself.
        let batched = read.is_some();
        let row = match read {
            Some(row) => row,
            None => self.repo.get(id).await?,
        };
        let Some(row) = row else {
            // Deleted: its endpoint rows went with it (ON DELETE CASCADE); its libraries go too,
            // but for those a served version or a pass in progress uses.
            self.waiting.lock().expect("waiting lock").remove(&id);
            self.finishing.forget_other(id, None);
            self.builds.sources.forget(id).await;
            let markers = self.markers.clone();
            let _ = tokio::task::spawn_blocking(move || markers.forget(id)).await;
            if let Some(name) = self.retire(id).await {
                // A new row of the same name (deleted and inserted in one transaction) is about
                // to load these libraries, and collects them itself once it serves.
                if self.repo.get_by_name(&name).await?.is_none() {
                    self.compiler.collect_garbage(&name, &self.served_libraries());
                    self.logs.forget(&name);
                    self.metrics.forget(&name);
                    self.repo.storage_forget(&name).await?;
                    self.databases.forget(&name).await?;
                }
            }
            return Ok(Outcome::Gone);
        };
        if !row.wants_active() {
            self.waiting.lock().expect("waiting lock").remove(&id);
            self.finishing.forget_other(id, None);
            self.retire(id).await;
            if batched || row.state != "inactive" || row.binary_path.is_some() {
                self.repo.record_unloaded(id).await?;
            }
            return Ok(Outcome::Inactive);
        }
        let freed = self.freed.load(std::sync::atomic::Ordering::SeqCst);
        let mut serving = self.served.lock().expect("served lock").contains_key(&id);
        let mut swapping = None;
        let e = match self.load_wanted(&row, force, batched, &mut swapping).await {
            Ok(outcome) => {
                self.waiting.lock().expect("waiting lock").remove(&id);
                return Ok(outcome);
            }
            Err(e @ (ReconcileError::Superseded | ReconcileError::ShuttingDown)) => return Err(e),
            Err(e) => e,
        };
        // The optimized library of a draft that serves did not load: the draft serves on, and
        // the swap is not tried again for this version. (Other failures, a database that was
        // away say, leave it to be tried again.)
        if let Some(hash) = swapping
            && matches!(e, ReconcileError::Load(_))
        {
            self.finishing.mark_failed(id, &hash);
        }
        // An instance the pass retired (its process crashed too often) serves no more.
        serving = serving && self.served.lock().expect("served lock").contains_key(&id);
        // A reload asked of every replica (a raised generation) that failed here leaves the old
        // instance serving; it counts as taken, or every later pass would try it again.
        if let Some(s) = self.served.lock().expect("served lock").get_mut(&id) {
            s.generation = s.generation.max(row.generation);
        }
        if matches!(e, ReconcileError::Manifest(ManifestError::NotFound(_)))
            && crate::manifest::exists_off_worker(std::path::Path::new(&row.source_path)).await == Some(false)
        {
            // The crate was removed: that is a decision, not a failed build. Unload.
            self.retire(id).await;
            serving = false;
        }
        let waits = matches!(e.code(), ErrorCode::RouteConflict | ErrorCode::DependencyMissing) && !serving;
        {
            let mut waiting = self.waiting.lock().expect("waiting lock");
            if waits {
                waiting.insert(id)
            } else {
                waiting.remove(&id)
            };
        }
        // A path or dependency freed after this pass looked, and before it joined `waiting`,
        // hinted the others but not this one: it passes again.
        if waits && self.freed.load(std::sync::atomic::Ordering::SeqCst) != freed {
            self.hint(id);
        }
        let text = format!("{}: {e}", e.code());
        let state = if waits { "waiting" } else { "failed" };
        if let Err(db) = self.repo.record_failed(id, &text, serving, state).await {
            tracing::warn!(plugin = %row.name, "could not record the failure: {db}");
        }
        let data = serde_json::json!({
            "name": row.name, "version": row.version, "error": text, "state": state, "serving": serving
        });
        let _ = self.events.publish("kiln.plugin.failed", data, Source::Kiln);
        Err(e)
    }

    /// Makes the wanted version of an active plugin serve. `swapping` is set to the version
    /// when the pass replaces its served draft by its optimized library.
    async fn load_wanted(
        &self,
        row: &PluginRow,
        force: bool,
        batched: bool,
        swapping: &mut Option<String>,
    ) -> Result<Outcome, ReconcileError> {
        let manifest = Manifest::read_off_worker(&self.builds.sources.dir(row).await).await?;
        if manifest.name != row.name {
            return Err(ReconcileError::NameMismatch {
                dir: manifest.dir,
                package: manifest.name,
                row: row.name.clone(),
            });
        }
        self.check_dependencies(&manifest).await?;
        // An invalid config is not applied: the instance serving keeps its last good one.
        let config = match &manifest.config_schema {
            Some(schema) => {
                crate::plugin_config::validate(schema, &row.config).map_err(ReconcileError::InvalidConfig)?
            }
            None => row.config.clone(),
        };
        let hash = self.compiler.source_hash(&manifest).await?;
        // The optimized build of another version is of no use any more.
        self.finishing.forget_other(row.id, Some(&hash));
        // From here to the end of the pass no garbage collection removes this library.
        let _pin = self.compiler.pin(&self.compiler.artifact_path(&manifest.name, &hash));
        let (mut current, generation) = {
            let served = self.served.lock().expect("served lock");
            let s = served.get(&row.id);
            (s.map(|s| (s.hash.clone(), s.config.clone(), s.plugin.clone())), s.map(|s| s.generation))
        };
        // An isolated instance whose process crashed too often serves nothing but errors: it
        // goes (its version is quarantined by now, so it is not loaded again below).
        if current.as_ref().is_some_and(|(_, _, p)| p.crash_failed().is_some()) {
            self.retire(row.id).await;
            current = None;
        }
        // A raised generation is a reload asked of every replica (taken once: see pass_once).
        // Only a higher one: a row read a moment before another pass's can show a lower one.
        let force = force || generation.is_some_and(|g| row.generation > g);
        // A draft of the wanted version serves (a staged build): once its optimized library is
        // built, a fresh instance of that replaces it (unless that failed already). Its build
        // runs, or is started again (it was cancelled, and the version is wanted again).
        let draft = self.compiler.draft_path(&manifest.name, &hash);
        let draft_serves = current.as_ref().is_some_and(|(h, _, p)| *h == hash && p.binary_path() == draft.as_path());
        let optimized_exists = draft_serves && self.compiler.artifact_path(&manifest.name, &hash).exists();
        if draft_serves && !optimized_exists && !self.finishing.known(row.id, &hash) {
            self.finish_later(row.id, &row.name, self.builds.finisher(&manifest, &hash));
        }
        let swap = draft_serves && optimized_exists && !self.finishing.failed(row.id, &hash);
        let force = force || swap;
        // Another way of running it (in process, in a process of its own, other limits) is a
        // fresh instance.
        let isolation = wanted_isolation(row, &manifest);
        let force = force || current.as_ref().is_some_and(|(_, _, p)| p.isolation() != isolation.as_ref());
        // A version that took a replica down is not loaded again; one that already serves
        // here (it loaded fine on this replica) keeps serving.
        let serves_it = current.as_ref().is_some_and(|(h, _, _)| *h == hash);
        if row.quarantined_hash.as_deref() == Some(hash.as_str()) && (force || !serves_it) {
            let why = row.quarantine_reason.as_deref().unwrap_or_default();
            return Err(match why.strip_prefix("CrashLoop: ") {
                Some(why) => ReconcileError::CrashLoop(why.to_string()),
                None => ReconcileError::Quarantined(why.strip_prefix("CrashedDuringLoad: ").unwrap_or(why).to_string()),
            });
        }
        if let Some((current_hash, current_config, plugin)) = &current
            && !force
            && *current_hash == hash
            && *current_config == config
        {
            // Serving the wanted version; its grants and deadline may have changed in the row.
            self.apply_row_settings(row, &manifest, &hash, plugin).await?;
            // Make sure the row says it serves (it may show an old error).
            self.record_if_stale(row, batched, &manifest, &hash, plugin, draft_serves).await?;
            return Ok(Outcome::Unchanged);
        }
        // Same code, new config: the plugin's hook may apply it in place (no reload at all).
        if let Some((current_hash, current_config, plugin)) = &current
            && !force
            && *current_hash == hash
            && *current_config != config
            && !manifest.reload_on_config_change
        {
            self.apply_row_settings(row, &manifest, &hash, plugin).await?;
            let (hook_plugin, json) = (plugin.clone(), serde_json::to_vec(&config).expect("a Value always serializes"));
            let answer = tokio::task::spawn_blocking(move || hook_plugin.configure(&json))
                .await
                .map_err(|e| ReconcileError::ConfigRejected(format!("the configure task failed: {e}")))?;
            match answer.map_err(ReconcileError::ConfigRejected)? {
                Configured::Applied => {
                    if let Some(s) = self.served.lock().expect("served lock").get_mut(&row.id)
                        && Arc::ptr_eq(&s.plugin, plugin)
                    {
                        s.config = config;
                    }
                    // The row may show the error of a config refused before; the version and
                    // its endpoints are unchanged otherwise (a storm of config edits writes
                    // nothing here).
                    self.record_if_stale(row, batched, &manifest, &hash, plugin, draft_serves).await?;
                    let data = serde_json::json!({ "name": row.name, "version": manifest.version });
                    let _ = self.events.publish("kiln.plugin.configured", data, Source::Kiln);
                    tracing::info!(plugin = %row.name, "configuration applied in place");
                    return Ok(Outcome::Configured);
                }
                Configured::Reload => {} // a fresh instance below
            }
        }
        // The row says `building` while cargo runs for a plugin that serves nothing yet (a
        // library built before, as at a warm start, loads without that round trip).
        if current.is_none() && !self.compiler.artifact_path(&manifest.name, &hash).exists() {
            self.repo.record_building(row.id).await?;
        }
        // An edit of a plugin that serves, or a plugin added while the server runs, is served
        // from a draft first (a staged profile).
        let added = row.id > self.new_after.load(std::sync::atomic::Ordering::Relaxed);
        let staged = self.compiler.profile().drafts() && (current.is_some() || added);
        let _draft_pin = (staged && !draft_serves).then(|| self.compiler.pin(&draft));
        if swap {
            *swapping = Some(hash.clone());
        }
        let (artifact, finisher) = if self.finishing.running(row.id, &hash) && draft.exists() {
            // A fresh instance of the draft that serves, whose optimized build runs: not a
            // second build of the version (it would wait for the first one's build lock).
            (Artifact::existing(draft.clone(), &hash, true), None)
        } else {
            self.build(row.id, &manifest, &hash, staged).await?
        };
        // Its schema, grants and migrations are in place before its init runs.
        self.databases.ensure(row, &manifest, &hash).await?;
        let (path, retirements) = (artifact.path.clone(), self.retirements.clone());
        let config_json = serde_json::to_vec(&config).expect("a Value always serializes");
        let (markers, id, name, marked_hash) = (self.markers.clone(), row.id, row.name.clone(), hash.clone());
        let services = Services {
            repo: self.repo.clone(),
            databases: self.databases.clone(),
            events: self.events.clone(),
            dependencies: manifest.dependencies.iter().map(|d| d.name.clone()).collect(),
            runtime: tokio::runtime::Handle::current(),
        };
        let host = HostCtx::with_services(&row.name, &manifest.version, self.logs.clone(), Some(services));
        let spawn = isolation.map(|settings| Spawn {
            exe: self.host_exe.clone(),
            settings,
            plugin_id: row.id,
            hash: hash.clone(),
            logs: self.logs.clone(),
            reports: self.crashes.clone(),
        });
        let load_clock = std::time::Instant::now();
        let loaded = tokio::task::spawn_blocking(move || {
            // If this process dies inside the plugin's init, the next start knows who did it
            // (an isolated plugin's init runs in its own process: it cannot).
            let marker = spawn.is_none().then(|| markers.begin(id, &name, &marked_hash));
            if let Some(Err(e)) = &marker {
                tracing::warn!(plugin = %name, "could not record the load in progress: {e}");
            }
            LoadedPlugin::load_tracked(&path, &config_json, &host, &retirements, spawn)
        })
        .await
        .map_err(|e| LoadError::Init(format!("the load task failed: {e}")))?;
        self.metrics.loaded(current.is_some(), loaded.is_ok(), load_clock.elapsed());
        let plugin = match loaded {
            Ok(p) => p,
            Err(e) => {
                if let LoadError::Init(msg) = &e {
                    self.logs.record(&row.name, Kind::Init, format!("init failed: {msg}"), None);
                }
                return Err(e.into());
            }
        };
        plugin.set_deadline(row.deadline_ms);
        self.publish_and_record(row, &manifest, &hash, config, Arc::new(plugin)).await?;
        tracing::info!(plugin = %row.name, built = artifact.built, library = %artifact.path.display(), "serving");
        if let Some(finisher) = finisher {
            self.finish_later(row.id, &row.name, finisher);
        }
        // Another library of this plugin can have become unused only if one was built, another
        // library was replaced (a version, or a draft by its optimized build), or the row last
        // recorded another version. Not at a warm start or when turning plugins on (that would
        // read the library directory once per plugin). A fresh instance of the same library (a
        // config change) collects only what an earlier pass may have left (one that failed
        // after a build, a collection that met a pinned library, the first since start): every
        // time, it cost 2.6% of kiln's CPU when 100 plugins took a new config.
        let replaced = current.as_ref().is_some_and(|(_, _, p)| p.binary_path() != artifact.path.as_path());
        let leftovers = current.is_some() && !self.compiler.swept(&row.name);
        if artifact.built || replaced || leftovers || row.loaded_hash.as_deref().is_some_and(|h| h != hash) {
            self.compiler.collect_garbage(&row.name, &self.served_libraries());
        }
        Ok(Outcome::Loaded { built: artifact.built })
    }

    /// Refuses to load a plugin whose dependencies lead back to it (and has every plugin of the
    /// cycle look again, so that all of them fail with it named), or one of whose dependencies
    /// does not serve in a version that will do (it waits: every publish hints the waiting).
    async fn check_dependencies(&self, manifest: &Manifest) -> Result<(), ReconcileError> {
        let names: Vec<String> = manifest.dependencies.iter().map(|d| d.name.clone()).collect();
        let cycle = {
            let mut declared = self.declared.lock().expect("declared lock");
            declared.insert(manifest.name.clone(), names);
            find_cycle(&declared, &manifest.name)
        };
        if let Some(cycle) = cycle {
            for name in &cycle[1..cycle.len() - 1] {
                if let Some(row) = self.repo.get_by_name(name).await? {
                    self.hint(row.id);
                }
            }
            return Err(ReconcileError::DependencyCycle(cycle.join(" → ")));
        }
        if manifest.dependencies.is_empty() {
            return Ok(());
        }
        let served: Vec<(String, String)> = {
            let served = self.served.lock().expect("served lock");
            served
                .values()
                .map(|s| s.plugin.description())
                .filter(|d| manifest.dependencies.iter().any(|dep| dep.name == d.name))
                .map(|d| (d.name.clone(), d.version.clone()))
                .collect()
        };
        for dependency in &manifest.dependencies {
            let serving = served.iter().find(|(name, _)| *name == dependency.name).map(|(_, v)| v);
            let fits = |version: &String| match (&dependency.version, semver::Version::parse(version)) {
                (None, _) => true,
                (Some(req), Ok(v)) => req.matches(&v),
                (Some(_), Err(_)) => false,
            };
            match serving {
                Some(v) if fits(v) => {}
                Some(v) => {
                    return Err(ReconcileError::DependencyMissing(format!("{dependency} (version {v} serves)")));
                }
                None => return Err(ReconcileError::DependencyMissing(dependency.to_string())),
            }
        }
        Ok(())
    }

    /// Brings what the row sets beside code and config into effect for a version that serves
    /// already: its database scope (`resources`) and its deadline (`deadline_ms`).
    async fn apply_row_settings(
        &self,
        row: &PluginRow,
        manifest: &Manifest,
        hash: &str,
        plugin: &LoadedPlugin,
    ) -> Result<(), ReconcileError> {
        self.databases.ensure(row, manifest, hash).await?;
        plugin.set_deadline(row.deadline_ms);
        Ok(())
    }

    /// Builds through the compiler and records every build that ran in the history. `staged`:
    /// a draft where this replica would build (see [`crate::shared_builds::SharedBuilds::build_staged`]).
    async fn build(
        &self,
        id: i64,
        manifest: &Manifest,
        hash: &str,
        staged: bool,
    ) -> Result<(Artifact, Option<Finisher>), ReconcileError> {
        let started_at = chrono::Utc::now();
        let clock = std::time::Instant::now();
        let result = if staged {
            self.builds.build_staged(manifest, hash).await
        } else {
            self.builds.build(manifest, hash).await.map(|a| (a, None))
        };
        if result.is_err() && self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ReconcileError::ShuttingDown); // its cargo was stopped: not a failure
        }
        let draft = result.as_ref().is_ok_and(|(a, _)| a.draft) || (staged && result.is_err());
        self.record_build(id, &manifest.name, hash, started_at, clock, result.as_ref().map(|(a, _)| a), draft).await;
        Ok(result?)
    }

    /// Records a build in the history (nothing when none ran), and in the metrics.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn record_build(
        &self,
        id: i64,
        name: &str,
        hash: &str,
        started_at: chrono::DateTime<chrono::Utc>,
        clock: std::time::Instant,
        result: Result<&Artifact, &BuildError>,
        draft: bool,
    ) {
        let (diagnostics, messages) = match result {
            Ok(a) if !a.built => return,
            Ok(_) => (None, &[][..]),
            Err(e @ BuildError::Failed { messages, .. }) => (Some(e.to_string()), &messages[..]),
            Err(e) => (Some(e.to_string()), &[][..]),
        };
        self.metrics.built(result.is_ok(), clock.elapsed());
        let ms = clock.elapsed().as_millis() as i64;
        let build =
            crate::repo::NewBuild { started_at, duration_ms: ms, diagnostics: diagnostics.as_deref(), messages, draft };
        if let Err(e) = self.repo.record_build(id, hash, &build).await {
            tracing::warn!(plugin = %name, "could not record the build: {e}");
        }
    }

    /// Records a version that serves already unless the row shows it serving, with no error
    /// (but the kept one of a draft whose optimized build failed). A row read in a batch
    /// (`batched`) is read again: what kiln observed may have been written since.
    async fn record_if_stale(
        &self,
        row: &PluginRow,
        batched: bool,
        manifest: &Manifest,
        hash: &str,
        plugin: &Arc<LoadedPlugin>,
        draft_serves: bool,
    ) -> Result<(), ReconcileError> {
        let reread;
        let observed = if batched {
            reread = self.repo.get(row.id).await?.ok_or(ReconcileError::Superseded)?;
            &reread
        } else {
            row
        };
        // Evicted meanwhile (an older plugin took a path and wrote `waiting`): pass again.
        let still =
            self.served.lock().expect("served lock").get(&row.id).is_some_and(|s| Arc::ptr_eq(&s.plugin, plugin));
        if !still {
            return Err(ReconcileError::Superseded);
        }
        // A draft whose optimized build failed shows that error while it serves.
        let kept_error = draft_serves && self.finishing.failed(row.id, hash);
        if observed.state != "loaded"
            || (observed.error.is_some() && !kept_error)
            || observed.loaded_hash.as_deref() != Some(hash)
        {
            self.record_loaded(row.id, manifest, hash, plugin).await?;
        }
        Ok(())
    }

    /// Refreshes the row of a version that serves already (its endpoints included).
    async fn record_loaded(
        &self,
        id: i64,
        manifest: &Manifest,
        hash: &str,
        plugin: &LoadedPlugin,
    ) -> Result<(), ReconcileError> {
        let endpoints = endpoints_of(plugin);
        if self.repo.record_loaded(id, &loaded(manifest, hash, plugin, &endpoints)).await? {
            Ok(())
        } else {
            Err(ReconcileError::Superseded)
        }
    }
}

/// How the row and the manifest want the plugin run: `Some` in a process of its own (the row's
/// `isolation` and limits over the manifest's).
fn wanted_isolation(row: &PluginRow, manifest: &Manifest) -> Option<Isolation> {
    let process = match row.isolation.as_deref().and_then(Isolation::mode) {
        Some(process) => process,
        None => manifest.isolation.process,
    };
    let limit = |row: Option<i32>, manifest: Option<u32>| row.and_then(|v| u32::try_from(v).ok()).or(manifest);
    process.then(|| Isolation {
        process,
        memory_limit_mb: limit(row.memory_limit_mb, manifest.isolation.memory_limit_mb),
        cpu_limit_s: limit(row.cpu_limit_s, manifest.isolation.cpu_limit_s),
    })
}

/// The cycle through `start` in the dependency graph, as names from `start` back to it.
fn find_cycle(declared: &std::collections::HashMap<String, Vec<String>>, start: &str) -> Option<Vec<String>> {
    fn walk(declared: &std::collections::HashMap<String, Vec<String>>, start: &str, path: &mut Vec<String>) -> bool {
        let last = path.last().expect("a path starts with one name").clone();
        for next in declared.get(&last).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if path.contains(next) {
                continue; // a cycle that does not pass through `start`
            }
            path.push(next.clone());
            if walk(declared, start, path) {
                return true;
            }
            path.pop();
        }
        false
    }
    let mut path = vec![start.to_string()];
    walk(declared, start, &mut path).then_some(path)
}

#[cfg(test)]
mod tests {
    use super::find_cycle;
    use std::collections::HashMap;

    #[test]
    fn a_cycle_is_found_from_any_of_its_plugins_and_named() {
        let declared: HashMap<String, Vec<String>> =
            [("a", vec!["b"]), ("b", vec!["c"]), ("c", vec!["a"]), ("d", vec!["a"])]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
                .collect();
        assert_eq!(find_cycle(&declared, "a").unwrap().join(" → "), "a → b → c → a");
        assert_eq!(find_cycle(&declared, "b").unwrap().join(" → "), "b → c → a → b");
        assert_eq!(find_cycle(&declared, "d"), None, "d depends on a cycle but is not in it");
        assert_eq!(find_cycle(&declared, "x"), None);
    }
}
