//! This server as one replica among those sharing its database: its id, its row in `replicas`
//! and the heartbeat that keeps the row live. Every replica also sweeps: one silent past the
//! timeout is marked gone and its observed rows are removed (any replica may do it; doing it
//! twice is harmless).

use crate::reconciler::Reconciler;
use crate::repo::{Beat, Holder, Registration, Repo};
use crate::shared_builds::SharedBuilds;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The id a replica gets when none is set: the host name and the port it serves on, which is
/// stable across restarts and tells apart two servers on one machine.
pub fn default_id(addr: SocketAddr) -> String {
    let host = hostname();
    let host: String =
        host.trim().chars().map(|c| if c.is_ascii_alphanumeric() || "_.-".contains(c) { c } else { '-' }).collect();
    let host = host.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    let host = if host.is_empty() { "kiln" } else { host };
    format!("{}:{}", &host[..host.len().min(100)], addr.port())
}

/// The machine's (or container's) host name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// Whether `id` may name a replica (as the `replicas` table checks).
pub fn validate_id(id: &str) -> Result<(), String> {
    let ok = (1..=128).contains(&id.len())
        && id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || "_.:@-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("replica id {id:?}: use 1 to 128 letters, digits or `_.:@-`, starting with a letter or digit"))
    }
}

/// Registers the replica (`registration`: host name, address). Refused while another live
/// process holds the id: one that heartbeat within `timeout`, unless it is a process of this host
/// that no longer runs (this server's own previous run, restarted by its supervisor).
pub async fn register(
    repo: &Repo,
    incarnation: &str,
    registration: &(String, String),
    timeout: Duration,
) -> anyhow::Result<()> {
    let (hostname, address) = registration;
    let identity = host_identity();
    let r = Registration { incarnation, hostname, address, host_identity: &identity };
    // Taken over only from a process this one can see is gone: same kernel and pid namespace,
    // and its pid no longer runs (this server's previous run, restarted by its supervisor).
    let may_take = |h: &Holder| !identity.is_empty() && h.host_identity == identity && !process_runs(h.pid);
    match repo.claim_replica(&r, timeout, may_take).await? {
        Ok(None) => {}
        Ok(Some(h)) => tracing::warn!(
            replica = repo.replica(),
            "taking over the id from pid {} of this host, which no longer runs",
            h.pid
        ),
        Err(h) => anyhow::bail!(
            "replica id {:?} is held by a live server: {} (pid {}), heartbeat {:.1} s ago. Give each server its \
             own --replica-id, or start this one after the other stops (it is taken for gone {:.0} s after its \
             last heartbeat)",
            repo.replica(),
            h.hostname,
            h.pid,
            h.age,
            timeout.as_secs_f64()
        ),
    }
    Ok(())
}

/// What a replica needs to keep its row.
pub struct Heartbeat {
    pub repo: Repo,
    pub incarnation: String,
    /// (host name, address served on), as shown in `GET /replicas`.
    pub registration: (String, String),
    pub every: Duration,
    pub timeout: Duration,
    pub builds: Arc<SharedBuilds>,
    pub reconciler: Reconciler,
    /// Notified when another process took this replica's id: the server stops.
    pub lost: Arc<tokio::sync::Notify>,
}

impl Heartbeat {
    /// A new incarnation id: this process, now.
    pub fn incarnation() -> String {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        format!("{:x}-{nanos:x}", std::process::id())
    }

    async fn register(&self) -> anyhow::Result<()> {
        register(&self.repo, &self.incarnation, &self.registration, self.timeout).await
    }

    /// Beats and sweeps until the task is aborted.
    pub async fn run(self) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // registered just now
        loop {
            tick.tick().await;
            let (builds, fetches) = (self.builds.builds() as i64, self.builds.fetches() as i64);
            match self.repo.heartbeat(&self.incarnation, builds, fetches).await {
                Ok(Beat::Live) => {}
                Ok(Beat::Returned) => {
                    // Silent past the timeout (a pause, a lost database): others removed this
                    // replica's observed rows. A resync writes them again.
                    tracing::warn!(
                        replica = self.repo.replica(),
                        "this replica had been marked gone; recording its state again"
                    );
                    self.resync().await;
                }
                Ok(Beat::Lost { holder: Some(holder) }) => {
                    // Taken for gone (silent past the timeout) and replaced, or a second server
                    // given this id: two writers of one replica's rows must not go on.
                    tracing::error!(
                        replica = self.repo.replica(),
                        "another process took this replica's id: {holder}; this server stops (give each \
                         server its own --replica-id)"
                    );
                    self.lost.notify_one();
                    return;
                }
                Ok(Beat::Lost { holder: None }) => match self.register().await {
                    Ok(()) => {
                        tracing::warn!(replica = self.repo.replica(), "this replica's row was gone; registered again");
                        self.resync().await;
                    }
                    Err(e) => tracing::warn!("registering the replica again: {e}"),
                },
                Err(e) => tracing::warn!("heartbeat: {e}"),
            }
            match self.repo.sweep_replicas(self.timeout).await {
                Ok(gone) if !gone.is_empty() => tracing::warn!(?gone, "replicas gone silent: their rows are removed"),
                Ok(_) => {}
                Err(e) => tracing::warn!("sweeping replicas: {e}"),
            }
        }
    }

    async fn resync(&self) {
        if let Err(e) = self.reconciler.resync_all().await {
            tracing::warn!("resync after rejoining: {e}");
        }
    }
}

/// Whether process `pid` of this host runs, other than this one (a container restarted with
/// the same pid numbering can find its own pid in its previous run's row).
fn process_runs(pid: i32) -> bool {
    if pid <= 0 || pid as u32 == std::process::id() {
        return false;
    }
    // SAFETY: kill(2) with signal 0 sends nothing; it only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// This process's kernel boot id and pid namespace (empty when they cannot be read): a pid
/// means the same process only to another process that shares both.
fn host_identity() -> String {
    use std::os::unix::fs::MetadataExt;
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    match std::fs::metadata("/proc/self/ns/pid") {
        Ok(ns) if !boot.trim().is_empty() => format!("{}:{}", boot.trim(), ns.ino()),
        _ => String::new(),
    }
}
