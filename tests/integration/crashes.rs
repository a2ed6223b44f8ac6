//! A plugin whose init takes the process down (abort, exit): `kiln serve`'s supervisor starts the
//! server again, which marks that plugin's row with how the process died, skips it until its row
//! or source changes, and serves the others; a plugin that ends the process outside a load is
//! not restarted. The real binary, as a user runs it.

use crate::support::{BUILD_DEADLINE, cluster, copy_crate, crate_source, fresh_database, wait_until};
use std::process::Stdio;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_that_kills_the_server_in_init_is_named_and_skipped() {
    let cluster = cluster().await;
    let db_url = fresh_database(&cluster).await;
    let root = tempfile::tempdir().unwrap();
    for name in ["crasher", "hello"] {
        copy_crate(&crate_source(name), &root.path().join("plugins").join(name));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut kiln = serve(root.path(), port, &db_url);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let row = |name: &'static str| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let resp = http.get(format!("{base}/plugins/{name}")).send().await.ok()?;
            resp.json::<serde_json::Value>().await.ok()
        }
    };
    wait_until("the restarted server names the crasher and serves hello", BUILD_DEADLINE, &mut || async {
        let crashed = row("crasher").await.is_some_and(|r| {
            r["state"] == "failed" && r["error"].as_str().is_some_and(|e| e.starts_with("CrashedDuringLoad"))
        });
        crashed && matches!(http.get(format!("{base}/hello")).send().await, Ok(r) if r.status() == 200)
    })
    .await;
    let crasher = row("crasher").await.unwrap();
    let error = crasher["error"].as_str().unwrap();
    assert!(error.contains("killed by signal 6 (SIGABRT)"), "{error}");
    assert_eq!(http.get(format!("{base}/crasher")).send().await.unwrap().status(), 404);

    // Reloading the same version is refused without calling into it.
    let resp = http.post(format!("{base}/plugins/crasher/reload")).send().await.unwrap();
    assert_eq!(resp.status(), 422);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "CrashedDuringLoad", "{body}");

    // A row edit lifts the quarantine: this config makes init call exit(3).
    let db = crate::support::connect(&db_url).await;
    db.execute("UPDATE plugins SET config = '{\"how\": \"exit\"}' WHERE name = 'crasher'", &[]).await.unwrap();
    wait_until("the server died again, names the exit code, and serves hello", BUILD_DEADLINE, &mut || async {
        let named =
            row("crasher").await.is_some_and(|r| r["error"].as_str().is_some_and(|e| e.contains("exited with code 3")));
        named && matches!(http.get(format!("{base}/hello")).send().await, Ok(r) if r.status() == 200)
    })
    .await;

    // SIGTERM reaches the server through the supervisor; both end cleanly.
    let pid = kiln.id().expect("running") as i32;
    // SAFETY: kill(2) on our own child process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(30), kiln.wait()).await.expect("kiln stops").unwrap();
    assert!(status.success(), "{status:?}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "the server process is gone too");

    // A plugin that ends the process outside any load is not taken for a crash while loading
    // (the load markers of every load since are there, emptied): the supervisor passes the
    // exit on instead of starting the server again.
    db.execute("UPDATE plugins SET config = '{\"how\": \"exit-later\"}' WHERE name = 'crasher'", &[]).await.unwrap();
    let mut kiln = serve(root.path(), port, &db_url);
    wait_until("the crasher serves", BUILD_DEADLINE, &mut || async {
        matches!(http.get(format!("{base}/hello")).send().await, Ok(r) if r.status() == 200)
            && row("crasher").await.is_some_and(|r| r["state"] == "loaded")
    })
    .await;
    let markers: Vec<_> = std::fs::read_dir(root.path().join("data/loading")).unwrap().collect();
    assert!(!markers.is_empty(), "the loads left their (emptied) marker files");
    let _ = http.get(format!("{base}/crasher")).send().await;
    let status = tokio::time::timeout(Duration::from_secs(30), kiln.wait()).await.expect("kiln ends").unwrap();
    assert_eq!(status.code(), Some(4), "the plugin's exit code, passed on, not restarted: {status:?}");
}

/// `kiln serve` on the crates in `root/plugins`, as a user runs it.
fn serve(root: &std::path::Path, port: u16, db_url: &str) -> tokio::process::Child {
    let build = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("kiln-plugin-build");
    tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("serve")
        .args(["--addr", &format!("127.0.0.1:{port}"), "--watch", "off"])
        .arg("--plugin-dirs")
        .arg(root.join("plugins"))
        .arg("--data-dir")
        .arg(root.join("data"))
        .arg("--bin-dir")
        .arg(root.join("bin"))
        .arg("--build-dir")
        .arg(&build)
        .env("DATABASE_URL", db_url)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start kiln serve")
}
