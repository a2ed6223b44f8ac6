//! Which plugin source trees are unchanged since they were last hashed, told from their files'
//! metadata, as git's index tells a clean work tree: every pass takes its plugin's content
//! hash, and reading, hashing and (for `Cargo.lock`) parsing every file each time was a large
//! part of a pass that changes nothing but a row (a toggle, a config edit).
//!
//! A tree is taken as unchanged when the same files have the same size, modification time,
//! change time, inode and device. The change time (`ctime`) cannot be set by tools that restore
//! modification times (`cp -p`, `tar`, `rsync -t`): any write sets it to now. A file changed within
//! the clock's granularity of the hash could still look the same ("racily clean", in git's
//! words), so a tree is remembered only when every file in it is at least [`SETTLED`] old.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// How old every file must be for a tree's hash to be remembered.
pub const SETTLED: Duration = Duration::from_secs(2);
/// At most this many trees are remembered (then the memory starts over).
const MOST: usize = 4096;

/// One file's metadata, as compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    pub rel: PathBuf,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
    dev: u64,
}

impl FileStamp {
    pub fn new(rel: PathBuf, m: &std::fs::Metadata) -> Self {
        Self {
            rel,
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            ino: m.ino(),
            dev: m.dev(),
        }
    }

    /// Whether this file was last changed at least [`SETTLED`] before `now`.
    fn settled(&self, now: SystemTime) -> bool {
        let newest = self.mtime.max(self.ctime);
        let at = SystemTime::UNIX_EPOCH + Duration::new(newest.0.max(0) as u64, newest.1.clamp(0, 999_999_999) as u32);
        now.duration_since(at).is_ok_and(|age| age >= SETTLED)
    }
}

/// A tree's two hashes: of all its files, and of all but `Cargo.lock` (see `compiler.rs`).
pub type Hashes = (String, String);

/// The hashes of trees, by directory, with the stamps of their files when hashed.
#[derive(Debug, Default)]
pub struct TreeStamps {
    known: Mutex<HashMap<PathBuf, (Vec<FileStamp>, Hashes)>>,
}

impl TreeStamps {
    /// The hashes remembered for `dir` if its files are stamped as when they were taken.
    pub fn get(&self, dir: &Path, stamps: &[FileStamp]) -> Option<Hashes> {
        let known = self.known.lock().expect("tree stamps lock");
        let (then, hashes) = known.get(dir)?;
        (then.as_slice() == stamps).then(|| hashes.clone())
    }

    /// Remembers the hashes of `dir` taken from files stamped `stamps`, if all are settled.
    pub fn put(&self, dir: &Path, stamps: Vec<FileStamp>, hashes: &Hashes) {
        let now = SystemTime::now();
        let mut known = self.known.lock().expect("tree stamps lock");
        if !stamps.iter().all(|s| s.settled(now)) {
            known.remove(dir);
            return;
        }
        if known.len() >= MOST {
            known.clear();
        }
        known.insert(dir.to_path_buf(), (stamps, hashes.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamps(dir: &Path) -> Vec<FileStamp> {
        let mut all: Vec<FileStamp> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                FileStamp::new(e.file_name().into(), &e.metadata().unwrap())
            })
            .collect();
        all.sort_by(|a, b| a.rel.cmp(&b.rel));
        all
    }

    fn age(path: &Path) {
        let old = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options().write(true).open(path).unwrap().set_modified(old).unwrap();
    }

    #[test]
    fn a_tree_is_remembered_until_a_file_changes_and_only_once_settled() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lib.rs");
        std::fs::write(&file, "a").unwrap();
        let cache = TreeStamps::default();
        let hashes = ("h".to_string(), "c".to_string());
        // Just written: its change time is now, so it is not remembered.
        cache.put(dir.path(), stamps(dir.path()), &hashes);
        assert_eq!(cache.get(dir.path(), &stamps(dir.path())), None);

        // Settled (a change time cannot be set back, so the threshold is checked directly).
        let mut old = stamps(dir.path());
        for s in &mut old {
            s.ctime = (s.ctime.0 - 3600, s.ctime.1);
            s.mtime = (s.mtime.0 - 3600, s.mtime.1);
        }
        cache.put(dir.path(), old.clone(), &hashes);
        assert_eq!(cache.get(dir.path(), &old), Some(hashes.clone()));

        // The same size, the modification time put back: the change time still tells.
        // Rewritten (until the clock has moved on: change times are as coarse as the kernel's
        // clock tick), then its modification time set back an hour, as `cp -p` would.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let after = loop {
            std::fs::write(&file, "b").unwrap();
            age(&file);
            let after = stamps(dir.path());
            if after[0].ctime > old[0].ctime {
                break after;
            }
            assert!(std::time::Instant::now() < deadline, "the change time never moved");
        };
        assert_eq!(after[0].len, old[0].len);
        assert_eq!(cache.get(dir.path(), &after), None);
        // A file added is a different tree.
        std::fs::write(dir.path().join("more.rs"), "").unwrap();
        assert_eq!(cache.get(dir.path(), &stamps(dir.path())), None);
    }
}
