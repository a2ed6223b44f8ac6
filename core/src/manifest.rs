//! Plugin manifests: a plugin is a Cargo crate whose `Cargo.toml` has a `[package.metadata.kiln]`
//! table. Name, version, description and authors come from `[package]`, so they are written once.
//!
//! ```toml
//! [package]
//! name = "powertable"
//! version = "0.1.0"
//! description = "…"
//!
//! [package.metadata.kiln]
//! type = "http"        # optional; the only kind today
//! tables = ["notes"]   # optional; tables of its own in PostgreSQL (see `plugin_db`)
//! dependencies = ["notes", { name = "audit", version = "^0.1" }]   # optional: served first
//! isolation = "process"   # optional: run it in a process of its own (default "in_process")
//! memoryLimitMb = 256     # optional, with process isolation: the memory it may map
//! cpuLimitSeconds = 3600  # optional, with process isolation: CPU time before a restart
//! ```

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// A plugin crate's manifest, read from its `Cargo.toml`.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// The plugin's name: the Cargo package name.
    pub name: String,
    pub version: String,
    pub description: String,
    pub author: String,
    /// Kind of plugin (`http`).
    pub kind: String,
    /// JSON Schema of the plugin's configuration (`configSchema`), if it declares one.
    pub config_schema: Option<serde_json::Value>,
    /// `reloadOnConfigChange`: a config change always gets a fresh instance, without asking the
    /// plugin's `configure` hook.
    pub reload_on_config_change: bool,
    /// `tables`: the tables of its own the plugin uses (its migrations create them). Declaring
    /// any gives the plugin a PostgreSQL schema and role (see `plugin_db`).
    pub tables: Vec<String>,
    /// `dependencies`: plugins that must serve (in a matching version) before this one loads.
    pub dependencies: Vec<Dependency>,
    /// `isolation`, `memoryLimitMb`, `cpuLimitSeconds`: how it runs (the row may override).
    pub isolation: crate::isolation::Isolation,
    /// The crate directory.
    pub dir: PathBuf,
    /// The `Cargo.toml` file.
    pub manifest_path: PathBuf,
}

/// A plugin another plugin depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct Dependency {
    pub name: String,
    /// The versions that will do (any, when absent).
    pub version: Option<semver::VersionReq>,
}

impl std::fmt::Display for Dependency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.version {
            Some(v) => write!(f, "{} {v}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// A `dependencies` entry as written: a name, or a table with a version requirement.
#[derive(Deserialize)]
#[serde(untagged)]
enum DependencyEntry {
    Name(String),
    Table { name: String, version: Option<String> },
}

/// Why a directory is not a usable plugin crate.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// There is no Cargo.toml in the directory.
    #[error("no plugin manifest: {0} does not exist")]
    NotFound(PathBuf),
    /// The Cargo.toml cannot be read or parsed, or its fields are unusable.
    #[error("invalid plugin manifest {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    /// A Cargo crate, but not a kiln plugin.
    #[error("{0} is not a kiln plugin: it has no [package.metadata.kiln] table")]
    NotAPlugin(PathBuf),
}

#[derive(Deserialize)]
struct CargoToml {
    package: Option<Package>,
}

#[derive(Deserialize)]
struct Package {
    name: String,
    version: Option<toml::Value>,
    description: Option<toml::Value>,
    authors: Option<toml::Value>,
    metadata: Option<PackageMetadata>,
}

#[derive(Deserialize)]
struct PackageMetadata {
    kiln: Option<KilnTable>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KilnTable {
    #[serde(rename = "type", default = "default_kind")]
    kind: String,
    #[serde(rename = "configSchema")]
    config_schema: Option<toml::Value>,
    #[serde(rename = "reloadOnConfigChange", default)]
    reload_on_config_change: bool,
    #[serde(default)]
    tables: Vec<String>,
    #[serde(default)]
    dependencies: Vec<DependencyEntry>,
    isolation: Option<String>,
    #[serde(rename = "memoryLimitMb")]
    memory_limit_mb: Option<u32>,
    #[serde(rename = "cpuLimitSeconds")]
    cpu_limit_seconds: Option<u32>,
}

fn default_kind() -> String {
    "http".to_string()
}

/// How long reading a user's crate directory may take before kiln gives up on it: a
/// `Cargo.toml` that is a FIFO, or lies on a hung network mount, would block forever.
pub const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Manifest {
    /// [`Manifest::read`] on the blocking pool, given up after [`READ_TIMEOUT`]: what a user
    /// names (a row's `source_path`) must never block an async worker. A read that hangs keeps
    /// one blocking-pool thread until it returns; the caller goes on at once.
    pub async fn read_off_worker(dir: &Path) -> Result<Self, ManifestError> {
        let owned = dir.to_path_buf();
        match tokio::time::timeout(READ_TIMEOUT, tokio::task::spawn_blocking(move || Self::read(&owned))).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(invalid(&dir.join("Cargo.toml"), format!("the read failed: {e}"))),
            Err(_) => Err(invalid(
                &dir.join("Cargo.toml"),
                format!("reading it did not finish within {READ_TIMEOUT:?} (a FIFO, or a hung mount?)"),
            )),
        }
    }

    /// Reads the manifest of the plugin crate in `dir`. Blocking: see [`Manifest::read_off_worker`].
    pub fn read(dir: &Path) -> Result<Self, ManifestError> {
        let manifest_path = dir.join("Cargo.toml");
        let text = match std::fs::read_to_string(&manifest_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ManifestError::NotFound(manifest_path)),
            Err(e) => return Err(invalid(&manifest_path, e.to_string())),
        };
        Self::parse(&text, dir, manifest_path)
    }

    fn parse(text: &str, dir: &Path, manifest_path: PathBuf) -> Result<Self, ManifestError> {
        let cargo: CargoToml = toml::from_str(text).map_err(|e| invalid(&manifest_path, e.message().to_string()))?;
        let package = cargo.package.ok_or_else(|| invalid(&manifest_path, "no [package] table".into()))?;
        let kiln =
            package.metadata.and_then(|m| m.kiln).ok_or_else(|| ManifestError::NotAPlugin(manifest_path.clone()))?;
        validate_name(&package.name).map_err(|reason| invalid(&manifest_path, reason))?;
        if kiln.kind != "http" {
            return Err(invalid(&manifest_path, format!("unknown plugin type {:?} (known: \"http\")", kiln.kind)));
        }
        let config_schema = match kiln.config_schema {
            Some(t) => {
                let schema = serde_json::to_value(t).map_err(|e| invalid(&manifest_path, e.to_string()))?;
                crate::plugin_config::check_schema(&schema).map_err(|e| invalid(&manifest_path, e))?;
                Some(schema)
            }
            None => None,
        };
        for table in &kiln.tables {
            crate::plugin_db::check_identifier(table).map_err(|e| invalid(&manifest_path, format!("tables: {e}")))?;
        }
        let process = match kiln.isolation.as_deref().map(crate::isolation::Isolation::mode) {
            None => false,
            Some(Some(process)) => process,
            Some(None) => {
                let msg =
                    format!("isolation: {:?} is not \"in_process\" or \"process\"", kiln.isolation.unwrap_or_default());
                return Err(invalid(&manifest_path, msg));
            }
        };
        if [kiln.memory_limit_mb, kiln.cpu_limit_seconds].contains(&Some(0)) {
            return Err(invalid(&manifest_path, "memoryLimitMb and cpuLimitSeconds must be positive".into()));
        }
        let isolation = crate::isolation::Isolation {
            process,
            memory_limit_mb: kiln.memory_limit_mb,
            cpu_limit_s: kiln.cpu_limit_seconds,
        };
        let mut dependencies: Vec<Dependency> = Vec::new();
        for entry in kiln.dependencies {
            let (name, version) = match entry {
                DependencyEntry::Name(name) => (name, None),
                DependencyEntry::Table { name, version } => (name, version),
            };
            validate_name(&name).map_err(|e| invalid(&manifest_path, format!("dependencies: {e}")))?;
            if name == package.name {
                return Err(invalid(
                    &manifest_path,
                    format!("dependencies: a plugin cannot depend on itself ({name})"),
                ));
            }
            if dependencies.iter().any(|d| d.name == name) {
                return Err(invalid(&manifest_path, format!("dependencies: {name} is listed twice")));
            }
            let version = match version {
                Some(v) => Some(semver::VersionReq::parse(&v).map_err(|e| {
                    invalid(&manifest_path, format!("dependencies: {name}: version requirement {v:?}: {e}"))
                })?),
                None => None,
            };
            dependencies.push(Dependency { name, version });
        }
        Ok(Self {
            name: package.name,
            version: plain_string(package.version),
            description: plain_string(package.description),
            author: match package.authors {
                Some(toml::Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(", "),
                _ => String::new(),
            },
            kind: kiln.kind,
            config_schema,
            reload_on_config_change: kiln.reload_on_config_change,
            tables: kiln.tables,
            dependencies,
            isolation,
            dir: dir.to_path_buf(),
            manifest_path,
        })
    }
}

/// A string field, or empty when absent or inherited from a workspace (`x.workspace = true`).
fn plain_string(v: Option<toml::Value>) -> String {
    v.and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

fn invalid(path: &Path, reason: String) -> ManifestError {
    ManifestError::Invalid { path: path.to_path_buf(), reason }
}

/// A plugin name becomes a URL segment, a file name and a library name: 1–64 characters of
/// `A-Z a-z 0-9 _ -`, starting with a letter or digit (the same rule as the table's CHECK).
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok_len = (1..=64).contains(&name.len());
    let ok_first = name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok_len && ok_first && ok_chars {
        Ok(())
    } else {
        Err(format!(
            "invalid plugin name {name:?}: use 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-', starting with a letter or digit"
        ))
    }
}

/// Whether `path` exists, asked on the blocking pool with [`READ_TIMEOUT`]. `None`: no answer in
/// time (a hung mount), which callers must not take for "gone".
pub async fn exists_off_worker(path: &Path) -> Option<bool> {
    let owned = path.to_path_buf();
    tokio::time::timeout(READ_TIMEOUT, tokio::task::spawn_blocking(move || owned.exists())).await.ok()?.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Manifest, ManifestError> {
        Manifest::parse(text, Path::new("/p"), PathBuf::from("/p/Cargo.toml"))
    }

    #[test]
    fn reads_package_fields() {
        let m = parse(
            "[package]\nname = \"pt\"\nversion = \"1.2.3\"\ndescription = \"d\"\nauthors = [\"a\", \"b\"]\n[package.metadata.kiln]\n",
        )
        .unwrap();
        assert_eq!(
            (m.name.as_str(), m.version.as_str(), m.author.as_str(), m.kind.as_str()),
            ("pt", "1.2.3", "a, b", "http")
        );
    }

    #[test]
    fn reads_a_config_schema_and_refuses_a_broken_one() {
        let m = parse("[package]\nname = \"x\"\n[package.metadata.kiln.configSchema]\ntype = \"object\"\nproperties.a = { type = \"integer\", default = 3 }\n").unwrap();
        assert_eq!(m.config_schema.unwrap()["properties"]["a"]["default"], 3);
        let broken = parse("[package]\nname = \"x\"\n[package.metadata.kiln.configSchema]\ntype = \"nonsense\"\n");
        assert!(matches!(broken, Err(ManifestError::Invalid { .. })), "{broken:?}");
    }

    #[test]
    fn reads_tables_and_refuses_unplain_names() {
        let m = parse("[package]\nname = \"x\"\n[package.metadata.kiln]\ntables = [\"notes\", \"tags_2\"]\n").unwrap();
        assert_eq!(m.tables, ["notes", "tags_2"]);
        let isolated =
            parse("[package]\nname = \"x\"\n[package.metadata.kiln]\nisolation = \"process\"\nmemoryLimitMb = 64\n");
        let isolated = isolated.unwrap().isolation;
        assert!(isolated.process && isolated.memory_limit_mb == Some(64) && isolated.cpu_limit_s.is_none());
        assert!(parse("[package]\nname = \"x\"\n[package.metadata.kiln]\nisolation = \"jail\"\n").is_err());
        let bad = parse("[package]\nname = \"x\"\n[package.metadata.kiln]\ntables = [\"public.notes\"]\n");
        assert!(matches!(bad, Err(ManifestError::Invalid { .. })), "{bad:?}");
    }

    #[test]
    fn reads_dependencies_and_refuses_bad_ones() {
        let kiln = "[package]\nname = \"x\"\n[package.metadata.kiln]\n";
        let m = parse(&format!("{kiln}dependencies = [\"a\", {{ name = \"b\", version = \"^1.2\" }}]\n")).unwrap();
        let deps: Vec<String> = m.dependencies.iter().map(ToString::to_string).collect();
        assert_eq!(deps, ["a", "b ^1.2"]);
        for bad in ["[\"x\"]", "[\"a\", \"a\"]", "[{ name = \"a\", version = \"one\" }]", "[\"a b\"]"] {
            let refused = parse(&format!("{kiln}dependencies = {bad}\n"));
            assert!(matches!(refused, Err(ManifestError::Invalid { .. })), "{bad}: {refused:?}");
        }
    }

    #[test]
    fn a_crate_without_the_kiln_table_is_not_a_plugin() {
        assert!(matches!(parse("[package]\nname = \"x\"\n"), Err(ManifestError::NotAPlugin(_))));
    }

    #[test]
    fn bad_toml_and_bad_names_are_invalid() {
        assert!(matches!(parse("[package\n"), Err(ManifestError::Invalid { .. })));
        assert!(matches!(
            parse("[package]\nname = \"../x\"\n[package.metadata.kiln]\n"),
            Err(ManifestError::Invalid { .. })
        ));
        assert!(matches!(
            parse("[package]\nname = \"x\"\n[package.metadata.kiln]\ntype = \"grpc\"\n"),
            Err(ManifestError::Invalid { .. })
        ));
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("power-table_2").is_ok());
        for bad in ["", "-x", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
