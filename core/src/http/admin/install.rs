//! Installing a plugin from an archive, for uploads and catalogs alike: unpack it safely,
//! place it, record it with its archive, and load it, all or nothing; and, from a catalog,
//! upgrading a plugin installed from an archive, rolled back if the new version does not serve.

use super::wire::Plugin;
use super::{AdminApi, db_error, failure, internal, manifest_code};
use crate::archive::{self, Extracted};
use crate::error_code::ErrorCode;
use crate::http::error::ErrorResponse;
use crate::manifest::Manifest;
use crate::reconciler::Failure;
use crate::repo::{CatalogEntry, Discovered, PluginRow, Replaced};
use std::io::ErrorKind;

type Result<T> = std::result::Result<T, ErrorResponse>;

impl AdminApi {
    /// Unpacks `bytes` (a `.tar.gz` of a plugin crate) into a fresh directory and reads its
    /// manifest. From a catalog (`entry`), the manifest must name the entry's plugin and version.
    pub(super) async fn unpack(
        &self,
        bytes: Vec<u8>,
        entry: Option<&CatalogEntry>,
    ) -> Result<(Extracted, Manifest, Vec<u8>)> {
        let install_dir = self.install_dir.clone();
        let (extracted, bytes) =
            tokio::task::spawn_blocking(move || (archive::extract(&bytes, &install_dir, Default::default()), bytes))
                .await
                .map_err(|e| internal(e.to_string()))?;
        let extracted = extracted.map_err(|e| ErrorResponse::new(ErrorCode::InvalidArchive, e.to_string()))?;
        let crate_dir = extracted.crate_dir.clone();
        let manifest = tokio::task::spawn_blocking(move || Manifest::read(&crate_dir))
            .await
            .map_err(|e| internal(e.to_string()))?
            .map_err(|e| ErrorResponse::new(manifest_code(&e), e.to_string()))?;
        if let Some(entry) = entry
            && (manifest.name != entry.name || !same_version(&manifest.version, &entry.version))
        {
            let msg = format!(
                "the catalog lists {}@{}, but the archive holds {}@{}",
                entry.name, entry.version, manifest.name, manifest.version
            );
            return Err(ErrorResponse::new(ErrorCode::CatalogMismatch, msg));
        }
        Ok((extracted, manifest, bytes))
    }

    /// Installs a new plugin from an unpacked archive: places the crate in the install
    /// directory, records the row with the archive, and loads it. If any step fails, nothing is
    /// left behind and the answer says why (with the compiler's diagnostics for a failed build).
    pub(super) async fn install_new(
        &self,
        extracted: Extracted,
        manifest: Manifest,
        bytes: Vec<u8>,
        origin: &'static str,
    ) -> Result<Plugin> {
        let exists = |name: &str| {
            let msg = format!("a plugin named {name:?} exists; uninstall it first (DELETE /plugins/{name})");
            ErrorResponse::new(ErrorCode::PluginExists, msg)
        };
        let dest = self.install_dir.join(&manifest.name);
        if dest.exists() || self.repo.get_by_name(&manifest.name).await.map_err(db_error)?.is_some() {
            return Err(exists(&manifest.name));
        }
        // The rename claims the name: of concurrent uploads of one new plugin, exactly one wins
        // it; the others find the directory taken (ENOTEMPTY or EEXIST) and are told so.
        let from = extracted.crate_dir.clone();
        let to = dest.clone();
        match tokio::task::spawn_blocking(move || std::fs::rename(from, to))
            .await
            .map_err(|e| internal(e.to_string()))?
        {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), ErrorKind::DirectoryNotEmpty | ErrorKind::AlreadyExists) => {
                return Err(exists(&manifest.name));
            }
            Err(e) => return Err(internal(format!("placing the plugin: {e}"))),
        }
        drop(extracted);
        // The copy's stamp: the archive it was unpacked from (see `shared_sources`).
        let stamp = crate::shared_sources::stamp_path(&self.install_dir, &manifest.name);
        let sha256 = sha256_hex(&bytes);
        if let Err(e) = tokio::fs::write(&stamp, &sha256).await {
            let _ = tokio::fs::remove_dir_all(&dest).await;
            return Err(internal(format!("placing the plugin: {e}")));
        }
        // Same crate, new place.
        let manifest = Manifest { manifest_path: dest.join("Cargo.toml"), dir: dest.clone(), ..manifest };
        // The archive is stored with the row: a replica that does not share this disk unpacks it.
        let inserted = self
            .repo
            .insert_upload(
                &Discovered {
                    name: &manifest.name,
                    source_path: &dest.to_string_lossy(),
                    description: &manifest.description,
                    version: &manifest.version,
                    author: &manifest.author,
                    kind: &manifest.kind,
                    origin,
                    status: "active",
                },
                &bytes,
                &sha256,
            )
            .await
            .map_err(db_error)?;
        if !inserted {
            let _ = tokio::fs::remove_dir_all(&dest).await;
            let _ = tokio::fs::remove_file(&stamp).await;
            return Err(exists(&manifest.name));
        }
        let row = self.row(&manifest.name).await?;
        if let Err(f) = self.reconciler.reconcile(row.id, false).await {
            // All or nothing: take the failed install back out.
            let _ = self.repo.delete(row.id).await;
            let _ = self.reconciler.reconcile(row.id, false).await;
            let _ = tokio::fs::remove_dir_all(&dest).await;
            let _ = tokio::fs::remove_file(&stamp).await;
            return Err(failure(f));
        }
        self.view(self.row(&manifest.name).await?).await
    }

    /// Replaces the archive of `row` (installed from an upload or a catalog) with `bytes`,
    /// already checked against `entry`, and has every replica load it: the old version serves
    /// until the new one does (a zero-drop reload). If it does not serve here, the old archive
    /// is put back (unless another install replaced it meanwhile) and reloaded, and the answer
    /// says why the new one failed. It runs to its end even if the client goes away.
    pub(super) async fn upgrade(&self, row: PluginRow, bytes: Vec<u8>, entry: CatalogEntry) -> Result<Plugin> {
        let this = self.clone();
        tokio::spawn(async move { this.upgrade_to_end(row, bytes, entry).await })
            .await
            .map_err(|e| internal(format!("the upgrade task failed: {e}")))?
    }

    async fn upgrade_to_end(&self, row: PluginRow, bytes: Vec<u8>, entry: CatalogEntry) -> Result<Plugin> {
        let sha256 = sha256_hex(&bytes);
        let replaced = self.repo.replace_archive(row.id, &bytes, &sha256, "catalog", None).await.map_err(db_error)?;
        let Replaced::Done { sha256: old_sha256, archive: old_bytes, origin: old_origin } = replaced else {
            let msg =
                format!("{:?} was installed before kiln kept archives; uninstall it and install it again", row.name);
            return Err(ErrorResponse::new(ErrorCode::PluginExists, msg));
        };
        tracing::info!(plugin = %row.name, from = %row.version, to = %entry.version, "upgrading from a catalog");
        let f = match self.reconciler.reconcile(row.id, false).await {
            Ok(_) => {
                let now = self.row(&row.name).await?;
                // A pass that kept the old sources (one that could not unpack the new archive)
                // succeeds without upgrading: that is a failure here.
                if !now.wants_active() || same_version(&now.version, &entry.version) {
                    return self.view(now).await;
                }
                let message = format!("the new version did not load here ({} still serves; see the log)", now.version);
                Failure { code: ErrorCode::LoadError, message }
            }
            Err(f) if f.code == ErrorCode::Internal => {
                // The server is stopping: the next start carries on with the new archive.
                return Err(failure(f));
            }
            Err(f) => f,
        };
        tracing::warn!(plugin = %row.name, to = %entry.version, "the upgrade failed, rolling back: {}", f.message);
        let restored = self.repo.replace_archive(row.id, &old_bytes, &old_sha256, &old_origin, Some(&sha256)).await;
        let what = match restored {
            Ok(Replaced::Done { .. }) => match self.reconciler.reconcile(row.id, false).await {
                Ok(_) => format!("was rolled back to {}", row.version),
                Err(again) => {
                    format!("was rolled back to {}, which did not load again ({})", row.version, again.message)
                }
            },
            Ok(Replaced::NotThat(_)) => "was not rolled back: another install replaced the archive meanwhile".into(),
            Ok(Replaced::NoArchive) => "was not rolled back: the plugin's archive is gone (uninstalled?)".into(),
            Err(e) => {
                tracing::error!(plugin = %row.name, "could not put the old archive back: {e}");
                format!("could not be rolled back ({e})")
            }
        };
        let message = format!("the upgrade to {} failed and {what}: {}", entry.version, f.message);
        Err(failure(Failure { code: f.code, message }))
    }
}

/// Whether two version strings name the same semver version.
fn same_version(a: &str, b: &str) -> bool {
    matches!((semver::Version::parse(a), semver::Version::parse(b)), (Ok(a), Ok(b)) if a == b)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes))
}
