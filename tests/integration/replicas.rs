//! Several kiln servers (replicas) on one database: a row edit reaches them all, each version is
//! built once and fetched by the others, a replica that stops or dies is shown gone, and a
//! builder that dies mid-build is replaced by another.

use crate::support::{
    BUILD_DEADLINE, EDIT_DEADLINE, TestServer, cluster, connect, crate_archive, crate_source, fresh_database, install,
    repo_root, wait_until,
};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Settings of replica `id`: heartbeats fast enough for a test to see one go silent.
fn replica(id: &'static str) -> impl FnOnce(&mut kiln::Config) {
    move |c: &mut kiln::Config| {
        c.replica_id = Some(id.into());
        c.heartbeat_ms = 100;
        c.replica_timeout_ms = 1500;
    }
}

/// Another replica on `first`'s database, with no plugin directory of its own.
async fn join(first: &TestServer, id: &'static str) -> TestServer {
    let root = tempfile::Builder::new().prefix("kiln-replica-").tempdir().expect("temp dir");
    std::fs::create_dir_all(root.path().join("plugins")).expect("mkdir");
    TestServer::start_in_with(first.cluster.clone(), root, first.db_url.clone(), replica(id)).await
}

/// The greeting `GET /hello` answers on `server` (empty when it does not answer 200).
async fn greeting(server: &TestServer) -> String {
    match server.get("/hello").await {
        (200, body) => body["message"].as_str().unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

async fn wait_all(servers: &[&TestServer], what: &str, deadline: Duration, want: &str) {
    for s in servers {
        s.wait_until(&format!("{what} on {}", s.base), deadline, || async { greeting(s).await == want }).await;
    }
}

/// `GET /replicas` as seen by `server`, by id.
async fn replicas(server: &TestServer) -> Vec<Value> {
    let (status, body) = server.get("/replicas").await;
    assert_eq!(status, 200, "{body}");
    body.as_array().expect("a list").clone()
}

fn find<'a>(list: &'a [Value], id: &str) -> &'a Value {
    list.iter().find(|r| r["id"] == id).unwrap_or_else(|| panic!("replica {id} not listed: {list:?}"))
}

/// Replicas `a` (which discovers `hello`), `b` and `c`, all serving it.
async fn three_serving_hello() -> (TestServer, TestServer, TestServer) {
    let a = TestServer::start_with(cluster().await, &["hello"], replica("a")).await;
    a.wait_state("hello", "loaded").await;
    let b = join(&a, "b").await;
    let c = join(&a, "c").await;
    wait_all(&[&a, &b, &c], "hello serves", BUILD_DEADLINE, "hello, world").await;
    (a, b, c)
}

#[tokio::test(flavor = "multi_thread")]
async fn three_replicas_follow_one_row_and_build_each_version_once() {
    let (a, b, c) = three_serving_hello().await;
    let all = [&a, &b, &c];

    // Each replica says what it serves; together they have converged.
    c.wait_until("c sees all three replicas serve hello", EDIT_DEADLINE, || async {
        c.plugin("hello").await["rollout"] == "converged"
    })
    .await;
    let plugin = c.plugin("hello").await;
    assert_eq!(plugin["replica"], "c", "{plugin:#}");
    let states: Vec<(String, String)> = plugin["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["replica"].as_str().unwrap().to_string(), r["state"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(states, [("a", "loaded"), ("b", "loaded"), ("c", "loaded")].map(|(r, s)| (r.into(), s.into())));

    // The first version was built by `a` alone; the others fetched its library.
    let counters = |id: &'static str, builds: i64, fetches: i64| {
        let b = &b;
        async move {
            let list = replicas(b).await;
            let r = find(&list, id);
            r["builds"] == builds && r["fetches"] == fetches && r["state"] == "live"
        }
    };
    b.wait_until("a built once, b and c fetched", EDIT_DEADLINE, || async {
        counters("a", 1, 0).await && counters("b", 0, 1).await && counters("c", 0, 1).await
    })
    .await;

    // A toggle in SQL reaches all three.
    let db = a.sql().await;
    db.execute("UPDATE plugins SET status = 'inactive' WHERE name = 'hello'", &[]).await.unwrap();
    for s in all {
        s.wait_until("hello is off everywhere", EDIT_DEADLINE, || async { s.get("/hello").await.0 == 404 }).await;
    }
    db.execute("UPDATE plugins SET status = 'active' WHERE name = 'hello'", &[]).await.unwrap();
    wait_all(&all, "hello serves again", EDIT_DEADLINE, "hello, world").await;

    // New code, reloaded through one replica: built once, served by all three.
    let lib = a.plugin_dir("hello").join("src/lib.rs");
    let code = std::fs::read_to_string(&lib).unwrap();
    std::fs::write(&lib, code.replace("format!(\"hello, {who}\")", "format!(\"hi, {who}\")")).unwrap();
    let (status, body) = b.post("/plugins/hello/reload", None).await;
    assert_eq!(status, 200, "{body}");
    wait_all(&all, "the new version serves", BUILD_DEADLINE, "hi, world").await;
    let new_hash = b.plugin("hello").await["loaded_hash"].as_str().unwrap().to_string();
    let of_new = |draft: bool| {
        let (a, new_hash) = (&a, &new_hash);
        async move {
            let (_, builds) = a.get("/plugins/hello/builds").await;
            let list: Vec<Value> =
                builds.as_array().unwrap().iter().filter(|x| x["source_hash"] == new_hash.as_str()).cloned().collect();
            list.into_iter().filter(|x| x["draft"] == draft).collect::<Vec<Value>>()
        }
    };
    // The replica that built it served a draft first (the staged profile), then recorded the
    // optimized build.
    a.wait_until("the new version's optimized build is recorded", BUILD_DEADLINE, || async {
        !of_new(false).await.is_empty()
    })
    .await;
    let optimized = of_new(false).await;
    assert_eq!(optimized.len(), 1, "one optimized build of the new version: {optimized:#?}");
    assert_eq!(optimized[0]["success"], true, "{optimized:#?}");
    // Whichever replica took the build lock first built it (b's own pass, or a pass another
    // replica's notification woke); the other two fetched it.
    let builder = optimized[0]["replica"].as_str().unwrap().to_string();
    let drafts = of_new(true).await;
    assert!(
        drafts.len() == 1 && drafts[0]["replica"] == builder.as_str(),
        "one draft, served by the replica that built the version (the others wait for its library): {drafts:#?}"
    );
    let (a_built, b_built, c_built) = (builder == "a", builder == "b", builder == "c");
    b.wait_until("one replica built the new version; the other two fetched it", EDIT_DEADLINE, || async {
        counters("a", 1 + 2 * a_built as i64, !a_built as i64).await
            && counters("b", 2 * b_built as i64, 1 + !b_built as i64).await
            && counters("c", 2 * c_built as i64, 1 + !c_built as i64).await
    })
    .await;
    for s in all {
        assert_eq!(s.plugin("hello").await["loaded_hash"], new_hash.as_str());
    }

    // A replica that stops is shown gone at once, and its observed rows go.
    let (_, _, _) = c.stop().await;
    let list = replicas(&a).await;
    assert_eq!(find(&list, "c")["state"], "gone", "{list:?}");
    let plugin = a.plugin("hello").await;
    let listed: Vec<&str> =
        plugin["replicas"].as_array().unwrap().iter().map(|r| r["replica"].as_str().unwrap()).collect();
    assert_eq!(listed, ["a", "b"], "{plugin:#}");
    let rows: i64 =
        db.query_one("SELECT count(*) FROM plugin_replicas WHERE replica_id = 'c'", &[]).await.unwrap().get(0);
    assert_eq!(rows, 0, "c's observed rows went with it");
}

#[tokio::test(flavor = "multi_thread")]
async fn reloads_through_a_round_robin_of_three_replicas_drop_nothing() {
    let (a, b, c) = three_serving_hello().await;
    let all = [&a, &b, &c];

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let bases: Vec<String> = all.iter().map(|s| s.url("/hello")).collect();
    let mut clients = Vec::new();
    for worker in 0..4 {
        let (stop, ok, failed, bases) = (stop.clone(), ok.clone(), failed.clone(), bases.clone());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut i = worker;
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let url = &bases[i % bases.len()];
                i += 1;
                match http.get(url).send().await {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        failures.push(format!("{url}: {}", r.status()));
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        failures.push(format!("{url}: {e}"));
                    }
                }
            }
            failures
        }));
    }
    for i in 0..20 {
        let s = all[i % 3];
        let (status, body) = s.post("/plugins/hello/reload", None).await;
        assert_eq!(status, 200, "reload {i} through {}: {body}", s.base);
    }
    // Every replica has taken the last reload: the row's generation, served everywhere.
    a.wait_until("every replica settled", EDIT_DEADLINE, || async {
        let mut settled = true;
        for s in all {
            settled &= s.get("/health").await.1["reconciling"] == 0;
        }
        settled && a.plugin("hello").await["rollout"] == "converged"
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(c.await.unwrap());
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 100, "the load ran: {ok} requests");
    assert_eq!(failed, 0, "failed requests during 20 reloads: {failures:?}");
    let generation: i64 =
        a.sql().await.query_one("SELECT generation FROM plugins WHERE name = 'hello'", &[]).await.unwrap().get(0);
    assert_eq!(generation, 20, "each reload asked every replica");
}

/// A plugin whose build script waits until `gate` exists (for at most 5 minutes).
fn write_gated_plugin(dir: &Path, gate: &Path) {
    std::fs::create_dir_all(dir.join("src")).unwrap();
    let manifest = "[package]\nname = \"gated\"\nversion = \"0.1.0\"\nedition = \"2024\"\npublish = false\n\n\
                    [package.metadata.kiln]\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n\
                    [dependencies]\nkiln-types = \"0.1\"\n";
    std::fs::write(dir.join("Cargo.toml"), manifest).unwrap();
    let lock = std::fs::read_to_string(repo_root().join("tests/fixtures/lifecycle/Cargo.lock")).unwrap();
    std::fs::write(dir.join("Cargo.lock"), kiln::staging::renamed_lock(&lock, "lifecycle", "gated")).unwrap();
    let build = format!(
        "fn main() {{\n\
         \x20   println!(\"cargo:rerun-if-changed=build.rs\");\n\
         \x20   let gate = std::path::Path::new({gate:?});\n\
         \x20   let start = std::time::Instant::now();\n\
         \x20   while !gate.exists() {{\n\
         \x20       assert!(start.elapsed().as_secs() < 300, \"the test never opened the gate\");\n\
         \x20       std::thread::sleep(std::time::Duration::from_millis(20));\n\
         \x20   }}\n\
         }}\n"
    );
    std::fs::write(dir.join("build.rs"), build).unwrap();
    let code = "use kiln_types::{InitContext, Plugin, Request, Response, Route};\n\
                pub struct P;\n\
                impl Plugin for P {\n\
                \x20   fn init(_: &InitContext) -> Result<Self, String> { Ok(P) }\n\
                \x20   fn routes() -> Vec<Route<Self>> { vec![Route::get(\"/gated\", Self::get)] }\n\
                }\n\
                impl P {\n\
                \x20   fn get(&self, _: &Request) -> Response { Response::text(200, \"through the gate\") }\n\
                }\n\
                kiln_types::export_plugin!(P);\n";
    std::fs::write(dir.join("src/lib.rs"), code).unwrap();
}

/// A `kiln serve` process as a replica, in its own process group. (Its cargo runs in a group of
/// its own: killed with the server's group, the server's session ends and its build lock with
/// it, while cargo and the build script go on until the gate opens.)
struct ChildReplica {
    child: std::process::Child,
}

impl ChildReplica {
    fn start(root: &Path, db_url: &str, id: &str) -> Self {
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(root.join("kiln.log")).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("serve")
            .current_dir(root)
            .env("DATABASE_URL", db_url)
            .env("KILN_ADDR", "127.0.0.1:0")
            .env("KILN_PLUGIN_DIRS", root.join("plugins"))
            .env("KILN_BIN_DIR", root.join("bin"))
            .env("KILN_BUILD_DIR", root.join("build"))
            .env("KILN_DATA_DIR", root.join("data"))
            .env("KILN_SUPERVISE", "false")
            .env("KILN_WATCH", "off")
            .env("KILN_REPLICA_ID", id)
            .env("KILN_HEARTBEAT_MS", "100")
            .env("KILN_REPLICA_TIMEOUT_MS", "1500")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start kiln serve");
        Self { child }
    }

    /// SIGKILL to the server's group.
    fn kill(&mut self) {
        let group = format!("-{}", self.child.id());
        let status = std::process::Command::new("kill").args(["-KILL", "--", &group]).status().unwrap();
        assert!(status.success(), "kill {group}");
        let _ = self.child.wait();
    }
}

impl Drop for ChildReplica {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill();
        }
    }
}

/// Advisory locks (granted, waiting) of build keys, as PostgreSQL shows them.
async fn build_locks(db: &tokio_postgres::Client) -> (i64, i64) {
    let row = db
        .query_one(
            "SELECT count(*) FILTER (WHERE granted), count(*) FILTER (WHERE NOT granted)
             FROM pg_locks WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database
                                                                      WHERE datname = current_database())",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_builder_killed_mid_build_is_replaced_and_shown_gone() {
    // `k`, a separate process, finds the gated plugin in its directory and starts building it;
    // then `b` (in this test process) joins, needs the same library, and waits for k's build.
    let cluster = cluster().await;
    let db_url = fresh_database(&cluster).await;
    let k_root = tempfile::Builder::new().prefix("kiln-replica-k-").tempdir().unwrap();
    let gate: PathBuf = k_root.path().join("gate-open");
    write_gated_plugin(&k_root.path().join("plugins/gated"), &gate);
    let mut k = ChildReplica::start(k_root.path(), &db_url, "k");
    let db = connect(&db_url).await;
    wait_until("k holds the build lock of gated", BUILD_DEADLINE, &mut || async { build_locks(&db).await == (1, 0) })
        .await;
    let b_root = tempfile::Builder::new().prefix("kiln-replica-b-").tempdir().unwrap();
    std::fs::create_dir_all(b_root.path().join("plugins")).unwrap();
    let b = TestServer::start_in_with(cluster, b_root, db_url, replica("b")).await;
    b.wait_until("b waits for k's build", BUILD_DEADLINE, || async { build_locks(&db).await == (1, 1) }).await;
    let building: Vec<String> = db
        .query(
            "SELECT replica_id FROM plugin_replicas o JOIN plugins p ON p.id = o.plugin_id
             WHERE p.name = 'gated' AND o.state = 'building' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(building, ["b", "k"], "both replicas show gated building");
    let list = replicas(&b).await;
    assert_eq!(find(&list, "k")["state"], "live", "{list:?}");

    // `k` dies mid-build: PostgreSQL ends its session and releases the lock, and `b` builds.
    k.kill();
    b.wait_until("b takes the build over", BUILD_DEADLINE, || async { build_locks(&db).await == (1, 0) }).await;
    std::fs::write(&gate, "").unwrap();
    b.wait_until("b serves gated", BUILD_DEADLINE, || async { b.get("/gated").await.0 == 200 }).await;
    let (_, builds) = b.get("/plugins/gated/builds").await;
    let done: Vec<&Value> = builds.as_array().unwrap().iter().filter(|x| x["success"] == true).collect();
    assert_eq!(done.len(), 1, "{builds:#}");
    assert_eq!(done[0]["replica"], "b", "the surviving replica built it: {builds:#}");

    // `k` stopped heartbeating: it is shown gone after the timeout, and its rows go.
    b.wait_until("k is shown gone", Duration::from_secs(10), || async {
        find(&replicas(&b).await, "k")["state"] == "gone"
    })
    .await;
    let rows: i64 =
        db.query_one("SELECT count(*) FROM plugin_replicas WHERE replica_id = 'k'", &[]).await.unwrap().get(0);
    assert_eq!(rows, 0, "k's observed rows were removed");
    let plugin = b.plugin("gated").await;
    assert_eq!(plugin["rollout"], "converged", "{plugin:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_reaches_a_replica_that_does_not_share_the_uploaders_disk() {
    let a = TestServer::start_with(cluster().await, &[], replica("a")).await;
    let (status, body) = install(&a, crate_archive(&crate_source("hello"), "hello")).await;
    assert_eq!(status, 200, "{body}");
    let db = a.sql().await;
    // (A plugin added while a runs serves from a draft first: the library stored is the
    // optimized one, built after it.)
    wait_until("a stored the library it built", BUILD_DEADLINE, &mut || async {
        db.query_one("SELECT count(*) FROM plugin_libraries WHERE name = 'hello'", &[]).await.unwrap().get::<_, i64>(0)
            == 1
    })
    .await;
    // a goes, and its disk with it: the unpacked upload and its library.
    let (cluster, a_root, db_url) = a.stop().await;
    let uploaded = a_root.path().join("installed/hello");
    assert!(uploaded.join("Cargo.toml").exists());
    drop(a_root);
    assert!(!uploaded.exists());

    // b has never seen the crate: it unpacks the stored archive, finds the library a built,
    // and serves.
    let b_root = tempfile::Builder::new().prefix("kiln-replica-b-").tempdir().unwrap();
    std::fs::create_dir_all(b_root.path().join("plugins")).unwrap();
    let b = TestServer::start_in_with(cluster, b_root, db_url, replica("b")).await;
    b.wait_until("b serves the upload", BUILD_DEADLINE, || async { greeting(&b).await == "hello, world" }).await;
    let copy = b.root.path().join("installed/hello");
    assert!(copy.join("src/lib.rs").exists(), "b's own copy of the upload");
    // (Counters reach the table with the next heartbeat.)
    b.wait_until("b fetched the library a built, and built nothing", EDIT_DEADLINE, || async {
        let list = replicas(&b).await;
        let me = find(&list, "b");
        (me["builds"].as_i64(), me["fetches"].as_i64()) == (Some(0), Some(1))
    })
    .await;

    // Uninstalled through b: b's copy and the stored archive go with the row.
    let (status, body) = b.send_delete("/plugins/hello").await;
    assert_eq!(status, 200, "{body}");
    b.wait_until("b's copy is removed", EDIT_DEADLINE, || async { !copy.exists() }).await;
    let archives: i64 = db.query_one("SELECT count(*) FROM plugin_archives", &[]).await.unwrap().get(0);
    assert_eq!(archives, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_live_replicas_id_is_refused_to_a_second_server_and_a_replica_whose_id_is_taken_stops() {
    // Held to the end: `a` ends before the last query, and with it would go the last hold on a
    // private cluster (under nextest, a test is a process of its own), stopping PostgreSQL.
    let cluster = cluster().await;
    let a = TestServer::start_with(cluster.clone(), &[], replica("a")).await;
    // A second server given the same id, on this host, while `a` (this process) heartbeats.
    let k_root = tempfile::Builder::new().prefix("kiln-replica-twin-").tempdir().unwrap();
    let mut twin = ChildReplica::start(k_root.path(), &a.db_url, "a");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = twin.child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < EDIT_DEADLINE, "the second server with id a kept running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!status.success(), "{status:?}");
    let log = std::fs::read_to_string(k_root.path().join("kiln.log")).unwrap();
    assert!(log.contains("replica id \"a\" is held by a live server"), "{log}");
    assert_eq!(a.get("/health").await.0, 200, "a serves on");

    // Another process takes the id (as one would after `a` was silent past the timeout): `a`
    // stops instead of writing rows that are no longer its own.
    let db = a.sql().await;
    db.execute("UPDATE replicas SET incarnation = 'other', hostname = 'elsewhere' WHERE id = 'a'", &[]).await.unwrap();
    let ended = a.ended(EDIT_DEADLINE).await;
    let error = format!("{:#}", ended.expect_err("a stops with an error"));
    assert!(error.contains("another process took replica id"), "{error}");
    let holder: String = db.query_one("SELECT hostname FROM replicas WHERE id = 'a'", &[]).await.unwrap().get(0);
    assert_eq!(holder, "elsewhere", "a left the new holder's row alone");
}
