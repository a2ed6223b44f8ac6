//! This server as one replica among those sharing its database: its id, its row in `replicas`
//! and the heartbeat that keeps the row live. Every replica also sweeps: one silent past the
//! timeout is marked gone and its observed rows are removed (any replica may do it; doing it
//! twice is harmless).

use crate::reconciler::Reconciler;
use crate::repo::{Beat, Registration, Repo};
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

/// Registers the replica (`registration`: host name, address); warns when another live process
/// held its id.
pub async fn register(
    repo: &Repo,
    incarnation: &str,
    registration: &(String, String),
    timeout: Duration,
) -> Result<(), crate::repo::RepoError> {
    let (hostname, address) = registration;
    let r = Registration { incarnation, hostname, address };
    if let Some(holder) = repo.register_replica(&r, timeout).await? {
        tracing::warn!(
            replica = repo.replica(),
            "replica id was live, held by {holder}: taking it over (give each server its own --replica-id)"
        );
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
}

impl Heartbeat {
    /// A new incarnation id: this process, now.
    pub fn incarnation() -> String {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        format!("{:x}-{nanos:x}", std::process::id())
    }

    async fn register(&self) -> Result<(), crate::repo::RepoError> {
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
                    tracing::error!(
                        replica = self.repo.replica(),
                        "another process took this replica's id: {holder}; give each server its own --replica-id"
                    );
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
