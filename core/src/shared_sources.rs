//! Uploaded plugins' sources on every replica. An upload reaches one replica, which unpacks it
//! into its install directory and stores the archive with the row (`plugin_archives`). A
//! replica that does not find the crate at the row's `source_path` (it does not share that
//! disk) unpacks the stored archive into its own install directory, through the same checks as
//! an upload, and builds, hashes and serves from there. A file beside the copy records the
//! archive's sha256, so a copy left by an earlier plugin of the same name is replaced.

use crate::repo::{PluginRow, Repo};
use std::path::PathBuf;

pub struct SharedSources {
    repo: Repo,
    install_dir: PathBuf,
}

impl SharedSources {
    pub fn new(repo: Repo, install_dir: PathBuf) -> Self {
        Self { repo, install_dir }
    }

    /// Where this replica finds the crate of `row`: its `source_path`, unless that is missing
    /// here and the plugin was uploaded, then this replica's copy of the stored archive. Errors
    /// are logged and leave `source_path` (whose absence the pass reports).
    pub async fn dir(&self, row: &PluginRow) -> PathBuf {
        let given = PathBuf::from(&row.source_path);
        if row.origin != "upload" || crate::manifest::exists_off_worker(&given).await != Some(false) {
            return given;
        }
        match self.unpacked(row).await {
            Ok(Some(dir)) => dir,
            Ok(None) => given,
            Err(e) => {
                tracing::warn!(plugin = %row.name, "could not unpack its stored archive: {e}");
                given
            }
        }
    }

    /// This replica's copy of `row`'s stored archive, unpacked now if it is missing or stale.
    async fn unpacked(&self, row: &PluginRow) -> anyhow::Result<Option<PathBuf>> {
        let Some(sha256) = self.repo.archive_sha256(row.id).await? else { return Ok(None) };
        let (dir, stamp) = self.paths(&row.name);
        if tokio::fs::read_to_string(&stamp).await.is_ok_and(|s| s == sha256) && dir.join("Cargo.toml").exists() {
            return Ok(Some(dir));
        }
        let Some((sha256, bytes)) = self.repo.archive(row.id).await? else { return Ok(None) };
        let install_dir = self.install_dir.clone();
        let (name, into) = (row.name.clone(), dir.clone());
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
        Ok(Some(dir))
    }

    /// Removes this replica's copy of an uploaded plugin that was uninstalled (only a copy it
    /// unpacked itself: the one the upload reached is removed by the uninstall).
    pub async fn forget(&self, name: &str) {
        let (dir, stamp) = self.paths(name);
        if tokio::fs::metadata(&stamp).await.is_ok() {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            let _ = tokio::fs::remove_file(&stamp).await;
        }
    }

    /// (the copy's directory, the file holding its archive's sha256).
    fn paths(&self, name: &str) -> (PathBuf, PathBuf) {
        (self.install_dir.join(name), self.install_dir.join(format!(".archive-{name}")))
    }
}
