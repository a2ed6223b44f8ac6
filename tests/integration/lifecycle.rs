//! The loop a user drives: discovery → build → serve, and row edits that load, toggle, reload
//! and unload plugins.

use crate::support::{EDIT_DEADLINE, TestServer, read_log};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn discovered_plugins_are_compiled_served_and_recorded() {
    let server = TestServer::start(&["powertable", "hello"]).await;
    let pt = server.wait_state("powertable", "loaded").await;
    server.wait_state("hello", "loaded").await;

    assert_eq!(pt["status"], "active");
    assert_eq!(pt["version"], "0.1.0");
    assert_eq!(pt["description"], "A small in-memory table of appliances and their power draw");
    assert!(pt["binary_path"].as_str().unwrap().contains("/bin/powertable-"), "{pt}");
    assert!(pt["error"].is_null());

    let (status, rows) = server.get("/powertable").await;
    assert_eq!(status, 200);
    assert_eq!(rows.as_array().unwrap().len(), 3, "{rows}");
    let (status, created) = server.post("/powertable", Some(json!({"name": "heater", "watts": 1500}))).await;
    assert_eq!((status, &created["id"]), (201, &json!(4)), "{created}");
    let (status, one) = server.get("/powertable/4").await;
    assert_eq!((status, &one["name"]), (200, &json!("heater")));
    let (status, bad) = server.post("/powertable", Some(json!({"name": "x"}))).await;
    assert_eq!(status, 400, "{bad}");
    assert_eq!(server.get("/hello/ada").await.1["message"], "hello, ada");

    let (status, list) = server.get("/plugins").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["hello", "powertable"]);

    let (_, endpoints) = server.get("/plugins/powertable/endpoints").await;
    let eps: Vec<(String, String)> = endpoints
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["method"].as_str().unwrap().into(), e["path"].as_str().unwrap().into()))
        .collect();
    assert_eq!(
        eps,
        [
            ("GET".into(), "/powertable".into()),
            ("POST".into(), "/powertable".into()),
            ("GET".into(), "/powertable/{id}".into())
        ]
    );

    // The live spec documents the admin API and every plugin endpoint; so does the UI page.
    let (_, spec) = server.get("/openapi.json").await;
    assert!(spec["paths"]["/plugins/{name}/reload"]["post"].is_object(), "admin API in the spec");
    assert!(spec["paths"]["/powertable/{id}"]["get"].is_object(), "plugin endpoint in the spec");
    assert_eq!(
        spec["paths"]["/powertable"]["post"]["requestBody"]["content"]["application/json"]["schema"]["required"],
        json!(["name", "watts"])
    );
    let (status, html) = server.get("/docs").await;
    assert_eq!(status, 200);
    assert!(html.as_str().unwrap().contains("/powertable/{id}"), "the UI embeds the merged spec");

    // Unknown things answer JSON errors.
    let (status, body) = server.get("/nothing-here").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("NotFound")));
    assert_eq!(body["message"], "no route for GET /nothing-here");
    let (status, body) = server.get("/powertable/1/more").await;
    assert_eq!((status, body["message"].as_str()), (404, Some("no route for GET /powertable/1/more")));
    // HEAD is GET without the body.
    let resp = server.http.head(server.url("/powertable")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert!(resp.bytes().await.unwrap().is_empty());
    let (status, body) = server.send_delete("/powertable").await;
    assert_eq!((status, body["error"].as_str()), (405, Some("MethodNotAllowed")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("/powertable does not accept DELETE"), "{body}");
    // A 405 names what the path allows, for plugin and admin paths alike.
    let resp = server.http.delete(server.url("/powertable")).send().await.unwrap();
    assert_eq!(resp.headers()["allow"], "GET, POST");
    let resp = server.http.patch(server.url("/plugins/powertable/config")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    assert_eq!(resp.headers()["allow"], "GET, PUT");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "MethodNotAllowed", "{body}");
    let (status, body) = server.get("/plugins/nope").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("PluginNotFound")));
    let (status, body) = server.get("/plugins/bad..name").await;
    assert_eq!((status, body["error"].as_str()), (400, Some("InvalidName")));
}

#[tokio::test(flavor = "multi_thread")]
async fn row_status_edits_unload_and_reload_the_plugin() {
    let server = TestServer::start(&["lifecycle"]).await;
    server.wait_state("lifecycle", "loaded").await;
    let log = server.plugin_dir("lifecycle").join("target/lifecycle.log");
    assert_eq!(read_log(&log), ["init v1"]);
    let db = server.sql().await;

    db.execute("UPDATE plugins SET status = 'inactive' WHERE name = 'lifecycle'", &[]).await.unwrap();
    server
        .wait_until("the route is gone and cleanup ran", EDIT_DEADLINE, || async {
            server.get("/lifecycle").await.0 == 404 && read_log(&log).last().map(String::as_str) == Some("cleanup v1")
        })
        .await;
    let row = server.wait_state("lifecycle", "inactive").await;
    assert!(row["binary_path"].is_null());
    let eps = db.query("SELECT 1 FROM plugin_endpoints", &[]).await.unwrap();
    assert!(eps.is_empty(), "an inactive plugin registers no endpoints");

    db.execute("UPDATE plugins SET status = 'active' WHERE name = 'lifecycle'", &[]).await.unwrap();
    server
        .wait_until("the route serves again", EDIT_DEADLINE, || async { server.get("/lifecycle").await.0 == 200 })
        .await;
    assert_eq!(read_log(&log), ["init v1", "cleanup v1", "init v1"]);

    // The API toggle does the same through the row, and answers once it took effect.
    let (status, body) = server.post("/plugins/lifecycle/toggle", None).await;
    assert_eq!((status, body["status"].as_str(), body["state"].as_str()), (200, Some("inactive"), Some("inactive")));
    assert_eq!(server.get("/lifecycle").await.0, 404);
    let (status, body) = server.post("/plugins/lifecycle/toggle", None).await;
    assert_eq!((status, body["state"].as_str()), (200, Some("loaded")));
    assert_eq!(server.get("/lifecycle").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_the_row_unloads_the_plugin_and_its_endpoints() {
    let server = TestServer::start(&["lifecycle", "hello"]).await;
    server.wait_state("lifecycle", "loaded").await;
    server.wait_state("hello", "loaded").await;
    let log = server.plugin_dir("lifecycle").join("target/lifecycle.log");
    let db = server.sql().await;

    let library = std::path::PathBuf::from(server.plugin("lifecycle").await["binary_path"].as_str().unwrap());
    assert!(library.exists());
    db.execute("DELETE FROM plugins WHERE name = 'lifecycle'", &[]).await.unwrap();
    server
        .wait_until("unloaded and cleaned up", EDIT_DEADLINE, || async {
            server.get("/lifecycle").await.0 == 404 && read_log(&log).last().map(String::as_str) == Some("cleanup v1")
        })
        .await;
    let left: Vec<String> = db
        .query("SELECT DISTINCT p.name FROM plugin_endpoints e JOIN plugins p ON p.id = e.plugin_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["hello"], "the deleted plugin's endpoint rows are gone, the others stay");
    assert_eq!(server.get("/plugins/lifecycle").await.0, 404);
    server.wait_until("its library is removed", EDIT_DEADLINE, || async { !library.exists() }).await;
    assert_eq!(server.get("/hello").await.0, 200, "other plugins keep serving");
    let (_, spec) = server.get("/openapi.json").await;
    assert!(spec["paths"]["/lifecycle"].is_null(), "the spec follows");
}

#[tokio::test(flavor = "multi_thread")]
async fn inserting_a_row_builds_and_serves_a_new_plugin() {
    let server = TestServer::start(&[]).await;
    let (_, list) = server.get("/plugins").await;
    assert_eq!(list, json!([]));

    // A plugin crate outside the plugin directories, named by its row.
    let elsewhere = server.root.path().join("elsewhere/hello");
    crate::support::copy_crate(&crate::support::crate_source("hello"), &elsewhere);
    let db = server.sql().await;
    db.execute(
        "INSERT INTO plugins (name, source_path) VALUES ('hello', $1)",
        &[&elsewhere.to_string_lossy().as_ref()],
    )
    .await
    .unwrap();
    let row = server.wait_state("hello", "loaded").await;
    assert_eq!(row["description"], "Greets whoever asks", "metadata comes from the manifest");
    assert_eq!(server.get("/hello").await.1["message"], "hello, world");

    // A row that names a directory without a plugin says so, and nothing else is disturbed.
    db.execute("INSERT INTO plugins (name, source_path) VALUES ('ghost', '/nonexistent/ghost')", &[]).await.unwrap();
    let ghost = server.wait_state("ghost", "failed").await;
    assert!(ghost["error"].as_str().unwrap().starts_with("ManifestNotFound"), "{ghost}");
    // A row whose name is not the crate's package name is refused with both names.
    db.execute(
        "INSERT INTO plugins (name, source_path) VALUES ('other', $1)",
        &[&elsewhere.to_string_lossy().as_ref()],
    )
    .await
    .unwrap();
    let other = server.wait_state("other", "failed").await;
    assert!(other["error"].as_str().unwrap().contains("\"hello\""), "{other}");
    assert_eq!(server.get("/hello").await.0, 200);

    // Bad rows are refused by the table itself, with PostgreSQL's message.
    let err = db.execute("INSERT INTO plugins (name, source_path) VALUES ('../evil', '/x')", &[]).await.unwrap_err();
    let msg = err.as_db_error().expect("a database error").message();
    assert!(msg.contains("violates check constraint \"plugins_name_check\""), "{msg}");
    let err = db.execute("UPDATE plugins SET status = 'maybe' WHERE name = 'hello'", &[]).await.unwrap_err();
    let msg = err.as_db_error().expect("a database error").message();
    assert!(msg.contains("violates check constraint \"plugins_status_check\""), "{msg}");
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_serves_the_changed_code_and_retires_the_old_version() {
    // Built optimized at once: the staged profile's draft and its swap are in author.rs.
    let server = TestServer::start_with(crate::support::cluster().await, &["lifecycle"], |c| {
        c.build_profile = kiln::compiler::BuildProfile::Optimized;
    })
    .await;
    let v1 = server.wait_state("lifecycle", "loaded").await;
    assert_eq!(server.get("/lifecycle").await.1, "v1");

    let src = server.plugin_dir("lifecycle").join("src/lib.rs");
    let code = std::fs::read_to_string(&src).unwrap();
    std::fs::write(&src, code.replace("const VERSION: &str = \"v1\";", "const VERSION: &str = \"v2\";")).unwrap();

    let (status, v2) = server.post("/plugins/lifecycle/reload", None).await;
    assert_eq!(status, 200, "{v2}");
    assert_ne!(v1["binary_path"], v2["binary_path"], "a new content-addressed library");
    assert_ne!(v1["loaded_hash"], v2["loaded_hash"]);
    let v1_path = std::path::PathBuf::from(v1["binary_path"].as_str().unwrap());
    assert!(!v1_path.exists(), "the retired library was garbage-collected");
    assert!(std::path::Path::new(v2["binary_path"].as_str().unwrap()).exists());
    assert_eq!(server.get("/lifecycle").await.1, "v2", "the new code serves, not a cached library");

    let log = server.plugin_dir("lifecycle").join("target/lifecycle.log");
    server
        .wait_until("the old version's cleanup ran", EDIT_DEADLINE, || async {
            read_log(&log).contains(&"cleanup v1".to_string())
        })
        .await;
    assert_eq!(
        read_log(&log),
        ["init v1", "init v2", "cleanup v1"],
        "new version initialized before the old one retired"
    );

    // A reload of unchanged source gives a fresh instance of the same library.
    let (status, again) = server.post("/plugins/lifecycle/reload", None).await;
    assert_eq!(status, 200);
    assert_eq!(again["binary_path"], v2["binary_path"]);
    server
        .wait_until("the replaced instance's cleanup ran", EDIT_DEADLINE, || async { read_log(&log).len() == 5 })
        .await;
    assert_eq!(read_log(&log)[3..], ["init v2", "cleanup v2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_with_unchanged_sources_compiles_nothing() {
    let server = TestServer::start(&["powertable", "hello"]).await;
    server.wait_state("powertable", "loaded").await;
    server.wait_state("hello", "loaded").await;
    let (cluster, root, db_url) = server.stop().await;

    let server = TestServer::start_in(cluster, root, db_url).await;
    server.wait_state("powertable", "loaded").await;
    server.wait_state("hello", "loaded").await;
    assert_eq!(server.get("/powertable").await.0, 200);
    let (_, health) = server.get("/health").await;
    assert_eq!(health["builds_run"], 0, "{health}");
    assert_eq!(health["plugins_served"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn stopping_the_server_runs_every_cleanup_before_it_returns() {
    let server = TestServer::start(&["lifecycle"]).await;
    server.wait_state("lifecycle", "loaded").await;
    let log = server.plugin_dir("lifecycle").join("target/lifecycle.log");
    let (_cluster, _root, _url) = server.stop().await;
    assert_eq!(read_log(&log), ["init v1", "cleanup v1"]);
}
