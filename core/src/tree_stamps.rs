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

    /// Whether this file was last changed at least `settled` before `now`.
    fn settled(&self, now: SystemTime, settled: Duration) -> bool {
        let newest = self.mtime.max(self.ctime);
        now.duration_since(time(newest)).is_ok_and(|age| age >= settled)
    }
}

fn time((secs, nanos): (i64, i64)) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::new(secs.max(0) as u64, nanos.clamp(0, 999_999_999) as u32)
}

/// A tree's two hashes: of all its files, and of all but `Cargo.lock` (see `compiler.rs`).
pub type Hashes = (String, String);

/// The hashes of trees, by directory, with the stamps of their files when hashed.
#[derive(Debug)]
pub struct TreeStamps {
    known: Mutex<HashMap<PathBuf, (Vec<FileStamp>, Hashes)>>,
    /// How old every file must be ([`SETTLED`]).
    settled: Duration,
}

impl Default for TreeStamps {
    fn default() -> Self {
        Self::new(SETTLED)
    }
}

impl TreeStamps {
    /// Remembers trees whose files are all at least `settled` old.
    pub fn new(settled: Duration) -> Self {
        Self { known: Mutex::default(), settled }
    }

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
        if !stamps.iter().all(|s| s.settled(now, self.settled)) {
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
pub(crate) mod tests {
    use super::*;

    /// The stamps of the files directly in `dir`, by name.
    pub(crate) fn stamps(dir: &Path) -> Vec<FileStamp> {
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

    /// Rewrites `file` with `content` (of the same length) and puts its modification time back,
    /// as `cp -p` or `rsync -t` would, until its change time has moved (change times are as
    /// coarse as the kernel's clock tick). Returns the stamps before and after.
    pub(crate) fn rewrite_keeping_mtime(dir: &Path, file: &Path, content: &str) -> (FileStamp, FileStamp) {
        let before = FileStamp::new(file.strip_prefix(dir).unwrap().into(), &std::fs::metadata(file).unwrap());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            std::fs::write(file, content).unwrap();
            std::fs::File::options().write(true).open(file).unwrap().set_modified(time(before.mtime)).unwrap();
            let after = FileStamp::new(before.rel.clone(), &std::fs::metadata(file).unwrap());
            if after.ctime != before.ctime {
                return (before, after);
            }
            assert!(std::time::Instant::now() < deadline, "the change time never moved");
        }
    }

    #[test]
    fn a_rewrite_with_its_mtime_put_back_is_seen_by_its_change_time() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lib.rs");
        std::fs::write(&file, "a").unwrap();
        let cache = TreeStamps::new(Duration::ZERO);
        let hashes = ("h".to_string(), "c".to_string());
        let then = stamps(dir.path());
        cache.put(dir.path(), then.clone(), &hashes);
        assert_eq!(cache.get(dir.path(), &then), Some(hashes.clone()));

        let (before, after) = rewrite_keeping_mtime(dir.path(), &file, "b");
        // Only the change time tells them apart.
        assert_eq!((after.len, after.mtime, after.ino, after.dev), (before.len, before.mtime, before.ino, before.dev));
        assert_eq!(cache.get(dir.path(), &stamps(dir.path())), None);
        // A file added is another tree.
        cache.put(dir.path(), stamps(dir.path()), &hashes);
        std::fs::write(dir.path().join("more.rs"), "").unwrap();
        assert_eq!(cache.get(dir.path(), &stamps(dir.path())), None);
    }

    #[test]
    fn a_tree_changed_lately_is_not_remembered() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("lib.rs"), "a").unwrap();
        let cache = TreeStamps::default();
        let now = stamps(dir.path());
        // Just written: changed less than SETTLED ago.
        cache.put(dir.path(), now.clone(), &("h".to_string(), "c".to_string()));
        assert_eq!(cache.get(dir.path(), &now), None);
    }
}
