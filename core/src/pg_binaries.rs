//! Finding PostgreSQL's server binaries (`initdb`, `pg_ctl`, `postgres`) for the private cluster.
//!
//! Distributions put them in different places, and most keep them off `PATH`: Debian and Ubuntu
//! in `/usr/lib/postgresql/<major>/bin`, PostgreSQL's own RPMs in `/usr/pgsql-<major>/bin`,
//! Homebrew in `<prefix>/opt/postgresql@<major>/bin`. kiln looks in this order: `KILN_PG_BIN`,
//! `PATH`, `pg_config --bindir`, then the known places, newest major version first. When a
//! cluster already exists, the binaries of its major version are preferred (a cluster can only
//! be started by the major version that created it).

use std::path::{Path, PathBuf};

/// The environment variable naming the directory of the server binaries.
pub const ENV: &str = "KILN_PG_BIN";

/// Directories tried after `PATH`; `*` stands for a major version (newest tried first).
const KNOWN_PLACES: &[&str] = &[
    "/usr/lib/postgresql/*/bin",                       // Debian, Ubuntu (apt install postgresql)
    "/usr/pgsql-*/bin",                                // PostgreSQL's own RPMs (RHEL, Fedora, Rocky)
    "/usr/lib64/pgsql/bin",                            // older Fedora and RHEL layouts
    "/opt/homebrew/opt/postgresql@*/bin",              // Homebrew on Apple silicon
    "/opt/homebrew/opt/postgresql/bin",                //
    "/usr/local/opt/postgresql@*/bin",                 // Homebrew on Intel macOS
    "/usr/local/opt/postgresql/bin",                   //
    "/home/linuxbrew/.linuxbrew/opt/postgresql@*/bin", // Homebrew on Linux
    "/usr/local/pgsql/bin",                            // built from source with the default prefix
    "/Applications/Postgres.app/Contents/Versions/latest/bin", // Postgres.app
];

/// Where the binaries are: `None` means "on `PATH`", `Some(dir)` a directory off it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBinaries(Option<PathBuf>);

impl PgBinaries {
    /// The path (or bare name, when on `PATH`) to run `program` by.
    pub fn program(&self, program: &str) -> PathBuf {
        match &self.0 {
            Some(dir) => dir.join(program),
            None => PathBuf::from(program),
        }
    }

    /// The directory, when it is not on `PATH`.
    pub fn dir(&self) -> Option<&Path> {
        self.0.as_deref()
    }
}

/// The binaries not found: the message names every place tried and what to do.
#[derive(Debug, thiserror::Error)]
#[error(
    "PostgreSQL's server binaries (initdb, pg_ctl, postgres) were not found. Looked in: {tried}. \
     Install them (Debian/Ubuntu: apt install postgresql; Fedora: dnf install postgresql-server; \
     macOS: brew install postgresql@15), set {ENV} to the directory that holds them, or set \
     DATABASE_URL to use a PostgreSQL you run yourself"
)]
pub struct NotFound {
    tried: String,
}

/// Finds the binaries. `cluster_version` is the major version of an existing cluster
/// (its `PG_VERSION` file), whose binaries are preferred.
pub fn find(cluster_version: Option<&str>) -> Result<PgBinaries, NotFound> {
    let explicit = std::env::var_os(ENV).map(PathBuf::from);
    find_in(explicit.as_deref(), std::env::var_os("PATH").as_deref(), KNOWN_PLACES, cluster_version)
}

/// [`find`] with its inputs spelled out (for tests).
fn find_in(
    explicit: Option<&Path>,
    path_var: Option<&std::ffi::OsStr>,
    known: &[&str],
    cluster_version: Option<&str>,
) -> Result<PgBinaries, NotFound> {
    let mut tried = Vec::new();
    if let Some(dir) = explicit {
        if has_server_binaries(dir) {
            return Ok(PgBinaries(Some(dir.to_path_buf())));
        }
        // An explicit setting that is wrong is an error, not something to guess around.
        return Err(NotFound { tried: format!("{} ({ENV})", dir.display()) });
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    let on_path = path_var.and_then(|p| std::env::split_paths(p).find(|d| has_server_binaries(d)));
    tried.push("PATH".to_string());
    if let Some(bindir) = pg_config_bindir(path_var) {
        candidates.push(bindir);
    }
    for pattern in known {
        tried.push((*pattern).to_string());
        candidates.extend(expand(pattern));
    }
    candidates.retain(|d| has_server_binaries(d));
    // An existing cluster needs its own major version; otherwise PATH first, then the newest.
    if let Some(v) = cluster_version {
        let matches = |d: &Path| {
            d.components().any(|c| {
                c.as_os_str().to_string_lossy().trim_start_matches("pgsql-").trim_start_matches("postgresql@") == v
            })
        };
        if let Some(d) = on_path.iter().chain(&candidates).find(|d| matches(d)) {
            return Ok(if Some(d) == on_path.as_ref() { PgBinaries(None) } else { PgBinaries(Some(d.clone())) });
        }
    }
    if on_path.is_some() {
        return Ok(PgBinaries(None));
    }
    candidates.into_iter().next().map(|d| PgBinaries(Some(d))).ok_or(NotFound { tried: tried.join(", ") })
}

/// Whether `dir` holds the three server binaries.
fn has_server_binaries(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"].iter().all(|p| dir.join(p).is_file())
}

/// `pg_config --bindir`, when `pg_config` is on `path_var`.
fn pg_config_bindir(path_var: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    let pg_config = std::env::split_paths(path_var?).map(|d| d.join("pg_config")).find(|p| p.is_file())?;
    let out = std::process::Command::new(pg_config).arg("--bindir").output().ok()?;
    let dir = String::from_utf8(out.stdout).ok()?;
    out.status.success().then(|| PathBuf::from(dir.trim()))
}

/// The directories matching `pattern` (at most one `*`, standing for a version), newest first.
fn expand(pattern: &str) -> Vec<PathBuf> {
    let Some((before, after)) = pattern.split_once('*') else { return vec![PathBuf::from(pattern)] };
    // Split at the last '/' before the star: the directory to list, and the name's prefix.
    let (parent, prefix) = before.rsplit_once('/').unwrap_or((".", before));
    let (suffix, rest) = after.split_once('/').map_or((after, ""), |(s, r)| (s, r));
    let Ok(entries) = std::fs::read_dir(if parent.is_empty() { "/" } else { parent }) else { return Vec::new() };
    let mut found: Vec<(Vec<u64>, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let version = name.strip_prefix(prefix)?.strip_suffix(suffix)?.to_string();
            let key = version.split('.').map(|p| p.parse::<u64>().ok()).collect::<Option<Vec<_>>>()?;
            Some((key, e.path().join(rest)))
        })
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0));
    found.into_iter().map(|(_, p)| p).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn fake_install(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        for p in ["initdb", "pg_ctl", "postgres"] {
            std::fs::write(dir.join(p), "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(dir.join(p), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    #[test]
    fn debian_layout_is_found_off_path_newest_first() {
        let root = tempfile::tempdir().unwrap();
        let lib = root.path().join("usr/lib/postgresql");
        for v in ["9.6", "13", "15"] {
            fake_install(&lib.join(v).join("bin"));
        }
        let pattern = format!("{}/*/bin", lib.display());
        let found = find_in(None, Some("/nonexistent".as_ref()), &[&pattern], None).unwrap();
        assert_eq!(found.dir(), Some(lib.join("15/bin").as_path()), "the newest major version");
        let found = find_in(None, Some("/nonexistent".as_ref()), &[&pattern], Some("13")).unwrap();
        assert_eq!(found.dir(), Some(lib.join("13/bin").as_path()), "an existing cluster's own version");
    }

    #[test]
    fn path_wins_and_the_explicit_setting_is_checked() {
        let root = tempfile::tempdir().unwrap();
        fake_install(&root.path().join("onpath"));
        fake_install(&root.path().join("known/16/bin"));
        let pattern = format!("{}/known/*/bin", root.path().display());
        let path = root.path().join("onpath").into_os_string();
        assert_eq!(find_in(None, Some(&path), &[&pattern], None).unwrap(), PgBinaries(None));
        let explicit = root.path().join("known/16/bin");
        assert_eq!(find_in(Some(&explicit), None, &[], None).unwrap().dir(), Some(explicit.as_path()));
        let wrong = root.path().join("empty");
        let err = find_in(Some(&wrong), Some(&path), &[&pattern], None).unwrap_err().to_string();
        assert!(err.contains("empty (KILN_PG_BIN)"), "{err}");
    }

    #[test]
    fn nothing_found_names_every_place_tried() {
        let root = tempfile::tempdir().unwrap();
        let places: Vec<String> = ["usr/lib/postgresql/*/bin", "usr/pgsql-*/bin", "opt/homebrew/opt/postgresql@*/bin"]
            .iter()
            .map(|p| format!("{}/{p}", root.path().display()))
            .collect();
        let places: Vec<&str> = places.iter().map(String::as_str).collect();
        let err = find_in(None, Some("/nonexistent".as_ref()), &places, None).unwrap_err().to_string();
        for place in places.iter().chain(&["PATH"]) {
            assert!(err.contains(place), "{place} missing from: {err}");
        }
        assert!(err.contains("apt install postgresql") && err.contains("DATABASE_URL"), "{err}");
    }
}
