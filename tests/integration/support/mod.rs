//! Test harness: a real PostgreSQL, a real kiln server on port 0, real cargo builds, real HTTP.
//!
//! - PostgreSQL: `DATABASE_URL` when set; otherwise one throwaway cluster per test process,
//!   started from the local binaries (as the `postgres` user when running as root).
//!   Every test gets a fresh database, migrated by the server it starts.
//! - Plugins: each test copies the crates it needs (from `plugins/` or `tests/fixtures/`) into
//!   its own directory, so it can edit them. All tests share one cargo target directory, so the
//!   plugins' dependencies compile once; kiln's build lock serializes builds across processes.

#![allow(dead_code)] // each test uses a different part of the harness

use kiln::local_pg::{LocalPostgres, Options};
use serde_json::Value;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, oneshot};
use tokio_postgres::NoTls;

/// Long enough for a cold build of a plugin's dependencies on a busy 2-core machine.
pub const BUILD_DEADLINE: Duration = Duration::from_secs(300);
/// How long a row edit may take to change the routes. The target is well under a second; the
/// margin absorbs a machine busy compiling other tests' plugins.
pub const EDIT_DEADLINE: Duration = Duration::from_secs(3);

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The PostgreSQL the tests of this process use. Shared by the servers alive at one time,
/// stopped (and its directory removed) when the last of them drops.
pub struct Cluster {
    admin_url: String,
    pg: Option<(LocalPostgres, tempfile::TempDir)>,
}

impl Cluster {
    /// A cluster of this test's own, even when `DATABASE_URL` is set (to stop and restart it).
    pub async fn private() -> Arc<Cluster> {
        let dir = tempfile::Builder::new().prefix("kiln-pg-").tempdir().expect("temp dir");
        // The postgres user must be able to reach its data directory inside.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let pg = LocalPostgres::start(&dir.path().join("data"), Options { ephemeral: true, ..Default::default() })
            .await
            .expect("start a PostgreSQL cluster");
        Arc::new(Cluster { admin_url: pg.url(), pg: Some((pg, dir)) })
    }

    /// The cluster's server process, when the harness owns it.
    pub fn server(&self) -> &LocalPostgres {
        &self.pg.as_ref().expect("a cluster the harness started").0
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some((pg, _dir)) = &self.pg {
            pg.stop_blocking();
        }
    }
}

static CLUSTER: Mutex<Weak<Cluster>> = Mutex::const_new(Weak::new());

/// The cluster of this process, started on first use.
pub async fn cluster() -> Arc<Cluster> {
    let mut slot = CLUSTER.lock().await;
    if let Some(c) = slot.upgrade() {
        return c;
    }
    let cluster = match std::env::var("DATABASE_URL") {
        Ok(url) => Arc::new(Cluster { admin_url: url, pg: None }),
        Err(_) => Cluster::private().await,
    };
    *slot = Arc::downgrade(&cluster);
    cluster
}

/// A fresh, empty database on `c`; returns its URL.
pub async fn fresh_database(c: &Cluster) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!("kiln_test_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    kiln::create_database(&c.admin_url, &name).await.expect("create the test database");
    let mut config: tokio_postgres::Config = c.admin_url.parse().expect("valid URL");
    config.dbname(&name);
    // Rebuild a URL from the parts (host, port, user) of the admin URL.
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        tokio_postgres::config::Host::Unix(p) => p.to_string_lossy().into_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres");
    let password = config.get_password().map(|p| format!(":{}", String::from_utf8_lossy(p))).unwrap_or_default();
    format!("postgres://{user}{password}@{host}:{port}/{name}")
}

/// Copies a plugin crate (without build output) into `dest`.
pub fn copy_crate(from: &Path, dest: &Path) {
    for entry in walkdir::WalkDir::new(from).into_iter().filter_entry(|e| e.file_name() != "target") {
        let entry = entry.expect("walk");
        let rel = entry.path().strip_prefix(from).expect("inside");
        let target = dest.join(rel);
        if entry.file_type().is_dir() {
            std::fs::create_dir_all(&target).expect("mkdir");
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// Where a named plugin crate lives in the repository: `plugins/<name>` or `tests/fixtures/<name>`.
pub fn crate_source(name: &str) -> PathBuf {
    let example = repo_root().join("plugins").join(name);
    if example.exists() { example } else { repo_root().join("tests/fixtures").join(name) }
}

/// A kiln server for one test.
pub struct TestServer {
    pub cluster: Arc<Cluster>,
    pub root: tempfile::TempDir,
    pub base: String,
    pub db_url: String,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// A server whose plugin directory holds copies of the named crates.
    pub async fn start(plugins: &[&str]) -> Self {
        Self::start_with(cluster().await, plugins, |_| {}).await
    }

    /// As [`TestServer::start`], on `cluster`, with settings adjusted by `tweak`.
    pub async fn start_with(cluster: Arc<Cluster>, plugins: &[&str], tweak: impl FnOnce(&mut kiln::Config)) -> Self {
        let root = tempfile::Builder::new().prefix("kiln-test-").tempdir().expect("temp dir");
        std::fs::create_dir_all(root.path().join("plugins")).expect("mkdir");
        for name in plugins {
            copy_crate(&crate_source(name), &root.path().join("plugins").join(name));
        }
        let db_url = fresh_database(&cluster).await;
        Self::start_in_with(cluster, root, db_url, tweak).await
    }

    /// A server on an existing root directory and database (for restarts).
    pub async fn start_in(cluster: Arc<Cluster>, root: tempfile::TempDir, db_url: String) -> Self {
        Self::start_in_with(cluster, root, db_url, |_| {}).await
    }

    pub async fn start_in_with(
        cluster: Arc<Cluster>,
        root: tempfile::TempDir,
        db_url: String,
        tweak: impl FnOnce(&mut kiln::Config),
    ) -> Self {
        let mut config = kiln::Config::under(root.path(), db_url.clone());
        // Isolated plugins run in the kiln binary (the test binary serves in process).
        config.plugin_host_exe = Some(env!("CARGO_BIN_EXE_kiln").into());
        tweak(&mut config);
        config.build_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kiln-plugin-build");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(kiln::serve(listener, config, async {
            let _ = stopped.await;
        }));
        let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().expect("client");
        let server = Self { cluster, root, base, db_url, http, stop: Some(stop), task: Some(task) };
        server
            .wait_until("the server answers /health", BUILD_DEADLINE, || async { server.get("/health").await.0 != 0 })
            .await;
        server
    }

    /// Stops the server (graceful) and hands back its cluster, directory and database.
    pub async fn stop(mut self) -> (Arc<Cluster>, tempfile::TempDir, String) {
        let _ = self.stop.take().expect("running").send(());
        self.task.take().expect("running").await.expect("join").expect("server ran cleanly");
        let root = std::mem::replace(&mut self.root, tempfile::tempdir().expect("temp dir"));
        (self.cluster.clone(), root, self.db_url.clone())
    }

    /// Waits (up to `deadline`) for the server to end by itself, and hands back how it ended.
    pub async fn ended(mut self, deadline: Duration) -> anyhow::Result<()> {
        let task = self.task.take().expect("running");
        tokio::time::timeout(deadline, task).await.expect("the server ended in time").expect("join")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GET: (status, body as JSON or as a string). Status 0 when the server does not answer.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(self.url(path))).await
    }

    pub async fn post(&self, path: &str, body: Option<Value>) -> (u16, Value) {
        let req = self.http.post(self.url(path));
        self.send(match body {
            Some(b) => req.json(&b),
            None => req,
        })
        .await
    }

    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(self.http.put(self.url(path)).json(&body)).await
    }

    pub async fn send_delete(&self, path: &str) -> (u16, Value) {
        self.send(self.http.delete(self.url(path))).await
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let text = resp.text().await.unwrap_or_default();
                (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
            }
            Err(_) => (0, Value::Null),
        }
    }

    /// The plugin object from the admin API.
    pub async fn plugin(&self, name: &str) -> Value {
        let (status, body) = self.get(&format!("/plugins/{name}")).await;
        assert_eq!(status, 200, "GET /plugins/{name}: {body}");
        body
    }

    /// Waits until the plugin's row shows `state` (and, for `loaded`, no error).
    pub async fn wait_state(&self, name: &str, state: &str) -> Value {
        let mut last = Value::Null;
        let deadline = Instant::now() + BUILD_DEADLINE;
        while Instant::now() < deadline {
            let (status, body) = self.get(&format!("/plugins/{name}")).await;
            if status == 200 && body["state"] == state {
                return body;
            }
            last = body;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("plugin {name} did not reach state {state} within {BUILD_DEADLINE:?}; last seen: {last:#}");
    }

    /// Waits until plugin `name` serves its optimized library, not a draft (the staged build
    /// profile serves a draft first after an edit or for a plugin added at runtime).
    pub async fn wait_optimized(&self, name: &str) {
        self.wait_until(&format!("{name}'s optimized library serves"), BUILD_DEADLINE, || async {
            let row = self.plugin(name).await;
            let binary = row["binary_path"].as_str().unwrap_or_default();
            row["state"] == "loaded" && !binary.is_empty() && !binary.contains("-draft.")
        })
        .await;
    }

    /// Polls `cond` until it holds, failing the test at the deadline.
    pub async fn wait_until<F, Fut>(&self, what: &str, deadline: Duration, mut cond: F) -> Duration
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        wait_until(what, deadline, &mut cond).await
    }

    /// A direct connection to the server's database, as psql would be.
    pub async fn sql(&self) -> tokio_postgres::Client {
        connect(&self.db_url).await
    }

    /// The value of one series of `GET /metrics`, named as the text format writes it
    /// (`kiln_plugin_requests_in_flight{plugin="hello"}`), if it is there.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self.http.get(self.url("/metrics")).send().await.ok()?.text().await.ok()?;
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// Path of a plugin crate copied into this server's plugin directory.
    pub fn plugin_dir(&self, name: &str) -> PathBuf {
        self.root.path().join("plugins").join(name)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Polls `cond` every 10 ms until it holds; panics after `deadline`. Returns the time it took.
pub async fn wait_until<F, Fut>(what: &str, deadline: Duration, cond: &mut F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return start.elapsed();
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A plain connection (the connection task runs in the background).
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
}

/// Events of the lifecycle fixture's log without instance ids (`init v1`, `cleanup v1`, …).
pub fn read_log(path: &Path) -> Vec<String> {
    log_entries(path).into_iter().map(|(event, version, _)| format!("{event} {version}")).collect()
}

/// (event, version, instance id) of each line of the lifecycle fixture's log.
pub fn log_entries(path: &Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut f = l.split(' ').map(str::to_string);
            (f.next().unwrap_or_default(), f.next().unwrap_or_default(), f.next().unwrap_or_default())
        })
        .collect()
}

/// A `.tar.gz` of `dir`, entries under `prefix/`.
pub fn crate_archive(dir: &Path, prefix: &str) -> Vec<u8> {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    tar.append_dir_all(prefix, dir).unwrap();
    tar.into_inner().unwrap().finish().unwrap()
}

/// A `.tar.gz` with one raw entry: any path, any type (as a hostile tool would write it).
pub fn raw_archive(path: &str, kind: tar::EntryType, data: &[u8], link: Option<&str>) -> Vec<u8> {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    let mut header = tar::Header::new_old();
    header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
    if let Some(l) = link {
        header.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
    }
    header.set_entry_type(kind);
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append(&header, data).unwrap();
    tar.into_inner().unwrap().finish().unwrap()
}

/// `POST /plugins/install` of `archive`: (status, JSON body).
pub async fn install(server: &TestServer, archive: Vec<u8>) -> (u16, Value) {
    let part = reqwest::multipart::Part::bytes(archive).file_name("plugin.tar.gz");
    let form = reqwest::multipart::Form::new().part("file", part);
    let resp = server.http.post(server.url("/plugins/install")).multipart(form).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Requests to `path` in a loop until stopped: (answered 200, anything else).
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(server: &Arc<TestServer>, path: &'static str, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let tasks = (0..clients)
            .map(|_| {
                let (server, stop, ok, failed) = (server.clone(), stop.clone(), ok.clone(), failed.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match server.get(path).await {
                            (200, _) => ok.fetch_add(1, Ordering::Relaxed),
                            (status, body) => {
                                eprintln!("{path} answered {status}: {body}");
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                })
            })
            .collect();
        Self { stop, ok, failed, tasks }
    }

    /// Stops the clients: (ok, failed).
    pub async fn end(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}
