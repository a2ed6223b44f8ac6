//! The database goes away and comes back: plugins keep serving, the listener reconnects and
//! resyncs, and edits it missed are applied. A row a user's transaction holds delays its own
//! plugin only.

use crate::support::{BUILD_DEADLINE, Cluster, EDIT_DEADLINE, TestServer, connect};

#[tokio::test(flavor = "multi_thread")]
async fn postgres_restart_and_a_missed_notification() {
    // A cluster of this test's own: it is stopped and restarted.
    let cluster = Cluster::private().await;
    let server = TestServer::start_with(cluster.clone(), &["powertable", "hello"], |_| {}).await;
    server.wait_state("powertable", "loaded").await;
    server.wait_state("hello", "loaded").await;

    cluster.server().stop().await.unwrap();
    server
        .wait_until("/health reports the database down", EDIT_DEADLINE, || async {
            let (status, h) = server.get("/health").await;
            status == 503 && h["database"] == "down" && h["listener"] == "disconnected"
        })
        .await;
    assert_eq!(server.get("/powertable").await.0, 200, "plugins keep serving without the database");
    let (status, body) = server.get("/plugins").await;
    assert_eq!((status, body["error"].as_str()), (503, Some("DatabaseUnavailable")), "{body}");

    cluster.server().restart().await.unwrap();
    server.wait_until("/health is ok again", BUILD_DEADLINE, || async { server.get("/health").await.0 == 200 }).await;
    let db = server.sql().await;
    db.execute("UPDATE plugins SET status = 'inactive' WHERE name = 'hello'", &[]).await.unwrap();
    server.wait_until("the edit applies", EDIT_DEADLINE, || async { server.get("/hello").await.0 == 404 }).await;

    // A notification sent while the listener is disconnected is lost; the resync after its
    // reconnect must apply the edit anyway. Keep the listener out while editing.
    let dbname: String = db.query_one("SELECT current_database()", &[]).await.unwrap().get(0);
    let admin = connect(&cluster.server().url()).await;
    admin.execute(&format!("ALTER DATABASE {dbname} WITH ALLOW_CONNECTIONS false"), &[]).await.unwrap();
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND query LIKE 'LISTEN%'",
            &[&dbname],
        )
        .await
        .unwrap();
    server
        .wait_until("the listener is down", EDIT_DEADLINE, || async {
            server.get("/health").await.1["listener"] == "disconnected"
        })
        .await;
    db.execute("UPDATE plugins SET status = 'active' WHERE name = 'hello'", &[]).await.unwrap();
    // Refused for a while (the scenario: a database down for seconds), so that a backoff that
    // grows without a low cap would wait seconds after the database is back.
    tokio::time::sleep(std::time::Duration::from_secs(7)).await;
    admin.execute(&format!("ALTER DATABASE {dbname} WITH ALLOW_CONNECTIONS true"), &[]).await.unwrap();
    // Within the listener's 400 ms reconnect cap plus a resync; the margin absorbs a busy machine.
    server
        .wait_until("the missed edit applies soon after the database is back", EDIT_DEADLINE / 3 * 2, || async {
            server.get("/hello").await.0 == 200
        })
        .await;
    assert_eq!(server.get("/health").await.0, 200);
}

/// Versions are published in batches by one task; a row locked by a user's open transaction
/// (an uncommitted `DELETE`, say) must hold back its own plugin's publish, not every other's.
#[tokio::test(flavor = "multi_thread")]
async fn a_row_a_user_holds_delays_only_its_own_plugin() {
    let server = TestServer::start_with(crate::support::cluster().await, &["lifecycle", "hello"], |_| {}).await;
    server.wait_state("lifecycle", "loaded").await;
    server.wait_state("hello", "loaded").await;
    let sql = server.sql().await;
    sql.execute("UPDATE plugins SET status = 'inactive' WHERE name = 'hello'", &[]).await.unwrap();
    server.wait_until("hello is off", EDIT_DEADLINE, || async { server.get("/hello").await.0 == 404 }).await;
    let loaded_at = || async {
        let (_, row) = server.get("/plugins/lifecycle").await;
        row["loaded_at"].clone()
    };
    let first = loaded_at().await;
    let log = server.plugin_dir("lifecycle").join("target/lifecycle.log");
    let inits = || std::fs::read_to_string(&log).unwrap_or_default().lines().filter(|l| l.starts_with("init")).count();
    assert_eq!(inits(), 1);

    // A new config: a fresh instance of lifecycle, whose init takes 2 s. Meanwhile a user's
    // transaction takes lifecycle's row as a DELETE would, so the instance cannot be published.
    sql.execute("UPDATE plugins SET config = '{\"init_sleep_ms\": 2000}' WHERE name = 'lifecycle'", &[]).await.unwrap();
    let mut user = server.sql().await;
    let held = user.transaction().await.unwrap();
    held.execute("SELECT 1 FROM plugins WHERE name = 'lifecycle' FOR UPDATE", &[]).await.unwrap();
    server.wait_until("the new instance is made", BUILD_DEADLINE, || async { inits() == 2 }).await;

    // Another plugin is turned on and serves; lifecycle's old instance serves on, its new one
    // waits.
    sql.execute("UPDATE plugins SET status = 'active' WHERE name = 'hello'", &[]).await.unwrap();
    server.wait_until("hello serves", EDIT_DEADLINE, || async { server.get("/hello").await.0 == 200 }).await;
    assert_eq!(server.get("/lifecycle").await.0, 200);
    let (_, health) = server.get("/health").await;
    assert!(health["reconciling"].as_u64() >= Some(1), "lifecycle's pass waits for its row: {health}");
    assert_eq!(loaded_at().await, first);

    // The row let go, lifecycle's new instance is published and recorded.
    held.rollback().await.unwrap();
    server
        .wait_until("the new instance is recorded", EDIT_DEADLINE, || async {
            let (_, health) = server.get("/health").await;
            health["reconciling"] == 0 && loaded_at().await != first
        })
        .await;
    let (_, row) = server.get("/plugins/lifecycle").await;
    assert!(row["error"].is_null() && row["state"] == "loaded", "{row}");
}
