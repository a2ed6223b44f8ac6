//! What the benchmark runs against: a private PostgreSQL, kiln servers, the static baseline
//! server, and generated plugin crates.

use kiln::local_pg::{LocalPostgres, Options};
use kiln_types::abi::{KilnRequest, KilnStr};
use poem::{Endpoint, Request, Response, Route};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio_postgres::NoTls;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A private PostgreSQL for the whole run.
pub struct Db {
    pub pg: LocalPostgres,
    _dir: tempfile::TempDir,
}

impl Db {
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("kiln-bench-pg-").tempdir()?;
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let pg =
            LocalPostgres::start(&dir.path().join("data"), Options { ephemeral: true, ..Default::default() }).await?;
        Ok(Self { pg, _dir: dir })
    }

    /// A fresh database; returns its URL.
    pub async fn fresh(&self, name: &str) -> anyhow::Result<String> {
        kiln::create_database(&self.pg.url(), name).await?;
        Ok(self.pg.url_for(name))
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        self.pg.stop_blocking();
    }
}

/// A kiln server running on its own runtime (own threads), as in production.
pub struct Kiln {
    pub addr: SocketAddr,
    pub db_url: String,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Kiln {
    /// Starts a server and waits until it answers (migrations done).
    pub async fn start(root: &Path, plugin_dirs: Vec<PathBuf>, db_url: &str) -> anyhow::Result<Self> {
        Self::start_with(root, plugin_dirs, db_url, |_| {}).await
    }

    /// As [`Kiln::start`], with settings adjusted by `tweak`.
    pub async fn start_with(
        root: &Path,
        plugin_dirs: Vec<PathBuf>,
        db_url: &str,
        tweak: impl FnOnce(&mut kiln::Config),
    ) -> anyhow::Result<Self> {
        let mut config = kiln::Config::under(root, db_url.to_string());
        config.plugin_dirs = plugin_dirs;
        config.build_dir = repo_root().join("target/kiln-bench-build");
        tweak(&mut config);
        let (stop, stopped) = oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .thread_name(KILN_THREADS)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
                addr_tx.send(listener.local_addr().expect("addr")).expect("send addr");
                let shutdown = async {
                    let _ = stopped.await;
                };
                if let Err(e) = kiln::serve(listener, config, shutdown).await {
                    eprintln!("kiln server failed: {e:#}");
                }
            });
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(30))?;
        let server = Self { addr, db_url: db_url.to_string(), stop: Some(stop), thread: Some(thread) };
        let start = std::time::Instant::now();
        while server.json("/health").await.is_err() {
            anyhow::ensure!(start.elapsed() < Duration::from_secs(60), "the server did not start");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(server)
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// GET a JSON document from the admin API.
    pub async fn json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let body = http(self.addr, "GET", path).await?.1;
        Ok(serde_json::from_str(&body)?)
    }

    /// The sum of a counter's series in `GET /metrics` (`kiln_reconcile_passes_total`, …).
    pub async fn counter(&self, name: &str) -> anyhow::Result<u64> {
        let text = http(self.addr, "GET", "/metrics").await?.1;
        Ok(text
            .lines()
            .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64)
    }

    /// Waits until plugin `name` serves its optimized library, not a draft (a staged build).
    pub async fn wait_optimized(&self, name: &str, deadline: Duration) -> anyhow::Result<()> {
        let start = std::time::Instant::now();
        loop {
            let row = self.json(&format!("/plugins/{name}")).await?;
            if !row["binary_path"].as_str().unwrap_or("-draft.").contains("-draft.") && row["state"] == "loaded" {
                return Ok(());
            }
            anyhow::ensure!(start.elapsed() < deadline, "{name}'s optimized library never served: {row}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Waits until `n` plugins serve and no reconcile pass is running or queued.
    pub async fn wait_serving(&self, n: u64, deadline: Duration) -> anyhow::Result<()> {
        let start = std::time::Instant::now();
        loop {
            if let Ok(h) = self.json("/health").await
                && h["plugins_served"].as_u64() == Some(n)
                && h["reconciling"].as_u64() == Some(0)
            {
                return Ok(());
            }
            if let Ok(h) = self.json("/health").await
                && h["plugins"]["failed"].as_u64().unwrap_or(0) > 0
                && h["reconciling"] == 0
            {
                anyhow::bail!("plugins failed (their rows say why): {h}");
            }
            anyhow::ensure!(start.elapsed() < deadline, "{n} plugins did not come up within {deadline:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn sql(&self) -> anyhow::Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.db_url, NoTls).await?;
        tokio::spawn(conn);
        Ok(client)
    }
}

impl Drop for Kiln {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// One HTTP request on a fresh connection (for the admin API): (status, body).
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!("{method} {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// Names of the threads of a kiln server's runtime and of the static baseline's (see
/// [`crate::cpu`]; at most 15 bytes, Linux's limit).
pub const KILN_THREADS: &str = "bench-kiln";
pub const STATIC_THREADS: &str = "bench-static";

/// The baseline: the same powertable handler, linked into a plain poem server and called
/// directly (no library, no C ABI, no blocking pool, no dynamic route table).
pub fn start_static() -> anyhow::Result<SocketAddr> {
    struct List(Arc<powertable::PowerTable>);
    impl Endpoint for List {
        type Output = Response;
        async fn call(&self, req: Request) -> poem::Result<Response> {
            let (method, path, query) = (req.method().as_str(), req.uri().path(), req.uri().query().unwrap_or(""));
            let raw = KilnRequest {
                route: 0,
                method: KilnStr::new(method.as_bytes()),
                path: KilnStr::new(path.as_bytes()),
                query: KilnStr::new(query.as_bytes()),
                params: std::ptr::null(),
                params_len: 0,
                headers: kiln_types::abi::KilnHeaders::NONE,
                body: KilnStr::new(&[]),
            };
            // SAFETY: every view points at this request's data (UTF-8 strs), alive for the call.
            let r = self.0.list(&unsafe { kiln_types::Request::from_raw(&raw) });
            let mut b = Response::builder().status(poem::http::StatusCode::from_u16(r.status).expect("status"));
            for (k, v) in &r.headers {
                b = b.header(k.as_str(), v.as_str());
            }
            Ok(b.body(r.body))
        }
    }
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .thread_name(STATIC_THREADS)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            addr_tx.send(listener.local_addr().expect("addr")).expect("send");
            let app = Route::new().at("/powertable", List(Arc::new(powertable::PowerTable::new())));
            let acceptor = poem::listener::TcpAcceptor::from_tokio(listener).expect("acceptor");
            let _ = poem::Server::new_with_acceptor(acceptor).run(app).await;
        });
    });
    Ok(addr_rx.recv_timeout(Duration::from_secs(30))?)
}

/// Writes a plugin crate `name` serving `routes` GET routes `/<name>/r<j>` (dependencies: only
/// kiln-types, like the lifecycle fixture, whose lock file it reuses).
pub fn generate_plugin(dir: &Path, name: &str, routes: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("src"))?;
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2024\"\npublish = false\n\n\
             [package.metadata.kiln]\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\nkiln-types = \"0.1\"\n"
        ),
    )?;
    let lock = std::fs::read_to_string(repo_root().join("tests/fixtures/lifecycle/Cargo.lock"))?;
    std::fs::write(dir.join("Cargo.lock"), kiln::staging::renamed_lock(&lock, "lifecycle", name))?;
    let routes: String =
        (0..routes).map(|j| format!("            Route::get(\"/{name}/r{j}\", Self::get),\n")).collect();
    std::fs::write(
        dir.join("src/lib.rs"),
        format!(
            "//! Generated benchmark plugin.\n\
             use kiln_types::{{InitContext, Plugin, Request, Response, Route}};\n\
             pub struct P;\n\
             impl Plugin for P {{\n    fn init(_: &InitContext) -> Result<Self, String> {{ Ok(P) }}\n\
             \x20   fn routes() -> Vec<Route<Self>> {{\n        vec![\n{routes}        ]\n    }}\n}}\n\
             impl P {{\n    fn get(&self, _: &Request) -> Response {{ Response::text(200, \"{name}\") }}\n}}\n\
             kiln_types::export_plugin!(P);\n"
        ),
    )?;
    Ok(())
}

/// Copies a crate without its build output.
pub fn copy_crate(from: &Path, to: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            if entry.file_name() != "target" {
                std::fs::create_dir_all(&target)?;
                copy_crate(&entry.path(), &target)?;
            }
        } else {
            std::fs::create_dir_all(to)?;
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// Resident memory of this process, in KiB.
pub fn rss_kib() -> u64 {
    rss_kib_of("self")
}

/// Resident memory of process `pid` (a number, or `self`), in KiB.
pub fn rss_kib_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status")).map(|s| kib_field(&s, "VmRSS:")).unwrap_or(0)
}

/// The KiB figure of the first line of `text` that starts with `key` (`/proc` status and smaps).
pub fn kib_field(text: &str, key: &str) -> u64 {
    text.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
}
