//! `kiln new NAME [DIR]`: a plugin crate that builds, serves and passes its own tests at once.

use crate::manifest::validate_name;
use crate::routes::ADMIN_ROOTS;
use std::path::{Path, PathBuf};

const CARGO_TOML: &str = include_str!("template/Cargo.toml.txt");
const LIB_RS: &str = include_str!("template/lib.rs.txt");
const CARGO_CONFIG: &str = include_str!("template/cargo-config.toml.txt");
/// The example plugins' lock (the template's dependencies are theirs): a new crate resolves to
/// the versions kiln's build directory has built already, without asking the registry.
const CARGO_LOCK: &str = include_str!("template/Cargo.lock.txt");

/// Names a plugin crate from the template cannot have: its dependencies, and keywords.
const RESERVED: &[&str] =
    &["kiln-types", "kiln_types", "schemars", "serde", "self", "super", "crate", "test", "core", "std"];

/// Why no crate was written.
#[derive(Debug, thiserror::Error)]
pub enum NewError {
    #[error("{0}")]
    InvalidName(String),
    #[error("{} exists and is not empty: choose another directory", .0.display())]
    NotEmpty(PathBuf),
    #[error("could not write the crate: {0}")]
    Io(#[from] std::io::Error),
}

/// Writes plugin crate `name` into `dir` (which must not exist, or be empty), its
/// `kiln-types` dependency pointed at `types_dir`. Returns the files written.
pub fn write_crate(name: &str, dir: &Path, types_dir: &Path) -> Result<Vec<PathBuf>, NewError> {
    validate_name(name).map_err(NewError::InvalidName)?;
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(NewError::InvalidName(format!(
            "invalid plugin name {name:?}: cargo refuses a name that starts with a digit"
        )));
    }
    if RESERVED.contains(&name) {
        return Err(NewError::InvalidName(format!(
            "invalid plugin name {name:?}: a crate of this name cannot depend on the template's crates, or is a Rust keyword"
        )));
    }
    if ADMIN_ROOTS.contains(&name) {
        return Err(NewError::InvalidName(format!("invalid plugin name {name:?}: /{name} is kiln's own path")));
    }
    if std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(NewError::NotEmpty(dir.to_path_buf()));
    }
    let types_dir = std::path::absolute(types_dir)?;
    let types = toml::Value::String(types_dir.to_string_lossy().into_owned()).to_string();
    let files = [
        ("Cargo.toml", CARGO_TOML.replace("__NAME__", name)),
        ("src/lib.rs", LIB_RS.replace("__NAME__", name).replace("__TYPE__", &type_name(name))),
        (".cargo/config.toml", CARGO_CONFIG.replace("__TYPES__", &types)),
        (".gitignore", "/target\n".to_string()),
        ("Cargo.lock", lock_for(name)),
    ];
    let mut written = Vec::new();
    for (file, content) in files {
        let path = dir.join(file);
        std::fs::create_dir_all(path.parent().unwrap_or(dir))?;
        std::fs::write(&path, content)?;
        written.push(path);
    }
    Ok(written)
}

/// The template's lock with the crate's own entry named `name`, in cargo's order (by name), so
/// cargo takes it as it is instead of rewriting it.
fn lock_for(name: &str) -> String {
    const SEP: &str = "\n[[package]]\n";
    let mut parts = CARGO_LOCK.split(SEP);
    let head = parts.next().unwrap_or_default().to_string();
    let mut packages: Vec<String> =
        parts.map(|p| p.trim_end().replace("name = \"__NAME__\"", &format!("name = \"{name}\""))).collect();
    let key = |p: &String| p.lines().next().unwrap_or_default().to_string();
    packages.sort_by_key(key);
    packages.iter().fold(head, |lock, p| format!("{lock}{SEP}{p}\n"))
}

/// The plugin type's name: `my-plugin` → `MyPluginPlugin` (the suffix keeps it apart from the
/// template's own types and imports: `greeting`, `json`, `route`, …).
fn type_name(name: &str) -> String {
    let base: String = name
        .split(['-', '_'])
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map(|c| c.to_ascii_uppercase()).into_iter().chain(chars).collect::<String>()
        })
        .collect();
    format!("{base}Plugin")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_type_names() {
        assert_eq!(type_name("hello2"), "Hello2Plugin");
        assert_eq!(type_name("my-plugin_x"), "MyPluginXPlugin");
        assert_eq!(type_name("greeting"), "GreetingPlugin");
    }

    #[test]
    fn the_lock_names_the_crate_in_cargos_order() {
        for name in ["aaa", "my-plugin", "zzz"] {
            let lock = lock_for(name);
            let names: Vec<&str> = lock.lines().filter_map(|l| l.strip_prefix("name = ")).collect();
            assert!(names.contains(&format!("{name:?}").as_str()), "{name}: {names:?}");
            assert!(names.windows(2).all(|w| w[0] <= w[1]), "{name}: sorted as cargo writes it: {names:?}");
            assert!(!lock.contains("__NAME__"));
        }
    }

    #[test]
    fn refuses_bad_names_and_full_directories() {
        let root = tempfile::tempdir().unwrap();
        let types = Path::new(crate::config::DEFAULT_TYPES_DIR);
        for bad in ["", "a b", "9lives", "plugins", "../x", "serde", "self"] {
            assert!(matches!(write_crate(bad, &root.path().join("x"), types), Err(NewError::InvalidName(_))), "{bad}");
        }
        std::fs::write(root.path().join("taken"), "").unwrap();
        assert!(matches!(write_crate("ok", root.path(), types), Err(NewError::NotEmpty(_))));
        let written = write_crate("ok", &root.path().join("ok"), types).unwrap();
        assert_eq!(written.len(), 5);
        let config = std::fs::read_to_string(root.path().join("ok/.cargo/config.toml")).unwrap();
        let patch: toml::Value = toml::from_str(&config).unwrap();
        let path = patch["patch"]["crates-io"]["kiln-types"]["path"].as_str().unwrap();
        assert!(Path::new(path).is_absolute() && Path::new(path).join("Cargo.toml").exists(), "{path}");
    }
}
