//! What operators do: configure plugins, install them from archives (and refuse hostile ones),
//! uninstall, rediscover, protect the admin API, read the build history.

use crate::support::{
    EDIT_DEADLINE, TestServer, cluster, copy_crate, crate_archive, crate_source, install, raw_archive,
};
use serde_json::{Value, json};
use std::io::Write;
use std::path::Path;

async fn put_config(server: &TestServer, name: &str, config: Value) -> (u16, Value) {
    let resp = server.http.put(server.url(&format!("/plugins/{name}/config"))).json(&config).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn config_is_validated_masked_applied_and_kept() {
    let server = TestServer::start(&["configured"]).await;
    server.wait_state("configured", "loaded").await;

    let (status, cfg) = server.get("/plugins/configured/config").await;
    assert_eq!(status, 200);
    assert_eq!(cfg["config"], json!({ "greeting": "hello", "times": 1 }), "defaults apply");
    assert_eq!(cfg["schema"]["properties"]["api_key"]["sensitive"], true);
    let served = |v: Value| json!({ "greeting": v["greeting"], "times": v["times"], "has_api_key": v["has_api_key"] });
    let first = server.get("/configured").await.1;
    assert_eq!(served(first.clone()), json!({ "greeting": "hello", "times": 1, "has_api_key": false }));

    let (status, cfg) =
        put_config(&server, "configured", json!({ "greeting": "hi", "times": 3, "api_key": "s3cret" })).await;
    assert_eq!(status, 200, "{cfg}");
    assert_eq!(cfg["config"], json!({ "greeting": "hi", "times": 3, "api_key": "********" }));
    let now = server.get("/configured").await.1;
    assert_eq!(served(now.clone()), json!({ "greeting": "hi", "times": 3, "has_api_key": true }));
    assert_eq!(now["instance"], first["instance"], "the configure hook applied it in place, no reload");

    // What GET showed, sent back with one change: the secret stays (not the asterisks).
    let mut shown = server.get("/plugins/configured/config").await.1["config"].clone();
    shown["times"] = json!(4);
    let (status, cfg) = put_config(&server, "configured", shown).await;
    assert_eq!(status, 200, "{cfg}");
    let db = server.sql().await;
    let stored: Value = db.query_one("SELECT config FROM plugins WHERE name = 'configured'", &[]).await.unwrap().get(0);
    assert_eq!(stored, json!({ "greeting": "hi", "times": 4, "api_key": "s3cret" }));

    // Valid by the schema, refused by the plugin's hook: 422, nothing stored, nothing applied.
    let (status, err) = put_config(&server, "configured", json!({ "greeting": "forbidden" })).await;
    assert_eq!((status, err["error"].as_str()), (422, Some("InvalidConfig")), "{err}");
    assert!(err["message"].as_str().unwrap().contains("not welcome"), "{err}");
    assert_eq!(server.get("/plugins/configured/config").await.1["config"]["greeting"], "hi");
    assert_eq!(server.get("/configured").await.1["greeting"], "hi");
    let (_, raw) = server.get("/plugins/configured/config").await;
    assert!(!raw.to_string().contains("s3cret"), "sensitive values never leave: {raw}");

    // Invalid: every violation, nothing stored, nothing applied, no secret in the answer.
    let (status, err) = put_config(&server, "configured", json!({ "times": 0, "nope": 1, "api_key": 987654321 })).await;
    assert_eq!((status, err["error"].as_str()), (422, Some("InvalidConfig")), "{err}");
    let paths: Vec<&str> =
        err["details"]["violations"].as_array().unwrap().iter().map(|v| v["path"].as_str().unwrap()).collect();
    assert!(paths.contains(&"/times") && paths.contains(&"/api_key") && paths.contains(&""), "{err}");
    assert!(!err.to_string().contains("987654321"), "{err}");
    assert_eq!(server.get("/plugins/configured/config").await.1["config"]["greeting"], "hi");
    let (status, _) = put_config(&server, "configured", json!([1, 2])).await;
    assert_eq!(status, 400, "the body must be an object, as the document says");

    // A bad config written with SQL is not applied: the row says why, the last good one serves.
    let db = server.sql().await;
    db.execute(r#"UPDATE plugins SET config = '{"times": "many"}' WHERE name = 'configured'"#, &[]).await.unwrap();
    server
        .wait_until("the row shows the invalid config", EDIT_DEADLINE, || async {
            server.plugin("configured").await["error"].as_str().is_some_and(|e| e.starts_with("InvalidConfig"))
        })
        .await;
    let row = server.plugin("configured").await;
    assert_eq!(row["state"], "loaded");
    assert!(row["error"].as_str().unwrap().contains("/times"), "{row}");
    assert_eq!(server.get("/configured").await.1["greeting"], "hi", "the last good config still serves");

    // A good one written with SQL applies, clears the error, and survives a restart.
    db.execute(r#"UPDATE plugins SET config = '{"greeting": "kept"}' WHERE name = 'configured'"#, &[]).await.unwrap();
    server
        .wait_until("the SQL config applies and the row's error clears", EDIT_DEADLINE, || async {
            // The row is written just after the new config serves: wait for both.
            server.get("/configured").await.1["greeting"] == "kept"
                && server.plugin("configured").await["error"].is_null()
        })
        .await;
    let (cluster, root, url) = server.stop().await;
    let server = TestServer::start_in(cluster, root, url).await;
    server.wait_state("configured", "loaded").await;
    assert_eq!(
        served(server.get("/configured").await.1),
        json!({ "greeting": "kept", "times": 1, "has_api_key": false })
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_config_change_reloads_when_the_plugin_or_its_manifest_asks() {
    // A plugin without a configure hook (the default asks for a reload) gets a fresh instance.
    let server = TestServer::start(&["lifecycle", "configured"]).await;
    server.wait_state("lifecycle", "loaded").await;
    let (status, _) = put_config(&server, "lifecycle", json!({ "anything": 1 })).await;
    assert_eq!(status, 200);
    let log = server.plugin_dir("lifecycle").join("target/lifecycle.log");
    assert_eq!(crate::support::read_log(&log)[..2], ["init v1", "init v1"], "a second instance");

    // reloadOnConfigChange in the manifest: a fresh instance even though the hook could apply it.
    let manifest = server.plugin_dir("configured").join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace("type = \"http\"\n", "type = \"http\"\nreloadOnConfigChange = true\n"))
        .unwrap();
    assert_eq!(server.post("/plugins/configured/reload", None).await.0, 200);
    let before = server.get("/configured").await.1["instance"].clone();
    let (status, _) = put_config(&server, "configured", json!({ "greeting": "fresh" })).await;
    assert_eq!(status, 200);
    let after = server.get("/configured").await.1;
    assert_eq!(after["greeting"], "fresh");
    assert_ne!(after["instance"], before, "reloaded, as the manifest asks");
}

fn installed_entries(server: &TestServer) -> Vec<String> {
    match std::fs::read_dir(server.root.path().join("installed")) {
        Ok(d) => {
            let mut names: Vec<String> = d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
            names.sort();
            names
        }
        Err(_) => Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn install_build_history_and_uninstall() {
    let server = TestServer::start(&[]).await;
    let (status, row) = install(&server, crate_archive(&crate_source("hello"), "hello-src")).await;
    assert_eq!(status, 200, "{row}");
    assert_eq!((row["state"].as_str(), row["name"].as_str()), (Some("loaded"), Some("hello")));
    assert_eq!(server.get("/hello").await.0, 200);
    let db = server.sql().await;
    let origin: String = db.query_one("SELECT origin FROM plugins WHERE name = 'hello'", &[]).await.unwrap().get(0);
    assert_eq!(origin, "upload");

    // A plugin added while the server runs serves from a draft first (the staged profile):
    // one optimized build of the version, after its draft.
    server.wait_optimized("hello").await;
    let (_, builds) = server.get("/plugins/hello/builds").await;
    let builds = builds.as_array().unwrap();
    let kinds: Vec<(bool, bool, &str)> = builds
        .iter()
        .map(|b| (b["draft"].as_bool().unwrap(), b["success"].as_bool().unwrap(), b["source_hash"].as_str().unwrap()))
        .collect();
    let hash = row["loaded_hash"].as_str().unwrap();
    assert_eq!(kinds, [(false, true, hash), (true, true, hash)], "{builds:?}");

    // The same name again is a conflict, and leaves nothing behind.
    let (status, err) = install(&server, crate_archive(&crate_source("hello"), "again")).await;
    assert_eq!((status, err["error"].as_str()), (409, Some("PluginExists")), "{err}");
    // (the crate, and the stamp naming the archive it came from)
    assert_eq!(installed_entries(&server), [".archive-hello", "hello"]);

    let source = std::path::PathBuf::from(row["source_path"].as_str().unwrap());
    let library = std::path::PathBuf::from(row["binary_path"].as_str().unwrap());
    let (status, _) = server.send_delete("/plugins/hello").await;
    assert_eq!(status, 200);
    assert_eq!(server.get("/hello").await.0, 404);
    assert_eq!(server.get("/plugins/hello").await.0, 404);
    assert!(!source.exists(), "an uploaded plugin's source goes with it");
    assert_eq!(installed_entries(&server), Vec::<String>::new(), "and its stamp");
    server.wait_until("its library is removed", EDIT_DEADLINE, || async { !library.exists() }).await;
    let n: i64 = db.query_one("SELECT count(*) FROM plugin_builds", &[]).await.unwrap().get(0);
    assert_eq!(n, 0, "its build history goes too");
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_or_broken_archives_are_refused_and_leave_nothing() {
    let server = TestServer::start(&[]).await;
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("parent path", raw_archive("../evil.txt", tar::EntryType::Regular, b"x", None), 400, "unsafe path"),
        (
            "nested parent path",
            raw_archive("a/../../evil.txt", tar::EntryType::Regular, b"x", None),
            400,
            "unsafe path",
        ),
        ("absolute path", raw_archive("/tmp/kiln-evil.txt", tar::EntryType::Regular, b"x", None), 400, "unsafe path"),
        ("symlink", raw_archive("link", tar::EntryType::Symlink, b"", Some("/etc/passwd")), 400, "symbolic link"),
        ("hard link", raw_archive("hard", tar::EntryType::Link, b"", Some("/etc/passwd")), 400, "hard link"),
        ("device", raw_archive("dev", tar::EntryType::Char, b"", None), 400, "character device"),
        ("fifo", raw_archive("fifo", tar::EntryType::Fifo, b"", None), 400, "FIFO"),
        ("huge file", raw_archive("big", tar::EntryType::Regular, &vec![0u8; 9 << 20], None), 400, "too large"),
        ("not gzip", b"this is not an archive".to_vec(), 400, "not a readable"),
        ("no crate", raw_archive("README", tar::EntryType::Regular, b"hi", None), 400, "no plugin crate"),
    ];
    for (what, archive, want, text) in cases {
        let (status, body) = install(&server, archive).await;
        assert_eq!(status, want, "{what}: {body}");
        assert_eq!(body["error"], "InvalidArchive", "{what}: {body}");
        assert!(body["message"].as_str().unwrap().contains(text), "{what}: {body}");
        assert_eq!(installed_entries(&server), Vec::<String>::new(), "{what} left something behind");
    }
    assert!(!Path::new("/tmp/kiln-evil.txt").exists());

    // Too many entries.
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    for i in 0..2001 {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_cksum();
        tar.append_data(&mut h, format!("f{i}"), &[][..]).unwrap();
    }
    let (status, body) = install(&server, tar.into_inner().unwrap().finish().unwrap()).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("InvalidArchive")), "{body}");

    // A crate that does not compile: the compiler's message, and nothing kept.
    let (status, body) = install(&server, crate_archive(&crate_source("broken"), "broken")).await;
    assert_eq!((status, body["error"].as_str()), (422, Some("BuildFailed")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("mismatched types"), "{body}");
    assert_eq!(server.get("/plugins/broken").await.0, 404);
    assert_eq!(installed_entries(&server), Vec::<String>::new());

    // An upload without a length is refused before it is read.
    let mut raw = std::net::TcpStream::connect(server.base.trim_start_matches("http://")).unwrap();
    raw.write_all(b"POST /plugins/install HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n").unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut raw, &mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 411"), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn discover_reports_found_added_removed_and_failed() {
    let server = TestServer::start(&[]).await;
    copy_crate(&crate_source("hello"), &server.plugin_dir("hello"));
    let bad = server.plugin_dir("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("Cargo.toml"), "[package]\nname = \"bad name\"\n[package.metadata.kiln]\n").unwrap();

    let (status, report) = server.post("/plugins/discover", None).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["found"], json!(["hello"]));
    assert_eq!(report["added"], json!(["hello"]));
    let failed = report["failed"].as_array().unwrap();
    assert!(failed.len() == 1 && failed[0]["error"].as_str().unwrap().contains("invalid plugin name"), "{report}");
    server.wait_state("hello", "loaded").await;

    let (_, again) = server.post("/plugins/discover", None).await;
    assert_eq!((again["found"].clone(), again["added"].clone()), (json!(["hello"]), json!([])));

    // Removed once its optimized build is done: a crate that vanishes under its build is
    // unloaded by the pass the failed build brings, before a rescan could report it removed.
    server.wait_optimized("hello").await;
    std::fs::remove_dir_all(server.plugin_dir("hello")).unwrap();
    let (_, report) = server.post("/plugins/discover", None).await;
    assert_eq!(report["removed"], json!(["hello"]), "{report}");
    server
        .wait_until("the removed plugin is unloaded", EDIT_DEADLINE, || async { server.get("/hello").await.0 == 404 })
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_token_guards_the_admin_api_only() {
    let server =
        TestServer::start_with(cluster().await, &["hello"], |c| c.admin_token = Some("s3cret-token".into())).await;
    server
        .wait_until("/health is ok, without a token", EDIT_DEADLINE, || async { server.get("/health").await.0 == 200 })
        .await;
    let (status, body) = server.get("/plugins").await;
    assert_eq!((status, body["error"].as_str()), (401, Some("Unauthorized")), "{body}");
    let wrong = server.http.get(server.url("/plugins")).bearer_auth("s3cret-tokeN").send().await.unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let right = server.http.get(server.url("/plugins")).bearer_auth("s3cret-token").send().await.unwrap();
    assert_eq!(right.status().as_u16(), 200);
    let toggle = server.http.post(server.url("/plugins/hello/toggle")).send().await.unwrap();
    assert_eq!(toggle.status().as_u16(), 401, "writes are guarded too");
    for public in ["/health", "/openapi.json", "/docs"] {
        assert_eq!(server.get(public).await.0, 200, "{public} stays public");
    }
    let (_, spec) = server.get("/openapi.json").await;
    assert_eq!(spec["components"]["securitySchemes"]["adminToken"]["scheme"], "bearer", "the spec declares it");
    assert_eq!(spec["paths"]["/plugins"]["get"]["security"], json!([{ "adminToken": [] }]));
    assert!(spec["paths"]["/health"]["get"]["security"].is_null());
    server
        .wait_until("the plugin serves, without a token", EDIT_DEADLINE * 20, || async {
            server.get("/hello").await.0 == 200
        })
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn load_activates_and_failed_builds_are_in_the_history() {
    let server = TestServer::start(&["broken", "hello"]).await;
    server.wait_state("broken", "failed").await;
    let (_, builds) = server.get("/plugins/broken/builds").await;
    let first = &builds.as_array().unwrap()[0];
    assert_eq!(first["success"], false);
    assert!(first["diagnostics"].as_str().unwrap().contains("mismatched types"), "{first}");
    // Each error with its place, in the history and at the top of the row's error.
    let error = first["messages"].as_array().unwrap().iter().find(|m| m["level"] == "error").expect("{first}");
    assert_eq!(error["message"], "mismatched types", "{first}");
    assert_eq!((&error["code"], &error["file"], &error["line"]), (&json!("E0308"), &json!("src/lib.rs"), &json!(9)));
    assert!(error["column"].as_u64().is_some() && error["rendered"].as_str().unwrap().contains("-->"), "{error}");
    let row = server.plugin("broken").await;
    let lines: Vec<&str> = row["error"].as_str().unwrap().lines().collect();
    let summary = format!("error[E0308] src/lib.rs:9:{}: mismatched types", error["column"]);
    let at = lines.iter().position(|l| *l == summary).unwrap_or_else(|| panic!("{summary:?} not in {row}"));
    assert!(lines.iter().position(|l| l.contains("-->")).is_some_and(|r| at < r), "places come first: {row}");

    server.wait_state("hello", "loaded").await;
    assert_eq!(server.post("/plugins/hello/toggle", None).await.0, 200);
    assert_eq!(server.get("/hello").await.0, 404);
    let (status, row) = server.post("/plugins/hello/load", None).await;
    assert_eq!((status, row["status"].as_str(), row["state"].as_str()), (200, Some("active"), Some("loaded")));
    assert_eq!(server.get("/hello").await.0, 200);
    let (status, err) = server.post("/plugins/broken/load", None).await;
    assert_eq!((status, err["error"].as_str()), (422, Some("BuildFailed")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_config_file_adds_plugin_directories_and_sets_initial_status() {
    let setup = tempfile::tempdir().unwrap();
    let file = setup.path().join("kiln.toml");
    std::fs::write(&file, "plugin_dirs = [\"extra\"]\ndisable = [\"hello\"]\n").unwrap();
    copy_crate(&crate_source("hello"), &setup.path().join("extra/hello"));
    let server = TestServer::start_with(cluster().await, &["powertable"], |c| c.config_file = Some(file.clone())).await;
    server.wait_state("powertable", "loaded").await;
    let hello = server.wait_state("hello", "inactive").await;
    assert_eq!(hello["status"], "inactive", "discovered in the extra directory, disabled by the list");
    assert!(hello["source_path"].as_str().unwrap().ends_with("extra/hello"));
    assert_eq!(server.get("/hello").await.0, 404);
    // The row is the truth afterwards: enabling it works despite the list.
    assert_eq!(server.post("/plugins/hello/load", None).await.0, 200);
    assert_eq!(server.get("/hello").await.0, 200);
}

/// PostgreSQL refusing a value is the client's problem (422, with PostgreSQL's reason), not an
/// unavailable database (503).
#[tokio::test(flavor = "multi_thread")]
async fn a_value_postgres_refuses_is_422_with_its_reason() {
    let server = TestServer::start(&["hello"]).await;
    server.wait_state("hello", "loaded").await;
    let (status, body) = put_config(&server, "hello", json!({ "a": "x\u{0}y" })).await;
    assert_eq!((status, body["error"].as_str()), (422, Some("DatabaseRefused")), "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("unsupported Unicode escape sequence"),
        "PostgreSQL's own words: {body}"
    );
    assert_eq!(server.get("/health").await.0, 200, "the database is fine");
}
