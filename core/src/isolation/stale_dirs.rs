//! The private socket directories of plugin processes (`kiln-host-<server pid>-…` in the temp
//! directory) are removed when their instance goes. A server killed outright (`kill -9`) leaves
//! them behind; the next server that starts a plugin process removes those whose server is gone.

use std::path::Path;
use std::sync::Once;

/// The prefix of this server's socket directories.
pub fn prefix() -> String {
    format!("kiln-host-{}-", std::process::id())
}

/// Once per process: removes the socket directories of servers that are gone.
pub fn sweep_once() {
    static SWEPT: Once = Once::new();
    SWEPT.call_once(|| {
        let removed = sweep(&std::env::temp_dir());
        if removed > 0 {
            tracing::info!(removed, "removed socket directories of plugin processes whose server is gone");
        }
    });
}

/// Removes, under `dir`, the `kiln-host-<pid>-…` directories whose `<pid>` is no live process.
/// Returns how many it removed.
pub fn sweep(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(owner) else { continue };
        // SAFETY: kill(2) with signal 0 only checks that the process exists; no memory involved.
        let gone =
            unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone && entry.file_type().is_ok_and(|t| t.is_dir()) && std::fs::remove_dir_all(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// The server pid a socket directory's name carries.
fn owner(name: &str) -> Option<i32> {
    let rest = name.strip_prefix("kiln-host-")?;
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok().filter(|p: &i32| *p > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_of_gone_servers_go_and_the_others_stay() {
        let base = tempfile::tempdir().unwrap();
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let gone_pid = gone.id();
        gone.wait().unwrap();
        let stale = base.path().join(format!("kiln-host-{gone_pid}-abc"));
        let live = base.path().join(format!("{}abc", prefix()));
        let other = base.path().join("kiln-host-notapid");
        for d in [&stale, &live, &other] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("s"), "").unwrap();
        }
        assert_eq!(sweep(base.path()), 1);
        assert!(!stale.exists() && live.exists() && other.exists());
        assert_eq!(owner("kiln-host-42-x"), Some(42));
        assert_eq!(owner("kiln-host--x"), None);
    }
}
