//! The catalog endpoints: what the catalogs list, their sources, a sync now, and an install or
//! upgrade from a catalog (through the upload's safe path: see `install.rs`).

use super::wire::Plugin;
use super::{AdminApi, Tag, db_error};
use crate::catalog::{self, Catalog, DownloadError, trust::Untrusted};
use crate::error_code::ErrorCode;
use crate::http::error::ErrorResponse;
use crate::manifest::validate_name;
use crate::repo::{CatalogEntry, CatalogSource, ListedEntry, PluginRow};
use chrono::{DateTime, Utc};
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi};
use std::sync::Arc;

type Result<T> = std::result::Result<Json<T>, ErrorResponse>;

/// The catalog endpoints (beside the rest of the admin API).
pub struct CatalogApi {
    pub admin: AdminApi,
    pub catalog: Arc<Catalog>,
}

/// A plugin some catalog lists, with every version listed and the one installed here.
#[derive(Debug, Object)]
pub struct CatalogPlugin {
    pub name: String,
    /// The description of the latest version.
    pub description: String,
    /// What an install without `version` installs: the highest release (a pre-release only if
    /// nothing else is listed).
    pub latest: String,
    /// The version installed now, if the plugin is installed.
    #[oai(nullable)]
    pub installed: Option<String>,
    /// Whether `latest` is newer than the installed version.
    pub upgrade: bool,
    /// Every listed version, newest first.
    pub versions: Vec<CatalogVersion>,
}

/// One listed version of a plugin.
#[derive(Debug, Object)]
pub struct CatalogVersion {
    pub version: String,
    /// The catalog that lists it.
    pub repository: String,
    pub archive_url: String,
    pub sha256: String,
    pub signed: bool,
    /// Whether this server would install it: signed by one of its trusted keys, or no keys are
    /// configured (then only the sha256 is checked).
    pub trusted: bool,
}

/// A catalog source and its last sync.
#[derive(Debug, Object)]
pub struct CatalogSourceView {
    /// An http(s) URL or a directory, serving `catalog.json`.
    pub url: String,
    #[oai(nullable)]
    pub synced_at: Option<DateTime<Utc>>,
    /// Why the last sync failed (its last good entries are kept).
    #[oai(nullable)]
    pub error: Option<String>,
    /// Entries kept.
    pub entries: i64,
    /// Entries the last sync refused, each `{"entry", "error"}`.
    pub refused: serde_json::Value,
}

impl From<CatalogSource> for CatalogSourceView {
    fn from(s: CatalogSource) -> Self {
        Self { url: s.url, synced_at: s.synced_at, error: s.sync_error, entries: s.entries, refused: s.refused }
    }
}

#[OpenApi]
impl CatalogApi {
    /// The plugin named `name`, as a catalog install of `entry` sees it. A plugin that was not
    /// installed from an archive is refused (409): kiln does not replace its source.
    async fn existing(&self, name: &str, entry: &CatalogEntry) -> std::result::Result<Existing, ErrorResponse> {
        let Some(row) = self.admin.repo.get_by_name(name).await.map_err(db_error)? else { return Ok(Existing::None) };
        if !row.from_archive() {
            let msg = format!(
                "{:?} was not installed from an archive (origin {:?}): kiln does not replace its source",
                row.name, row.origin
            );
            return Err(ErrorResponse::new(ErrorCode::PluginExists, msg));
        }
        let current = self.admin.repo.archive_sha256(row.id).await.map_err(db_error)?;
        if current.as_deref() == Some(entry.sha256.as_str()) {
            return Ok(Existing::Installed(self.admin.view(row).await?));
        }
        Ok(Existing::Other(row))
    }

    /// List what the catalogs offer (as of their last sync), with the installed versions.
    #[oai(path = "/catalog", method = "get", tag = "Tag::Catalog")]
    async fn list(&self) -> Result<Vec<CatalogPlugin>> {
        let listed = self.admin.repo.catalog_entries(None).await.map_err(db_error)?;
        let installed = self.admin.repo.list().await.map_err(db_error)?;
        let mut plugins = Vec::new();
        let mut rest = listed.as_slice();
        while let Some(first) = rest.first() {
            let n = rest.iter().take_while(|e| e.entry.name == first.entry.name).count();
            let (same, next) = rest.split_at(n);
            let row = installed.iter().find(|r| r.name == first.entry.name);
            plugins.extend(self.plugin(same, row.map(|r| r.version.as_str())));
            rest = next;
        }
        Ok(Json(plugins))
    }

    /// List the catalog sources and how their last sync went.
    #[oai(path = "/catalog/sources", method = "get", tag = "Tag::Catalog")]
    async fn sources(&self) -> Result<Vec<CatalogSourceView>> {
        let sources = self.admin.repo.catalog_sources().await.map_err(db_error)?;
        Ok(Json(sources.into_iter().map(Into::into).collect()))
    }

    /// Sync every catalog now (kiln also syncs every `--catalog-sync-secs`). A source that
    /// cannot be read keeps its last entries and shows why.
    #[oai(path = "/catalog/sync", method = "post", tag = "Tag::Catalog")]
    async fn sync(&self) -> Result<Vec<CatalogSourceView>> {
        let sources = self.catalog.sync().await.map_err(db_error)?;
        Ok(Json(sources.into_iter().map(Into::into).collect()))
    }

    /// Install a plugin from a catalog (`version`, or the latest), or upgrade it if it was
    /// installed from an archive. The archive is downloaded and checked (sha256; the signature
    /// when trusted keys are configured) before anything changes. An upgrade is a zero-drop
    /// reload; if the new version does not serve, the old one is put back and the answer says
    /// why. Installing the version already installed changes nothing.
    #[oai(path = "/catalog/:name/install", method = "post", tag = "Tag::Catalog")]
    async fn install(
        &self,
        #[oai(validator(pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"))] name: Path<String>,
        #[oai(validator(max_length = 100))] version: Query<Option<String>>,
    ) -> Result<Plugin> {
        validate_name(&name).map_err(|msg| ErrorResponse::new(ErrorCode::InvalidName, msg))?;
        let listed = self.admin.repo.catalog_entries(Some(&name)).await.map_err(db_error)?;
        let Some(pick) = catalog::pick(listed, version.as_deref()) else {
            let which = version.as_deref().map(|v| format!(" version {v:?}")).unwrap_or_default();
            let msg = format!("no catalog lists {:?}{which} (POST /catalog/sync reads them again)", &*name);
            return Err(ErrorResponse::new(ErrorCode::NotInCatalog, msg));
        };
        let entry = pick.entry;
        // Nothing is downloaded for a plugin that is installed already, or that kiln would not replace.
        if let Existing::Installed(plugin) = self.existing(&name, &entry).await? {
            return Ok(Json(plugin));
        }
        // Checked (signature, sha256, then the manifest against the entry) before anything else.
        let bytes = self.catalog.download(&entry).await.map_err(|e| {
            let code = match &e {
                DownloadError::Untrusted(Untrusted::Checksum { .. }) => ErrorCode::ChecksumMismatch,
                DownloadError::Untrusted(_) => ErrorCode::SignatureInvalid,
                DownloadError::Unavailable(_) => ErrorCode::CatalogUnavailable,
            };
            tracing::warn!(plugin = %entry.name, version = %entry.version, "not installed from {}: {e}", pick.repository);
            ErrorResponse::new(code, format!("{}@{} from {}: {e}", entry.name, entry.version, pick.repository))
        })?;
        let (extracted, manifest, bytes) = self.admin.unpack(bytes, Some(&entry)).await?;
        // Again under the lock: another install may have come first.
        let _one = self.catalog.installing.lock().await;
        let plugin = match self.existing(&name, &entry).await? {
            Existing::None => self.admin.install_new(extracted, manifest, bytes, "catalog").await?,
            Existing::Installed(plugin) => plugin,
            Existing::Other(row) => {
                drop(extracted);
                self.admin.upgrade(row, bytes, entry).await?
            }
        };
        Ok(Json(plugin))
    }
}

/// What a catalog install finds of the plugin it installs.
enum Existing {
    None,
    /// The entry's archive is installed already: the plugin as it is.
    Installed(Plugin),
    /// Another archive is installed: an upgrade.
    Other(PluginRow),
}

impl CatalogApi {
    /// One plugin's listing: `same` holds every entry of one name.
    fn plugin(&self, same: &[ListedEntry], installed: Option<&str>) -> Option<CatalogPlugin> {
        let latest = catalog::pick(same.to_vec(), None)?;
        let parse = |v: &str| semver::Version::parse(v).ok();
        let mut versions: Vec<&ListedEntry> = same.iter().collect();
        versions.sort_by_key(|e| std::cmp::Reverse(parse(&e.entry.version)));
        let upgrade = installed.is_some_and(|i| parse(i) < parse(&latest.entry.version));
        Some(CatalogPlugin {
            name: latest.entry.name.clone(),
            description: latest.entry.description.clone(),
            latest: latest.entry.version.clone(),
            installed: installed.map(str::to_string),
            upgrade,
            versions: versions
                .into_iter()
                .map(|e| CatalogVersion {
                    version: e.entry.version.clone(),
                    repository: e.repository.clone(),
                    archive_url: e.entry.archive_url.clone(),
                    sha256: e.entry.sha256.clone(),
                    signed: e.entry.signature.is_some(),
                    trusted: self.catalog.keys.check_signature(&e.entry.sha256, e.entry.signature.as_deref()).is_ok(),
                })
                .collect(),
        })
    }
}
