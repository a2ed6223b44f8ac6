//! The compiler: turns a plugin crate into a library file under the bin directory.
//!
//! - One shared cargo target directory for every plugin, so dependencies compile once.
//! - Builds run one at a time: cargo locks the target directory anyway, and a plugin's library
//!   file name carries no hash, so the artifact must be copied out before the next build starts.
//!   An in-process queue orders builds; a file lock extends that to other kiln processes
//!   sharing the target directory.
//! - Every build is copied to a content-addressed `<name>-<hash>.so` (dlopen caches by path, so a
//!   loaded file must never be overwritten) and a build whose hash already has a library is skipped.
//! - The plugin's `kiln-types` dependency is patched to this server's own copy, panics are
//!   forced to unwind, and the plugin crate compiles incrementally (see [`BuildProfile`]).

use crate::diagnostics::Diagnostic;
use crate::manifest::Manifest;
use crate::staging;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;
use walkdir::WalkDir;

/// Longest build before it is killed.
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);
/// Most bytes of diagnostics kept for a failed build.
const MAX_DIAGNOSTICS: usize = 16 * 1024;

/// How plugins are built, on top of their own release profile. All compile the plugin crate
/// incrementally (dependencies are built once, optimized as usual) and force panics to unwind
/// (the plugin's exports must catch them; `panic = "abort"` would kill the host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BuildProfile {
    /// An edit of a plugin that serves is first built as a draft (the plugin crate alone
    /// unoptimized: a one-line change of powertable in about 0.2 s on 2 cores), served, and then
    /// built `optimized` and swapped in with a zero-drop reload. The libraries kept, their hashes
    /// and the builds replicas share are those of `optimized`; a start builds no drafts.
    #[default]
    Staged,
    /// Optimized as a release build is (crate-local ThinLTO included): a one-line change of
    /// powertable rebuilds in about 0.35 s on 2 cores, and its handlers run as fast as those of
    /// a clean release build.
    Optimized,
    /// Without the crate-local ThinLTO pass: a one-line change rebuilds in about 0.23 s, and a
    /// handler call costs about 0.4 µs more (less inlining).
    Fast,
}

impl BuildProfile {
    /// cargo `--config` settings.
    fn settings(self) -> &'static [&'static str] {
        const BASE: [&str; 2] = ["profile.release.panic=\"unwind\"", "profile.release.incremental=true"];
        match self {
            // A staged version ends as the optimized one: the same library, hash and name.
            Self::Optimized | Self::Staged => &BASE,
            Self::Fast => &[BASE[0], BASE[1], "profile.release.lto=\"off\""],
        }
    }

    /// Whether an edit is served from a draft first (see [`Compiler::build_draft`]).
    pub fn drafts(self) -> bool {
        self == Self::Staged
    }
}

/// What a draft is compiled with beyond the profile, for the plugin crate alone (its
/// dependencies are the optimized build's, shared): no optimization and no crate-local LTO, and
/// the `debug_assertions` and overflow checks of the crate's release profile (rustc would turn
/// both on at opt-level 0), so that a draft behaves as its optimized build will. Its incremental
/// state is kept apart from the optimized build's, so that each stays warm as they alternate.
/// `None` for a crate whose release profile asks for LTO: its dependencies are then built as
/// bitcode for the LTO step, which a draft does not run. (A profile set elsewhere, in a
/// workspace root or a cargo config, is not read: a draft that fails for it without an error in
/// the plugin's code is replaced by the optimized build, see `SharedBuilds`.)
fn draft_rustc_args(manifest: &str) -> Option<Vec<String>> {
    let doc: toml::Table = manifest.parse().ok()?;
    let release = doc.get("profile").and_then(|p| p.get("release"));
    let setting = |key: &str| release.and_then(|r| r.get(key));
    if setting("lto").is_some_and(|lto| !matches!(lto, toml::Value::Boolean(false)) && lto.as_str() != Some("off")) {
        return None;
    }
    let debug_assertions = setting("debug-assertions").and_then(toml::Value::as_bool).unwrap_or(false);
    let overflow_checks = setting("overflow-checks").and_then(toml::Value::as_bool).unwrap_or(debug_assertions);
    let on = |b: bool| if b { "on" } else { "off" };
    let args = [
        "opt-level=0".to_string(),
        "lto=off".to_string(),
        format!("debug-assertions={}", on(debug_assertions)),
        format!("overflow-checks={}", on(overflow_checks)),
    ];
    Some(args.into_iter().flat_map(|arg| ["-C".to_string(), arg]).collect())
}

/// A plugin library ready to load.
#[derive(Debug, Clone)]
pub struct Artifact {
    /// `bin/plugins/<name>-<hash>.so`
    pub path: PathBuf,
    /// Content hash of the sources it was built from.
    pub hash: String,
    /// Whether cargo ran (false: the library for this hash already existed).
    pub built: bool,
    /// How long the build took (zero when skipped).
    pub duration: Duration,
    /// A draft: the plugin crate unoptimized, served until its optimized build replaces it.
    pub draft: bool,
}

impl Artifact {
    /// A library that exists already (nothing built).
    pub fn existing(path: PathBuf, hash: &str, draft: bool) -> Self {
        Self { path, hash: hash.to_string(), built: false, duration: Duration::ZERO, draft }
    }
}

/// Why a build produced no library.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// cargo reported errors: the diagnostics are what the user needs to see (one line per
    /// compiler message with its place, then the rendered text and cargo's own errors).
    #[error("build failed:\n{}{diagnostics}", summary(messages))]
    Failed { diagnostics: String, messages: Vec<Diagnostic> },
    /// cargo could not be run, or the files could not be read or written.
    #[error("build could not run: {0}")]
    Io(#[from] std::io::Error),
    /// cargo succeeded but named no cdylib for the plugin.
    #[error("the build produced no library: cargo reported no cdylib for the plugin crate")]
    NoLibrary,
    /// The build ran past its deadline and was killed.
    #[error("build timed out after {0:?} and was stopped")]
    TimedOut(Duration),
    /// The plugin's files changed while cargo built them: the library was not kept. What changed
    /// them (a save the watcher sees, a reload) brings the next pass.
    #[error("the plugin's sources changed during the build: the library was not kept")]
    SourcesChanged,
}

impl BuildError {
    /// Whether the compiler found an error in the plugin's code (one with a place in a file).
    pub fn in_code(&self) -> bool {
        matches!(self, Self::Failed { messages, .. } if messages.iter().any(|m| m.level == "error" && m.file.is_some()))
    }
}

/// Builds plugins. One per server; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Compiler {
    target_dir: PathBuf,
    bin_dir: PathBuf,
    types_dir: PathBuf,
    /// Hash of the kiln-types sources and ABI version: a plugin is rebuilt when they change.
    types_hash: String,
    /// The in-process build queue (FIFO); see the module docs.
    queue: tokio::sync::Mutex<()>,
    /// How many times cargo built a plugin since start (reported by /health).
    builds: std::sync::atomic::AtomicU64,
    /// Libraries a pass in progress is about to build or open: garbage collection keeps them.
    pinned: Arc<Mutex<HashMap<PathBuf, usize>>>,
    /// Plugins whose unused libraries were all removed by a collection (none was pinned then),
    /// and none of whose libraries was written since: see [`Compiler::swept`].
    swept: Mutex<std::collections::HashSet<String>>,
    /// Manifests known to be workspaces of their own (built in place, not staged).
    own_workspace: Mutex<std::collections::HashSet<PathBuf>>,
    profile: BuildProfile,
    /// Of each content hash taken lately, the hash of the same files but `Cargo.lock`: what a
    /// build checks that it built (see [`Compiler::source_hash`]).
    code_of: Mutex<HashMap<String, String>>,
    /// The content hashes of plugin trees whose files have not changed since (by metadata).
    stamps: Arc<crate::tree_stamps::TreeStamps>,
    /// The process groups of the cargo runs in progress, and whether the server stops (see
    /// [`Compiler::stop`]).
    running: Mutex<(std::collections::HashSet<u32>, bool)>,
}

/// Keeps a library out of garbage collection while it lives (see [`Compiler::pin`]).
#[derive(Debug)]
pub struct Pin {
    path: PathBuf,
    pinned: Arc<Mutex<HashMap<PathBuf, usize>>>,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut pinned = self.pinned.lock().expect("pinned lock");
        if let Some(n) = pinned.get_mut(&self.path) {
            *n -= 1;
            if *n == 0 {
                pinned.remove(&self.path);
            }
        }
    }
}

impl Compiler {
    /// A compiler writing libraries to `bin_dir` and building in `target_dir` with `profile`.
    pub fn new(
        target_dir: PathBuf,
        bin_dir: PathBuf,
        types_dir: PathBuf,
        profile: BuildProfile,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(&target_dir)?;
        std::fs::create_dir_all(&bin_dir)?;
        let mut h = Sha256::new();
        h.update(kiln_types::abi::ABI_VERSION.to_le_bytes());
        // The profile is part of what decides the library (and of its file name).
        h.update(profile.settings().join("\n").as_bytes());
        h.update(hash_tree(&types_dir)?.as_bytes());
        Ok(Self {
            target_dir,
            bin_dir,
            types_dir,
            types_hash: hex::encode(h.finalize()),
            queue: Default::default(),
            builds: Default::default(),
            pinned: Default::default(),
            swept: Default::default(),
            own_workspace: Default::default(),
            profile,
            running: Default::default(),
            code_of: Default::default(),
            stamps: Default::default(),
        })
    }

    /// The content hash of a plugin crate: every file except build output, plus the kiln-types
    /// sources. Equal hashes mean the same library.
    pub async fn source_hash(&self, manifest: &Manifest) -> Result<String, BuildError> {
        if !manifest.dir.join("Cargo.lock").exists() {
            // Without a lock file the first build would create one and change the hash.
            let _queued = self.queue.lock().await;
            let (buildable, out) = self.cargo_on(manifest, &["generate-lockfile"]).await?;
            if !out.success {
                return Err(failed(&out));
            }
            if buildable != manifest.manifest_path {
                let lock = buildable.with_file_name("Cargo.lock");
                tokio::fs::copy(&lock, manifest.dir.join("Cargo.lock")).await?;
            }
        }
        let (hash, code) = self.tree_hash(manifest).await?;
        let mut code_of = self.code_of.lock().expect("code_of lock");
        if code_of.len() >= 4096 {
            code_of.clear(); // a bound; a hash not found skips the check after its build
        }
        code_of.insert(hash.clone(), code);
        Ok(hash)
    }

    /// The content hash of the plugin's files as they are (see [`Compiler::source_hash`]), and
    /// the hash of those files but `Cargo.lock` (which cargo may rewrite while it builds).
    async fn tree_hash(&self, manifest: &Manifest) -> Result<(String, String), BuildError> {
        let (dir, stamps) = (manifest.dir.clone(), self.stamps.clone());
        let (tree, code) = tokio::task::spawn_blocking(move || hash_tree_and_code(&dir, Some(&stamps)))
            .await
            .map_err(std::io::Error::other)??;
        let mut h = Sha256::new();
        h.update(tree.as_bytes());
        h.update(self.types_hash.as_bytes());
        Ok((hex::encode(h.finalize()), code))
    }

    /// How many builds ran since start.
    pub fn builds_run(&self) -> u64 {
        self.builds.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Where the library for `hash` lives.
    pub fn artifact_path(&self, name: &str, hash: &str) -> PathBuf {
        self.bin_dir.join(format!("{name}-{}.{}", &hash[..16], std::env::consts::DLL_EXTENSION))
    }

    /// Where the draft of `hash` lives (see [`Compiler::build_draft`]).
    pub fn draft_path(&self, name: &str, hash: &str) -> PathBuf {
        self.bin_dir.join(format!("{name}-{}-draft.{}", &hash[..16], std::env::consts::DLL_EXTENSION))
    }

    /// How this compiler builds.
    pub fn profile(&self) -> BuildProfile {
        self.profile
    }

    /// The server stops: every cargo run in progress is killed (its build fails), and none
    /// starts any more.
    pub fn stop(&self) {
        let mut running = self.running.lock().expect("running lock");
        running.1 = true;
        for pgid in running.0.drain() {
            kill_group(pgid);
        }
    }

    /// Builds the plugin whose sources hash to `hash`, unless its library already exists.
    pub async fn build(&self, manifest: &Manifest, hash: &str) -> Result<Artifact, BuildError> {
        self.build_as(manifest, hash, None).await
    }

    /// Builds a draft of the version `hash`: the plugin crate without optimization (see
    /// [`draft_rustc_args`]), to serve until [`Compiler::build`] has made its library. When that
    /// library exists already, it is the answer (`draft` false) and nothing is built; for a
    /// crate that cannot have a draft, the library is built.
    pub async fn build_draft(&self, manifest: &Manifest, hash: &str) -> Result<Artifact, BuildError> {
        let library = self.artifact_path(&manifest.name, hash);
        if library.exists() {
            return Ok(Artifact::existing(library, hash, false));
        }
        let text = tokio::fs::read_to_string(&manifest.manifest_path).await?;
        match draft_rustc_args(&text) {
            Some(args) => self.build_as(manifest, hash, Some(args)).await,
            None => self.build_as(manifest, hash, None).await,
        }
    }

    /// Builds the library of `hash`, or with `draft_args` its draft.
    async fn build_as(
        &self,
        manifest: &Manifest,
        hash: &str,
        draft_args: Option<Vec<String>>,
    ) -> Result<Artifact, BuildError> {
        let draft = draft_args.is_some();
        let path = if draft { self.draft_path(&manifest.name, hash) } else { self.artifact_path(&manifest.name, hash) };
        let skipped = Artifact::existing(path.clone(), hash, draft);
        if path.exists() {
            return Ok(skipped);
        }
        let _queued = self.queue.lock().await;
        let _file_lock = self.lock_target_dir().await?;
        if path.exists() {
            return Ok(skipped); // built while we waited
        }
        let started = Instant::now();
        self.builds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(plugin = %manifest.name, draft, "compiling");
        let target_dir = self.target_dir.to_string_lossy();
        // Only the cdylib kiln loads: a plugin's manifest often asks for an rlib too (for its
        // tests), and writing its metadata costs a tenth of a one-line rebuild.
        let mut build = vec![
            "rustc",
            "--release",
            "--lib",
            "--crate-type",
            "cdylib",
            "--message-format=json",
            "--target-dir",
            &target_dir,
        ];
        let draft_incremental = format!("incremental={}", self.target_dir.join("kiln-draft-incremental").display());
        if let Some(args) = &draft_args {
            build.push("--");
            build.extend(args.iter().map(String::as_str));
            build.extend(["-C", &draft_incremental]);
        }
        let (buildable, mut output) = self.cargo_on(manifest, &build).await?;
        // Our content hash decides that a build is needed, and cargo's freshness check decides
        // what to recompile (incrementally: see `BuildProfile`). When cargo finds the crate fresh
        // although its content hash is new, its judgement rests on mtimes (sources with old
        // mtimes from an archive or a checkout look fresh) or on fingerprints that two copies of
        // one package share (cargo hashes a standalone crate relative to its own root): then
        // the crate's packages that cargo found fresh are cleaned (the plugin, and path
        // dependencies inside its directory), keeping the shared dependencies, and built again.
        // The same holds for kiln-types when its sources changed since the last build in this
        // target directory (an upgrade whose files kept old mtimes).
        // cargo names manifests with `.` and `..` resolved lexically (a plugin directory given
        // as `../plugins` is reported as `/…/plugins`): compare with the path as cargo says it.
        let buildable = lexically_normal(&buildable);
        let crate_dir = buildable.parent().unwrap_or(Path::new("/"));
        let mut stale = fresh_packages_under(&output.stdout, crate_dir);
        let marker = self.target_dir.join(".kiln-types-hash");
        let types_changed = tokio::fs::read_to_string(&marker).await.ok().as_deref() != Some(self.types_hash.as_str());
        let types_dir = tokio::fs::canonicalize(&self.types_dir).await.unwrap_or_else(|_| self.types_dir.clone());
        if types_changed {
            stale.extend(fresh_packages_under(&output.stdout, &types_dir));
        }
        if output.success && !stale.is_empty() {
            let mut clean = vec!["clean", "--release", "--target-dir", &target_dir];
            clean.extend(stale.iter().flat_map(|id| ["-p", id.as_str()]));
            let cleaned = self.cargo(&buildable, &clean).await?;
            if !cleaned.success {
                return Err(failed(&cleaned));
            }
            output = self.cargo(&buildable, &build).await?;
        }
        if types_changed && built_under(&output.stdout, &types_dir) {
            // This kiln-types is built here now (even when the plugin itself failed).
            tokio::fs::write(&marker, &self.types_hash).await?;
        }
        let library = find_library(&output.stdout, &buildable);
        if !output.success {
            return Err(failed(&output));
        }
        let library = library.ok_or(BuildError::NoLibrary)?;
        // cargo builds what is on disk when it runs: sources edited since they were hashed made
        // a library of other code than `hash` names, which must not be kept under that name.
        // (`Cargo.lock` aside: cargo itself rewrites it after an edit of the manifest.)
        let code_then = self.code_of.lock().expect("code_of lock").get(hash).cloned();
        if let Some(code_then) = code_then
            && self.tree_hash(manifest).await?.1 != code_then
        {
            return Err(BuildError::SourcesChanged);
        }
        let tmp = path.with_extension("tmp");
        tokio::fs::copy(&library, &tmp).await?;
        tokio::fs::rename(&tmp, &path).await?;
        self.library_written(&manifest.name);
        let duration = started.elapsed();
        tracing::info!(plugin = %manifest.name, ?duration, library = %path.display(), "compiled");
        Ok(Artifact { path, hash: hash.to_string(), built: true, duration, draft })
    }

    /// Keeps the library at `path` from garbage collection until the pin drops: a pass holds
    /// one from the moment it knows which library it wants until it serves it (or gives up).
    pub fn pin(&self, path: &Path) -> Pin {
        *self.pinned.lock().expect("pinned lock").entry(path.to_path_buf()).or_default() += 1;
        Pin { path: path.to_path_buf(), pinned: self.pinned.clone() }
    }

    /// Removes plugin `name`'s libraries that nothing uses: not in `keep` (the libraries served
    /// now) and not pinned by a pass in progress. A library still mapped by in-flight requests
    /// stays mapped after its file is removed. Returns how many were removed.
    pub fn collect_garbage(&self, name: &str, keep: &[PathBuf]) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.bin_dir) else { return 0 };
        let pinned = self.pinned.lock().expect("pinned lock");
        let (mut removed, mut all) = (0, true);
        for entry in entries.flatten() {
            let path = entry.path();
            if !is_artifact_of(&path, name) || keep.contains(&path) {
                continue;
            }
            if pinned.contains_key(&path) {
                all = false;
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) => {
                    all = false;
                    tracing::warn!(library = %path.display(), "could not remove: {e}");
                }
            }
        }
        drop(pinned);
        let mut swept = self.swept.lock().expect("swept lock");
        if all {
            swept.insert(name.to_string());
        } else {
            swept.remove(name);
        }
        removed
    }

    /// Whether plugin `name` has no unused library left by this process: a collection removed
    /// every one it found (none was pinned) and no library of it was written since. A pass
    /// that loads a fresh instance of the library that served (a config change) collects
    /// only when this is false, so that it does not read the library directory every time.
    pub fn swept(&self, name: &str) -> bool {
        self.swept.lock().expect("swept lock").contains(name)
    }

    /// A library of plugin `name` is being written (built or fetched): the next pass of it
    /// collects (a pass that fails after a build leaves the library unused).
    pub fn library_written(&self, name: &str) {
        self.swept.lock().expect("swept lock").remove(name);
    }

    /// Runs cargo with `args` on what builds this plugin (see [`Compiler::buildable`]); when
    /// the crate was moved into someone else's workspace since it was last probed, probes again
    /// and runs on the staged copy. Returns the manifest it ran on, and cargo's output.
    async fn cargo_on(&self, manifest: &Manifest, args: &[&str]) -> Result<(PathBuf, CargoOutput), BuildError> {
        let buildable = self.buildable(manifest).await?;
        let output = self.cargo(&buildable, args).await?;
        if output.success || !staging::is_foreign_workspace_error(&output.stderr) || buildable != manifest.manifest_path
        {
            return Ok((buildable, output));
        }
        self.own_workspace.lock().expect("workspace cache lock").remove(&manifest.manifest_path);
        let buildable = self.buildable(manifest).await?;
        let output = self.cargo(&buildable, args).await?;
        Ok((buildable, output))
    }

    /// The manifest cargo builds for this plugin: its own, or that of a staged copy when the
    /// crate lies inside a workspace that does not include it (see [`staging`]).
    /// The answer for a crate that is a workspace of its own is remembered (a probe is a cargo
    /// run); a build that finds it moved into a foreign workspace forgets it.
    async fn buildable(&self, manifest: &Manifest) -> Result<PathBuf, BuildError> {
        if self.own_workspace.lock().expect("workspace cache lock").contains(&manifest.manifest_path) {
            return Ok(manifest.manifest_path.clone());
        }
        let probe = ["locate-project", "--workspace", "--message-format", "plain"];
        let out = self.cargo(&manifest.manifest_path, &probe).await?;
        if out.success || !staging::is_foreign_workspace_error(&out.stderr) {
            if out.success {
                self.own_workspace.lock().expect("workspace cache lock").insert(manifest.manifest_path.clone());
            }
            return Ok(manifest.manifest_path.clone());
        }
        let dest = self.target_dir.join("kiln-staging").join(&manifest.name);
        tracing::debug!(plugin = %manifest.name, copy = %dest.display(), "inside a foreign workspace: building a copy");
        let src = manifest.dir.clone();
        Ok(tokio::task::spawn_blocking(move || staging::stage(&src, &dest)).await.map_err(std::io::Error::other)??)
    }

    /// Runs one cargo subcommand on the crate of `manifest_path`, with kiln's settings (what
    /// follows a `--` in `args` goes last: it is for rustc). cargo runs in a process group of its
    /// own, killed whole (rustc included) when the run is dropped unfinished: a build given up
    /// (cancelled, or past its deadline) leaves nothing writing into the target directory.
    async fn cargo(&self, manifest_path: &Path, args: &[&str]) -> Result<CargoOutput, BuildError> {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let patch = format!("patch.crates-io.kiln-types.path={}", toml_string(&self.types_dir));
        let (args, rustc) = args.split_at(args.iter().position(|a| *a == "--").unwrap_or(args.len()));
        let mut child = Command::new(cargo)
            .args(args)
            .arg("--manifest-path")
            .arg(manifest_path)
            .arg("--config")
            .arg(patch)
            .args(self.profile.settings().iter().flat_map(|setting| ["--config", *setting]))
            .current_dir(manifest_path.parent().unwrap_or(Path::new("/")))
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .args(rustc)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()?;
        let mut group = GroupKill { pgid: child.id(), running: &self.running };
        {
            let mut running = self.running.lock().expect("running lock");
            if running.1 {
                return Err(BuildError::Io(std::io::Error::other("the server is stopping")));
            }
            running.0.extend(group.pgid);
        }
        let mut stdout = BufReader::new(child.stdout.take().expect("piped")).lines();
        let mut stderr = child.stderr.take().expect("piped");
        let run = async {
            let mut lines = Vec::new();
            let mut err = Vec::new();
            let read_err = stderr.read_to_end(&mut err);
            let read_out = async {
                while let Some(line) = stdout.next_line().await? {
                    lines.push(line);
                }
                Ok::<_, std::io::Error>(())
            };
            let (a, b) = tokio::join!(read_out, read_err);
            a?;
            b?;
            let status = child.wait().await?;
            Ok::<_, std::io::Error>(CargoOutput {
                success: status.success(),
                stdout: lines,
                stderr: String::from_utf8_lossy(&err).into_owned(),
            })
        };
        let out = match tokio::time::timeout(BUILD_TIMEOUT, run).await {
            Ok(out) => out?,
            Err(_) => return Err(BuildError::TimedOut(BUILD_TIMEOUT)),
        };
        group.disarm(); // cargo was waited for: its group is gone, its id may be reused
        Ok(out)
    }

    /// Locks the shared target directory against other kiln processes until the guard drops.
    async fn lock_target_dir(&self) -> std::io::Result<std::fs::File> {
        let path = self.target_dir.join(".kiln-build.lock");
        tokio::task::spawn_blocking(move || {
            let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
            file.lock()?;
            Ok(file)
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

/// Kills the process group of a cargo run when dropped before [`GroupKill::disarm`] (see
/// [`Compiler::cargo`]), and keeps it in the compiler's list of runs meanwhile.
struct GroupKill<'a> {
    /// cargo's pid, its group's id.
    pgid: Option<u32>,
    running: &'a Mutex<(std::collections::HashSet<u32>, bool)>,
}

impl GroupKill<'_> {
    /// cargo was waited for.
    fn disarm(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            self.running.lock().expect("running lock").0.remove(&pgid);
        }
    }
}

impl Drop for GroupKill<'_> {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            self.running.lock().expect("running lock").0.remove(&pgid);
            kill_group(pgid);
        }
    }
}

/// SIGKILL to the process group `pgid`, led by a cargo that was not waited for yet.
fn kill_group(pgid: u32) {
    if let Ok(pgid) = libc::pid_t::try_from(pgid) {
        // SAFETY: kill(2) takes plain integers and touches no memory of ours. The group's leader
        // (cargo) is not reaped yet when its guard drops, so its pid, and with it the group id,
        // cannot have been reused. From `stop`, a run whose cargo was reaped a moment ago may
        // still be listed (it leaves the list right after the wait returns): its id could be
        // reused only if the kernel's cyclic pid allocation wrapped around in that moment.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
}

struct CargoOutput {
    success: bool,
    /// JSON messages, one a line.
    stdout: Vec<String>,
    /// cargo's own messages (resolution errors, progress).
    stderr: String,
}

/// Whether `path` is named like a library of plugin `name`: `<name>-<16 hex>[-draft].<dll extension>`.
fn is_artifact_of(path: &Path, name: &str) -> bool {
    let Some(file) = path.file_name().and_then(|f| f.to_str()) else { return false };
    let Some(rest) = file.strip_prefix(name).and_then(|r| r.strip_prefix('-')) else { return false };
    let Some(hash) = rest.strip_suffix(std::env::consts::DLL_EXTENSION).and_then(|r| r.strip_suffix('.')) else {
        return false;
    };
    let hash = hash.strip_suffix("-draft").unwrap_or(hash); // a draft (see `Compiler::draft_path`)
    hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `path` with `.` and `..` components resolved as cargo resolves them: lexically, without
/// looking at the filesystem (a symbolic link stays as named).
fn lexically_normal(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.components().next_back() {
                Some(Component::Normal(_)) => drop(out.pop()),
                Some(Component::RootDir | Component::Prefix(_)) => {} // `/..` is `/`
                _ => out.push(c),
            },
            other => out.push(other),
        }
    }
    out
}

/// The cdylib cargo produced for the crate at `manifest_path`, from its JSON messages.
fn find_library(messages: &[String], manifest_path: &Path) -> Option<PathBuf> {
    messages.iter().rev().find_map(|line| {
        let msg: serde_json::Value = serde_json::from_str(line).ok()?;
        if msg["reason"] != "compiler-artifact" || Path::new(msg["manifest_path"].as_str()?) != manifest_path {
            return None;
        }
        if !msg["target"]["kind"].as_array()?.iter().any(|k| k == "cdylib") {
            return None;
        }
        let suffix = format!(".{}", std::env::consts::DLL_EXTENSION);
        msg["filenames"].as_array()?.iter().filter_map(|f| f.as_str()).find(|f| f.ends_with(&suffix)).map(PathBuf::from)
    })
}

/// The package ids of the packages under `dir` (the plugin crate and path dependencies inside
/// it) that cargo reported fresh: not recompiled.
fn fresh_packages_under(messages: &[String], dir: &Path) -> Vec<String> {
    let mut ids: Vec<String> = messages
        .iter()
        .filter_map(|line| {
            let msg: serde_json::Value = serde_json::from_str(line).ok()?;
            let manifest = Path::new(msg["manifest_path"].as_str()?);
            let fresh = msg["reason"] == "compiler-artifact" && msg["fresh"] == true && manifest.starts_with(dir);
            fresh.then(|| msg["package_id"].as_str().map(str::to_string)).flatten()
        })
        .collect();
    ids.dedup();
    ids
}

/// Whether cargo compiled a package under `dir` in this run (not fresh).
fn built_under(messages: &[String], dir: &Path) -> bool {
    messages.iter().any(|line| {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { return false };
        msg["reason"] == "compiler-artifact"
            && msg["fresh"] == false
            && msg["manifest_path"].as_str().is_some_and(|m| Path::new(m).starts_with(dir))
    })
}

/// The error of a failed cargo run.
fn failed(out: &CargoOutput) -> BuildError {
    BuildError::Failed { diagnostics: diagnostics(out), messages: crate::diagnostics::from_cargo(&out.stdout) }
}

/// One summary line per error with its place (`error[E0308] src/lib.rs:4:9: …`), then a blank
/// line; nothing when there are none.
fn summary(messages: &[Diagnostic]) -> String {
    let errors: Vec<String> = messages.iter().filter(|m| m.level == "error").map(Diagnostic::summary).collect();
    if errors.is_empty() { String::new() } else { format!("{}\n\n", errors.join("\n")) }
}

/// What a user needs to see of a failed build: rustc's rendered errors, then cargo's own errors.
fn diagnostics(out: &CargoOutput) -> String {
    let mut text = String::new();
    for line in &out.stdout {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if msg["reason"] == "compiler-message"
            && msg["message"]["level"] == "error"
            && let Some(rendered) = msg["message"]["rendered"].as_str()
        {
            text.push_str(rendered);
        }
    }
    for line in out.stderr.lines() {
        let trimmed = line.trim_start();
        let progress = ["Compiling", "Updating", "Locking", "Blocking", "Downloaded", "Downloading", "Adding"];
        if !progress.iter().any(|p| trimmed.starts_with(p)) {
            text.push_str(line);
            text.push('\n');
        }
    }
    if text.len() > MAX_DIAGNOSTICS {
        let mut cut = MAX_DIAGNOSTICS;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("\n… (diagnostics truncated)");
    }
    text
}

/// A path as a TOML string literal (for cargo's `--config`).
fn toml_string(path: &Path) -> String {
    toml::Value::String(path.to_string_lossy().into_owned()).to_string()
}

/// Hash of every file under `dir` (relative path and content), skipping `target/` and hidden
/// entries. Sorted, so the hash does not depend on directory order.
fn hash_tree(dir: &Path) -> std::io::Result<String> {
    Ok(hash_tree_and_code(dir, None)?.0)
}

/// [`hash_tree`], and the same hash without a top-level `Cargo.lock`.
fn hash_tree_and_code(dir: &Path, known: Option<&crate::tree_stamps::TreeStamps>) -> std::io::Result<(String, String)> {
    use crate::tree_stamps::FileStamp;
    let walk = WalkDir::new(dir).sort_by_file_name().into_iter().filter_entry(|e| {
        let name = e.file_name().to_string_lossy();
        e.depth() == 0 || !(name.starts_with('.') || (e.depth() == 1 && name == "target"))
    });
    let mut files = Vec::new();
    for entry in walk {
        let entry = entry.map_err(std::io::Error::other)?;
        // Regular files only (symbolic links followed): a FIFO or a device in a crate would block
        // the read forever.
        if entry.file_type().is_dir() {
            continue;
        }
        let Ok(meta) = std::fs::metadata(entry.path()) else { continue };
        if !meta.is_file() {
            continue;
        }
        let rel = entry.path().strip_prefix(dir).unwrap_or(entry.path()).to_path_buf();
        files.push(FileStamp::new(rel, &meta));
    }
    if let Some(hashes) = known.and_then(|k| k.get(dir, &files)) {
        return Ok(hashes);
    }
    let mut h = Sha256::new();
    let mut code = Sha256::new();
    for file in &files {
        let rel = file.rel.as_path();
        let mut content = std::fs::read(dir.join(rel))?;
        if rel == Path::new("Cargo.lock")
            && let Some(canonical) = canonical_lock(&content)
        {
            content = canonical;
        }
        let hashers: &mut [&mut Sha256] =
            if rel == Path::new("Cargo.lock") { &mut [&mut h] } else { &mut [&mut h, &mut code] };
        for hasher in hashers {
            hasher.update(rel.to_string_lossy().as_bytes());
            hasher.update([0]);
            hasher.update((content.len() as u64).to_le_bytes());
            hasher.update(&content);
        }
    }
    let hashes = (hex::encode(h.finalize()), hex::encode(code.finalize()));
    if let Some(known) = known {
        known.put(dir, files, &hashes);
    }
    Ok(hashes)
}

/// A lock file's packages in cargo's order, written out again: cargo rewrites a lock whose
/// packages are out of its order (a package renamed by hand, say) at the first build, which
/// would change the content hash and build the plugin a second time. `None` if it does not parse.
fn canonical_lock(content: &[u8]) -> Option<Vec<u8>> {
    let mut lock: toml::Table = std::str::from_utf8(content).ok()?.parse().ok()?;
    if let Some(toml::Value::Array(packages)) = lock.get_mut("package") {
        let key = |p: &toml::Value| {
            let field = |k: &str| p.get(k).and_then(toml::Value::as_str).unwrap_or_default().to_string();
            (field("name"), field("version"), field("source"))
        };
        packages.sort_by_cached_key(key);
    }
    toml::to_string(&lock).ok().map(String::into_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remembered_tree_hash_is_taken_again_when_a_file_changes() {
        use crate::tree_stamps::{TreeStamps, tests::rewrite_keeping_mtime, tests::stamps};
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lib.rs");
        std::fs::write(&file, "fn a() {}").unwrap();
        let cache = TreeStamps::new(Duration::ZERO);
        let first = hash_tree_and_code(dir.path(), Some(&cache)).unwrap();
        assert_eq!(first, hash_tree_and_code(dir.path(), None).unwrap());
        assert_eq!(cache.get(dir.path(), &stamps(dir.path())), Some(first.clone()), "remembered");
        assert_eq!(hash_tree_and_code(dir.path(), Some(&cache)).unwrap(), first);
        // The same size and modification time, other content: hashed again.
        rewrite_keeping_mtime(dir.path(), &file, "fn b() {}");
        let second = hash_tree_and_code(dir.path(), Some(&cache)).unwrap();
        assert_ne!(second, first);
        assert_eq!(second, hash_tree_and_code(dir.path(), None).unwrap());
    }

    /// A plugin counts as swept (a fresh instance of the library that serves collects nothing)
    /// only after a collection removed every unused library of it, until one is written again.
    #[test]
    fn a_plugin_is_swept_only_when_no_unused_library_of_it_is_left() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("types")).unwrap();
        let compiler = Compiler::new(
            dir.path().join("target"),
            dir.path().join("bin"),
            dir.path().join("types"),
            BuildProfile::Fast,
        )
        .unwrap();
        let (a, b) = (compiler.artifact_path("p", &"a".repeat(64)), compiler.artifact_path("p", &"b".repeat(64)));
        std::fs::write(&a, "a").unwrap();
        std::fs::write(&b, "b").unwrap();
        assert!(!compiler.swept("p"), "not collected since start");
        let pinned = compiler.pin(&b);
        assert_eq!(compiler.collect_garbage("p", &[]), 1);
        assert!(!compiler.swept("p"), "a pinned library was left");
        drop(pinned);
        assert_eq!(compiler.collect_garbage("p", &[]), 1);
        assert!(compiler.swept("p") && !b.exists());
        compiler.library_written("p");
        assert!(!compiler.swept("p"), "a library was written since");
    }

    #[test]
    fn a_lock_hashes_the_same_in_any_package_order() {
        let a = "version = 4\n\n[[package]]\nname = \"b\"\nversion = \"1.0.0\"\n\n[[package]]\nname = \"a\"\nversion = \"0.1.0\"\ndependencies = [\"b\"]\n";
        let b = "version = 4\n\n[[package]]\nname = \"a\"\nversion = \"0.1.0\"\ndependencies = [\"b\"]\n\n[[package]]\nname = \"b\"\nversion = \"1.0.0\"\n";
        assert_eq!(canonical_lock(a.as_bytes()), canonical_lock(b.as_bytes()));
        let other = b.replace("1.0.0", "1.0.1");
        assert_ne!(canonical_lock(b.as_bytes()), canonical_lock(other.as_bytes()), "versions count");
        assert_eq!(canonical_lock(b"not = [toml"), None);
    }

    #[test]
    fn a_draft_follows_the_release_profile_and_none_is_made_with_lto() {
        let args = |toml: &str| draft_rustc_args(toml).map(|a| a.join(" "));
        assert_eq!(
            args("[package]\nname = \"p\"\n").as_deref(),
            Some("-C opt-level=0 -C lto=off -C debug-assertions=off -C overflow-checks=off")
        );
        assert_eq!(
            args("[profile.release]\ndebug-assertions = true\n").as_deref(),
            Some("-C opt-level=0 -C lto=off -C debug-assertions=on -C overflow-checks=on")
        );
        assert_eq!(
            args("[profile.release]\ndebug-assertions = true\noverflow-checks = false\nlto = false\n").as_deref(),
            Some("-C opt-level=0 -C lto=off -C debug-assertions=on -C overflow-checks=off")
        );
        assert_eq!(args("[profile.release]\nlto = true\n"), None);
        assert_eq!(args("[profile.release]\nlto = \"thin\"\n"), None);
        assert!(args("[profile.release]\nlto = \"off\"\n").is_some());
    }

    #[test]
    fn hash_changes_with_content_and_ignores_target() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.rs"), "1").unwrap();
        let h1 = hash_tree(dir.path()).unwrap();
        std::fs::create_dir(dir.path().join("target")).unwrap();
        std::fs::write(dir.path().join("target/x"), "junk").unwrap();
        assert_eq!(h1, hash_tree(dir.path()).unwrap());
        std::fs::write(dir.path().join("a.rs"), "2").unwrap();
        assert_ne!(h1, hash_tree(dir.path()).unwrap());
    }

    #[test]
    fn paths_are_normalized_as_cargo_reports_them() {
        assert_eq!(
            lexically_normal(Path::new("/w/bench/../plugins/./a/Cargo.toml")),
            Path::new("/w/plugins/a/Cargo.toml")
        );
        assert_eq!(lexically_normal(Path::new("/../a")), Path::new("/a"));
        assert_eq!(lexically_normal(Path::new("../a/b/..")), Path::new("../a"));
    }

    #[test]
    fn only_the_plugins_own_libraries_are_collected() {
        let so = std::env::consts::DLL_EXTENSION;
        assert!(is_artifact_of(Path::new(&format!("/b/foo-0123456789abcdef.{so}")), "foo"));
        assert!(!is_artifact_of(Path::new(&format!("/b/foo-bar-0123456789abcdef.{so}")), "foo"));
        assert!(!is_artifact_of(Path::new(&format!("/b/foo-0123456789abcdeg.{so}")), "foo"));
        assert!(!is_artifact_of(Path::new("/b/foo-0123456789abcdef.tmp"), "foo"));
        assert!(is_artifact_of(Path::new(&format!("/b/foo-0123456789abcdef-draft.{so}")), "foo"));
        assert!(!is_artifact_of(Path::new(&format!("/b/foo-0123456789abcdef-other.{so}")), "foo"));
    }

    #[test]
    fn library_is_found_in_cargo_messages() {
        let msgs = vec![
            r#"{"reason":"compiler-artifact","manifest_path":"/other/Cargo.toml","target":{"kind":["cdylib"]},"filenames":["/t/libother.so"]}"#.to_string(),
            r#"{"reason":"compiler-artifact","manifest_path":"/p/Cargo.toml","target":{"kind":["cdylib","rlib"]},"filenames":["/t/libp.so","/t/libp.rlib"],"fresh":true}"#.to_string(),
            r#"{"reason":"build-finished","success":true}"#.to_string(),
        ];
        assert_eq!(find_library(&msgs, Path::new("/p/Cargo.toml")), Some(PathBuf::from("/t/libp.so")));
        assert_eq!(find_library(&msgs, Path::new("/q/Cargo.toml")), None);
    }

    #[test]
    fn fresh_packages_of_the_crate_are_found() {
        let artifact = |manifest: &str, id: &str, fresh: bool| {
            serde_json::json!({ "reason": "compiler-artifact", "manifest_path": manifest, "package_id": id, "fresh": fresh })
                .to_string()
        };
        let msgs = vec![
            artifact("/types/Cargo.toml", "path+file:///types#kiln-types@0.1.0", true),
            artifact("/p/helpers/Cargo.toml", "path+file:///p/helpers#0.1.0", true),
            artifact("/p/Cargo.toml", "path+file:///p#0.1.0", false),
        ];
        assert_eq!(fresh_packages_under(&msgs, Path::new("/p")), ["path+file:///p/helpers#0.1.0"]);
        assert!(built_under(&msgs, Path::new("/p")) && !built_under(&msgs, Path::new("/types")));
    }
}
