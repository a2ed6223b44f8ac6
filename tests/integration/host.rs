//! The host side of the boundary, over HTTP: a plugin's own log lines, its panics (with their
//! place) and its init errors, at `GET /plugins/{name}/logs`.

use crate::support::TestServer;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn a_plugins_logs_panics_and_init_errors_are_kept_and_served() {
    let server = TestServer::start(&["hello", "panicky", "lifecycle"]).await;
    server.wait_state("hello", "loaded").await;
    server.wait_state("panicky", "loaded").await;
    server.wait_state("lifecycle", "loaded").await;

    assert_eq!(server.get("/hello/kiln").await.0, 200);
    let (status, lines) = server.get("/plugins/hello/logs").await;
    assert_eq!(status, 200, "{lines}");
    let line = lines.as_array().unwrap().iter().find(|l| l["message"] == "greeted").expect("the greeting was logged");
    assert_eq!(line["level"], "info");
    assert_eq!(line["kind"], "log");
    assert_eq!(line["route"], "GET /hello/{name}");
    assert_eq!(line["fields"], json!({ "who": "kiln", "greetings": 1 }));

    assert_eq!(server.get("/panicky/boom").await.0, 500);
    let (_, lines) = server.get("/plugins/panicky/logs?level=error").await;
    let panic = &lines.as_array().unwrap()[0];
    assert_eq!((panic["kind"].as_str(), panic["route"].as_str()), (Some("panic"), Some("GET /panicky/boom")));
    let message = panic["message"].as_str().unwrap();
    assert!(message.contains("panicky fixture: boom") && message.contains("(at src/lib.rs:"), "{message}");

    // An init that refuses: its reason is kept with the plugin's lines.
    let src = server.plugin_dir("lifecycle").join("src/lib.rs");
    let code = std::fs::read_to_string(&src).unwrap();
    std::fs::write(&src, code.replace("const VERSION: &str = \"v1\";", "const VERSION: &str = \"init-error\";"))
        .unwrap();
    assert_eq!(server.post("/plugins/lifecycle/reload", None).await.0, 422);
    let (_, lines) = server.get("/plugins/lifecycle/logs?limit=1").await;
    let last = &lines.as_array().unwrap()[0];
    assert_eq!(last["kind"], "init");
    assert!(last["message"].as_str().unwrap().contains("init refused"), "{last}");

    // Filters and errors.
    let (status, lines) = server.get("/plugins/hello/logs?level=warn").await;
    assert_eq!((status, lines.as_array().map(Vec::len)), (200, Some(0)));
    assert_eq!(server.get("/plugins/hello/logs?level=loud").await.0, 400);
    assert_eq!(server.get("/plugins/nobody/logs").await.0, 404);
}

/// The host's key-value storage: compare-and-set under concurrency, from inline and blocking
/// handlers; kept across a reload and a restart; gone with the plugin's row.
#[tokio::test(flavor = "multi_thread")]
async fn storage_counts_without_lost_updates_and_outlives_reloads_and_restarts() {
    let server = TestServer::start(&["stored"]).await;
    server.wait_state("stored", "loaded").await;
    let hits = (0..20).map(|i| {
        let path = if i % 2 == 0 { "/stored/count" } else { "/stored/count-blocking" };
        server.get(path)
    });
    let answers = futures_util::future::join_all(hits).await;
    assert!(answers.iter().all(|(s, _)| *s == 200), "{answers:?}");
    let mut counts: Vec<u64> = answers.iter().map(|(_, b)| b["count"].as_u64().unwrap()).collect();
    counts.sort();
    assert_eq!(counts, (1..=20).collect::<Vec<_>>(), "every increment counted once");

    assert_eq!(server.post("/plugins/stored/reload", None).await.0, 200);
    assert_eq!(server.get("/stored/count").await.1, json!({ "count": 21 }), "kept across a reload");
    let (cluster, root, url) = server.stop().await;
    let server = TestServer::start_in(cluster, root, url).await;
    server.wait_state("stored", "loaded").await;
    assert_eq!(server.get("/stored/count").await.1, json!({ "count": 22 }), "kept across a restart");
    assert_eq!(server.get("/stored/keys").await.1, json!(["count"]));

    assert_eq!(server.send_delete("/plugins/stored").await.0, 200);
    let db = server.sql().await;
    server
        .wait_until("the storage goes with the plugin", crate::support::EDIT_DEADLINE, || async {
            db.query("SELECT 1 FROM plugin_storage WHERE plugin = 'stored'", &[]).await.unwrap().is_empty()
        })
        .await;
}

/// A handler past its route's deadline: the client gets 504 at the deadline, the server stays
/// responsive, and the handler's later host calls fail at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_handler_past_its_deadline_answers_504_and_its_host_calls_fail() {
    let server = TestServer::start(&["stored"]).await;
    server.wait_state("stored", "loaded").await;
    let started = std::time::Instant::now();
    let (status, body) = server.get("/stored/slow").await;
    assert_eq!((status, body["error"].as_str()), (504, Some("Timeout")), "{body}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "answered at the deadline, not when the handler ended"
    );
    assert_eq!(server.get("/stored/keys").await.0, 200, "the server stays responsive");
    server
        .wait_until("the late handler's storage call failed with Timeout", crate::support::EDIT_DEADLINE, || async {
            let (_, lines) = server.get("/plugins/stored/logs").await;
            lines.as_array().into_iter().flatten().any(|l| {
                l["message"] == "slow handler's late storage call"
                    && l["fields"]["outcome"].as_str().is_some_and(|o| o.starts_with("Timeout"))
            })
        })
        .await;
    let (status, body) = server.get("/stored/slow-inline").await;
    assert_eq!((status, body["error"].as_str()), (504, Some("Timeout")), "{body}");
}

/// The live tail: `Accept: text/event-stream` on the logs path streams new lines as they come.
#[tokio::test(flavor = "multi_thread")]
async fn the_live_tail_streams_new_lines() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start(&["hello"]).await;
    server.wait_state("hello", "loaded").await;
    let mut tail = tokio::net::TcpStream::connect(server.base.trim_start_matches("http://")).await.unwrap();
    let head = "GET /plugins/hello/logs?level=info HTTP/1.1\r\nHost: k\r\nAccept: text/event-stream\r\n\r\n";
    tail.write_all(head.as_bytes()).await.unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    // The stream answers at once (headers, then the recent lines, none yet).
    let n = tail.read(&mut buf).await.unwrap();
    seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    assert!(seen.starts_with("HTTP/1.1 200") && seen.contains("text/event-stream"), "{seen}");
    assert_eq!(server.get("/hello/tailed").await.0, 200);
    let found = tokio::time::timeout(crate::support::EDIT_DEADLINE, async {
        while !seen.contains("tailed") {
            let n = tail.read(&mut buf).await.unwrap();
            assert!(n > 0, "the stream ended");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await;
    assert!(found.is_ok(), "no live line within the deadline: {seen}");
    assert!(seen.contains("event: log") && seen.contains(r#""message":"greeted""#), "{seen}");
    assert_eq!(server.get("/plugins/nobody/logs").await.0, 404);
}

/// Host calls block the plugin's thread, but never the server: inline handlers stuck in storage
/// calls (their row is locked) leave both async workers free for everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_stuck_in_host_calls_do_not_stall_other_requests() {
    let server = TestServer::start(&["stored", "hello"]).await;
    server.wait_state("stored", "loaded").await;
    server.wait_state("hello", "loaded").await;
    assert_eq!(server.get("/stored/count").await.1, json!({ "count": 1 }));
    let mut locker = server.sql().await;
    let lock = locker.transaction().await.unwrap();
    lock.execute("SELECT 1 FROM plugin_storage WHERE plugin = 'stored' AND key = 'count' FOR UPDATE", &[])
        .await
        .unwrap();
    // More inline handlers than async workers, each waiting in a storage call on the lock.
    let stuck: Vec<_> = (0..6)
        .map(|_| {
            let (http, url) = (server.http.clone(), server.url("/stored/count"));
            tokio::spawn(async move { http.get(url).send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    let watcher = server.sql().await;
    server
        .wait_until("the handlers wait on the row lock", crate::support::EDIT_DEADLINE, || async {
            let waiting: i64 = watcher
                .query_one("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()", &[])
                .await
                .unwrap()
                .get(0);
            waiting >= 2
        })
        .await;
    let quick = reqwest::Client::builder().timeout(std::time::Duration::from_secs(2)).build().unwrap();
    for _ in 0..10 {
        let resp = quick.get(server.url("/hello")).send().await.expect("answered while handlers are stuck");
        assert_eq!(resp.status().as_u16(), 200);
    }
    lock.commit().await.unwrap();
    for handle in stuck {
        assert_eq!(handle.await.unwrap().unwrap(), 200);
    }
    assert_eq!(server.get("/stored/count").await.1, json!({ "count": 8 }), "every increment counted");
}
