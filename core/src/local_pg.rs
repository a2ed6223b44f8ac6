//! A private PostgreSQL cluster started from the locally installed binaries.
//!
//! `kiln serve` uses it when `DATABASE_URL` is unset (data kept under `.kiln/pgdata`, reused on
//! the next start); the test harness uses it for throwaway clusters. PostgreSQL refuses to run as
//! root, so when kiln runs as root the cluster is owned by and run as the `postgres` user.

use anyhow::{Context, bail};
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::process::Command;

/// How to run the cluster.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Turn off fsync and friends: for throwaway test clusters only.
    pub ephemeral: bool,
    /// Port to try first (a stable port is easier to point psql at); any free port otherwise.
    pub preferred_port: Option<u16>,
}

/// A running cluster, stopped by [`LocalPostgres::stop`] (not on drop: a server that exits
/// abnormally leaves it running, and the next start reuses it).
#[derive(Debug)]
pub struct LocalPostgres {
    data_dir: PathBuf,
    port: u16,
    options: Options,
    /// `Some((uid, gid))` of the `postgres` user when this process runs as root.
    run_as: Option<(u32, u32)>,
}

impl LocalPostgres {
    /// Creates the cluster in `data_dir` if needed and starts it, or attaches to the server
    /// already running on it.
    pub async fn start(data_dir: &Path, options: Options) -> anyhow::Result<Self> {
        let run_as = if is_root() { Some(postgres_user()?) } else { None };
        std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
        let data_dir = data_dir.canonicalize()?;
        if let Some((uid, gid)) = run_as {
            chown(&data_dir, Some(uid), Some(gid)).context("handing the data directory to the postgres user")?;
        }
        let mut pg = Self { data_dir, port: 0, options, run_as };
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

    /// Stops the server (fast shutdown: open sessions are cut).
    pub async fn stop(&self) -> anyhow::Result<()> {
        let data = self.data_dir.to_string_lossy().into_owned();
        self.run("pg_ctl", &["stop", "-D", &data, "-m", "fast", "-w"]).await.map(drop)
    }

    /// Stops the server at once, blocking (for `Drop` of throwaway clusters).
    pub fn stop_blocking(&self) {
        let mut cmd = std::process::Command::new("pg_ctl");
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
        let mut cmd = Command::new(program);
        cmd.args(args).current_dir(&self.data_dir).stdin(Stdio::null());
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd.output().await.with_context(|| format!("running {program} (is PostgreSQL installed?)"))?;
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

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}
