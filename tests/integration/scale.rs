//! Many plugins at once: a bulk `UPDATE` of their rows is one notification and one batch (a
//! handful of route tables, not one per plugin), turning them back on rebuilds nothing and
//! records them in a handful of transactions, a storm of single-row commits is coalesced into a
//! few passes per plugin, and a warm start builds nothing and serves them all.

use crate::quiet::notifications_during;
use crate::support::{BUILD_DEADLINE, TestServer, cluster, fresh_database, repo_root};
use serde_json::{Value, json};
use std::path::Path;

/// How many plugins: enough that one table per plugin would show.
const N: u64 = 12;

/// Writes plugin crate `name` into `plugins`, serving `GET /<name>/a` and `GET /<name>/b/{x}`,
/// with the lock file cargo would write (a lock cargo rewrites changes the source hash).
fn write_plugin(plugins: &Path, name: &str) {
    let dir = plugins.join(name);
    std::fs::create_dir_all(dir.join("src")).unwrap();
    let manifest = format!(
        "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2024\"\npublish = false\n\n\
         [package.metadata.kiln]\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\nkiln-types = \"0.1\"\n"
    );
    std::fs::write(dir.join("Cargo.toml"), manifest).unwrap();
    let lock = std::fs::read_to_string(repo_root().join("tests/fixtures/lifecycle/Cargo.lock")).unwrap();
    std::fs::write(dir.join("Cargo.lock"), kiln::staging::renamed_lock(&lock, "lifecycle", name)).unwrap();
    let code = format!(
        "use kiln_types::{{InitContext, Plugin, Request, Response, Route}};\n\
         pub struct P(i64);\n\
         impl Plugin for P {{\n\
         \x20   fn init(ctx: &InitContext) -> Result<Self, String> {{\n\
         \x20       Ok(P(ctx.config.get(\"n\").and_then(|n| n.as_i64()).unwrap_or(-1)))\n\
         \x20   }}\n\
         \x20   fn routes() -> Vec<Route<Self>> {{\n\
         \x20       vec![Route::get(\"/{name}/a\", Self::get), Route::get(\"/{name}/b/{{x}}\", Self::get)]\n\
         \x20   }}\n\
         }}\n\
         impl P {{\n\
         \x20   fn get(&self, _: &Request) -> Response {{ Response::text(200, format!(\"n={{}}\", self.0)) }}\n\
         }}\n\
         kiln_types::export_plugin!(P);\n"
    );
    std::fs::write(dir.join("src/lib.rs"), code).unwrap();
}

async fn health(server: &TestServer) -> Value {
    server.get("/health").await.1
}

/// Waits until `n` plugins serve and no pass is running or queued.
async fn wait_served(server: &TestServer, n: u64) {
    server
        .wait_until(&format!("{n} plugins serve, settled"), BUILD_DEADLINE, || async {
            let h = health(server).await;
            h["plugins_served"] == n && h["reconciling"] == 0
        })
        .await;
}

/// The sum of a counter's series in `GET /metrics`.
async fn counter(server: &TestServer, name: &str) -> u64 {
    let text = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
        .sum()
}

async fn storms(server: &TestServer) -> u64 {
    counter(server, "kiln_notification_storms_total").await
}

/// `GET /<name>/a` of every plugin: its status, and its body when it serves (`n=` the config's
/// `n`).
async fn answers(server: &TestServer) -> Vec<(u16, Value)> {
    let mut all = Vec::new();
    for i in 0..N {
        let (status, body) = server.get(&format!("/many_{i:02}/a")).await;
        all.push(if status == 200 { (status, body) } else { (status, Value::Null) });
    }
    all
}

/// The status of `GET /<name>/a` for every plugin.
async fn statuses(server: &TestServer) -> Vec<u16> {
    let mut all = Vec::new();
    for i in 0..N {
        all.push(server.get(&format!("/many_{i:02}/a")).await.0);
    }
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bulk_update_is_one_batch_and_a_warm_start_of_many_plugins_builds_nothing() {
    let cluster = cluster().await;
    let root = tempfile::Builder::new().prefix("kiln-test-").tempdir().unwrap();
    for i in 0..N {
        write_plugin(&root.path().join("plugins"), &format!("many_{i:02}"));
    }
    let db_url = fresh_database(&cluster).await;
    let server = TestServer::start_in(cluster, root, db_url).await;
    wait_served(&server, N).await;
    assert!(statuses(&server).await.iter().all(|s| *s == 200));
    let built = health(&server).await["builds_run"].clone();

    // One statement turns them all off: one notification naming every row, one batch.
    let tables = health(&server).await["route_tables_built"].as_u64().unwrap();
    let sql = server.sql().await;
    let seen = notifications_during(&server.db_url, async {
        assert_eq!(sql.execute("UPDATE plugins SET status = 'inactive'", &[]).await.unwrap(), N);
    })
    .await;
    assert_eq!(seen.len(), 1, "one notification for the statement: {seen:?}");
    let payload: Value = serde_json::from_str(&seen[0]).unwrap();
    assert_eq!(payload["operation"], "UPDATE");
    assert_eq!(payload["ids"].as_array().map(Vec::len), Some(N as usize), "{payload}");
    wait_served(&server, 0).await;
    let h = health(&server).await;
    let off_tables = h["route_tables_built"].as_u64().unwrap() - tables;
    assert!((1..N / 2).contains(&off_tables), "{off_tables} route tables for one statement over {N} rows");
    assert!(statuses(&server).await.iter().all(|s| *s == 404));
    assert_eq!(h["plugins"]["inactive"], N, "every row says so: {h}");

    // And back on: nothing is built again, and the versions loaded at once are published and
    // recorded together (one transaction each would be N).
    let tables = h["route_tables_built"].as_u64().unwrap();
    let transactions = counter(&server, "kiln_publish_transactions_total").await;
    sql.execute("UPDATE plugins SET status = 'active'", &[]).await.unwrap();
    wait_served(&server, N).await;
    assert!(statuses(&server).await.iter().all(|s| *s == 200));
    let h = health(&server).await;
    assert_eq!(h["builds_run"], built, "turning plugins back on built nothing");
    assert_eq!(h["plugins"]["loaded"], N, "{h}");
    let on_tables = h["route_tables_built"].as_u64().unwrap() - tables;
    let on_transactions = counter(&server, "kiln_publish_transactions_total").await - transactions;
    assert!((1..=N / 2).contains(&on_transactions), "{on_transactions} publish transactions for {N} plugins");
    assert!((1..=on_transactions).contains(&on_tables), "{on_tables} route tables, {on_transactions} transactions");

    // A storm of single-row commits (each its own notification) is held and coalesced: far
    // fewer passes than commits, and every plugin ends as its row's last write says.
    let (passes, storms_before) = (counter(&server, "kiln_reconcile_passes_total").await, storms(&server).await);
    const COMMITS: u64 = 10_000;
    sql.batch_execute(&format!(
        "DO $$ BEGIN FOR i IN 1..{COMMITS} LOOP
             UPDATE plugins SET status = CASE WHEN (i / {N} + i % {N}) % 2 = 0 THEN 'active' ELSE 'inactive' END,
                                config = jsonb_build_object('n', i)
             WHERE name = format('many_%s', lpad((i % {N})::text, 2, '0'));
             COMMIT;
         END LOOP; END $$"
    ))
    .await
    .unwrap();
    // Plugin k was last written by the last i ≤ COMMITS with i % N = k: it serves, with config
    // {"n": i}, or not, as that write says.
    let wanted: Vec<(u16, Value)> = (0..N)
        .map(|k| {
            let i = (COMMITS - k) / N * N + k;
            if (i / N + i % N).is_multiple_of(2) { (200, json!(format!("n={i}"))) } else { (404, Value::Null) }
        })
        .collect();
    let active = wanted.iter().filter(|s| s.0 == 200).count() as u64;
    server
        .wait_until("every plugin as its row's last write says, config included", BUILD_DEADLINE, || async {
            let h = health(&server).await;
            h["reconciling"] == 0 && h["plugins_served"] == active && answers(&server).await == wanted
        })
        .await;
    // At least one storm: more if the notifications reached kiln with pauses (a busy machine).
    let n = storms(&server).await - storms_before;
    assert!(n >= 1, "{n} storms");
    let passes = counter(&server, "kiln_reconcile_passes_total").await - passes;
    // Those before the storm was told (at most STORM_NOTES notifications), 20 a second during
    // it, and one each at its end (of each storm): a few per plugin, not one per commit (83
    // with the gate here, 569 without).
    assert!(passes <= 250, "{passes} passes for {COMMITS} commits over {N} plugins");
    sql.execute("UPDATE plugins SET status = 'active'", &[]).await.unwrap();
    wait_served(&server, N).await;

    // A warm start: every library is there, nothing is built, all serve.
    let (cluster, root, db_url) = server.stop().await;
    let server = TestServer::start_in(cluster, root, db_url).await;
    wait_served(&server, N).await;
    let h = health(&server).await;
    assert_eq!(h["builds_run"], 0, "a warm start built: {h}");
    assert!(statuses(&server).await.iter().all(|s| *s == 200));
    assert_eq!(server.get("/many_03/b/x").await.0, 200);
}
