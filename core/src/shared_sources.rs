//! Uploaded plugins' sources on every replica. An upload reaches one replica, which unpacks it
//! into its install directory and stores the archive with the row (`plugin_archives`). A
//! replica that does not find the crate at the row's `source_path` (it does not share that
//! disk) unpacks the stored archive into its own install directory, through the same checks as
//! an upload, and builds, hashes and serves from there. A file beside each copy (the
//! uploader's too) records the archive's sha256, so a copy left by an earlier plugin of the
//! same name is replaced.

use crate::repo::{PluginRow, Repo};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub struct SharedSources {
    repo: Repo,
    install_dir: PathBuf,
    /// Uploaded plugins whose crate this replica resolved, by row id: when a row goes, its copy
    /// goes too (whether or not it ever served here).
    known: Mutex<HashMap<i64, String>>,
}

impl SharedSources {
    pub fn new(repo: Repo, install_dir: PathBuf) -> Self {
        Self { repo, install_dir, known: Default::default() }
    }

    /// Where this replica finds the crate of `row`. Not an upload: its `source_path`. An upload:
    /// its `source_path` when that is another existing directory (a disk shared with the
    /// uploader) unpacked from the stored archive (its stamp says so; after an upgrade the
    /// uploader's copy is stale until its replica unpacks the new archive); otherwise this replica's copy in its install directory, checked against the
    /// stored archive's sha256 and unpacked again when missing or stale (the same path on
    /// replicas that do not share a disk may hold a copy of an earlier plugin of that name).
    /// Errors are logged and leave `source_path` (whose absence the pass reports).
    pub async fn dir(&self, row: &PluginRow) -> PathBuf {
        let given = PathBuf::from(&row.source_path);
        if !row.from_archive() {
            return given;
        }
        let local = self.install_dir.join(&row.name);
        if given != local
            && crate::manifest::exists_off_worker(&given).await != Some(false)
            && self.holds_stored_archive(row, &given).await
        {
            return given;
        }
        self.known.lock().expect("known lock").insert(row.id, row.name.clone());
        match self.unpacked(row, &local).await {
            Ok(Some(dir)) => dir,
            Ok(None) => given,
            Err(e) => {
                tracing::warn!(plugin = %row.name, "could not unpack its stored archive: {e}");
                given
            }
        }
    }

    /// Whether `dir` (another replica's copy) holds `row`'s stored archive, or the plugin has
    /// none stored (the directory is all there is).
    async fn holds_stored_archive(&self, row: &PluginRow, dir: &Path) -> bool {
        let Some(parent) = dir.parent() else { return false };
        match self.repo.archive_sha256(row.id).await {
            Ok(None) => true,
            Ok(Some(sha256)) => {
                tokio::fs::read_to_string(stamp_path(parent, &row.name)).await.is_ok_and(|s| s == sha256)
            }
            Err(_) => false,
        }
    }

    /// This replica's copy of `row`'s stored archive at `dir`, unpacked now if it is missing or
    /// stale. None for an upload that has no stored archive (made before archives were kept).
    async fn unpacked(&self, row: &PluginRow, dir: &Path) -> anyhow::Result<Option<PathBuf>> {
        let Some(sha256) = self.repo.archive_sha256(row.id).await? else { return Ok(None) };
        let stamp = stamp_path(&self.install_dir, &row.name);
        if tokio::fs::read_to_string(&stamp).await.is_ok_and(|s| s == sha256) && dir.join("Cargo.toml").exists() {
            return Ok(Some(dir.to_path_buf()));
        }
        let Some((sha256, bytes)) = self.repo.archive(row.id).await? else { return Ok(None) };
        let install_dir = self.install_dir.clone();
        let (name, into) = (row.name.clone(), dir.to_path_buf());
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let extracted = crate::archive::extract(&bytes, &install_dir, Default::default())?;
            let manifest = crate::manifest::Manifest::read(&extracted.crate_dir)?;
            anyhow::ensure!(manifest.name == name, "the archive holds {:?}, not {name:?}", manifest.name);
            let _ = std::fs::remove_file(&stamp);
            if into.exists() {
                std::fs::remove_dir_all(&into)?;
            }
            std::fs::rename(&extracted.crate_dir, &into)?;
            std::fs::write(&stamp, &sha256)?;
            Ok(())
        })
        .await??;
        tracing::info!(plugin = %row.name, dir = %dir.display(), "unpacked its stored archive");
        Ok(Some(dir.to_path_buf()))
    }

    /// Row `id` is gone: removes this replica's copy of its upload, unless a new row of the same
    /// name (uploaded again) owns the directory now.
    pub async fn forget(&self, id: i64) {
        let Some(name) = self.known.lock().expect("known lock").remove(&id) else { return };
        if !matches!(self.repo.get_by_name(&name).await, Ok(None)) {
            return;
        }
        let _ = tokio::fs::remove_dir_all(self.install_dir.join(&name)).await;
        let _ = tokio::fs::remove_file(stamp_path(&self.install_dir, &name)).await;
    }
}

/// The file beside an uploaded plugin's copy in `install_dir` that holds its archive's sha256
/// (the uploader writes it too).
pub fn stamp_path(install_dir: &Path, name: &str) -> PathBuf {
    install_dir.join(format!(".archive-{name}"))
}
