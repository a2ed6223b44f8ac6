//! `GET /metrics`: the Prometheus text format, read by a Prometheus text-format parser, with
//! counters that move as requests, panics, reloads and builds happen, and route labels that are
//! patterns, not request paths.

use crate::support::TestServer;
use prometheus_parse::{Scrape, Value};

async fn scrape(server: &TestServer) -> Scrape {
    let resp = server.http.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let kind = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    let text = resp.text().await.unwrap();
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text format")
}

/// The value of the sample `name` with exactly these labels (a histogram: its count), or 0.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found = scrape.samples.iter().find(|s| {
        s.metric == name && s.labels.len() == labels.len() && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
    });
    match found.map(|s| &s.value) {
        Some(Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v)) => *v,
        Some(Value::Histogram(buckets)) => buckets.iter().map(|b| b.count).fold(0.0, f64::max),
        _ => 0.0,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_move_with_requests_panics_reloads_and_builds() {
    let server = TestServer::start(&["hello", "panicky"]).await;
    server.wait_state("hello", "loaded").await;
    server.wait_state("panicky", "loaded").await;
    let before = scrape(&server).await;
    assert_eq!(value(&before, "kiln_builds_total", &[("result", "success")]), 2.0, "one build each");
    assert!(value(&before, "kiln_listener_connects_total", &[]) >= 1.0);
    assert!(value(&before, "kiln_route_tables_built_total", &[]) >= 1.0);
    assert_eq!(value(&before, "kiln_plugin_loads_total", &[("kind", "load"), ("result", "ok")]), 2.0);

    for who in ["ada", "grace", "edsger"] {
        assert_eq!(server.get(&format!("/hello/{who}")).await.0, 200);
    }
    assert_eq!(server.get("/hello").await.0, 200);
    assert_eq!(server.get("/panicky/boom").await.0, 500);
    assert_eq!(server.post("/plugins/hello/reload", None).await.0, 200);

    let after = scrape(&server).await;
    let hello = |route: &str, class: &str| {
        value(&after, "kiln_plugin_requests_total", &[("plugin", "hello"), ("route", route), ("class", class)])
    };
    // One series per route pattern, whatever the names asked for.
    assert_eq!(hello("GET /hello/:name", "2xx"), 3.0);
    assert_eq!(hello("GET /hello", "2xx"), 1.0);
    let series = after.samples.iter().filter(|s| s.metric == "kiln_plugin_requests_total").count();
    assert!(series <= 5 * 7, "bounded by routes and status classes: {series}");
    let latency = &[("plugin", "hello"), ("route", "GET /hello/:name")];
    assert_eq!(value(&after, "kiln_plugin_request_duration_seconds", latency), 3.0);
    let boom = &[("plugin", "panicky"), ("route", "GET /panicky/boom"), ("class", "5xx")];
    assert_eq!(value(&after, "kiln_plugin_requests_total", boom), 1.0);
    assert_eq!(value(&after, "kiln_plugin_panics_total", &[("plugin", "panicky")]), 1.0);
    assert_eq!(value(&after, "kiln_plugin_loads_total", &[("kind", "reload"), ("result", "ok")]), 1.0);
    assert_eq!(value(&after, "kiln_plugin_load_duration_seconds", &[("kind", "reload")]), 1.0);
    assert_eq!(
        value(&after, "kiln_builds_total", &[("result", "success")]),
        2.0,
        "a reload of unchanged source builds nothing"
    );
    assert!(
        value(&after, "kiln_reconcile_passes_total", &[("outcome", "ok")])
            > value(&before, "kiln_reconcile_passes_total", &[("outcome", "ok")])
    );

    // An uninstalled plugin's series go with it; the others stay.
    assert_eq!(server.send_delete("/plugins/panicky").await.0, 200);
    let gone = scrape(&server).await;
    let of = |plugin: &str| gone.samples.iter().filter(|s| s.labels.get("plugin") == Some(plugin)).count();
    assert_eq!(of("panicky"), 0, "no series of an uninstalled plugin");
    assert!(of("hello") > 0);
}
