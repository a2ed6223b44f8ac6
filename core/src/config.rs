//! Server settings, from command-line flags or the environment.

use crate::watcher::WatchMode;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Settings of `kiln serve`. Relative paths resolve against the working directory.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// PostgreSQL connection string. Unset: kiln starts a private PostgreSQL under `--data-dir`.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,

    /// Address to serve HTTP on.
    #[arg(long, env = "KILN_ADDR", default_value = "127.0.0.1:9999")]
    pub addr: SocketAddr,

    /// Directories searched for plugin crates, colon-separated.
    #[arg(long, env = "KILN_PLUGIN_DIRS", default_value = "plugins", value_delimiter = ':')]
    pub plugin_dirs: Vec<PathBuf>,

    /// Where built plugin libraries are kept (`<name>-<hash>.so`).
    #[arg(long, env = "KILN_BIN_DIR", default_value = "bin/plugins")]
    pub bin_dir: PathBuf,

    /// Cargo target directory shared by all plugin builds, so dependencies compile once.
    #[arg(long, env = "KILN_BUILD_DIR", default_value = ".kiln/build")]
    pub build_dir: PathBuf,

    /// Local state: the private PostgreSQL cluster when `DATABASE_URL` is unset.
    #[arg(long, env = "KILN_DATA_DIR", default_value = ".kiln")]
    pub data_dir: PathBuf,

    /// The kiln-types crate that plugins are built against (default: the copy this server was
    /// built from).
    #[arg(long, env = "KILN_TYPES_DIR", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../types"))]
    pub types_dir: PathBuf,

    /// Seconds between full resyncs of every plugin row: a safety net behind LISTEN/NOTIFY.
    #[arg(long, env = "KILN_RESYNC_SECS", default_value_t = 60)]
    pub resync_secs: u64,

    /// Watch plugin sources: rebuild and reload on change, discover new crates, unload removed ones.
    #[arg(long, env = "KILN_WATCH", value_enum, default_value = "auto")]
    pub watch: WatchMode,

    /// Largest request body passed to a plugin, in bytes.
    #[arg(long, env = "KILN_MAX_BODY", default_value_t = 8 * 1024 * 1024)]
    pub max_body: usize,
}

impl Config {
    /// Settings for a server whose files all live under `root` (used by tests).
    pub fn under(root: &Path, database_url: String) -> Self {
        Self {
            database_url: Some(database_url),
            addr: "127.0.0.1:0".parse().expect("valid address"),
            plugin_dirs: vec![root.join("plugins")],
            bin_dir: root.join("bin"),
            build_dir: root.join("build"),
            data_dir: root.join("data"),
            types_dir: default_types_dir(),
            resync_secs: 60,
            watch: WatchMode::Off,
            max_body: 8 * 1024 * 1024,
        }
    }

    /// The interval of the safety-net resync.
    pub fn resync_interval(&self) -> Duration {
        Duration::from_secs(self.resync_secs.max(1))
    }

    /// Makes every path absolute against the current directory, so that cargo (run elsewhere)
    /// and the stored rows see the same paths.
    pub fn absolutize(mut self) -> std::io::Result<Self> {
        let cwd = std::env::current_dir()?;
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = cwd.join(&*p);
            }
        };
        self.plugin_dirs.iter_mut().for_each(abs);
        abs(&mut self.bin_dir);
        abs(&mut self.build_dir);
        abs(&mut self.data_dir);
        abs(&mut self.types_dir);
        Ok(self)
    }
}

/// The `types/` crate next to the `core/` crate this binary was built from.
pub fn default_types_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("types")
}
