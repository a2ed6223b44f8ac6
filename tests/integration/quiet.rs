//! The server's own writes never notify it: no build loop.

use crate::support::TestServer;
use futures_util::future::poll_fn;
use std::time::Duration;
use tokio_postgres::{AsyncMessage, NoTls};

/// Listens on `plugin_changes` and returns every payload received before `marker`, which it
/// sends itself after `work` completes. Notifications arrive in commit order, so anything the
/// server committed before the marker would be seen first: no sleeping needed.
pub(crate) async fn notifications_during<F: std::future::Future<Output = ()>>(db_url: &str, work: F) -> Vec<String> {
    let (client, mut conn) = tokio_postgres::connect(db_url, NoTls).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(msg)) = poll_fn(|cx| conn.poll_message(cx)).await {
            if let AsyncMessage::Notification(n) = msg {
                let _ = tx.send(n.payload().to_string());
            }
        }
    });
    client.batch_execute("LISTEN plugin_changes").await.unwrap();
    work.await;
    client.batch_execute("NOTIFY plugin_changes, 'marker'").await.unwrap();
    let mut seen = Vec::new();
    loop {
        let payload =
            tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("the marker arrives").unwrap();
        if payload == "marker" {
            return seen;
        }
        seen.push(payload);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_channel_stays_quiet_while_the_server_records_its_work() {
    let server = TestServer::start(&["powertable", "hello"]).await;
    server.wait_state("powertable", "loaded").await;
    server.wait_state("hello", "loaded").await;

    let seen = notifications_during(&server.db_url, async {
        // A reload asks every replica (it raises the row's `generation`: one notification
        // each), and then writes observed state (library, hash, endpoints), which must not.
        assert_eq!(server.post("/plugins/powertable/reload", None).await.0, 200);
        assert_eq!(server.post("/plugins/hello/reload", None).await.0, 200);
        assert_eq!(server.get("/powertable").await.0, 200);
    })
    .await;
    let named: Vec<String> = seen
        .iter()
        .map(|p| serde_json::from_str::<serde_json::Value>(p).unwrap()["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(named, ["powertable", "hello"], "only the reload requests notified: {seen:?}");
    let (_, health) = server.get("/health").await;
    assert_eq!(health["builds_run"], 2, "one build each at startup, none since: {health}");

    // A user's edit, by contrast, does notify, with a small payload naming the row.
    let seen = notifications_during(&server.db_url, async {
        let db = server.sql().await;
        db.execute("UPDATE plugins SET status = 'inactive' WHERE name = 'hello'", &[]).await.unwrap();
    })
    .await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    let payload: serde_json::Value = serde_json::from_str(&seen[0]).unwrap();
    assert_eq!((payload["operation"].as_str(), payload["table"].as_str()), (Some("UPDATE"), Some("plugins")));
    assert_eq!(payload["name"], "hello");
    assert!(payload["id"].is_i64() && payload["timestamp"].is_string(), "{payload}");
}
