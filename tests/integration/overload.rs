//! A plugin whose blocking handlers hang cannot take the server's blocking pool: once its
//! blocking routes run as many calls as they may (`--blocking-calls-per-plugin`), a call past
//! that waits for one to end and answers 503 `PluginOverloaded` at its deadline, unrun;
//! everything else serves, and a waiting call runs as soon as one ends. All plugins' blocking
//! routes together are held the same way to `--blocking-calls`.

use crate::support::{EDIT_DEADLINE, TestServer, cluster};
use serde_json::json;

const LIMIT: u32 = 4;

#[tokio::test(flavor = "multi_thread")]
async fn hung_blocking_handlers_are_capped_and_the_rest_keeps_serving() {
    let server = TestServer::start_with(cluster().await, &["lifecycle", "powertable"], |c| {
        c.blocking_calls_per_plugin = LIMIT;
        // The deadline of the routes that set none (`/lifecycle/slow`): how long they wait.
        c.route_deadline_ms = 2_000;
    })
    .await;
    server.wait_state("lifecycle", "loaded").await;
    server.wait_state("powertable", "loaded").await;
    let unstick = server.plugin_dir("lifecycle").join("target/unstick");

    // LIMIT calls that hang.
    hang(&server, LIMIT).await;

    // The next calls of the plugin's blocking routes wait for a slot and find none before their
    // deadline: refused, not run (a run call would log `slow`).
    let (status, body) = server.get("/lifecycle/stuck").await;
    assert_eq!((status, body["error"].as_str()), (503, Some("PluginOverloaded")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("GET /lifecycle/stuck was not run"), "{body}");
    let log = server.plugin_dir("lifecycle").join("target/lifecycle.log");
    let (status, body) = server.get("/lifecycle/slow").await;
    assert_eq!((status, body["error"].as_str()), (503, Some("PluginOverloaded")), "every blocking route: {body}");
    assert!(!std::fs::read_to_string(&log).unwrap().contains("slow "), "the refused handler did not run");
    // Its inline route, another plugin and the admin API serve as before.
    assert_eq!(server.get("/lifecycle").await.0, 200);
    assert_eq!(server.get("/powertable").await.0, 200);
    assert_eq!(server.get("/health").await.0, 200);
    let (_, lines) = server.get("/plugins/lifecycle/logs?level=error").await;
    let refusals =
        lines.as_array().unwrap().iter().filter(|l| l["message"].as_str().is_some_and(|m| m.contains("not run")));
    assert_eq!(refusals.count(), 1, "the overload is logged once, for the plugin: {lines}");
    assert_eq!(
        server.metric("kiln_plugin_overloaded_total{plugin=\"lifecycle\"}").await,
        Some(2.0),
        "both refusals are counted"
    );

    // A call waiting when a hung one ends runs then.
    let waiting = {
        let (http, url) = (server.http.clone(), server.url("/lifecycle/slow"));
        tokio::spawn(async move { http.get(url).send().await.map(|r| r.status().as_u16()).unwrap_or(0) })
    };
    server
        .wait_until("the call waits for a slot", EDIT_DEADLINE, || async { in_flight(&server).await == Some(1) })
        .await;
    std::fs::write(&unstick, b"").unwrap();
    assert_eq!(waiting.await.unwrap(), 200, "the waiting call ran once a slot was free");
    assert_eq!(server.get("/lifecycle/stuck").await.0, 200, "released at once now");
}

/// The server-wide limit: one plugin's hung calls fill it, and then another plugin's blocking
/// route waits and is refused too, while inline routes (also one that makes a host call) and
/// the admin API serve. (The pool's headroom beyond the limit is `main.rs`'s sizing of the
/// runtime; the test server runs on the test's runtime.)
#[tokio::test(flavor = "multi_thread")]
async fn all_plugins_blocking_calls_are_capped_server_wide() {
    const SERVER_LIMIT: u32 = 3;
    let server = TestServer::start_with(cluster().await, &["lifecycle", "sqlrun"], |c| {
        c.blocking_calls_per_plugin = 64;
        c.blocking_calls = SERVER_LIMIT;
        c.route_deadline_ms = 2_000;
    })
    .await;
    server.wait_state("lifecycle", "loaded").await;
    server.wait_state("sqlrun", "loaded").await;
    let unstick = server.plugin_dir("lifecycle").join("target/unstick");

    hang(&server, SERVER_LIMIT).await;

    // Another plugin, far below its own limit, finds no server slot before its deadline.
    let select = json!({ "sql": "SELECT 1 AS one" });
    let resp = server.http.post(server.url("/sqlrun/query")).json(&select).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(resp.headers().get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "PluginOverloaded", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("all plugins ran 3 calls, the server's limit"), "{body}");
    assert!(message.contains("POST /sqlrun/query was not run"), "{body}");
    // An inline route with a host call, and the admin API, serve.
    let (status, body) = server.post("/sqlrun/inline", Some(select.clone())).await;
    assert_eq!((status, &body), (200, &json!([{ "one": 1 }])));
    assert_eq!(server.get("/health").await.0, 200);
    assert_eq!(server.metric("kiln_plugin_overloaded_total{plugin=\"sqlrun\"}").await, Some(1.0));

    // Once the hung calls end, the other plugin's blocking route runs.
    std::fs::write(&unstick, b"").unwrap();
    server
        .wait_until("the server's slots are free again", EDIT_DEADLINE, || async {
            server.post("/sqlrun/query", Some(select.clone())).await == (200, json!([{ "one": 1 }]))
        })
        .await;
}

/// Makes `n` calls of the lifecycle fixture's `/lifecycle/stuck` at once, each of which hangs
/// (until `target/unstick` exists) and is answered 504 at its 200 ms deadline, running on.
async fn hang(server: &TestServer, n: u32) {
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let (http, url) = (server.http.clone(), server.url("/lifecycle/stuck"));
            tokio::spawn(async move { http.get(url).send().await.map(|r| r.status().as_u16()).unwrap_or(0) })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), 504, "a hung call is answered at its deadline");
    }
}

/// `kiln_plugin_requests_in_flight` of the lifecycle plugin: the hung calls were answered, so
/// only calls waiting for a slot (or running) count.
async fn in_flight(server: &TestServer) -> Option<i64> {
    server.metric("kiln_plugin_requests_in_flight{plugin=\"lifecycle\"}").await.map(|v| v as i64)
}
