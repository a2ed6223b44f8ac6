//! Discovery: finds plugin crates under the plugin directories.
//!
//! Discovery only reads manifests; it neither builds nor loads. Its results become rows of
//! `plugins` (see `startup`), and the reconciler takes it from there.

use crate::config::FileConfig;
use crate::manifest::{Manifest, ManifestError};
use crate::repo::{Discovered, Repo, RepoError};
use std::path::{Path, PathBuf};
use walkdir::WalkDir;

/// How deep below a plugin directory a plugin crate may sit.
const MAX_DEPTH: usize = 4;

/// What a scan found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Plugin crates, in path order.
    pub plugins: Vec<Manifest>,
    /// Crates that look like plugins but whose manifest is unusable, and unreadable directories.
    pub errors: Vec<(PathBuf, String)>,
}

/// Scans every directory in `dirs` for plugin crates. A missing directory is reported, not fatal.
pub fn scan(dirs: &[PathBuf]) -> Scan {
    let mut scan = Scan::default();
    for dir in dirs {
        if !dir.is_dir() {
            scan.errors.push((dir.clone(), "plugin directory does not exist".into()));
            continue;
        }
        scan_dir(dir, &mut scan);
    }
    scan
}

fn scan_dir(root: &Path, scan: &mut Scan) {
    let mut walk = WalkDir::new(root).max_depth(MAX_DEPTH).sort_by_file_name().into_iter();
    while let Some(entry) = walk.next() {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                scan.errors.push((e.path().unwrap_or(root).to_path_buf(), e.to_string()));
                continue;
            }
        };
        if !entry.file_type().is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy();
        if entry.depth() > 0 && (name.starts_with('.') || name == "target") {
            walk.skip_current_dir();
            continue;
        }
        if !entry.path().join("Cargo.toml").is_file() {
            continue;
        }
        match Manifest::read(entry.path()) {
            Ok(m) => {
                scan.plugins.push(m);
                // A plugin crate's subdirectories are its own business.
                walk.skip_current_dir();
            }
            // Ordinary crates (a plugin's helper library, a workspace root) are not errors.
            Err(ManifestError::NotAPlugin(_)) => {}
            Err(e) => scan.errors.push((entry.path().to_path_buf(), e.to_string())),
        }
    }
}

/// Scans `dirs` and inserts a row for every plugin crate that has none; logs unusable crates.
/// Rows that exist are left alone: their `source_path` and `status` are the user's.
pub async fn record(repo: &Repo, dirs: &[PathBuf], policy: &FileConfig) -> Result<(Scan, Vec<String>), RepoError> {
    let scan = tokio::task::spawn_blocking({
        let dirs = dirs.to_vec();
        move || scan(&dirs)
    })
    .await
    .unwrap_or_else(|e| Scan { plugins: Vec::new(), errors: vec![(PathBuf::new(), format!("discovery failed: {e}"))] });
    for (path, error) in &scan.errors {
        tracing::warn!(path = %path.display(), "discovery: {error}");
    }
    let paths: Vec<String> = scan.plugins.iter().map(|m| m.dir.to_string_lossy().into_owned()).collect();
    let found: Vec<Discovered> = scan
        .plugins
        .iter()
        .zip(&paths)
        .map(|(m, dir)| Discovered {
            name: &m.name,
            source_path: dir,
            description: &m.description,
            version: &m.version,
            author: &m.author,
            kind: &m.kind,
            origin: "discovered",
            status: policy.initial_status(&m.name),
        })
        .collect();
    let inserted = if found.is_empty() { Vec::new() } else { repo.insert_discovered_all(&found).await? };
    let mut added = Vec::new();
    for (m, inserted) in scan.plugins.iter().zip(inserted) {
        if inserted {
            tracing::info!(plugin = %m.name, dir = %m.dir.display(), "discovered");
            added.push(m.name.clone());
        }
    }
    Ok((scan, added))
}
