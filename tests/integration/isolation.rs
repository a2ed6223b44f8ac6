//! Process isolation: a plugin in a process of its own (`isolated` fixture) that aborts,
//! segfaults, overflows its stack, exits, runs out of memory or hangs costs its own requests
//! (502 `PluginCrashed`, `MemoryLimit`; 504 `Timeout`) and nothing else: a neighbour under load
//! sees no failure, the process is restarted, a crash loop ends in `failed`, and a reload under
//! load drops nothing.

use crate::support::{EDIT_DEADLINE, Load, TestServer};
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

async fn pid_of(server: &TestServer) -> Option<u64> {
    match server.get("/isolated/ok").await {
        (200, body) => body["pid"].as_u64(),
        _ => None,
    }
}

/// Waits until the isolated plugin answers again, from a process other than `dead`.
async fn serving_again(server: &TestServer, dead: u64) -> u64 {
    let pid = Arc::new(AtomicU64::new(0));
    server
        .wait_until("the plugin's process is restarted and serves", EDIT_DEADLINE, || {
            let pid = pid.clone();
            async move {
                let now = pid_of(server).await.filter(|p| *p != dead).unwrap_or(0);
                pid.store(now, Ordering::Relaxed);
                now != 0
            }
        })
        .await;
    pid.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_in_an_isolated_plugin_costs_only_its_own_requests() {
    let server = Arc::new(TestServer::start(&["isolated", "hello"]).await);
    server.wait_state("isolated", "loaded").await;
    server.wait_state("hello", "loaded").await;
    let mut pid = pid_of(&server).await.expect("the isolated plugin serves");
    assert_ne!(pid, u64::from(std::process::id()), "it runs in a process of its own");
    // Host calls from its process: a log line and storage (the second request sees the first).
    assert_eq!(server.get("/isolated/ok").await.1["hits"], 2);
    let (status, logs) = server.get("/plugins/isolated/logs").await;
    assert_eq!(status, 200);
    assert!(logs.to_string().contains("ok asked"), "{logs}");
    assert_eq!(server.get("/isolated/background").await.1, "logged");
    assert!(server.get("/plugins/isolated/logs").await.1.to_string().contains("from a thread of its own"));

    let neighbour = Load::start(&server, "/hello/neighbour", 3);
    let crashes: [(&str, &str, &str); 4] = [
        ("abort", "PluginCrashed", "signal 6 (SIGABRT)"),
        ("segfault", "PluginCrashed", "signal 11 (SIGSEGV)"),
        ("overflow", "PluginCrashed", "overflowed its stack"),
        ("exit", "PluginCrashed", "exited with code 7"),
    ];
    for (n, (how, code, says)) in crashes.iter().enumerate() {
        let (status, body) = server.get(&format!("/isolated/{how}")).await;
        assert_eq!((status, body["error"].as_str()), (502, Some(*code)), "{how}: {body}");
        // The 502 may be answered before the process's end is known (its message then says
        // less); the row says how it died once the crash is recorded, checked below.
        let message = body["message"].as_str().unwrap_or_default().to_string();
        pid = serving_again(&server, pid).await;
        server
            .wait_until("the row counts the restart", EDIT_DEADLINE, || async {
                server.plugin("isolated").await["restarts"] == n as u64 + 1
            })
            .await;
        let row = server.plugin("isolated").await;
        let last = row["last_crash"].as_str().unwrap_or_default();
        assert!(last.contains(says), "{how}: the row says how it died: {last} (its 502 said: {message})");
        assert_eq!(row["state"], "loaded");
    }

    // A fresh instance (a reload) starts its crash count over. Its limits: memory, and the
    // deadline (its process is killed there, the one thing in-process mode cannot do).
    assert_eq!(server.post("/plugins/isolated/reload", None).await.0, 200);
    pid = pid_of(&server).await.expect("serves after the reload");
    assert_eq!(server.plugin("isolated").await["restarts"], 0);
    let (status, body) = server.get("/isolated/hog").await;
    assert_eq!((status, body["error"].as_str()), (502, Some("MemoryLimit")), "{body}");
    pid = serving_again(&server, pid).await;
    let started = std::time::Instant::now();
    let (status, body) = server.get("/isolated/hang").await;
    assert_eq!((status, body["error"].as_str()), (504, Some("Timeout")), "{body}");
    assert!(started.elapsed() < Duration::from_secs(2), "answered at its 300 ms deadline");
    serving_again(&server, pid).await;
    server
        .wait_until("the row says it was killed at the deadline", EDIT_DEADLINE, || async {
            server.plugin("isolated").await["last_crash"].as_str().unwrap_or_default().starts_with("Timeout")
        })
        .await;

    // A reload under load in process mode drops nothing: the new process serves before the
    // old one is retired.
    let own = Load::start(&server, "/isolated/ok", 3);
    for _ in 0..5 {
        let (status, body) = server.post("/plugins/isolated/reload", None).await;
        assert_eq!(status, 200, "{body}");
    }
    let (ok, failed) = own.end().await;
    assert_eq!(failed, 0, "{failed} of {} requests to the reloaded plugin failed", ok + failed);
    assert!(ok > 20, "the load was real: {ok}");

    // A crash loop: five crashes within a minute, and it is `failed`, not restarted.
    for _ in 0..5 {
        let (status, _) = server.get("/isolated/abort").await;
        assert!(status == 502 || status == 404, "{status}");
        server
            .wait_until("restarted or given up", EDIT_DEADLINE, || async {
                let row = server.plugin("isolated").await;
                row["state"] == "failed" || pid_of(&server).await.is_some()
            })
            .await;
    }
    let row = server.wait_state("isolated", "failed").await;
    let error = row["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("CrashLoop: PluginCrashed") && error.contains("SIGABRT"), "{error}");
    // The row says `failed` as soon as the crash is recorded; the pass that retires the
    // instance (until then its routes answer 502) follows.
    server
        .wait_until("its routes are gone", EDIT_DEADLINE, || async { server.get("/isolated/ok").await.0 == 404 })
        .await;
    // A reload of the same row and source is refused; an edit of the row brings it back.
    assert_eq!(server.post("/plugins/isolated/reload", None).await.0, 422);
    let sql = server.sql().await;
    sql.execute("UPDATE plugins SET config = '{\"again\": true}' WHERE name = 'isolated'", &[]).await.unwrap();
    server
        .wait_until("an edited row lifts the crash loop", EDIT_DEADLINE, || async { pid_of(&server).await.is_some() })
        .await;

    let (ok, failed) = neighbour.end().await;
    assert_eq!(failed, 0, "the neighbour failed {failed} of {} requests", ok + failed);
    assert!(ok > 50, "the neighbour's load was real: {ok}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_row_chooses_how_a_plugin_runs() {
    let server = TestServer::start(&["isolated"]).await;
    server.wait_state("isolated", "loaded").await;
    let own = u64::from(std::process::id());
    assert_ne!(pid_of(&server).await, Some(own));
    let sql = server.sql().await;
    sql.execute("UPDATE plugins SET isolation = 'in_process' WHERE name = 'isolated'", &[]).await.unwrap();
    server
        .wait_until("it serves from the server's process", EDIT_DEADLINE, || async {
            pid_of(&server).await == Some(own)
        })
        .await;
    let row: Value = server.plugin("isolated").await;
    assert_eq!(row["isolation"], "in_process");
    sql.execute("UPDATE plugins SET isolation = 'process', memory_limit_mb = 128 WHERE name = 'isolated'", &[])
        .await
        .unwrap();
    server
        .wait_until("it serves from a process of its own again", EDIT_DEADLINE, || async {
            pid_of(&server).await.is_some_and(|p| p != own)
        })
        .await;
    let refused = sql.execute("UPDATE plugins SET isolation = 'jail' WHERE name = 'isolated'", &[]).await;
    assert!(refused.is_err(), "PostgreSQL refuses an unknown isolation");
}

/// Processes running `kiln plugin-host` for a library under `root` (this test's own).
fn hosts_under(root: &std::path::Path, plugin: &str) -> usize {
    let needle = format!("{}/bin/{plugin}-", root.display());
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    dir.filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("plugin-host") && c.contains(&needle))
        .count()
}

/// Every host call crosses the process boundary: two isolated plugins, `notes` (its database
/// schema, storage, an event it emits, a service it offers) and `audit` (an event subscriber
/// that calls notes' service), behave as they do in process.
#[tokio::test(flavor = "multi_thread")]
async fn host_calls_events_and_services_cross_the_process_boundary() {
    let server = TestServer::start(&["audit", "notes"]).await;
    server.wait_state("audit", "loaded").await;
    server.wait_state("notes", "loaded").await;
    let before = (server.plugin("audit").await["loaded_at"].clone(), server.plugin("notes").await["loaded_at"].clone());
    let sql = server.sql().await;
    sql.execute("UPDATE plugins SET isolation = 'process' WHERE name IN ('audit', 'notes')", &[]).await.unwrap();
    let root = server.root.path().to_path_buf();
    // Served by the new instances (published: a new `loaded_at`), not only started: an event
    // delivered to the old audit would be kept in the memory of an instance that is gone.
    server
        .wait_until("both serve from processes of their own", EDIT_DEADLINE, || async {
            let (audit, notes) = (server.plugin("audit").await, server.plugin("notes").await);
            hosts_under(&root, "audit") == 1
                && hosts_under(&root, "notes") == 1
                && audit["loaded_at"] != before.0
                && notes["loaded_at"] != before.1
        })
        .await;
    // Database, storage and an emitted event (notes); a service called from another plugin's
    // process (audit → notes).
    let (status, body) = server.post("/notes", Some(serde_json::json!({ "text": "buy milk" }))).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(server.get("/audit/notes").await, (200, serde_json::json!({ "notes": 1 })));
    // The event reached the subscriber in its process.
    server
        .wait_until("audit hears notes.created", EDIT_DEADLINE, || async {
            let (_, events) = server.get("/audit").await;
            events.as_array().into_iter().flatten().any(|e| e["topic"] == "notes.created")
        })
        .await;
    // Both appear in the API's document as before.
    let (_, doc) = server.get("/openapi.json").await;
    assert!(doc["paths"]["/notes"].is_object() && doc["paths"]["/audit/notes"].is_object());
    // Disabled, their processes end (the cleanup ran in each).
    sql.execute("UPDATE plugins SET status = 'inactive' WHERE name IN ('audit', 'notes')", &[]).await.unwrap();
    server
        .wait_until("their processes end", EDIT_DEADLINE, || async {
            hosts_under(&root, "audit") + hosts_under(&root, "notes") == 0
        })
        .await;
}

/// A restart whose first try fails (here the plugin's init, once) is tried again: the plugin
/// serves again instead of being given up.
#[tokio::test(flavor = "multi_thread")]
async fn a_restart_that_fails_once_is_tried_again() {
    let server = TestServer::start(&["isolated"]).await;
    server.wait_state("isolated", "loaded").await;
    let marker = server.root.path().join("fail-init-once");
    let config = serde_json::json!({ "fail_init_once": marker.to_string_lossy() });
    let before = pid_of(&server).await.expect("it serves");
    server.sql().await.execute("UPDATE plugins SET config = $1 WHERE name = 'isolated'", &[&config]).await.unwrap();
    // A new config is a fresh instance, in a fresh process.
    let first = serving_again(&server, before).await;
    std::fs::write(&marker, "").unwrap();
    assert_eq!(server.get("/isolated/abort").await.0, 502);
    let now = serving_again(&server, first).await;
    assert_ne!(now, first);
    assert!(!marker.exists(), "the first restart's init ran, found the marker and failed");
    let row = server.plugin("isolated").await;
    assert!(row["error"].is_null() && row["state"] == "loaded", "{row}");
    let (_, logs) = server.get("/plugins/isolated/logs").await;
    assert!(logs.to_string().contains("trying again"), "{logs}");
}

/// How many lines of the isolated plugin's log say `message`.
async fn logged(server: &TestServer, message: &str) -> usize {
    let (_, lines) = server.get("/plugins/isolated/logs?limit=1000").await;
    lines.as_array().into_iter().flatten().filter(|l| l["message"] == message).count()
}

/// Requests to one isolated plugin run side by side in its process, over the one connection
/// they share: handlers held up hold up neither each other nor quick requests (with their host
/// calls), and all of them answer once released.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_held_up_in_an_isolated_plugin_hold_up_no_others() {
    let server = Arc::new(TestServer::start(&["isolated"]).await);
    server.wait_state("isolated", "loaded").await;
    let pid = pid_of(&server).await.expect("the isolated plugin serves");
    let release = server.root.path().join("release");
    let held: Vec<_> = (0..4)
        .map(|_| {
            let (server, path) = (server.clone(), format!("/isolated/held?until={}", release.display()));
            tokio::spawn(async move { server.get(&path).await })
        })
        .collect();
    server.wait_until("four handlers are held", EDIT_DEADLINE, || async { logged(&server, "held").await == 4 }).await;
    // Quick requests (each a log line and two storage calls) while the four are held.
    for n in 0..20 {
        let (status, body) = server.get("/isolated/ok").await;
        assert_eq!((status, body["pid"].as_u64()), (200, Some(pid)), "quick request {n}: {body}");
    }
    assert_eq!(logged(&server, "released").await, 0, "the held handlers were still held");
    assert_eq!(in_flight(&server).await, Some(4), "the metrics count the four held requests");
    std::fs::write(&release, b"").unwrap();
    for answer in held {
        assert_eq!(answer.await.unwrap(), (200, serde_json::json!({ "released": true })));
    }
    assert_eq!(logged(&server, "released").await, 4);
    assert_eq!(in_flight(&server).await, Some(0));
    assert_eq!(pid_of(&server).await, Some(pid), "the same process served throughout");
}

/// `kiln_plugin_requests_in_flight` of the isolated plugin.
async fn in_flight(server: &TestServer) -> Option<i64> {
    server.metric("kiln_plugin_requests_in_flight{plugin=\"isolated\"}").await.map(|v| v as i64)
}
