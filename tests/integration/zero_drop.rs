//! Reloads under load: no request fails, and every retired instance is cleaned up exactly once.

use crate::support::{EDIT_DEADLINE, Load, TestServer, log_entries};
use std::collections::BTreeMap;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_never_fail_across_many_reloads() {
    let server = Arc::new(TestServer::start(&["lifecycle"]).await);
    server.wait_state("lifecycle", "loaded").await;

    // One client of four sends slow requests, which are in flight across the swaps.
    let slow = Load::start(&server, "/lifecycle/slow", 1);
    let fast = Load::start(&server, "/lifecycle", 3);

    let src = server.plugin_dir("lifecycle").join("src/lib.rs");
    let code = std::fs::read_to_string(&src).unwrap();
    let (mut reloads, mut code_changes) = (0, 0);
    for round in 0..40 {
        if round % 10 == 0 {
            code_changes += 1;
            // Now and then a real code change: a rebuild and a new library.
            let version = format!("v{}", round / 10 + 2);
            std::fs::write(&src, code.replace("\"v1\"", &format!("\"{version}\""))).unwrap();
        }
        let (status, body) = server.post("/plugins/lifecycle/reload", None).await;
        assert_eq!(status, 200, "{body}");
        reloads += 1;
    }
    let ((slow_ok, slow_failed), (fast_ok, fast_failed)) = (slow.end().await, fast.end().await);
    let (ok, failed) = (slow_ok + fast_ok, slow_failed + fast_failed);
    assert_eq!(failed, 0, "{failed} of {} requests failed across {reloads} reloads", ok + failed);
    assert!(ok > 100, "the load was real: {ok} requests");
    assert_eq!(server.get("/lifecycle").await.1, "v5");

    // Every instance but the serving one is cleaned up, exactly once, once its requests end.
    let log = server.plugin_dir("lifecycle").join("target/lifecycle.log");
    server
        .wait_until("every retired instance is cleaned up", EDIT_DEADLINE, || async {
            let entries = log_entries(&log);
            let inits = entries.iter().filter(|e| e.0 == "init").count();
            entries.iter().filter(|e| e.0 == "cleanup").count() == inits - 1
        })
        .await;
    let mut per_instance: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    for (event, _, id) in log_entries(&log) {
        let counts = per_instance.entry(id).or_default();
        match event.as_str() {
            "init" => counts.0 += 1,
            "cleanup" => counts.1 += 1,
            _ => {}
        }
    }
    // One instance per reload, and at start. A code change can add one: a reload's own
    // notification reaches the server's listener after the reload answered, and if the test
    // has written new code by then, that pass loads it before the next reload asks for a
    // fresh instance again (as a pass would with watch mode on).
    let (low, high) = (reloads + 1, reloads + 1 + code_changes);
    assert!((low..=high).contains(&per_instance.len()), "{} instances for {low}..={high} loads", per_instance.len());
    let serving: Vec<_> = per_instance.iter().filter(|(_, c)| **c == (1, 0)).collect();
    assert_eq!(serving.len(), 1, "only the serving instance is not cleaned up: {per_instance:?}");
    assert!(per_instance.values().all(|c| *c == (1, 1) || *c == (1, 0)), "{per_instance:?}");
}
