//! A plugin whose blocking handlers hang cannot take the server's blocking pool: once its
//! blocking routes run as many calls as they may (`--blocking-calls-per-plugin`), a call past
//! that answers 503 `PluginOverloaded` at once, everything else serves, and its blocking routes
//! serve again once a call ends.

use crate::support::{EDIT_DEADLINE, TestServer, cluster};

const LIMIT: u32 = 4;

#[tokio::test(flavor = "multi_thread")]
async fn hung_blocking_handlers_are_capped_and_the_rest_keeps_serving() {
    let server =
        TestServer::start_with(cluster().await, &["lifecycle", "powertable"], |c| c.blocking_calls_per_plugin = LIMIT)
            .await;
    server.wait_state("lifecycle", "loaded").await;
    server.wait_state("powertable", "loaded").await;
    let unstick = server.plugin_dir("lifecycle").join("target/unstick");

    // LIMIT calls that hang: each is answered 504 at its 200 ms deadline and runs on.
    let calls: Vec<_> = (0..LIMIT)
        .map(|_| {
            let (http, url) = (server.http.clone(), server.url("/lifecycle/stuck"));
            tokio::spawn(async move { http.get(url).send().await.map(|r| r.status().as_u16()).unwrap_or(0) })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), 504, "a hung call is answered at its deadline");
    }

    // The plugin's blocking routes are refused now, not queued behind the hung calls.
    let (status, body) = server.get("/lifecycle/stuck").await;
    assert_eq!((status, body["error"].as_str()), (503, Some("PluginOverloaded")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("GET /lifecycle/stuck"), "{body}");
    assert_eq!(server.get("/lifecycle/slow").await.0, 503, "every blocking route of the plugin");
    // Its inline route, another plugin and the admin API serve as before.
    assert_eq!(server.get("/lifecycle").await.0, 200);
    assert_eq!(server.get("/powertable").await.0, 200);
    assert_eq!(server.get("/health").await.0, 200);
    let (_, lines) = server.get("/plugins/lifecycle/logs?level=error").await;
    let refusals =
        lines.as_array().unwrap().iter().filter(|l| l["message"].as_str().is_some_and(|m| m.contains("is refused")));
    assert_eq!(refusals.count(), 1, "the overload is logged once, for the plugin: {lines}");
    let metrics = server.http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l == "kiln_plugin_overloaded_total{plugin=\"lifecycle\"} 2"),
        "both refusals are counted: {metrics}"
    );

    // Once the hung calls end, its blocking routes serve again.
    std::fs::write(&unstick, b"").unwrap();
    server
        .wait_until("the blocking routes serve again", EDIT_DEADLINE, || async {
            server.get("/lifecycle/slow").await.0 == 200
        })
        .await;
    assert_eq!(server.get("/lifecycle/stuck").await.0, 200, "released at once now");
}
