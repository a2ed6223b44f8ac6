//! Prebuilt libraries a plugin's crate carries, so that a server can load it without compiling:
//! `.kiln-prebuilt/<arch>-<os>/` in the crate holds the library and `prebuilt.json`, written by
//! `kiln check --write-prebuilt`. A server uses it when it was built from exactly these sources
//! with this server's kiln-types, ABI and build profile (the content hash covers all of them; the
//! directory is hidden, so it is not part of the hash) for this target, and its sha256 matches;
//! otherwise it builds from source, as without one.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The directory in a crate (hidden: the source hash skips it).
pub const DIR: &str = ".kiln-prebuilt";

/// What `prebuilt.json` says of the library beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stamp {
    pub name: String,
    /// The content hash of the sources it was built from (as `Compiler::source_hash`).
    pub hash: String,
    pub sha256: String,
    pub abi: u32,
    pub types_version: String,
    pub target: String,
    /// The library's file name, beside the stamp.
    pub library: String,
}

/// This server's target, as the directory is named.
pub fn target() -> String {
    format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS)
}

fn dir_of(crate_dir: &Path) -> PathBuf {
    crate_dir.join(DIR).join(target())
}

/// Copies `library`, built from sources of content hash `hash`, into the crate at `crate_dir`
/// with its stamp. Blocking. The stamp's path.
pub fn write(crate_dir: &Path, name: &str, hash: &str, library: &Path) -> std::io::Result<PathBuf> {
    let dir = dir_of(crate_dir);
    std::fs::create_dir_all(&dir)?;
    let bytes = std::fs::read(library)?;
    let file = format!("{name}.{}", std::env::consts::DLL_EXTENSION);
    std::fs::write(dir.join(&file), &bytes)?;
    let stamp = Stamp {
        name: name.into(),
        hash: hash.into(),
        sha256: hex::encode(Sha256::digest(&bytes)),
        abi: kiln_types::abi::ABI_VERSION,
        types_version: kiln_types::TYPES_VERSION.into(),
        target: target(),
        library: file,
    };
    let path = dir.join("prebuilt.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&stamp).map_err(std::io::Error::other)?)?;
    Ok(path)
}

/// The crate's prebuilt library, when it is one for `name` built from `hash` whose bytes match
/// its sha256: written to `dest` (whole, then renamed). `Ok(false)`: none, or one that does not
/// fit (the log says why); the caller builds from source. Blocking.
pub fn install(crate_dir: &Path, name: &str, hash: &str, dest: &Path) -> std::io::Result<bool> {
    let dir = dir_of(crate_dir);
    let stamp: Stamp = match std::fs::read(dir.join("prebuilt.json")) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(stamp) => stamp,
            Err(e) => {
                tracing::warn!(plugin = %name, "an unreadable prebuilt.json ({e}); building from source");
                return Ok(false);
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let fits = stamp.name == name
        && stamp.hash == hash
        && stamp.abi == kiln_types::abi::ABI_VERSION
        && stamp.target == target()
        && !stamp.library.contains('/');
    if !fits {
        tracing::info!(
            plugin = %name,
            "the prebuilt library was built from other sources, kiln-types, ABI or target; building from source"
        );
        return Ok(false);
    }
    let bytes = std::fs::read(dir.join(&stamp.library))?;
    if hex::encode(Sha256::digest(&bytes)) != stamp.sha256 {
        tracing::warn!(plugin = %name, "the prebuilt library does not match its sha256; building from source");
        return Ok(false);
    }
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let mut tmp = tempfile::Builder::new().prefix(".prebuilt-").tempfile_in(parent)?;
    std::io::Write::write_all(&mut tmp, &bytes)?;
    tmp.persist(dest).map_err(|e| e.error)?;
    tracing::info!(plugin = %name, size = bytes.len(), "loaded the prebuilt library (no build)");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prebuilt_library_is_used_only_when_it_fits() {
        let (krate, bin) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let library = bin.path().join("built.so");
        std::fs::write(&library, b"library bytes").unwrap();
        write(krate.path(), "p", "h1", &library).unwrap();
        let dest = bin.path().join("p-h1.so");
        assert!(install(krate.path(), "p", "h1", &dest).unwrap());
        assert_eq!(std::fs::read(&dest).unwrap(), b"library bytes");
        assert!(!install(krate.path(), "p", "h2", &dest).unwrap(), "other sources");
        assert!(!install(krate.path(), "q", "h1", &dest).unwrap(), "another plugin");
        let shipped = dir_of(krate.path()).join(format!("p.{}", std::env::consts::DLL_EXTENSION));
        std::fs::write(&shipped, b"tampered").unwrap();
        assert!(!install(krate.path(), "p", "h1", &dest).unwrap(), "bytes that do not match the sha256");
        assert!(!install(bin.path(), "p", "h1", &dest).unwrap(), "no prebuilt directory");
    }
}
