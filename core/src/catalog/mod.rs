//! Plugin catalogs: sources that list plugin archives (`catalog.json`), synced into
//! `catalog_plugins`, from which a plugin is installed or upgraded after its archive is checked
//! (sha256 always; an ed25519 signature when the server trusts keys). The install itself is
//! the upload's (`http::admin`): the same safe unpacking, and the reconciler's zero-drop
//! reload for an upgrade.

pub mod fetch;
pub mod index;
pub mod trust;

use crate::repo::{CatalogEntry, CatalogSource, ListedEntry, Repo, RepoError};
use fetch::Location;
use std::sync::Arc;
use std::time::Duration;
use trust::{TrustedKeys, Untrusted};

/// The largest `catalog.json` read.
const INDEX_CAP: u64 = 4 << 20;

/// The largest archive downloaded: what an upload may unpack to at most.
const ARCHIVE_CAP: u64 = 64 << 20;

/// Why an archive is not installed.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("{0}")]
    Untrusted(#[from] Untrusted),
    #[error("could not download the archive: {0}")]
    Unavailable(String),
}

/// The catalogs a server reads from.
pub struct Catalog {
    repo: Repo,
    /// Made at the first download (its TLS roots are not loaded at every start).
    http: std::sync::OnceLock<Result<reqwest::Client, String>>,
    pub keys: TrustedKeys,
    /// One sync at a time (a periodic one and `POST /catalog/sync`).
    syncing: tokio::sync::Mutex<()>,
    /// One install at a time, so that an upgrade's roll-back restores what it replaced.
    pub installing: tokio::sync::Mutex<()>,
}

impl Catalog {
    pub fn new(repo: Repo, keys: TrustedKeys) -> Self {
        Self { repo, http: Default::default(), keys, syncing: Default::default(), installing: Default::default() }
    }

    fn http(&self) -> Result<&reqwest::Client, String> {
        let made = self.http.get_or_init(|| {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .timeout(Duration::from_secs(120))
                .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| format!("no HTTP client: {e}"))
        });
        made.as_ref().map_err(Clone::clone)
    }

    /// Reads every source's `catalog.json` and replaces its entries; a source that cannot be
    /// read keeps its last good entries and records why. Returns the sources as they stand.
    pub async fn sync(&self) -> Result<Vec<CatalogSource>, RepoError> {
        let _one = self.syncing.lock().await;
        for source in self.repo.catalog_sources().await? {
            if !self.keys.required() && source.url.to_ascii_lowercase().starts_with("http://") {
                tracing::warn!(
                    catalog = %source.url,
                    "a catalog over plain HTTP without trusted keys: whoever is on the path can change what installs"
                );
            }
            let failed = match self.read_index(&source.url).await {
                Ok(index) => {
                    let refused = serde_json::Value::from(index.refused);
                    match self.repo.replace_catalog_entries(source.id, &index.entries, &refused).await {
                        Ok(()) => {
                            tracing::info!(catalog = %source.url, entries = index.entries.len(), "synced");
                            None
                        }
                        Err(e @ RepoError::Unavailable(_)) => return Err(e),
                        Err(e) => Some(format!("its entries could not be stored: {e}")),
                    }
                }
                Err(e) => Some(e),
            };
            if let Some(e) = failed {
                tracing::warn!(catalog = %source.url, "could not sync: {e}");
                self.repo.record_catalog_failure(source.id, &e).await?;
            }
        }
        self.repo.catalog_sources().await
    }

    async fn read_index(&self, source: &str) -> Result<index::Index, String> {
        let at = Location::parse(source)?;
        let text = at.fetch(self.http()?, INDEX_CAP).await?;
        index::parse(&text, &at)
    }

    /// Downloads an entry's archive and checks it: a signature is checked before anything is
    /// downloaded, the bytes after.
    pub async fn download(&self, entry: &CatalogEntry) -> Result<Vec<u8>, DownloadError> {
        self.keys.check_signature(&entry.sha256, entry.signature.as_deref())?;
        let http = self.http().map_err(DownloadError::Unavailable)?;
        let bytes =
            Location::archive(&entry.archive_url).fetch(http, ARCHIVE_CAP).await.map_err(DownloadError::Unavailable)?;
        self.keys.check(&bytes, &entry.sha256, entry.signature.as_deref())?;
        Ok(bytes)
    }

    /// Syncs every `every` (the first time at once), until the task is aborted.
    pub fn spawn_periodic(self: Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = self.sync().await {
                    tracing::warn!("periodic catalog sync: {e}");
                }
            }
        })
    }
}

/// The entry to install among `listed` (all of one name): `version` if given (the first source
/// listing it), else the highest version (on a tie, the first source's).
pub fn pick(listed: Vec<ListedEntry>, version: Option<&str>) -> Option<ListedEntry> {
    let parse = |v: &str| semver::Version::parse(v).ok();
    let rank = |v: &str| parse(v).map(|v| (v.pre.is_empty(), v));
    match version {
        Some(v) => {
            let wanted = parse(v)?;
            listed.into_iter().find(|e| parse(&e.entry.version).as_ref() == Some(&wanted))
        }
        None => listed.into_iter().fold(None, |best: Option<ListedEntry>, e| match &best {
            Some(b) if rank(&b.entry.version) >= rank(&e.entry.version) => best,
            _ => Some(e),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(version: &str, repository_id: i64) -> ListedEntry {
        ListedEntry {
            entry: CatalogEntry {
                name: "p".into(),
                version: version.into(),
                description: String::new(),
                archive_url: format!("/r{repository_id}/{version}"),
                sha256: String::new(),
                signature: None,
            },
            repository: format!("r{repository_id}"),
            repository_id,
        }
    }

    #[test]
    fn the_highest_version_or_the_one_asked_for_from_the_first_source() {
        let all = || vec![listed("1.2.0", 1), listed("1.10.0", 1), listed("1.10.0", 2), listed("2.0.0-rc.1", 2)];
        let got = |v| pick(all(), v).map(|e| (e.entry.version, e.repository_id));
        assert_eq!(got(None), Some(("1.10.0".into(), 1)), "a release, numerically highest, first source");
        assert_eq!(got(Some("2.0.0-rc.1")), Some(("2.0.0-rc.1".into(), 2)));
        assert!(pick(vec![listed("2.0.0-rc.1", 1)], None).is_some());
        assert_eq!(got(Some("1.10.0")), Some(("1.10.0".into(), 1)));
        assert_eq!(got(Some("1.2")), None, "not a version");
        assert_eq!(got(Some("3.0.0")), None);
        assert!(pick(vec![listed("1.0.0", 2), listed("1.0.0", 1)], None).is_some_and(|e| e.repository_id == 2));
    }
}
