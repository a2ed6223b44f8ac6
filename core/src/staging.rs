//! Building a plugin crate wherever it lies.
//!
//! Cargo walks up from a crate to the nearest `Cargo.toml` with a `[workspace]` table, and
//! refuses to build a crate that such a workspace does not list ("current package believes it's
//! in a workspace when it's not"). An uploaded plugin unpacked under kiln's own checkout, or a
//! row pointing into a user's monorepo, lands in exactly that case. kiln then builds a *staged
//! copy*: the crate mirrored to `<target dir>/kiln-staging/<name>`, its `Cargo.toml` made a
//! workspace of its own, and every relative dependency path made absolute against the original
//! directory. A crate that cargo accepts where it is (a standalone crate, or a member of the
//! workspace around it) is built in place, exactly as its author would build it.

use std::path::{Path, PathBuf};
use walkdir::WalkDir;

/// The dependency tables whose `path` entries are rewritten.
const DEPENDENCY_TABLES: &[&str] = &["dependencies", "dev-dependencies", "build-dependencies"];

/// Whether cargo's error output says the crate sits in a workspace that does not include it.
pub fn is_foreign_workspace_error(stderr: &str) -> bool {
    stderr.contains("believes it's in a workspace when it's not")
}

/// Mirrors the crate in `src` to `dest` (replacing what was there) and rewrites the copy's
/// manifest (see the module docs). Returns the copy's `Cargo.toml`. Blocking: call it on the
/// blocking pool.
pub fn stage(src: &Path, dest: &Path) -> std::io::Result<PathBuf> {
    if dest.exists() {
        std::fs::remove_dir_all(dest)?;
    }
    let walk = WalkDir::new(src).into_iter().filter_entry(|e| {
        let name = e.file_name().to_string_lossy();
        e.depth() != 1 || !(name == "target" || name == ".git")
    });
    for entry in walk {
        let entry = entry.map_err(std::io::Error::other)?;
        let rel = entry.path().strip_prefix(src).map_err(std::io::Error::other)?;
        let to = dest.join(rel);
        if entry.file_type().is_dir() {
            std::fs::create_dir_all(&to)?;
        } else if entry.file_type().is_file() {
            // Fresh copies carry fresh mtimes: cargo sees every staged build as changed.
            std::fs::copy(entry.path(), &to)?;
        }
    }
    let manifest = dest.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)?;
    let rewritten = standalone_manifest(&text, src).map_err(std::io::Error::other)?;
    std::fs::write(&manifest, rewritten)?;
    Ok(manifest)
}

/// The manifest `text` of a crate from `original_dir`, made a workspace of its own with its
/// relative dependency paths pointing back at `original_dir`.
fn standalone_manifest(text: &str, original_dir: &Path) -> Result<String, toml::de::Error> {
    let mut doc: toml::Table = toml::from_str(text)?;
    if let Some(toml::Value::Table(package)) = doc.get_mut("package") {
        package.remove("workspace");
    }
    doc.entry("workspace").or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let absolutize = |deps: &mut toml::Value| {
        let Some(deps) = deps.as_table_mut() else { return };
        for (_, dep) in deps.iter_mut() {
            if let Some(toml::Value::String(p)) = dep.as_table_mut().and_then(|d| d.get_mut("path"))
                && Path::new(p.as_str()).is_relative()
            {
                *p = original_dir.join(&*p).to_string_lossy().into_owned();
            }
        }
    };
    for table in DEPENDENCY_TABLES {
        doc.get_mut(*table).map(absolutize);
    }
    if let Some(toml::Value::Table(targets)) = doc.get_mut("target") {
        for target in targets.iter_mut().filter_map(|(_, t)| t.as_table_mut()) {
            for table in DEPENDENCY_TABLES {
                target.get_mut(*table).map(absolutize);
            }
        }
    }
    if let Some(toml::Value::Table(patches)) = doc.get_mut("patch") {
        patches.iter_mut().for_each(|(_, p)| absolutize(p));
    }
    if let Some(toml::Value::Table(ws)) = doc.get_mut("workspace") {
        ws.get_mut("dependencies").map(absolutize);
    }
    Ok(toml::to_string(&doc).expect("a TOML table serializes"))
}

/// `lock` (a crate's `Cargo.lock`) for a copy of the crate renamed from `from` to `to`, exactly
/// as cargo would write it: the packages stay sorted by name, so cargo finds nothing to rewrite
/// (a rewritten lock file would change the copy's source hash after its first build). For
/// generated plugins (tests, the benchmark) that reuse a fixture's resolved dependencies.
pub fn renamed_lock(lock: &str, from: &str, to: &str) -> String {
    const SEPARATOR: &str = "\n[[package]]\n";
    let mut parts = lock.split(SEPARATOR);
    let head = parts.next().unwrap_or_default();
    let (old, new) = (format!("name = \"{from}\"\n"), format!("name = \"{to}\"\n"));
    let mut blocks: Vec<String> = parts
        .map(|b| {
            let b = b.trim_end();
            if b.starts_with(&old) { b.replacen(&old, &new, 1) } else { b.to_string() }
        })
        .collect();
    let key = |b: &String| b.lines().take(2).map(str::to_string).collect::<Vec<_>>();
    blocks.sort_by_key(key);
    format!("{head}{SEPARATOR}{}\n", blocks.join(&format!("\n{SEPARATOR}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_is_its_own_workspace_with_absolute_paths() {
        let text = r#"
[package]
name = "p"
version = "0.1.0"
workspace = "../.."

[dependencies]
common = { path = "../common" }
abs = { path = "/opt/abs" }
serde = "1"

[target.'cfg(unix)'.dependencies]
unixy = { path = "unixy" }

[patch.crates-io]
kiln-types = { path = "../../types" }
"#;
        let out: toml::Table = toml::from_str(&standalone_manifest(text, Path::new("/src/p")).unwrap()).unwrap();
        assert!(out["workspace"].is_table(), "a workspace of its own");
        assert!(out["package"].get("workspace").is_none(), "no pointer to the enclosing workspace");
        assert_eq!(out["dependencies"]["common"]["path"].as_str(), Some("/src/p/../common"));
        assert_eq!(out["dependencies"]["abs"]["path"].as_str(), Some("/opt/abs"));
        assert_eq!(out["dependencies"]["serde"].as_str(), Some("1"));
        assert_eq!(out["target"]["cfg(unix)"]["dependencies"]["unixy"]["path"].as_str(), Some("/src/p/unixy"));
        assert_eq!(out["patch"]["crates-io"]["kiln-types"]["path"].as_str(), Some("/src/p/../../types"));
    }

    #[test]
    fn staging_mirrors_the_crate_without_build_output() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("src")).unwrap();
        std::fs::create_dir_all(src.path().join("target/release")).unwrap();
        std::fs::write(src.path().join("Cargo.toml"), "[package]\nname = \"p\"\nversion = \"0.1.0\"\n").unwrap();
        std::fs::write(src.path().join("src/lib.rs"), "pub fn f() {}").unwrap();
        std::fs::write(src.path().join("target/release/junk"), "x").unwrap();
        let dest = tempfile::tempdir().unwrap();
        let staged = dest.path().join("p");
        std::fs::create_dir_all(staged.join("stale")).unwrap();
        let manifest = stage(src.path(), &staged).unwrap();
        assert_eq!(std::fs::read_to_string(staged.join("src/lib.rs")).unwrap(), "pub fn f() {}");
        assert!(!staged.join("target").exists() && !staged.join("stale").exists());
        assert!(std::fs::read_to_string(manifest).unwrap().contains("[workspace]"));
    }

    #[test]
    fn a_renamed_lock_is_what_cargo_writes() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let lifecycle = std::fs::read_to_string(root.join("lifecycle/Cargo.lock")).unwrap();
        let frozen = std::fs::read_to_string(root.join("frozen_sdk/Cargo.lock")).unwrap();
        assert_eq!(renamed_lock(&lifecycle, "lifecycle", "frozen_sdk"), frozen);
        assert_eq!(renamed_lock(&lifecycle, "lifecycle", "lifecycle"), lifecycle);
    }
}
