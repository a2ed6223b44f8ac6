//! Bad plugins: each is refused or contained with a clear error, and nothing else is disturbed.

use crate::support::TestServer;

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_that_does_not_compile_says_why_and_others_keep_serving() {
    let server = TestServer::start(&["broken", "hello"]).await;
    let broken = server.wait_state("broken", "failed").await;
    let error = broken["error"].as_str().unwrap();
    assert!(error.starts_with("BuildFailed"), "{error}");
    assert!(error.contains("error[E0308]: mismatched types"), "the compiler's message is kept: {error}");
    assert!(error.contains("src/lib.rs"), "with its location: {error}");
    server.wait_state("hello", "loaded").await;
    assert_eq!(server.get("/hello").await.0, 200);
    assert_eq!(server.get("/broken").await.0, 404);
    // A serving server answers 200, and says what does not serve.
    let (status, health) = server.get("/health").await;
    assert_eq!(status, 200, "{health}");
    assert_eq!((health["plugins"]["failed"].as_u64(), health["plugins"]["loaded"].as_u64()), (Some(1), Some(1)));

    let (status, body) = server.post("/plugins/broken/reload", None).await;
    assert_eq!((status, body["error"].as_str()), (422, Some("BuildFailed")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("mismatched types"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_rebuild_leaves_the_old_version_serving_until_fixed() {
    let server = TestServer::start(&["lifecycle"]).await;
    server.wait_state("lifecycle", "loaded").await;
    let src = server.plugin_dir("lifecycle").join("src/lib.rs");
    let good = std::fs::read_to_string(&src).unwrap();
    std::fs::write(&src, good.replace("const VERSION: &str = \"v1\";", "const VERSION: &str = 42;")).unwrap();

    let (status, body) = server.post("/plugins/lifecycle/reload", None).await;
    assert_eq!((status, body["error"].as_str()), (422, Some("BuildFailed")), "{body}");
    assert_eq!(server.get("/lifecycle").await.1, "v1", "the old version keeps serving");
    let row = server.plugin("lifecycle").await;
    assert_eq!(row["state"], "loaded");
    assert!(row["error"].as_str().unwrap().contains("mismatched types"), "{row}");

    std::fs::write(&src, good.replace("\"v1\"", "\"v3\"")).unwrap();
    let (status, row) = server.post("/plugins/lifecycle/reload", None).await;
    assert_eq!(status, 200, "{row}");
    assert!(row["error"].is_null(), "a later success clears the error: {row}");
    assert_eq!(server.get("/lifecycle").await.1, "v3");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_handler_answers_500_and_the_server_survives() {
    let server = TestServer::start(&["panicky", "hello"]).await;
    server.wait_state("panicky", "loaded").await;
    server.wait_state("hello", "loaded").await;
    for _ in 0..3 {
        let (status, body) = server.get("/panicky/boom").await;
        assert_eq!(status, 500);
        assert_eq!(body["error"], "PluginError");
        assert!(body["message"].as_str().unwrap().contains("panicky fixture: boom"), "{body}");
    }
    assert_eq!(server.get("/panicky/ok").await, (200, "still fine".into()), "the plugin itself still works");
    assert_eq!(server.get("/hello").await.0, 200);
    assert_eq!(server.get("/health").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_colliding_route_is_refused_and_the_first_owner_keeps_it() {
    let server = TestServer::start(&["powertable"]).await;
    server.wait_state("powertable", "loaded").await;
    let dir = server.root.path().join("more/collider");
    crate::support::copy_crate(&crate::support::crate_source("collider"), &dir);
    let db = server.sql().await;
    db.execute("INSERT INTO plugins (name, source_path) VALUES ('collider', $1)", &[&dir.to_string_lossy().as_ref()])
        .await
        .unwrap();
    let row = server.wait_state("collider", "waiting").await;
    let error = row["error"].as_str().unwrap();
    assert!(error.starts_with("RouteConflict"), "{error}");
    assert!(error.contains("/powertable/{key}") && error.contains("\"powertable\""), "names both sides: {error}");
    assert_eq!(server.get("/collider").await.0, 404, "nothing of the refused plugin serves");
    assert_eq!(server.get("/powertable/1").await.0, 200);
    let eps = db
        .query("SELECT 1 FROM plugin_endpoints e JOIN plugins p ON p.id = e.plugin_id WHERE p.name = 'collider'", &[]);
    assert!(eps.await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_library_built_against_another_abi_is_refused_with_both_versions() {
    let server = TestServer::start(&["abi_skew", "hello"]).await;
    let row = server.wait_state("abi_skew", "failed").await;
    let error = row["error"].as_str().unwrap();
    assert!(error.starts_with("AbiMismatch"), "{error}");
    assert!(error.contains("kiln-types 9.9.9 (ABI 999)"), "the plugin's version: {error}");
    let server_version = format!("kiln-types {} (ABI {})", kiln_types::TYPES_VERSION, kiln_types::abi::ABI_VERSION);
    assert!(error.contains(&server_version), "the server's: {error}");
    server.wait_state("hello", "loaded").await;
    assert_eq!(server.get("/hello").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_body_over_the_limit_is_refused_before_the_plugin_sees_it() {
    let server = TestServer::start_with(crate::support::cluster().await, &["powertable"], |c| c.max_body = 1024).await;
    server.wait_state("powertable", "loaded").await;
    let big = serde_json::json!({ "name": "x".repeat(2000), "watts": 1 });
    let (status, body) = server.post("/powertable", Some(big)).await;
    assert_eq!((status, body["error"].as_str()), (413, Some("BodyTooLarge")), "{body}");
    let (status, _) = server.post("/powertable", Some(serde_json::json!({ "name": "small", "watts": 1 }))).await;
    assert_eq!(status, 201);
    assert_eq!(server.get("/powertable").await.1.as_array().unwrap().len(), 4, "only the small row was added");
}

/// A row naming a crate whose `Cargo.toml` blocks on open (a FIFO; a hung mount behaves alike):
/// no async worker waits for it, so every other request is answered meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_that_blocks_on_open_stalls_nothing_else() {
    let server = TestServer::start(&["hello"]).await;
    server.wait_state("hello", "loaded").await;
    let dir = server.root.path().join("fifo");
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("Cargo.toml");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("run mkfifo");
    assert!(made.success());
    let db = server.sql().await;
    db.execute("INSERT INTO plugins (name, source_path) VALUES ('fifo', $1)", &[&dir.to_string_lossy().as_ref()])
        .await
        .unwrap();
    // Two readers of the FIFO at once (the pass and a config read): with two async workers, both
    // would be stuck if either read ran on one.
    let config = tokio::spawn({
        let (http, url) = (server.http.clone(), server.url("/plugins/fifo/config"));
        async move { http.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    let quick = reqwest::Client::builder().timeout(std::time::Duration::from_secs(2)).build().unwrap();
    for _ in 0..20 {
        let resp = quick.get(server.url("/hello")).send().await.expect("answered while the FIFO blocks");
        assert_eq!(resp.status().as_u16(), 200);
        let resp = quick.get(server.url("/health")).send().await.expect("answered while the FIFO blocks");
        assert_eq!(resp.status().as_u16(), 200);
    }
    let row = server.wait_state("fifo", "failed").await;
    let error = row["error"].as_str().unwrap();
    assert!(error.starts_with("InvalidManifest") && error.contains("did not finish"), "{error}");
    assert_eq!(config.await.unwrap().expect("the config read answered"), 200, "without a schema, after the limit");
    // Release the blocked reads (a writer opens the FIFO), so no thread stays behind.
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(&fifo);
}

/// Sends `head` (and nothing more) on a raw connection; the status line of the answer, read
/// within `within`.
async fn raw_answer(server: &TestServer, head: &str, within: std::time::Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = server.base.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(within, conn.read(&mut answer)).await.expect("an answer in time").unwrap();
    String::from_utf8_lossy(&answer[..n]).lines().next().unwrap_or_default().to_string()
}

/// A client that declares a huge body, or stops sending one, cannot hold a connection.
#[tokio::test(flavor = "multi_thread")]
async fn slow_and_lying_clients_are_answered_at_once_or_timed_out() {
    let server =
        TestServer::start_with(crate::support::cluster().await, &["powertable"], |c| c.request_timeout_secs = 1).await;
    server.wait_state("powertable", "loaded").await;
    let quick = std::time::Duration::from_secs(2);
    let huge = "Content-Length: 99999999999\r\n\r\nx";
    let plugin = raw_answer(&server, &format!("POST /powertable HTTP/1.1\r\nHost: k\r\n{huge}"), quick).await;
    assert!(plugin.starts_with("HTTP/1.1 413"), "{plugin}");
    let admin =
        raw_answer(&server, &format!("PUT /plugins/powertable/config HTTP/1.1\r\nHost: k\r\n{huge}"), quick).await;
    assert!(admin.starts_with("HTTP/1.1 413"), "{admin}");
    // Ten bytes declared, one sent: 408 once the body timeout (1 s here) passes.
    let stalled = "Content-Type: application/json\r\nContent-Length: 10\r\n\r\n{";
    let within = std::time::Duration::from_secs(5);
    let plugin = raw_answer(&server, &format!("POST /powertable HTTP/1.1\r\nHost: k\r\n{stalled}"), within).await;
    assert!(plugin.starts_with("HTTP/1.1 408"), "{plugin}");
    let admin =
        raw_answer(&server, &format!("PUT /plugins/powertable/config HTTP/1.1\r\nHost: k\r\n{stalled}"), within).await;
    assert!(admin.starts_with("HTTP/1.1 408"), "{admin}");
    // Headers that never end, even trickled a byte at a time, end the connection at the deadline.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(server.base.trim_start_matches("http://")).await.unwrap();
    conn.write_all(b"GET /powertable HTTP/1.1\r\nHost: k\r\n").await.unwrap();
    let started = std::time::Instant::now();
    let mut closed = false;
    while started.elapsed() < within && !closed {
        let _ = conn.write_all(b"X").await; // a slowloris keeps sending
        let mut byte = [0u8; 1];
        closed = matches!(
            tokio::time::timeout(std::time::Duration::from_millis(200), conn.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        );
    }
    assert!(closed, "a head that never ends holds the connection");
    // An over-long query string gets kiln's JSON error, not an empty 414.
    let mut conn = tokio::net::TcpStream::connect(server.base.trim_start_matches("http://")).await.unwrap();
    let head = format!("GET /powertable?x={} HTTP/1.1\r\nHost: k\r\n\r\n", "a".repeat(20_000));
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(within, conn.read_to_end(&mut answer)).await.expect("answered in time").unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 414"), "{}", answer.lines().next().unwrap_or_default());
    assert!(answer.contains(r#""error":"UriTooLong""#), "kiln's error shape");
    assert_eq!(server.get("/powertable/1").await.0, 200);
}
