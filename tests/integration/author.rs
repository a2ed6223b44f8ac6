//! The plugin author's loop: `kiln new` writes a crate that tests, checks and serves at once;
//! `kiln check` reports what would serve or what is wrong; a plugin written against the SDK of
//! an earlier kiln still compiles and serves.

use crate::support::{BUILD_DEADLINE, Load, TestServer, repo_root};
use serde_json::json;
use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

/// Runs the `kiln` binary with `args` in `dir`.
async fn kiln(dir: &Path, args: &[&str]) -> Output {
    let build = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kiln-plugin-build");
    tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(dir)
        .env("KILN_BUILD_DIR", build)
        .output()
        .await
        .expect("run kiln")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_plugin_tests_checks_and_serves_at_once() {
    let server = TestServer::start(&[]).await;
    let work = server.root.path().join("work");
    std::fs::create_dir_all(&work).unwrap();

    let out = kiln(&work, &["new", "hello2"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let dir = work.join("hello2");
    let refused = kiln(&work, &["new", "hello2"]).await;
    assert_eq!(refused.status.code(), Some(1), "a second `new` into the same place: {}", text(&refused));
    assert!(text(&refused).contains("not empty"), "{}", text(&refused));
    let bad = kiln(&work, &["new", "no way"]).await;
    assert!(text(&bad).contains("invalid plugin name"), "{}", text(&bad));

    // Its own tests pass inside it, with nothing but what `kiln new` wrote; the lock it wrote
    // is cargo's own (cargo leaves it as it is), with the versions the example plugins use.
    let lock = std::fs::read_to_string(dir.join("Cargo.lock")).unwrap();
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("standalone-plugins");
    let tested = tokio::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .arg("test")
        .current_dir(&dir)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .await
        .expect("run cargo test");
    assert!(tested.status.success(), "cargo test in a new plugin: {}", text(&tested));
    assert_eq!(std::fs::read_to_string(dir.join("Cargo.lock")).unwrap(), lock, "cargo rewrote the template's lock");
    assert!(text(&tested).contains("2 passed"), "{}", text(&tested));

    // `kiln check` builds and loads it as the server would, and says what it serves.
    let checked = kiln(&dir, &["check"]).await;
    assert!(checked.status.success(), "{}", text(&checked));
    let report = String::from_utf8_lossy(&checked.stdout);
    assert!(report.contains("hello2 0.1.0: builds and loads"), "{report}");
    assert!(report.contains("route GET /hello2/hello/{who}"), "{report}");

    // A mistake: the compiler's diagnostics, and exit status 1.
    let lib = dir.join("src/lib.rs");
    let good = std::fs::read_to_string(&lib).unwrap();
    std::fs::write(&lib, good.replace("Json(Greeting { message", "Json(Greeting { mesage")).unwrap();
    let broken = kiln(&dir, &["check", "."]).await;
    assert_eq!(broken.status.code(), Some(1), "{}", text(&broken));
    assert!(text(&broken).contains("no field named `mesage`"), "{}", text(&broken));
    assert!(text(&broken).contains("src/lib.rs"), "{}", text(&broken));
    std::fs::write(&lib, good).unwrap();

    // Its row serves it; its typed schemas are in the live document.
    let db = server.sql().await;
    db.execute("INSERT INTO plugins (name, source_path) VALUES ('hello2', $1)", &[&dir.to_string_lossy().as_ref()])
        .await
        .unwrap();
    server.wait_state("hello2", "loaded").await;
    assert_eq!(server.get("/hello2/hello/kiln").await, (200, json!({ "message": "hello, kiln" })));
    // Decoded once: `%25` is a percent sign, not the start of another escape.
    assert_eq!(server.get("/hello2/hello/a%2541").await.1["message"], "hello, a%41");
    let (status, wrong) = server.post("/hello2/echo", Some(json!({ "text": ["not", "text"] }))).await;
    assert_eq!((status, &wrong["details"]), (400, &json!({ "in": "body", "field": "text" })), "{wrong}");
    let (_, spec) = server.get("/openapi.json").await;
    let echo = &spec["paths"]["/hello2/echo"]["post"];
    let body = &echo["requestBody"]["content"]["application/json"]["schema"];
    assert_eq!((&body["required"], &body["properties"]["text"]["maxLength"]), (&json!(["text"]), &json!(100)));
    assert!(echo["responses"]["200"]["content"].is_object() && echo["responses"]["422"].is_object(), "{echo}");
}

/// The fixture `frozen_sdk` is written against the SDK as it was before typed handlers, and is
/// never edited: it must build and serve as it did.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_written_for_an_earlier_sdk_still_serves() {
    let server = TestServer::start(&["frozen_sdk"]).await;
    server.wait_state("frozen_sdk", "loaded").await;
    let resp = server.http.get(server.url("/frozen/ann?q=1&r")).header("x-test", "yes").send().await.unwrap();
    assert_eq!(resp.headers()["x-frozen"], "1");
    let echoed: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        echoed,
        json!({
            "greeting": "hello", "method": "GET", "path": "/frozen/ann", "name": "ann", "q": "1",
            "query": "q=1&r", "x_test": "yes", "x_test_bytes": 3, "has_headers": true,
        })
    );
    // Path parameters arrive percent-decoded, as they always did.
    assert_eq!(server.get("/frozen/caf%C3%A9").await.1["name"], "café");
    assert_eq!(server.post("/frozen", Some(json!({ "a": 1 }))).await, (200, json!({ "a": 1 })));
    assert_eq!(server.send_delete("/frozen").await, (410, json!("gone")));
    assert_eq!(server.post("/events/frozen.poked", Some(json!({}))).await.0, 202);
    server
        .wait_until("the event is heard", crate::support::EDIT_DEADLINE, || async {
            let (_, calls) = server.put("/frozen", json!({})).await;
            calls["heard"].as_array().is_some_and(|h| h.iter().any(|t| t == "frozen.poked"))
        })
        .await;
    let (status, calls) = server.put("/frozen", json!({})).await;
    assert_eq!((status, &calls["stored"], &calls["emitted"]), (200, &json!(1), &json!(true)), "{calls}");
    assert_eq!(calls["called"], "DependencyNotDeclared", "{calls}");
    let (status, _) = server.put("/plugins/frozen_sdk/config", json!({ "greeting": "hi" })).await;
    assert_eq!(status, 200);
    assert_eq!(server.get("/frozen/x").await.1["greeting"], "hi");
    assert!(repo_root().join("CHANGELOG.md").exists(), "SDK changes are recorded for authors");
}

/// cargo compiles incrementally, and judges freshness by mtimes: an edit whose file carries an
/// older mtime than the last build (restored from an archive, a checkout) must still be built.
#[tokio::test(flavor = "multi_thread")]
async fn an_edit_with_an_old_mtime_is_built_all_the_same() {
    let server = TestServer::start(&["hello"]).await;
    server.wait_state("hello", "loaded").await;
    assert_eq!(server.get("/hello/ann").await.1["message"], "hello, ann");
    let lib = server.plugin_dir("hello").join("src/lib.rs");
    let code = std::fs::read_to_string(&lib).unwrap();
    std::fs::write(&lib, code.replace("format!(\"hello, {who}\")", "format!(\"hi, {who}\")")).unwrap();
    let past = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(946_684_800); // 2000
    std::fs::File::options().write(true).open(&lib).unwrap().set_modified(past).unwrap();
    let (status, row) = server.post("/plugins/hello/reload", None).await;
    assert_eq!(status, 200, "{row}");
    assert_eq!(server.get("/hello/ann").await.1["message"], "hi, ann", "the old library was served again");
}

/// Staged builds, the default profile: an edit of a plugin that serves is served at once from a
/// draft, then from the optimized library of the same version, swapped in under load with no
/// failed request; the draft's library is collected, and the history records both builds.
#[tokio::test(flavor = "multi_thread")]
async fn an_edit_serves_a_draft_at_once_then_its_optimized_build() {
    let server = Arc::new(TestServer::start(&["hello"]).await);
    server.wait_state("hello", "loaded").await;
    let binary = |row: &serde_json::Value| row["binary_path"].as_str().unwrap_or_default().to_string();
    let draft_suffix = format!("-draft.{}", std::env::consts::DLL_EXTENSION);
    assert!(!binary(&server.plugin("hello").await).ends_with(&draft_suffix), "a start builds no draft");
    let load = Load::start(&server, "/hello/ann", 4);

    let lib = server.plugin_dir("hello").join("src/lib.rs");
    let code = std::fs::read_to_string(&lib).unwrap();
    std::fs::write(&lib, code.replace("format!(\"hello, {who}\")", "format!(\"hi, {who}\")")).unwrap();
    let (status, row) = server.post("/plugins/hello/reload", None).await;
    assert_eq!(status, 200, "{row}");
    let row = server.plugin("hello").await;
    assert!(binary(&row).ends_with(&draft_suffix), "the edit serves from a draft: {row}");
    assert_eq!(server.get("/hello/ann").await.1["message"], "hi, ann", "the draft serves the new code");
    let hash = row["loaded_hash"].as_str().unwrap().to_string();

    server
        .wait_until("the optimized library serves", BUILD_DEADLINE, || async {
            let row = server.plugin("hello").await;
            row["loaded_hash"] == hash.as_str() && !binary(&row).ends_with(&draft_suffix) && row["state"] == "loaded"
        })
        .await;
    assert_eq!(server.get("/hello/ann").await.1["message"], "hi, ann");
    let (ok, failed) = load.end().await;
    assert_eq!(failed, 0, "requests failed while the draft and then the optimized library were swapped in");
    assert!(ok > 0);

    let (_, builds) = server.get("/plugins/hello/builds").await;
    let summary: Vec<(bool, bool, &str)> = builds.as_array().unwrap()[..2]
        .iter()
        .map(|b| (b["draft"].as_bool().unwrap(), b["success"].as_bool().unwrap(), b["source_hash"].as_str().unwrap()))
        .collect();
    assert_eq!(summary, [(false, true, hash.as_str()), (true, true, hash.as_str())], "{builds}");
    let libraries: Vec<String> = std::fs::read_dir(server.root.path().join("bin"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.starts_with("hello-"))
        .collect();
    assert_eq!(libraries.len(), 1, "the draft and the replaced version were collected: {libraries:?}");
}

/// An edit made while the optimized build of the last one runs is served from its own draft at
/// once (that build is cancelled, not waited for), and ends served from its optimized library.
#[tokio::test(flavor = "multi_thread")]
async fn an_edit_during_an_optimized_build_cancels_it() {
    let server = TestServer::start(&["hello"]).await;
    server.wait_state("hello", "loaded").await;
    let lib = server.plugin_dir("hello").join("src/lib.rs");
    let code = std::fs::read_to_string(&lib).unwrap();
    let mut hashes = Vec::new();
    for greeting in ["hi", "hey", "yo"] {
        std::fs::write(&lib, code.replace("format!(\"hello, {who}\")", &format!("format!(\"{greeting}, {{who}}\")")))
            .unwrap();
        let (status, row) = server.post("/plugins/hello/reload", None).await;
        assert_eq!(status, 200, "{row}");
        assert_eq!(server.get("/hello/ann").await.1["message"], format!("{greeting}, ann"));
        hashes.push(server.plugin("hello").await["loaded_hash"].as_str().unwrap().to_string());
    }
    let last = hashes.last().unwrap().clone();
    server
        .wait_until("the last edit's optimized library serves", BUILD_DEADLINE, || async {
            let row = server.plugin("hello").await;
            row["loaded_hash"] == last.as_str() && !row["binary_path"].as_str().unwrap_or("-draft").contains("-draft")
        })
        .await;
    assert_eq!(server.get("/hello/ann").await.1["message"], "yo, ann");
    let (_, builds) = server.get("/plugins/hello/builds").await;
    let builds = builds.as_array().unwrap();
    let count = |hash: &str, draft: bool| {
        builds.iter().filter(|b| b["source_hash"] == hash && b["draft"] == draft && b["success"] == true).count()
    };
    for hash in &hashes {
        assert_eq!(count(hash, true), 1, "each edit served from one draft: {builds:?}");
    }
    // The edit that followed at once (a cargo run takes longer) cancelled the optimized builds
    // of the first two versions; the last one's ran.
    assert_eq!([count(&hashes[0], false), count(&hashes[1], false), count(&last, false)], [0, 0, 1], "{builds:?}");
    // Every build recorded succeeded: a cancelled one is not recorded as a failure.
    assert!(builds.iter().all(|b| b["success"] == true), "{builds:?}");
}

/// A version wanted again after its optimized build was cancelled (an edit that failed to
/// build came between) gets that build: its draft does not serve for good. A plugin added while
/// the server runs is served from a draft first too.
#[tokio::test(flavor = "multi_thread")]
async fn a_draft_served_again_gets_its_optimized_build_and_a_new_plugin_drafts() {
    let server = TestServer::start(&["hello"]).await;
    server.wait_state("hello", "loaded").await;
    let lib = server.plugin_dir("hello").join("src/lib.rs");
    let code = std::fs::read_to_string(&lib).unwrap();
    let edited = code.replace("format!(\"hello, {who}\")", "format!(\"hi again, {who}\")");
    std::fs::write(&lib, &edited).unwrap();
    let (status, row) = server.post("/plugins/hello/reload", None).await;
    assert_eq!(status, 200, "{row}");
    assert!(server.plugin("hello").await["binary_path"].as_str().unwrap().contains("-draft."));
    // At once (before the optimized build can end), an edit that does not build: the optimized
    // build of the version that serves is cancelled, and its draft serves on.
    std::fs::write(&lib, edited.replace("pub struct", "pub struct struct")).unwrap();
    let (status, body) = server.post("/plugins/hello/reload", None).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(server.get("/hello/ann").await.1["message"], "hi again, ann");
    // The edit undone: the version whose draft serves is wanted again, seen by a pass that is
    // not a forced reload (as the watcher's or a row change's are).
    std::fs::write(&lib, &edited).unwrap();
    let db = server.sql().await;
    db.execute("UPDATE plugins SET status = 'active' WHERE name = 'hello'", &[]).await.unwrap();
    server
        .wait_until("the optimized library of the version wanted again serves", Duration::from_secs(120), || async {
            let row = server.plugin("hello").await;
            !row["binary_path"].as_str().unwrap_or("-draft.").contains("-draft.") && row["error"].is_null()
        })
        .await;
    assert_eq!(server.get("/hello/ann").await.1["message"], "hi again, ann");

    // A plugin added now (its sources new to the build directory): a draft, then optimized.
    let dir = server.root.path().join("added");
    crate::support::copy_crate(&crate::support::crate_source("hello"), &dir);
    let added_lib = dir.join("src/lib.rs");
    let unique = format!("format!(\"added {}, {{who}}\")", std::process::id());
    std::fs::write(&added_lib, code.replace("format!(\"hello, {who}\")", &unique).replace("\"/hello", "\"/added"))
        .unwrap();
    for file in ["Cargo.toml", "Cargo.lock"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap().replace("name = \"hello\"", "name = \"added\"");
        std::fs::write(dir.join(file), text).unwrap();
    }
    db.execute("INSERT INTO plugins (name, source_path) VALUES ('added', $1)", &[&dir.to_string_lossy().as_ref()])
        .await
        .unwrap();
    server.wait_optimized("added").await;
    let (_, builds) = server.get("/plugins/added/builds").await;
    let drafts: Vec<bool> = builds.as_array().unwrap().iter().map(|b| b["draft"].as_bool().unwrap()).collect();
    assert_eq!(drafts, [false, true], "a draft, then the optimized build: {builds}");
    assert_eq!(server.get("/added/ann").await.1["message"], format!("added {}, ann", std::process::id()));
}

/// A manifest edit that makes cargo rewrite `Cargo.lock` while it builds (a version bump) is not
/// taken for sources edited during the build: it builds and serves.
#[tokio::test(flavor = "multi_thread")]
async fn a_version_bump_builds_though_cargo_rewrites_the_lock() {
    let server = TestServer::start(&["hello"]).await;
    server.wait_state("hello", "loaded").await;
    let manifest = server.plugin_dir("hello").join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replacen("version = \"0.1.0\"", "version = \"0.1.1\"", 1)).unwrap();
    let (status, row) = server.post("/plugins/hello/reload", None).await;
    assert_eq!(status, 200, "{row}");
    assert_eq!(server.plugin("hello").await["version"], "0.1.1");
    assert_eq!(server.get("/hello/ann").await.1["message"], "hello, ann");
}

/// The terminal interface against a live server: tables, exit statuses, a followed log, an
/// install from a directory, and the admin token.
#[tokio::test(flavor = "multi_thread")]
async fn the_terminal_interface_drives_a_live_server() {
    let server = TestServer::start_with(crate::support::cluster().await, &["hello"], |c| {
        c.admin_token = Some("t0ken".into());
    })
    .await;
    let http = reqwest::Client::new();
    server
        .wait_until("hello serves", crate::support::BUILD_DEADLINE, || async {
            matches!(http.get(server.url("/hello")).send().await, Ok(r) if r.status() == 200)
        })
        .await;
    let addr = server.base.trim_start_matches("http://").to_string();
    let here = server.root.path().to_path_buf();
    let cli = |args: &[&str]| {
        let all: Vec<String> =
            args.iter().chain(&["--addr", addr.as_str(), "--token", "t0ken"]).map(|s| s.to_string()).collect();
        let here = here.clone();
        async move { kiln(&here, &all.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };

    let status = cli(&["status"]).await;
    assert!(status.status.success(), "{}", text(&status));
    assert!(text(&status).contains("database up, listener connected"), "{}", text(&status));
    let plugins = cli(&["plugins"]).await;
    let listed = String::from_utf8_lossy(&plugins.stdout).to_string();
    assert!(
        listed.starts_with("NAME ") && listed.lines().any(|l| l.starts_with("hello ") && l.contains("loaded")),
        "{listed}"
    );

    let reloaded = cli(&["reload", "hello"]).await;
    assert_eq!(String::from_utf8_lossy(&reloaded.stdout), "hello 0.1.0: loaded\n", "{}", text(&reloaded));
    let missing = cli(&["reload", "nope"]).await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing).contains("error: PluginNotFound (404)"), "{}", text(&missing));
    let denied = kiln(&here, &["plugins", "--addr", &addr]).await;
    assert!(denied.status.code() == Some(1) && text(&denied).contains("Unauthorized (401)"), "{}", text(&denied));
    let away = kiln(&here, &["status", "--addr", "127.0.0.1:1"]).await;
    assert_eq!(away.status.code(), Some(3), "{}", text(&away));

    // A followed log prints a line logged after it started.
    let mut follow = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["logs", "hello", "-f", "--addr", &addr, "--token", "t0ken"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(follow.stdout.take().unwrap());
    assert_eq!(http.get(server.url("/hello/follower")).send().await.unwrap().status(), 200);
    let seen = tokio::time::timeout(crate::support::EDIT_DEADLINE, async {
        let mut line = String::new();
        loop {
            line.clear();
            if tokio::io::AsyncBufReadExt::read_line(&mut lines, &mut line).await.unwrap() == 0 {
                return None;
            }
            if line.contains("\"who\":\"follower\"") {
                return Some(line.clone());
            }
        }
    })
    .await
    .expect("the followed log showed the new line in time");
    assert!(seen.is_some_and(|l| l.contains("info  greeted [GET /hello/{name}]")));
    follow.kill().await.unwrap();
    let recent = cli(&["logs", "hello", "--level", "info"]).await;
    assert!(String::from_utf8_lossy(&recent.stdout).contains("greeted"), "{}", text(&recent));

    // Install from a directory: packed without build output, built and served.
    let dir = server.root.path().join("work/lifecycle");
    crate::support::copy_crate(&crate::support::crate_source("lifecycle"), &dir);
    std::fs::create_dir_all(dir.join("target/junk")).unwrap();
    std::fs::write(dir.join("target/junk/big"), vec![0u8; 40 << 20]).unwrap(); // over the upload limit
    let installed = cli(&["install", dir.to_str().unwrap()]).await;
    assert_eq!(
        String::from_utf8_lossy(&installed.stdout),
        "installed lifecycle 0.1.0: loaded\n",
        "{}",
        text(&installed)
    );
    assert_eq!(http.get(server.url("/lifecycle")).send().await.unwrap().status(), 200);
    let again = cli(&["install", dir.to_str().unwrap()]).await;
    assert!(again.status.code() == Some(1) && text(&again).contains("PluginExists (409)"), "{}", text(&again));
}

/// A kiln-types whose sources changed but kept old mtimes (an upgrade unpacked from an archive)
/// is rebuilt, not taken from the build directory as cargo would judge it fresh.
#[tokio::test(flavor = "multi_thread")]
async fn a_changed_kiln_types_with_old_mtimes_is_rebuilt() {
    let copy = tempfile::tempdir().unwrap();
    let types = copy.path().join("types");
    crate::support::copy_crate(&repo_root().join("types"), &types);
    standalone_manifest(&types.join("Cargo.toml"));
    let cluster = crate::support::cluster().await;
    let server = TestServer::start_with(cluster.clone(), &["hello"], |c| c.types_dir = types.clone()).await;
    server.wait_state("hello", "loaded").await;
    assert!(endpoints(&server).await.contains("\"GET /hello\""), "{}", endpoints(&server).await);
    let (cluster, root, url) = server.stop().await;

    // The SDK now names handlers differently; the file keeps an mtime from the past.
    let route = types.join("src/route.rs");
    let code = std::fs::read_to_string(&route).unwrap();
    let changed =
        code.replace("handler_name: format!(\"{method} {path}\"),", "handler_name: format!(\"{method} {path} (v2)\"),");
    assert_ne!(changed, code, "the SDK line to change moved");
    std::fs::write(&route, changed).unwrap();
    let past = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(946_684_800);
    std::fs::File::options().write(true).open(&route).unwrap().set_modified(past).unwrap();

    let server = TestServer::start_in_with(cluster, root, url, |c| c.types_dir = types.clone()).await;
    server.wait_state("hello", "loaded").await;
    assert!(
        endpoints(&server).await.contains("\"GET /hello (v2)\""),
        "a stale kiln-types: {}",
        endpoints(&server).await
    );
}

/// The endpoints of hello, as JSON text.
async fn endpoints(server: &TestServer) -> String {
    server.get("/plugins/hello/endpoints").await.1.to_string()
}

/// Gives a copied workspace member the values it inherited, so it builds on its own.
fn standalone_manifest(path: &std::path::Path) {
    let workspace = std::fs::read_to_string(repo_root().join("Cargo.toml")).unwrap();
    let inherited = |key: &str| {
        let line = workspace.lines().find(|l| l.starts_with(&format!("{key} = "))).expect("workspace key");
        line.to_string()
    };
    let manifest = std::fs::read_to_string(path).unwrap();
    let mut out = String::new();
    for line in manifest.lines() {
        if line == "[lints]" || line == "workspace = true" {
            continue;
        }
        match line.strip_suffix(".workspace = true") {
            Some(key) => out += &inherited(key),
            None => out += line,
        }
        out.push('\n');
    }
    std::fs::write(path, out).unwrap();
}

/// A crate that carries its library (`kiln check --write-prebuilt`) serves without a build while
/// its sources stay as they were; once they change, it is built from source.
#[tokio::test(flavor = "multi_thread")]
async fn a_prebuilt_library_serves_without_a_build_while_its_sources_fit() {
    use crate::support::{cluster, copy_crate, crate_source, fresh_database};
    let root = tempfile::Builder::new().prefix("kiln-test-").tempdir().unwrap();
    let dir = root.path().join("plugins/hello");
    copy_crate(&crate_source("hello"), &dir);
    let out = kiln(&dir, &["check", "--write-prebuilt"]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(".kiln-prebuilt"), "{}", text(&out));

    let cluster = cluster().await;
    let db_url = fresh_database(&cluster).await;
    let server = TestServer::start_in(cluster, root, db_url).await;
    server.wait_state("hello", "loaded").await;
    assert_eq!(server.get("/hello/prebuilt").await.0, 200);
    let builds = || async { server.get("/plugins/hello/builds").await.1.as_array().map_or(0, Vec::len) };
    assert_eq!(builds().await, 0, "the prebuilt library served: no build ran");

    // Changed sources do not fit the library any more: built from source.
    let lib = dir.join("src/lib.rs");
    let code = std::fs::read_to_string(&lib).unwrap();
    std::fs::write(&lib, format!("{code}\n// changed after the prebuild\n")).unwrap();
    let (status, body) = server.post("/plugins/hello/reload", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(builds().await, 1, "built from the changed sources");
    assert_eq!(server.get("/hello/prebuilt").await.0, 200);
}
