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

    /// A TOML file with more plugin directories and the plugins that start enabled or disabled
    /// (`plugin_dirs = [...]`, `enable = [...]`, `disable = [...]`; see the README).
    #[arg(long, env = "KILN_CONFIG")]
    pub config_file: Option<PathBuf>,

    /// Where built plugin libraries are kept (`<name>-<hash>.so`).
    #[arg(long, env = "KILN_BIN_DIR", default_value = "bin/plugins")]
    pub bin_dir: PathBuf,

    /// Cargo target directory shared by all plugin builds, so dependencies compile once.
    #[arg(long, env = "KILN_BUILD_DIR", default_value = ".kiln/build")]
    pub build_dir: PathBuf,

    /// How plugins are built: `staged` (an edit of a plugin that serves is served from an
    /// unoptimized draft at once, then from its optimized build), `optimized` (as a release
    /// build, at once), or `fast` (without crate-local LTO: handlers run a little slower).
    #[arg(long, env = "KILN_BUILD_PROFILE", value_enum, default_value = "staged")]
    pub build_profile: crate::compiler::BuildProfile,

    /// Where plugins installed by upload are unpacked, one directory each.
    #[arg(long, env = "KILN_INSTALL_DIR", default_value = ".kiln/installed")]
    pub install_dir: PathBuf,

    /// When set, every admin endpoint except /health and the docs requires
    /// `Authorization: Bearer <token>`. Plugin endpoints stay public.
    #[arg(long, env = "KILN_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Local state: the private PostgreSQL cluster when `DATABASE_URL` is unset.
    #[arg(long, env = "KILN_DATA_DIR", default_value = ".kiln")]
    pub data_dir: PathBuf,

    /// The kiln-types crate that plugins are built against (default: the copy this server was
    /// built from).
    #[arg(long, env = "KILN_TYPES_DIR", default_value = DEFAULT_TYPES_DIR)]
    pub types_dir: PathBuf,

    /// Seconds between full resyncs of every plugin row: a safety net behind LISTEN/NOTIFY.
    #[arg(long, env = "KILN_RESYNC_SECS", default_value_t = 60)]
    pub resync_secs: u64,

    /// Watch plugin sources: rebuild and reload on change, discover new crates, unload removed ones.
    #[arg(long, env = "KILN_WATCH", value_enum, default_value = "auto")]
    pub watch: WatchMode,

    /// Run the server under a supervisor process that starts it again when a plugin takes it
    /// down (and marks that plugin's row with the signal or exit code).
    #[arg(long, env = "KILN_SUPERVISE", default_value_t = true, action = clap::ArgAction::Set)]
    pub supervise: bool,

    /// Count every plugin request in `GET /metrics` (requests, latency, handler panics and
    /// timeouts). `false` leaves the request path uninstrumented; the other metrics stay.
    #[arg(long, env = "KILN_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub metrics: bool,

    /// Seconds to wait at startup for PostgreSQL to accept connections.
    #[arg(long, env = "KILN_DB_WAIT_SECS", default_value_t = 60)]
    pub db_wait_secs: u64,

    /// Seconds a request's head (request line and headers) and then its body may each take to
    /// arrive; an idle keep-alive connection is closed after as long. A slow body gets 408.
    #[arg(long, env = "KILN_REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    pub request_timeout_secs: u64,

    /// The default deadline of a plugin route, in milliseconds (a route may set its own): past
    /// it the client gets 504, and the handler's host calls fail.
    #[arg(long, env = "KILN_ROUTE_DEADLINE_MS", default_value_t = 30_000)]
    pub route_deadline_ms: u64,

    /// Calls of one plugin's blocking routes that may run at once; more wait for one to end,
    /// and answer 503 `PluginOverloaded` if none does before their deadline. Each holds a
    /// thread of the blocking pool until its handler returns, also past its deadline.
    #[arg(long, env = "KILN_BLOCKING_CALLS_PER_PLUGIN", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub blocking_calls_per_plugin: u32,

    /// Calls of all plugins' blocking routes that may run at once, server-wide; more wait for
    /// one to end, and answer 503 `PluginOverloaded` if none does before their deadline. The
    /// blocking pool has this many threads plus 256 that plugin routes never take (host calls,
    /// event deliveries, builds, the docs).
    #[arg(long, env = "KILN_BLOCKING_CALLS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub blocking_calls: u32,

    /// Largest request body passed to a plugin, in bytes.
    #[arg(long, env = "KILN_MAX_BODY", default_value_t = 8 * 1024 * 1024)]
    pub max_body: usize,

    /// Milliseconds before a durable event (a row of the `events` table) that failed is tried
    /// again; the pause doubles after each attempt.
    #[arg(long, env = "KILN_EVENT_RETRY_MS", default_value_t = 1000)]
    pub event_retry_ms: u64,

    /// Milliseconds an event subscriber may take over one event unless its subscription says
    /// (`Subscription::timeout`); past it the event counts as timed out.
    #[arg(long, env = "KILN_EVENT_TIMEOUT_MS", default_value_t = 5000)]
    pub event_timeout_ms: u64,

    /// Attempts to deliver a durable event before it is `dead`.
    #[arg(long, env = "KILN_EVENT_ATTEMPTS", default_value_t = 5)]
    pub event_attempts: u32,

    /// This server's name among the replicas sharing its database (letters, digits, `_.:@-`).
    /// Keep it stable across restarts. Default: the host name and the port it serves on.
    #[arg(long, env = "KILN_REPLICA_ID")]
    pub replica_id: Option<String>,

    /// Milliseconds between this replica's heartbeats.
    #[arg(long, env = "KILN_HEARTBEAT_MS", default_value_t = 2000)]
    pub heartbeat_ms: u64,

    /// Milliseconds without a heartbeat after which a replica is shown gone and its observed
    /// rows are removed.
    #[arg(long, env = "KILN_REPLICA_TIMEOUT_MS", default_value_t = 10_000)]
    pub replica_timeout_ms: u64,

    /// The `kiln` binary that runs plugins with `isolation = "process"` (as `kiln plugin-host`).
    /// Default: this binary.
    #[arg(long, env = "KILN_PLUGIN_HOST_EXE")]
    pub plugin_host_exe: Option<PathBuf>,

    /// Microseconds an isolated call's waiter polls its socket, when it is the only call in
    /// flight on its side, before it sleeps (see the README's Process isolation); 0: never.
    #[arg(long, env = "KILN_ISOLATION_POLL_US", default_value_t = 100)]
    pub isolation_poll_us: u64,

    /// Plugin catalogs to sync (comma-separated): http(s) URLs, or absolute directory paths,
    /// serving a `catalog.json`. Recorded in `catalog_repositories`, where operators may add more.
    #[arg(long = "catalog", env = "KILN_CATALOGS", value_delimiter = ',')]
    pub catalogs: Vec<String>,

    /// ed25519 public keys (base64 or hex, comma-separated) one of which must have signed a
    /// catalog entry for it to be installed. None: only the archive's sha256 is checked.
    #[arg(long = "catalog-trusted-key", env = "KILN_CATALOG_TRUSTED_KEYS", value_delimiter = ',')]
    pub catalog_trusted_keys: Vec<String>,

    /// Seconds between catalog syncs (the first at startup); 0: only on `POST /catalog/sync`.
    #[arg(long, env = "KILN_CATALOG_SYNC_SECS", default_value_t = 3600)]
    pub catalog_sync_secs: u64,
}

impl Config {
    /// Settings for a server whose files all live under `root` (used by tests).
    pub fn under(root: &Path, database_url: String) -> Self {
        Self {
            database_url: Some(database_url),
            addr: "127.0.0.1:0".parse().expect("valid address"),
            plugin_dirs: vec![root.join("plugins")],
            config_file: None,
            bin_dir: root.join("bin"),
            build_dir: root.join("build"),
            build_profile: Default::default(),
            install_dir: root.join("installed"),
            admin_token: None,
            data_dir: root.join("data"),
            types_dir: PathBuf::from(DEFAULT_TYPES_DIR),
            resync_secs: 60,
            supervise: false,
            metrics: true,
            db_wait_secs: 60,
            request_timeout_secs: 30,
            route_deadline_ms: 30_000,
            watch: WatchMode::Off,
            max_body: 8 * 1024 * 1024,
            blocking_calls_per_plugin: 64,
            blocking_calls: 256,
            event_retry_ms: 1000,
            event_timeout_ms: 5000,
            event_attempts: 5,
            replica_id: None,
            heartbeat_ms: 2000,
            replica_timeout_ms: 10_000,
            plugin_host_exe: None,
            isolation_poll_us: 100,
            catalogs: Vec::new(),
            catalog_trusted_keys: Vec::new(),
            catalog_sync_secs: 0,
        }
    }

    /// Threads of the blocking pool: [`Config::blocking_calls`] for plugins' blocking routes,
    /// and [`BLOCKING_RESERVE`] that they never take.
    pub fn blocking_pool(&self) -> usize {
        self.blocking_calls as usize + BLOCKING_RESERVE
    }

    /// How long startup waits for the database.
    pub fn db_wait(&self) -> Duration {
        Duration::from_secs(self.db_wait_secs)
    }

    /// How long a request's head, and then its body, may take to arrive.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs.max(1))
    }

    /// The interval of this replica's heartbeats.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms.max(10))
    }

    /// How long a replica may be silent before it is shown gone.
    pub fn replica_timeout(&self) -> Duration {
        Duration::from_millis(self.replica_timeout_ms.max(2 * self.heartbeat_ms).max(20))
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
        if let Some(f) = &mut self.config_file {
            abs(f);
        }
        abs(&mut self.build_dir);
        abs(&mut self.install_dir);
        abs(&mut self.data_dir);
        abs(&mut self.types_dir);
        Ok(self)
    }
}

/// Threads of the blocking pool that plugins' blocking routes never take: headroom for the
/// server's own blocking work (host calls from inline handlers hand their worker to one, so
/// without it a pool full of hung handlers would stall the async workers too). Event handlers
/// and configure hooks run plugin code on these threads too, at most one per subscription.
/// `main.rs` sizes the pool; a program that embeds [`crate::serve`] should build its runtime
/// with [`Config::blocking_pool`] blocking threads.
pub const BLOCKING_RESERVE: usize = 256;

/// The `types/` crate next to the `core/` crate this binary was built from.
pub const DEFAULT_TYPES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../types");

/// The config file (`--config-file`, TOML):
///
/// ```toml
/// plugin_dirs = ["more-plugins"]   # searched too (relative to this file)
/// enable = ["powertable"]          # if given: only these start active when discovered
/// disable = ["hello"]              # these start inactive when discovered
/// ```
///
/// The lists decide the status a plugin's row gets when discovery creates it; after that the
/// row is the truth (a later toggle is not overridden at the next start).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub plugin_dirs: Vec<PathBuf>,
    pub enable: Option<Vec<String>>,
    #[serde(default)]
    pub disable: Vec<String>,
}

impl FileConfig {
    /// Reads and checks the file; relative plugin directories resolve against its directory.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        let mut file: FileConfig = toml::from_str(&text)?;
        for name in file.enable.iter().flatten().chain(&file.disable) {
            crate::manifest::validate_name(name).map_err(anyhow::Error::msg)?;
        }
        let base = path.parent().unwrap_or(Path::new("."));
        for dir in &mut file.plugin_dirs {
            if dir.is_relative() {
                *dir = base.join(&*dir);
            }
        }
        Ok(file)
    }

    /// The status a newly discovered plugin gets.
    pub fn initial_status(&self, name: &str) -> &'static str {
        let enabled = self.enable.as_ref().is_none_or(|e| e.iter().any(|n| n == name));
        if enabled && !self.disable.iter().any(|n| n == name) { "active" } else { "inactive" }
    }
}

#[cfg(test)]
mod tests {
    use super::FileConfig;

    #[test]
    fn lists_decide_the_initial_status() {
        let f: FileConfig = toml::from_str("enable = [\"a\", \"b\"]\ndisable = [\"b\"]").unwrap();
        assert_eq!(
            (f.initial_status("a"), f.initial_status("b"), f.initial_status("c")),
            ("active", "inactive", "inactive")
        );
        let f: FileConfig = toml::from_str("disable = [\"b\"]").unwrap();
        assert_eq!((f.initial_status("a"), f.initial_status("b")), ("active", "inactive"));
        assert!(toml::from_str::<FileConfig>("enabel = []").is_err(), "unknown keys are refused");
    }
}
