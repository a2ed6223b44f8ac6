//! The control plane under races: who owns a path, rows that change while a plugin builds, the
//! endpoint rows against what is served, one name deleted and inserted at once, and shutdown.

use crate::support::{EDIT_DEADLINE, TestServer, copy_crate, crate_source, log_entries};
use serde_json::json;
use std::time::Duration;

/// The names of the endpoint rows of plugin `name`, as `METHOD path`.
async fn endpoint_rows(server: &TestServer, name: &str) -> Vec<String> {
    let db = server.sql().await;
    let rows = db
        .query(
            "SELECT e.method || ' ' || e.path FROM plugin_endpoints e JOIN plugins p ON p.id = e.plugin_id
             WHERE p.name = $1 ORDER BY 1",
            &[&name],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

/// Collider (the older row) serves the contested path; powertable waits and serves nothing.
async fn the_older_row_serves(server: &TestServer) {
    server.wait_state("collider", "loaded").await;
    let row = server.wait_state("powertable", "waiting").await;
    assert!(row["error"].as_str().unwrap().starts_with("RouteConflict"), "{row}");
    assert_eq!(server.get("/powertable/1").await, (200, json!("collider")));
    assert!(endpoint_rows(server, "powertable").await.is_empty(), "a waiting plugin serves nothing");
    let (status, health) = server.get("/health").await;
    assert_eq!((status, health["plugins"]["waiting"].as_u64()), (200, Some(1)), "{health}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_older_row_owns_a_contested_path_across_restarts() {
    // Discovery records crates in name order: collider's row is older than powertable's. Both
    // claim /powertable/{…}: collider serves it, whichever of the two loads first.
    let server = TestServer::start(&["powertable", "collider"]).await;
    the_older_row_serves(&server).await;
    let (cluster, root, url) = server.stop().await;
    let server = TestServer::start_in(cluster, root, url).await;
    the_older_row_serves(&server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_path_freed_by_its_owner_goes_to_the_waiting_claimant_at_once() {
    let server = TestServer::start(&["collider", "powertable"]).await;
    server.wait_state("collider", "loaded").await;
    server.wait_state("powertable", "waiting").await;
    let db = server.sql().await;
    db.execute("UPDATE plugins SET status = 'inactive' WHERE name = 'collider'", &[]).await.unwrap();
    // Well within the 60 s safety-net resync: the claimant is retried when the owner retires.
    server
        .wait_until("powertable takes the freed path", EDIT_DEADLINE, || async {
            server.get("/powertable/1").await.0 == 200 && server.get("/powertable").await.0 == 200
        })
        .await;
    let row = server.wait_state("powertable", "loaded").await;
    assert!(row["error"].is_null(), "{row}");
    assert!(!endpoint_rows(&server, "powertable").await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoint_rows_follow_a_removed_crate_and_its_paths_go_to_the_next_plugin() {
    let server = TestServer::start(&["hello"]).await;
    server.wait_state("hello", "loaded").await;
    assert_eq!(endpoint_rows(&server, "hello").await, ["GET /hello", "GET /hello/{name}"]);
    std::fs::remove_dir_all(server.plugin_dir("hello")).unwrap();
    let (status, report) = server.post("/plugins/discover", None).await;
    assert_eq!((status, report["removed"].clone()), (200, json!(["hello"])));
    server.wait_state("hello", "failed").await;
    assert!(endpoint_rows(&server, "hello").await.is_empty(), "nothing serves, so no endpoint rows");
    assert_eq!(server.get("/hello").await.0, 404);

    // Another plugin claiming the same paths loads cleanly.
    let dir = server.root.path().join("elsewhere/hello_too");
    copy_crate(&crate_source("hello"), &dir);
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    std::fs::write(dir.join("Cargo.toml"), manifest.replace("name = \"hello\"", "name = \"hello_too\"")).unwrap();
    std::fs::remove_file(dir.join("Cargo.lock")).ok();
    let db = server.sql().await;
    db.execute("INSERT INTO plugins (name, source_path) VALUES ('hello_too', $1)", &[&dir.to_string_lossy().as_ref()])
        .await
        .unwrap();
    let row = server.wait_state("hello_too", "loaded").await;
    assert!(row["error"].is_null(), "{row}");
    assert_eq!(server.get("/hello").await.0, 200);
    assert_eq!(endpoint_rows(&server, "hello_too").await, ["GET /hello", "GET /hello/{name}"]);
    let (_, listed) = server.get("/plugins/hello_too/endpoints").await;
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_deleted_while_its_plugin_builds_is_never_served() {
    let server = TestServer::start(&[]).await;
    let dir = server.root.path().join("elsewhere/hello");
    copy_crate(&crate_source("hello"), &dir);
    let db = server.sql().await;
    db.execute("INSERT INTO plugins (name, source_path) VALUES ('hello', $1)", &[&dir.to_string_lossy().as_ref()])
        .await
        .unwrap();
    server.wait_state("hello", "building").await;
    db.execute("DELETE FROM plugins WHERE name = 'hello'", &[]).await.unwrap();
    // Until every pass has ended, the deleted plugin never answers.
    let mut settled = 0;
    while settled < 20 {
        assert_eq!(server.get("/hello").await.0, 404, "a deleted row's plugin was served");
        let reconciling = server.get("/health").await.1["reconciling"].as_u64();
        settled = if reconciling == Some(0) { settled + 1 } else { 0 };
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(endpoint_rows(&server, "hello").await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn one_name_deleted_and_inserted_in_one_transaction_serves_the_new_row() {
    let server = TestServer::start(&["hello"]).await;
    let old = server.wait_state("hello", "loaded").await;
    let builds_before = server.get("/health").await.1["builds_run"].clone();
    let dir = server.plugin_dir("hello");
    let mut db = server.sql().await;
    let tx = db.transaction().await.unwrap();
    tx.execute("DELETE FROM plugins WHERE name = 'hello'", &[]).await.unwrap();
    tx.execute("INSERT INTO plugins (name, source_path) VALUES ('hello', $1)", &[&dir.to_string_lossy().as_ref()])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    server
        .wait_until("the new row serves", EDIT_DEADLINE, || async {
            let (status, row) = server.get("/plugins/hello").await;
            status == 200 && row["id"] != old["id"] && row["state"] == "loaded" && row["error"].is_null()
        })
        .await;
    let row = server.plugin("hello").await;
    let library = row["binary_path"].as_str().expect("a library").to_string();
    assert!(std::path::Path::new(&library).exists(), "its library was not collected: {library}");
    assert_eq!(server.get("/health").await.1["builds_run"], builds_before, "the same library serves, not a rebuild");
    assert_eq!(server.get("/hello").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn at_shutdown_every_instance_cleans_up_once_even_one_held_by_a_late_request() {
    let server = TestServer::start(&["lifecycle"]).await;
    server.wait_state("lifecycle", "loaded").await;
    // A slow request holds the first instance while a reload replaces it; shutdown begins while
    // it is still in flight.
    let slow = tokio::spawn({
        let (http, url) = (server.http.clone(), server.url("/lifecycle/slow"));
        async move { http.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    let log = server.plugin_dir("lifecycle").join("target/lifecycle.log");
    server
        .wait_until("the slow request is in its handler", EDIT_DEADLINE, || async {
            log_entries(&log).iter().any(|e| e.0 == "slow")
        })
        .await;
    assert_eq!(server.post("/plugins/lifecycle/reload", None).await.0, 200);
    let (_cluster, _root, _url) = server.stop().await;
    assert_eq!(slow.await.unwrap().expect("the slow request was answered"), 200);
    let entries = log_entries(&log);
    let inits: Vec<&str> = entries.iter().filter(|e| e.0 == "init").map(|e| e.2.as_str()).collect();
    assert!(entries.iter().any(|e| e.0 == "slow"));
    let mut cleanups: Vec<&str> = entries.iter().filter(|e| e.0 == "cleanup").map(|e| e.2.as_str()).collect();
    let mut expected = inits.clone();
    expected.sort();
    cleanups.sort();
    assert_eq!(inits.len(), 2, "{entries:?}");
    assert_eq!(cleanups, expected, "every instance cleaned up exactly once before serve returned: {entries:?}");
}
