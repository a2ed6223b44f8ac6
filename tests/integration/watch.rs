//! Watch mode: edits rebuild and reload, new crates are discovered, removed ones unloaded.

use crate::support::{BUILD_DEADLINE, TestServer, cluster, copy_crate, crate_source};
use kiln::watcher::WatchMode;

async fn watch_loop(mode: WatchMode) {
    let server = TestServer::start_with(cluster().await, &["lifecycle"], |c| c.watch = mode).await;
    server.wait_state("lifecycle", "loaded").await;

    // An edit is rebuilt and served without any API call.
    let src = server.plugin_dir("lifecycle").join("src/lib.rs");
    let code = std::fs::read_to_string(&src).unwrap();
    std::fs::write(&src, code.replace("\"v1\"", "\"v2\"")).unwrap();
    server.wait_until("the edit serves", BUILD_DEADLINE, || async { server.get("/lifecycle").await.1 == "v2" }).await;

    // A new crate in the plugin directory is discovered and served.
    copy_crate(&crate_source("hello"), &server.plugin_dir("hello"));
    server.wait_until("the new crate serves", BUILD_DEADLINE, || async { server.get("/hello").await.0 == 200 }).await;

    // A removed crate is unloaded, and its row says why.
    std::fs::remove_dir_all(server.plugin_dir("lifecycle")).unwrap();
    server
        .wait_until("the removed crate is gone", BUILD_DEADLINE, || async { server.get("/lifecycle").await.0 == 404 })
        .await;
    let row = server.wait_state("lifecycle", "failed").await;
    assert!(row["error"].as_str().unwrap().starts_with("ManifestNotFound"), "{row}");
    assert_eq!(server.get("/hello").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_mode_follows_the_files_with_the_os_watcher() {
    watch_loop(WatchMode::Auto).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_mode_follows_the_files_by_polling() {
    watch_loop(WatchMode::Poll).await;
}
