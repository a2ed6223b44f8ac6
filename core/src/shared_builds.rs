//! Each library built once among replicas: a replica that needs a library it does not have
//! fetches it from PostgreSQL when another replica stored it, and otherwise builds it under an
//! advisory lock on its build key, so that replicas needing it at once wait for one build
//! instead of each running cargo. A replica that dies mid-build loses its session, PostgreSQL
//! releases the lock, and the next waiter builds.
//!
//! The build key is what decides the library: the plugin's content hash (its sources, the
//! kiln-types sources, the ABI version and the build profile), the toolchain (`rustc -vV`) and
//! the target. Libraries travel with their sha256, checked before one is written to disk.

use crate::compiler::{Artifact, BuildError, Compiler};
use crate::manifest::Manifest;
use crate::repo::Repo;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The lock of a build key this replica holds, to build its library (see [`SharedBuilds::build`]).
struct Held {
    key: String,
    lock: crate::repo::BuildLock,
}

/// What is left of a staged build once its draft serves: building the library itself (and
/// storing it for the other replicas). Dropped unfinished, it builds nothing more: a cargo run
/// in progress is killed, and the build key's lock goes with its session.
pub struct Finisher {
    manifest: Manifest,
    hash: String,
    /// The build key's lock, taken to build the draft (`None`: taken, or not, by `finish`).
    held: Option<Held>,
    /// One of [`MAX_DRAFTING`]'s places.
    _place: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Finisher {
    /// The version it finishes.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Builds the library, as [`SharedBuilds::build`] would have.
    pub async fn finish(self, builds: &SharedBuilds) -> Result<Artifact, BuildError> {
        match self.held {
            Some(held) => {
                let built = builds.compiler.build(&self.manifest, &self.hash).await;
                builds.share(&self.manifest.name, built, Some(held))
            }
            None => builds.build(&self.manifest, &self.hash).await,
        }
    }
}

/// Drafts whose optimized build is still to come, at most: each holds its build key's lock, a
/// database session, until then (the pool has 16).
const MAX_DRAFTING: usize = 4;

/// The compiler, shared with the other replicas through the database.
pub struct SharedBuilds {
    repo: Repo,
    compiler: Arc<Compiler>,
    /// sha256 of `rustc -vV` and the target, asked once, when first needed.
    toolchain: tokio::sync::OnceCell<String>,
    /// One build key waited for or built at a time (each wait holds a database session).
    turn: tokio::sync::Mutex<()>,
    fetches: AtomicU64,
    /// Places for drafts whose optimized build is to come (see [`MAX_DRAFTING`]).
    drafting: Arc<tokio::sync::Semaphore>,
    /// Uploaded plugins' sources, unpacked from the database where this replica lacks them.
    pub sources: crate::shared_sources::SharedSources,
}

impl SharedBuilds {
    pub fn new(repo: Repo, compiler: Arc<Compiler>, sources: crate::shared_sources::SharedSources) -> Self {
        Self {
            repo,
            compiler,
            toolchain: Default::default(),
            turn: Default::default(),
            fetches: Default::default(),
            drafting: Arc::new(tokio::sync::Semaphore::new(MAX_DRAFTING)),
            sources,
        }
    }

    /// The compiler itself.
    pub fn compiler(&self) -> &Arc<Compiler> {
        &self.compiler
    }

    /// Libraries fetched from other replicas since start.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// Builds run by this replica since start.
    pub fn builds(&self) -> u64 {
        self.compiler.builds_run()
    }

    /// The library of `hash`: on disk already, fetched from the database, or built here (and
    /// stored for the others).
    pub async fn build(&self, manifest: &Manifest, hash: &str) -> Result<Artifact, BuildError> {
        Ok(self.obtain(manifest, hash, false).await?.0)
    }

    /// As [`SharedBuilds::build`], but where this replica would build the library it builds a
    /// draft first (see [`Compiler::build_draft`]) and answers that, with the [`Finisher`] that
    /// builds the library itself (and stores it for the other replicas, which wait for it as
    /// they wait for any build: each version is still compiled once among them).
    /// With [`MAX_DRAFTING`] drafts waiting for their optimized builds already, it builds the
    /// library directly.
    pub async fn build_staged(
        &self,
        manifest: &Manifest,
        hash: &str,
    ) -> Result<(Artifact, Option<Finisher>), BuildError> {
        self.obtain(manifest, hash, true).await
    }

    /// What builds the library of a version whose draft serves already (its optimized build
    /// was cancelled, and the version is wanted again).
    pub fn finisher(&self, manifest: &Manifest, hash: &str) -> Finisher {
        Finisher { manifest: manifest.clone(), hash: hash.to_string(), held: None, _place: None }
    }

    async fn obtain(
        &self,
        manifest: &Manifest,
        hash: &str,
        draft: bool,
    ) -> Result<(Artifact, Option<Finisher>), BuildError> {
        let path = self.compiler.artifact_path(&manifest.name, hash);
        if path.exists() {
            return Ok((self.compiler.build(manifest, hash).await?, None)); // answers at once
        }
        // A library the crate carries, built from these very sources: no build, no fetch.
        let (dir, name, owned_hash, dest) =
            (manifest.dir.clone(), manifest.name.clone(), hash.to_string(), path.clone());
        let prebuilt =
            tokio::task::spawn_blocking(move || crate::prebuilt::install(&dir, &name, &owned_hash, &dest)).await;
        match prebuilt {
            Ok(Ok(true)) => {
                return Ok((Artifact::existing(path, hash, false), None));
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::warn!(plugin = %manifest.name, "could not read the prebuilt library: {e}"),
            Err(e) => tracing::warn!(plugin = %manifest.name, "could not read the prebuilt library: {e}"),
        }
        let key = self.key(&manifest.name, hash).await;
        match self.fetch(&key, manifest, hash).await {
            Ok(Some(artifact)) => return Ok((artifact, None)),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(plugin = %manifest.name, "could not fetch a shared library, building here: {e}");
                return self.here(manifest, hash, None, draft).await;
            }
        }
        let _turn = self.turn.lock().await;
        let lock = match self.repo.lock_build(&key).await {
            Ok(lock) => lock,
            Err(e) => {
                tracing::warn!(plugin = %manifest.name, "could not take the build lock, building here: {e}");
                return self.here(manifest, hash, None, draft).await;
            }
        };
        // Another replica may have built it while this one waited for the lock.
        match self.fetch(&key, manifest, hash).await {
            Ok(Some(artifact)) => {
                lock.release().await;
                return Ok((artifact, None));
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(plugin = %manifest.name, "could not fetch a shared library: {e}"),
        }
        self.here(manifest, hash, Some(Held { key, lock }), draft).await
    }

    /// Builds on this replica: the library, stored for the others under `held` (the build
    /// key's lock), or a draft and the finisher that will do that.
    async fn here(
        &self,
        manifest: &Manifest,
        hash: &str,
        held: Option<Held>,
        draft: bool,
    ) -> Result<(Artifact, Option<Finisher>), BuildError> {
        let place = if draft { self.drafting.clone().try_acquire_owned().ok() } else { None };
        if place.is_some() {
            match self.compiler.build_draft(manifest, hash).await {
                Ok(artifact) if artifact.draft => {
                    let finisher = Finisher { manifest: manifest.clone(), hash: hash.to_string(), held, _place: place };
                    return Ok((artifact, Some(finisher)));
                }
                // The library exists now (built meanwhile, or the crate cannot have a draft).
                Ok(_) => {}
                // A compiler failure without an error in the plugin's code may be the draft's own
                // (a profile whose LTO leaves only bitcode to link): the library is built as if
                // there were no drafts. Any other failure is the answer.
                Err(e @ BuildError::Failed { .. }) if !e.in_code() => {
                    tracing::warn!(plugin = %manifest.name, "the draft did not build, building optimized: {e}")
                }
                Err(e) => {
                    if let Some(held) = held {
                        held.lock.release().await;
                    }
                    return Err(e);
                }
            }
        }
        let built = self.compiler.build(manifest, hash).await;
        Ok((self.share(&manifest.name, built, held)?, None))
    }

    /// After a build here: stores its library for the other replicas and releases the build
    /// key's lock, in the background (this replica loads the library at once; a waiting replica
    /// finds it stored when it gets the lock). A failed build releases the lock at once.
    fn share(
        &self,
        name: &str,
        built: Result<Artifact, BuildError>,
        held: Option<Held>,
    ) -> Result<Artifact, BuildError> {
        let Some(Held { key, lock }) = held else { return built };
        let artifact = match built {
            Ok(a) => a,
            Err(e) => {
                tokio::spawn(lock.release());
                return Err(e);
            }
        };
        let (repo, name, hash, library) =
            (self.repo.clone(), name.to_string(), artifact.hash.clone(), artifact.path.clone());
        tokio::spawn(async move {
            let clock = Instant::now();
            match tokio::fs::read(&library).await {
                Ok(bytes) => {
                    let sha256 = hex::encode(Sha256::digest(&bytes));
                    match repo.store_library(&key, &name, &hash, &sha256, &bytes).await {
                        Ok(()) => {
                            tracing::debug!(plugin = %name, took = ?clock.elapsed(), size = bytes.len(), "library stored")
                        }
                        Err(e) => tracing::warn!(plugin = %name, "could not store the library for other replicas: {e}"),
                    }
                }
                Err(e) => tracing::warn!(plugin = %name, "could not read the library to store it: {e}"),
            }
            lock.release().await;
        });
        Ok(artifact)
    }

    /// The stored library of `key` written to this replica's library directory, checked.
    async fn fetch(
        &self,
        key: &str,
        manifest: &Manifest,
        hash: &str,
    ) -> Result<Option<Artifact>, crate::repo::RepoError> {
        let clock = Instant::now();
        let Some(stored) = self.repo.stored_library(key).await? else { return Ok(None) };
        let sha256 = hex::encode(Sha256::digest(&stored.bytes));
        if sha256 != stored.sha256 {
            tracing::warn!(
                plugin = %manifest.name, built_by = %stored.built_by,
                "a stored library does not match its sha256 ({sha256}, recorded {}); building here", stored.sha256
            );
            return Ok(None);
        }
        let path = self.compiler.artifact_path(&manifest.name, hash);
        // Written whole under a name of its own (unique among processes that may share the
        // directory), then renamed: a loader never sees half a library.
        let (target, size, built_by) = (path.clone(), stored.bytes.len(), stored.built_by.clone());
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let dir = target.parent().unwrap_or(std::path::Path::new("."));
            let mut tmp = tempfile::Builder::new().prefix(".fetch-").tempfile_in(dir)?;
            tmp.write_all(&stored.bytes)?;
            tmp.persist(&target).map_err(|e| e.error)?;
            Ok(())
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if let Err(e) = written {
            tracing::warn!(plugin = %manifest.name, "could not write a fetched library: {e}");
            return Ok(None);
        }
        self.compiler.library_written(&manifest.name);
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let took = clock.elapsed();
        tracing::info!(plugin = %manifest.name, built_by = %built_by, ?took, size, "library fetched");
        Ok(Some(Artifact::existing(path, hash, false)))
    }

    async fn key(&self, name: &str, hash: &str) -> String {
        let toolchain = self.toolchain.get_or_init(toolchain).await;
        format!("{name}-{hash}-{toolchain}")
    }
}

/// sha256 (16 hex digits) of what the toolchain says of itself, the rustc flags, and the target.
async fn toolchain() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = match tokio::process::Command::new(&rustc).arg("-vV").output().await {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        Ok(out) => format!("rustc -vV failed: {}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => format!("rustc -vV could not run: {e}"),
    };
    let mut h = Sha256::new();
    h.update(version.as_bytes());
    // Flags that change the code cargo emits (`-C target-cpu=native` would not run elsewhere).
    for flags in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_BUILD_RUSTFLAGS"] {
        h.update(format!("{flags}={}\n", std::env::var(flags).unwrap_or_default()).as_bytes());
    }
    h.update(std::env::consts::ARCH.as_bytes());
    h.update(std::env::consts::OS.as_bytes());
    hex::encode(h.finalize())[..16].to_string()
}
