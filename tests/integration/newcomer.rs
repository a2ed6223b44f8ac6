//! The newcomer's path, to the letter: the README's plugin example and SQL walk-through run
//! verbatim, the example plugins check and test on their own, and the private PostgreSQL starts
//! where a new user's machine puts obstacles (a late database, a private home directory).

use crate::support::{BUILD_DEADLINE, EDIT_DEADLINE, TestServer, repo_root, wait_until};
use kiln::local_pg::{LocalPostgres, Options};
use serde_json::json;
use std::path::Path;
use std::time::Duration;

/// The code blocks of `lang` in the README section that starts with `heading`, in order.
fn readme_blocks(heading: &str, lang: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let start = readme.find(heading).unwrap_or_else(|| panic!("README has no section {heading:?}"));
    let section = &readme[start..];
    let end = section[heading.len()..].find("\n## ").map_or(section.len(), |i| i + heading.len());
    let mut blocks = Vec::new();
    let mut rest = &section[..end];
    let fence = format!("```{lang}\n");
    while let Some(i) = rest.find(&fence) {
        let body = &rest[i + fence.len()..];
        let close = body.find("```").expect("closed code block");
        blocks.push(body[..close].to_string());
        rest = &body[close..];
    }
    blocks
}

/// Writes the README's example plugin (`Cargo.toml` and `src/lib.rs`, verbatim) into `dir`.
fn write_readme_plugin(dir: &Path) {
    let toml = readme_blocks("## Writing a plugin", "toml");
    let rust = readme_blocks("## Writing a plugin", "rust");
    std::fs::create_dir_all(dir.join("src")).expect("mkdir");
    std::fs::write(dir.join("Cargo.toml"), &toml[0]).expect("write Cargo.toml");
    std::fs::write(dir.join("src/lib.rs"), &rust[0]).expect("write lib.rs");
}

/// The statements of the README's SQL walk-through, comments removed.
fn readme_sql() -> Vec<String> {
    let block = readme_blocks("## Driving plugins with SQL", "sql").into_iter().next().expect("an sql block");
    block
        .lines()
        .map(|l| l.split("--").next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readme_plugin_and_sql_walk_through_work_verbatim() {
    let server = TestServer::start(&["powertable", "hello"]).await;
    server.wait_state("powertable", "loaded").await;
    let greeter = server.root.path().join("elsewhere/greeter");
    write_readme_plugin(&greeter);
    let db = server.sql().await;
    let statements = readme_sql();
    assert!(statements.len() >= 5, "the walk-through lost statements: {statements:?}");
    for statement in statements {
        let sql = statement.replace("/path/to/greeter", &greeter.to_string_lossy());
        let rows = db.simple_query(&sql).await.unwrap_or_else(|e| panic!("README SQL {sql:?} failed: {e}"));
        let powertable = || async { server.get("/powertable").await.0 };
        if sql.starts_with("UPDATE plugins SET status = 'inactive'") {
            server.wait_until("powertable is unloaded", EDIT_DEADLINE, || async { powertable().await == 404 }).await;
        } else if sql.starts_with("UPDATE plugins SET status = 'active'") {
            server.wait_until("powertable serves again", EDIT_DEADLINE, || async { powertable().await == 200 }).await;
        } else if sql.starts_with("DELETE FROM plugins") {
            server.wait_until("powertable is gone", EDIT_DEADLINE, || async { powertable().await == 404 }).await;
            assert_eq!(server.get("/plugins/powertable").await.0, 404);
            let left = db.query("SELECT 1 FROM plugin_endpoints WHERE path LIKE '/powertable%'", &[]).await.unwrap();
            assert!(left.is_empty(), "its endpoint rows went with it");
            // Uninstall lasts: discovery skips the crate that is still in the plugin directory.
            let (status, report) = server.post("/plugins/discover", None).await;
            assert_eq!(status, 200, "{report}");
            assert_eq!(server.get("/plugins/powertable").await.0, 404, "rediscovered after uninstall: {report}");
        } else if sql.starts_with("INSERT INTO plugins") {
            server.wait_state("greeter", "loaded").await;
            let (status, body) = server.get("/greet/world").await;
            assert_eq!((status, body), (200, json!({ "hello": "world" })));
        } else if sql.starts_with("SELECT name, status, state, rollout, error FROM plugin_status") {
            let names: Vec<String> = rows
                .iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => {
                        Some(format!("{} {} {}", r.get(0)?, r.get(2)?, r.get(3)?))
                    }
                    _ => None,
                })
                .collect();
            assert!(names.contains(&"greeter loaded converged".to_string()), "{names:?}");
        } else {
            panic!("the README's walk-through has a statement this test does not check: {sql}");
        }
    }
    // The README's way back from an uninstall.
    db.batch_execute("DELETE FROM plugin_tombstones WHERE name = 'powertable'").await.unwrap();
    let (status, report) = server.post("/plugins/discover", None).await;
    assert_eq!(status, 200);
    assert_eq!(report["added"], json!(["powertable"]), "{report}");
    server.wait_state("powertable", "loaded").await;
}

/// `cargo check` and `cargo test` inside an example plugin's own directory, with nothing but
/// the checkout (its `.cargo/config.toml` points `kiln-types` at `types/`).
#[tokio::test(flavor = "multi_thread")]
async fn example_plugins_check_and_test_on_their_own() {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("standalone-plugins");
    for plugin in ["hello", "powertable", "notes", "audit"] {
        for command in ["check", "test"] {
            let out = tokio::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .arg(command)
                .current_dir(repo_root().join("plugins").join(plugin))
                .env("CARGO_TARGET_DIR", &target)
                .output()
                .await
                .expect("run cargo");
            assert!(
                out.status.success(),
                "cargo {command} in plugins/{plugin} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// A database that starts after kiln (a container, a booting machine) is waited for.
#[tokio::test(flavor = "multi_thread")]
async fn the_server_waits_for_a_database_that_starts_late() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("plugins")).unwrap();
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let mut config = kiln::Config::under(root.path(), url);
    config.build_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kiln-plugin-build");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(kiln::serve(listener, config, async {
        let _ = stopped.await;
    }));
    // The database comes up two seconds after the server started: the scenario, not a wait.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!server.is_finished(), "the server gave up on a database that was not up yet");
    let dir = tempfile::Builder::new().prefix("kiln-pg-late-").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let options = Options { ephemeral: true, preferred_port: Some(port), ..Default::default() };
    let pg = LocalPostgres::start(&dir.path().join("data"), options).await.expect("start PostgreSQL");
    let http = reqwest::Client::new();
    wait_until("the server is healthy", BUILD_DEADLINE, &mut || async {
        matches!(http.get(format!("{base}/health")).send().await, Ok(r) if r.status() == 200)
    })
    .await;
    let _ = stop.send(());
    server.await.unwrap().expect("the server ran cleanly");
    pg.stop_blocking();
}

/// As root, the private cluster runs as the `postgres` user, which cannot enter a private home
/// directory (`/root`, mode 0700): the cluster then lives where that user can reach it.
#[tokio::test(flavor = "multi_thread")]
async fn the_private_cluster_starts_from_a_private_home_directory() {
    let top = tempfile::tempdir().unwrap();
    std::fs::set_permissions(top.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let home = top.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let fallback = top.path().join("fallback");
    let options = Options { ephemeral: true, fallback_root: Some(fallback.clone()), ..Default::default() };
    let pg = LocalPostgres::start(&home.join("checkout/.kiln/pgdata"), options).await.expect("start PostgreSQL");
    let as_root = nix_is_root();
    assert_eq!(
        pg.data_dir().starts_with(&fallback),
        as_root,
        "as root the cluster moves out of the private directory, otherwise it stays: {}",
        pg.data_dir().display()
    );
    let client = crate::support::connect(&pg.url()).await;
    let one: i32 = client.query_one("SELECT 1", &[]).await.expect("query").get(0);
    assert_eq!(one, 1);
    pg.stop_blocking();
}

fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

/// A taken port stops `kiln serve` before it starts anything, so nothing is left running.
#[tokio::test(flavor = "multi_thread")]
async fn a_bind_failure_leaves_no_private_postgres_behind() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let root = tempfile::tempdir().unwrap();
    let mut config = kiln::Config::under(root.path(), String::new());
    config.database_url = None;
    config.addr = taken.local_addr().unwrap();
    let err = kiln::run(config).await.expect_err("the port is taken");
    assert!(format!("{err:#}").contains("binding"), "{err:#}");
    assert!(!root.path().join("data/pgdata").exists(), "no private PostgreSQL was started");
}

/// A plugin directory named with `..` (`--plugin-dirs ../plugins`): cargo reports the crate's
/// manifest with the `..` resolved, and kiln still finds the library it built.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_directory_named_with_dot_dot_builds() {
    let server = TestServer::start_with(crate::support::cluster().await, &["hello"], |c| {
        c.plugin_dirs = c.plugin_dirs.iter().map(|d| d.join("../plugins/.")).collect();
    })
    .await;
    let row = server.wait_state("hello", "loaded").await;
    assert!(row["source_path"].as_str().unwrap().contains(".."), "the row keeps the path as given: {row}");
    assert_eq!(server.get("/hello/ann").await.0, 200);
}
