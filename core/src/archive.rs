//! Safe extraction of an uploaded plugin archive (`.tar.gz` of a plugin crate).
//!
//! An archive is hostile until proven otherwise. Only regular files and directories are
//! extracted; absolute paths, `..`, links, devices and FIFOs are refused; the number of entries,
//! the size of each file and the total unpacked size are capped, and so is the decompressed
//! stream itself (against gzip bombs made of tar padding). Extraction goes into a fresh temporary
//! directory, which is removed on any failure: a refused archive leaves nothing behind.

use flate2::read::GzDecoder;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// Caps on what an archive may contain.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Entries (files and directories).
    pub max_entries: usize,
    /// Bytes of one file.
    pub max_file_bytes: u64,
    /// Bytes of all files together.
    pub max_total_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_entries: 2_000, max_file_bytes: 8 << 20, max_total_bytes: 64 << 20 }
    }
}

/// Why an archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Not a gzip-compressed tar archive, or a corrupt one.
    #[error("not a readable .tar.gz archive: {0}")]
    Unreadable(String),
    /// An entry's path is absolute or leaves the archive.
    #[error("unsafe path in archive: {0:?}")]
    UnsafePath(String),
    /// An entry is a link, device or FIFO.
    #[error("archive entry {path:?} is a {kind}; only regular files and directories are allowed")]
    ForbiddenEntry { path: String, kind: String },
    /// A cap was exceeded.
    #[error("archive too large: {0}")]
    TooLarge(String),
    /// No Cargo.toml at the top, nor in a single top-level directory.
    #[error("the archive holds no plugin crate: expected Cargo.toml at its top or in its one top-level directory")]
    NoCrate,
    /// The local filesystem failed.
    #[error("could not extract the archive: {0}")]
    Io(#[from] std::io::Error),
}

/// An extracted archive: a temporary directory (removed on drop) and the crate inside it.
#[derive(Debug)]
pub struct Extracted {
    pub dir: tempfile::TempDir,
    /// The crate directory (the temp dir itself, or its one top-level directory).
    pub crate_dir: PathBuf,
}

/// Extracts `archive` into a new temporary directory under `parent`.
pub fn extract(archive: &[u8], parent: &Path, limits: Limits) -> Result<Extracted, ArchiveError> {
    std::fs::create_dir_all(parent)?;
    let dir = tempfile::Builder::new().prefix(".upload-").tempdir_in(parent)?;
    // Headers and padding count too: cap the decompressed stream a little above the file total.
    let stream_cap = limits.max_total_bytes + (limits.max_entries as u64 + 16) * 1024;
    let mut tar = tar::Archive::new(GzDecoder::new(archive).take(stream_cap));
    let mut total = 0u64;
    let entries = tar.entries().map_err(|e| ArchiveError::Unreadable(e.to_string()))?;
    for (count, entry) in entries.enumerate() {
        let mut entry = entry.map_err(|e| unreadable_or_too_large(e, stream_cap))?;
        if count >= limits.max_entries {
            return Err(ArchiveError::TooLarge(format!("more than {} entries", limits.max_entries)));
        }
        let raw_path = entry.path().map_err(|e| ArchiveError::Unreadable(e.to_string()))?.into_owned();
        let shown = raw_path.to_string_lossy().into_owned();
        let rel = safe_relative(&raw_path).ok_or_else(|| ArchiveError::UnsafePath(shown.clone()))?;
        let kind = entry.header().entry_type();
        if rel.as_os_str().is_empty() {
            // `./` itself, as `tar -czf p.tar.gz -C crate .` writes it: the top, already there.
            if kind.is_dir() {
                continue;
            }
            return Err(ArchiveError::UnsafePath(shown));
        }
        if kind.is_dir() {
            std::fs::create_dir_all(dir.path().join(&rel))?;
            continue;
        }
        if !kind.is_file() {
            return Err(ArchiveError::ForbiddenEntry { path: shown, kind: describe(kind) });
        }
        let size = entry.header().size().map_err(|e| ArchiveError::Unreadable(e.to_string()))?;
        if size > limits.max_file_bytes {
            return Err(ArchiveError::TooLarge(format!("{shown} is {size} bytes (at most {})", limits.max_file_bytes)));
        }
        total += size;
        if total > limits.max_total_bytes {
            return Err(ArchiveError::TooLarge(format!("more than {} bytes unpacked", limits.max_total_bytes)));
        }
        let target = dir.path().join(&rel);
        if let Some(p) = target.parent() {
            std::fs::create_dir_all(p)?;
        }
        // create_new: a second entry for the same path does not overwrite the first.
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(&target)?;
        let copied = std::io::copy(&mut (&mut entry).take(size), &mut file)?;
        if copied != size {
            return Err(ArchiveError::Unreadable(format!("{shown} is truncated")));
        }
    }
    let crate_dir = find_crate(dir.path())?;
    Ok(Extracted { dir, crate_dir })
}

/// The path as a plain relative path (empty for `.` and `./`), or `None` if it is absolute or
/// climbs out.
fn safe_relative(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn find_crate(root: &Path) -> Result<PathBuf, ArchiveError> {
    if root.join("Cargo.toml").is_file() {
        return Ok(root.to_path_buf());
    }
    let dirs: Vec<PathBuf> = std::fs::read_dir(root)?.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    match dirs.as_slice() {
        [one] if one.join("Cargo.toml").is_file() => Ok(one.clone()),
        _ => Err(ArchiveError::NoCrate),
    }
}

fn describe(kind: tar::EntryType) -> String {
    match kind {
        tar::EntryType::Symlink => "symbolic link".into(),
        tar::EntryType::Link => "hard link".into(),
        tar::EntryType::Char => "character device".into(),
        tar::EntryType::Block => "block device".into(),
        tar::EntryType::Fifo => "FIFO".into(),
        other => format!("{other:?} entry"),
    }
}

fn unreadable_or_too_large(e: std::io::Error, cap: u64) -> ArchiveError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        ArchiveError::TooLarge(format!("the archive unpacks to more than {cap} bytes, or is truncated"))
    } else {
        ArchiveError::Unreadable(e.to_string())
    }
}

/// Packs the crate in `dir` as a `.tar.gz` whose entries lie under one directory named `prefix`
/// (what `POST /plugins/install` takes): regular files only, without `target/` and hidden
/// entries (build output and tool state, as the source hash leaves them out too). Blocking.
pub fn pack(dir: &Path, prefix: &str) -> std::io::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default()));
    let walk = walkdir::WalkDir::new(dir).sort_by_file_name().into_iter().filter_entry(|e| {
        let name = e.file_name().to_string_lossy();
        e.depth() == 0 || !(name.starts_with('.') || (e.depth() == 1 && name == "target"))
    });
    for entry in walk {
        let entry = entry.map_err(std::io::Error::other)?;
        if !entry.file_type().is_file() {
            continue;
        }
        let rel = entry.path().strip_prefix(dir).map_err(std::io::Error::other)?;
        tar.append_path_with_name(entry.path(), Path::new(prefix).join(rel))?;
    }
    tar.into_inner()?.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_checked() {
        assert_eq!(safe_relative(Path::new("a/./b")), Some(PathBuf::from("a/b")));
        assert_eq!(safe_relative(Path::new("../x")), None);
        assert_eq!(safe_relative(Path::new("a/../../x")), None);
        assert_eq!(safe_relative(Path::new("/etc/passwd")), None);
        assert_eq!(safe_relative(Path::new("./")), Some(PathBuf::new()), "the top, as tar -C dir . writes it");
        assert_eq!(safe_relative(Path::new("./src/lib.rs")), Some(PathBuf::from("src/lib.rs")));
    }
}
