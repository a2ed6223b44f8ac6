//! A private PostgreSQL cluster started from the locally installed binaries.
//!
//! `kiln serve` uses it when `DATABASE_URL` is unset (data kept under `.kiln/pgdata`, reused on
//! the next start); the test harness uses it for throwaway clusters. PostgreSQL refuses to run as
//! root, so when kiln runs as root the cluster is owned by and run as the `postgres` user; when
//! that user cannot reach the data directory (a checkout under `/root`, mode 0700), the cluster
//! is placed where it can (see [`Options::fallback_root`]) and the log says where and why.
//! The server binaries are found by [`crate::pg_binaries`].

use crate::pg_binaries::{self, PgBinaries};
use anyhow::{Context, bail};
use sha2::{Digest, Sha256};
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::process::Command;

/// How to run the cluster.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Turn off fsync and friends: for throwaway test clusters only.
    pub ephemeral: bool,
    /// Port to try first (a stable port is easier to point psql at); any free port otherwise.
    pub preferred_port: Option<u16>,
    /// Where the cluster goes when kiln runs as root and the `postgres` user cannot reach the
    /// data directory: `<fallback_root>/pgdata-<hash of the data directory>`.
    /// Default: [`DEFAULT_FALLBACK_ROOT`].
    pub fallback_root: Option<PathBuf>,
}

/// The default [`Options::fallback_root`].
pub const DEFAULT_FALLBACK_ROOT: &str = "/var/lib/kiln";

/// A running cluster, stopped by [`LocalPostgres::stop`] (not on drop: a server that exits
/// abnormally leaves it running, and the next start reuses it).
#[derive(Debug)]
pub struct LocalPostgres {
    data_dir: PathBuf,
    port: u16,
    options: Options,
    /// `Some((uid, gid))` of the `postgres` user when this process runs as root.
    run_as: Option<(u32, u32)>,
    /// Where `initdb`, `pg_ctl` and `postgres` are.
    bin: PgBinaries,
}

impl LocalPostgres {
    /// Creates the cluster in `data_dir` if needed and starts it, or attaches to the server
    /// already running on it.
    pub async fn start(data_dir: &Path, options: Options) -> anyhow::Result<Self> {
        let run_as = if is_root() { Some(postgres_user()?) } else { None };
        std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
        let mut data_dir = data_dir.canonicalize()?;
        if let Some((uid, gid)) = run_as {
            if let Some(blocker) = unreachable_ancestor(&data_dir, uid, gid) {
                let root = options.fallback_root.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_FALLBACK_ROOT));
                let fallback = fallback_dir(&root, &data_dir)?;
                tracing::warn!(
                    "the postgres user cannot reach {} ({} is not searchable by it), so the private \
                     PostgreSQL lives in {} instead; set KILN_DATA_DIR to a directory it can reach to choose",
                    data_dir.display(),
                    blocker.display(),
                    fallback.display()
                );
                data_dir = fallback;
            }
            chown(&data_dir, Some(uid), Some(gid)).context("handing the data directory to the postgres user")?;
        }
        let cluster_version = std::fs::read_to_string(data_dir.join("PG_VERSION")).ok();
        let bin = pg_binaries::find(cluster_version.as_deref().map(str::trim))?;
        if let Some(dir) = bin.dir() {
            tracing::info!(dir = %dir.display(), "using PostgreSQL's server binaries");
        }
        let mut pg = Self { data_dir, port: 0, options, run_as, bin };
        if !pg.data_dir.join("PG_VERSION").exists() {
            pg.initdb().await?;
        }
        if let Some(port) = pg.running_port().await {
            tracing::info!(port, dir = %pg.data_dir.display(), "attached to the running private PostgreSQL");
            pg.port = port;
            return Ok(pg);
        }
        pg.start_server().await?;
        Ok(pg)
    }

    /// Connection string for the `postgres` database.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// Connection string for database `db`.
    pub fn url_for(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The cluster's data directory (see [`Options::fallback_root`] for when it moves).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Stops the server (fast shutdown: open sessions are cut).
    pub async fn stop(&self) -> anyhow::Result<()> {
        let data = self.data_dir.to_string_lossy().into_owned();
        self.run("pg_ctl", &["stop", "-D", &data, "-m", "fast", "-w"]).await.map(drop)
    }

    /// Stops the server at once, blocking (for `Drop` of throwaway clusters).
    pub fn stop_blocking(&self) {
        let mut cmd = std::process::Command::new(self.bin.program("pg_ctl"));
        cmd.args(["stop", "-D"]).arg(&self.data_dir).args(["-m", "immediate", "-w"]);
        cmd.current_dir(&self.data_dir).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::process::CommandExt::uid(&mut cmd, uid);
            std::os::unix::process::CommandExt::gid(&mut cmd, gid);
        }
        let _ = cmd.status();
    }

    /// Starts the server again on the same port, after [`LocalPostgres::stop`].
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.launch(self.port).await
    }

    async fn initdb(&self) -> anyhow::Result<()> {
        let data = self.data_dir.to_string_lossy().into_owned();
        self.run("initdb", &["-D", &data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale"])
            .await
            .context("initdb")?;
        Ok(())
    }

    /// The port of a postmaster already running on this data directory, if any.
    async fn running_port(&self) -> Option<u16> {
        let data = self.data_dir.to_string_lossy().into_owned();
        self.run("pg_ctl", &["status", "-D", &data]).await.ok()?;
        let pid_file = std::fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        pid_file.lines().nth(3)?.trim().parse().ok()
    }

    async fn start_server(&mut self) -> anyhow::Result<()> {
        let mut last_err = None;
        let preferred = self.options.preferred_port.filter(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok());
        // A free port can be taken between our probe and the server's bind: try a few.
        for attempt in 0..5 {
            let port = match (attempt, preferred) {
                (0, Some(p)) => p,
                _ => free_port()?,
            };
            match self.launch(port).await {
                Ok(()) => {
                    self.port = port;
                    return Ok(());
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    async fn launch(&self, port: u16) -> anyhow::Result<()> {
        let data = self.data_dir.to_string_lossy().into_owned();
        let log = self.data_dir.join("postgres.log").to_string_lossy().into_owned();
        // TCP only: a socket path inside a deep data directory can exceed the 107-byte limit.
        let mut opts = format!("-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''");
        if self.options.ephemeral {
            opts.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        self.run("pg_ctl", &["start", "-D", &data, "-l", &log, "-w", "-t", "60", "-o", &opts])
            .await
            .with_context(|| format!("starting PostgreSQL on port {port} (log: {log})"))?;
        tracing::info!(port, dir = %data, "private PostgreSQL started");
        Ok(())
    }

    async fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let path = self.bin.program(program);
        let mut cmd = Command::new(&path);
        cmd.args(args).current_dir(&self.data_dir).stdin(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd.output().await.with_context(|| format!("running {}", path.display()))?;
        if !out.status.success() {
            bail!(
                "{program} {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Uid and gid of the `postgres` user, from /etc/passwd.
fn postgres_user() -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == "postgres")
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .context("running as root, PostgreSQL must run as the `postgres` user, and there is none")
}

/// The first ancestor of `dir` (not `dir` itself, which kiln hands to the user) that user
/// `uid`/`gid` may not search, by its permission bits. Supplementary groups and ACLs are not
/// considered: a directory they open is reported as unreachable, and the cluster moves.
pub fn unreachable_ancestor(dir: &Path, uid: u32, gid: u32) -> Option<PathBuf> {
    dir.ancestors().skip(1).find_map(|a| {
        let meta = std::fs::metadata(a).ok()?;
        let bit = if meta.uid() == uid {
            0o100
        } else if meta.gid() == gid {
            0o010
        } else {
            0o001
        };
        (meta.mode() & bit == 0).then(|| a.to_path_buf())
    })
}

/// `<root>/pgdata-<hash of data_dir>`: one stable place per requested data directory, so the
/// next start finds the same cluster.
fn fallback_dir(root: &Path, data_dir: &Path) -> anyhow::Result<PathBuf> {
    let hash = hex::encode(Sha256::digest(data_dir.as_os_str().as_encoded_bytes()));
    let dir = root.join(format!("pgdata-{}", &hash[..16]));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for a in [root, dir.as_path()] {
        std::fs::set_permissions(a, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .with_context(|| format!("opening {} to the postgres user", a.display()))?;
    }
    Ok(dir)
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::unreachable_ancestor;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn a_private_home_blocks_another_user() {
        let root = tempfile::tempdir().unwrap();
        let home = root.path().join("home");
        let data = home.join("kiln/.kiln/pgdata");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
        let owner = std::fs::metadata(&home).unwrap();
        let (other_uid, other_gid) = (owner.uid() + 4242, owner.gid() + 4242);
        assert_eq!(unreachable_ancestor(&data, other_uid, other_gid), Some(home.clone()));
        assert_eq!(unreachable_ancestor(&data, owner.uid(), owner.gid()), None, "the owner may search it");
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o711)).unwrap();
        assert_eq!(unreachable_ancestor(&data, other_uid, other_gid), None, "search permission suffices");
    }
}
