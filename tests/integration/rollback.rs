//! A new version that fails to load in any way leaves the previous one serving.

use crate::support::{EDIT_DEADLINE, TestServer, read_log};

/// Rewrites the lifecycle fixture's VERSION and reloads; returns the API's answer.
async fn reload_as(server: &TestServer, version: &str) -> (u16, serde_json::Value) {
    let src = server.plugin_dir("lifecycle").join("src/lib.rs");
    let code = std::fs::read_to_string(&src).unwrap();
    let start = code.find("const VERSION: &str = \"").unwrap() + "const VERSION: &str = \"".len();
    let end = start + code[start..].find('"').unwrap();
    std::fs::write(&src, format!("{}{version}{}", &code[..start], &code[end..])).unwrap();
    server.post("/plugins/lifecycle/reload", None).await
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_init_panicking_init_and_abi_skew_all_roll_back() {
    let server = TestServer::start(&["lifecycle"]).await;
    server.wait_state("lifecycle", "loaded").await;

    let (status, body) = reload_as(&server, "init-error").await;
    assert_eq!((status, body["error"].as_str()), (422, Some("InitFailed")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("init refused"), "{body}");
    assert_eq!(server.get("/lifecycle").await.1, "v1");
    let row = server.plugin("lifecycle").await;
    assert_eq!(row["state"], "loaded");
    assert!(row["error"].as_str().unwrap().starts_with("InitFailed"), "{row}");

    let (status, body) = reload_as(&server, "init-panic").await;
    assert_eq!((status, body["error"].as_str()), (422, Some("InitFailed")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("panicked: lifecycle fixture: init panicked"), "{body}");
    assert_eq!(server.get("/lifecycle").await.1, "v1");
    let row = server.plugin("lifecycle").await;
    assert!(row["error"].as_str().unwrap().contains("(at src/lib.rs:"), "an init panic names its place: {row}");

    // A library speaking another ABI, under the same package name.
    let src = server.plugin_dir("lifecycle").join("src/lib.rs");
    let good = std::fs::read_to_string(&src).unwrap();
    let skew = std::fs::read_to_string(crate::support::crate_source("abi_skew").join("src/lib.rs")).unwrap();
    std::fs::write(&src, skew).unwrap();
    let (status, body) = server.post("/plugins/lifecycle/reload", None).await;
    assert_eq!((status, body["error"].as_str()), (422, Some("AbiMismatch")), "{body}");
    assert_eq!(server.get("/lifecycle").await.1, "v1");
    std::fs::write(&src, good).unwrap();

    let (status, row) = reload_as(&server, "v2").await;
    assert_eq!(status, 200, "{row}");
    assert!(row["error"].is_null(), "success clears the error");
    assert_eq!(server.get("/lifecycle").await.1, "v2");
    let log = server.plugin_dir("lifecycle").join("target/lifecycle.log");
    assert_eq!(read_log(&log)[..2], ["init v1", "init v2"], "failed inits never produced an instance");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_cleanup_is_contained() {
    let server = TestServer::start(&["lifecycle"]).await;
    server.wait_state("lifecycle", "loaded").await;
    assert_eq!(reload_as(&server, "cleanup-panic").await.0, 200);
    assert_eq!(reload_as(&server, "v3").await.0, 200);
    let log = server.plugin_dir("lifecycle").join("target/lifecycle.log");
    server
        .wait_until("the panicking cleanup ran", EDIT_DEADLINE, || async {
            read_log(&log).contains(&"cleanup cleanup-panic".to_string())
        })
        .await;
    assert_eq!(server.get("/lifecycle").await.1, "v3");
    assert_eq!(server.get("/health").await.0, 200);
}
