//! Events: published by the admin API, by a PostgreSQL trigger's `pg_notify`, by plugins and by
//! kiln itself, delivered to the plugins subscribed to them, in order, without one subscriber
//! holding up another, and without loss across a reload.

use crate::support::{EDIT_DEADLINE, TestServer};
use serde_json::{Value, json};
use std::time::Duration;

/// The audit example's events, as `(topic, data)`.
async fn heard(server: &TestServer) -> Vec<(String, Value)> {
    let (_, events) = server.get("/audit").await;
    events
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| (e["topic"].as_str().unwrap_or("").to_string(), e["data"].clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn events_from_the_api_a_trigger_a_plugin_and_kiln_reach_their_subscribers() {
    let server = TestServer::start(&["audit", "notes"]).await;
    server.wait_state("audit", "loaded").await;
    server.wait_state("notes", "loaded").await;

    // kiln announces what it loads (also a new version of what serves): audit hears notes
    // reloaded (it may have missed notes' first load, if notes served before audit did).
    assert_eq!(server.post("/plugins/notes/reload", None).await.0, 200);
    server
        .wait_until("audit hears kiln.plugin.loaded", EDIT_DEADLINE, || async {
            heard(&server).await.iter().any(|(t, d)| t == "kiln.plugin.loaded" && d["name"] == "notes")
        })
        .await;

    // The admin API publishes.
    let (status, event) = server.post("/events/orders.created", Some(json!({ "id": 1, "via": "api" }))).await;
    assert_eq!(status, 202, "{event}");
    assert_eq!((event["topic"].as_str(), event["source"].as_str()), (Some("orders.created"), Some("api")));

    // A trigger on a user's table publishes, in the inserting transaction's commit.
    let sql = server.sql().await;
    sql.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY, item text NOT NULL);
         CREATE FUNCTION orders_created() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM pg_notify('kiln_events', json_build_object('topic', 'orders.created', 'data', row_to_json(NEW))::text);
             RETURN NEW;
         END $$;
         CREATE TRIGGER orders_created AFTER INSERT ON orders FOR EACH ROW EXECUTE FUNCTION orders_created();
         INSERT INTO orders VALUES (2, 'tea');",
    )
    .await
    .unwrap();

    // A plugin publishes: notes announces each note. (audit depends on notes, and asks its
    // count service.)
    assert_eq!(server.post("/notes", Some(json!({ "text": "buy milk" }))).await.0, 201);
    assert_eq!(server.get("/audit/notes").await, (200, json!({ "notes": 1 })));

    server
        .wait_until("audit hears the API's, the trigger's and the plugin's events", EDIT_DEADLINE, || async {
            let heard = heard(&server).await;
            let has = |topic: &str, data: Value| heard.iter().any(|(t, d)| t == topic && *d == data);
            has("orders.created", json!({ "id": 1, "via": "api" }))
                && has("orders.created", json!({ "id": 2, "item": "tea" }))
                && has("notes.created", json!({ "id": 1, "text": "buy milk" }))
        })
        .await;

    // The event list shows where each went; the plugin shows its counters.
    let (_, events) = server.get("/events?topic=orders.*").await;
    let from_postgres = events.as_array().unwrap().iter().find(|e| e["source"] == "postgres").expect("listed");
    assert_eq!(
        from_postgres["deliveries"],
        json!([{ "plugin": "audit", "handler": "orders.*", "outcome": "delivered", "error": null }])
    );
    let audit = server.plugin("audit").await;
    let orders = audit["events"].as_array().unwrap().iter().find(|s| s["pattern"] == "orders.*").unwrap().clone();
    assert_eq!(
        (orders["delivered"].as_u64(), orders["failed"].as_u64(), orders["dropped"].as_u64()),
        (Some(2), Some(0), Some(0))
    );

    // What kiln refuses: a malformed topic, a topic of kiln's own, a bad pattern; a bad
    // notification is logged and dropped, and the next one still arrives.
    let (status, body) = server.post("/events/a..b", Some(json!({}))).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("BadRequest")), "{body}");
    let (status, body) = server.post("/events/kiln.plugin.loaded", Some(json!({}))).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("TopicReserved")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("kiln's own"), "{body}");
    assert_eq!(server.get("/events?topic=a.b*").await.0, 400);
    sql.batch_execute("SELECT pg_notify('kiln_events', 'not json'); SELECT pg_notify('kiln_events', '{\"topic\": \"orders.late\", \"data\": 3}');")
        .await
        .unwrap();
    server
        .wait_until("the notification after a bad one arrives", EDIT_DEADLINE, || async {
            heard(&server).await.iter().any(|(t, d)| t == "orders.late" && *d == json!(3))
        })
        .await;

    // Unloading says so: audit hears notes go.
    sql.execute("UPDATE plugins SET status = 'inactive' WHERE name = 'notes'", &[]).await.unwrap();
    server
        .wait_until("audit hears kiln.plugin.unloaded", EDIT_DEADLINE, || async {
            heard(&server).await.iter().any(|(t, d)| t == "kiln.plugin.unloaded" && d["name"] == "notes")
        })
        .await;
}

/// The counters of eventsink's `fast`, `panics` and `slow` subscriptions.
async fn subscriptions(server: &TestServer) -> (Value, Value, Value) {
    let plugin = server.plugin("eventsink").await;
    let of = |handler: &str| {
        plugin["events"].as_array().unwrap().iter().find(|s| s["handler"] == handler).cloned().unwrap_or_default()
    };
    (of("fast"), of("panics"), of("slow"))
}

/// 10,000 events through a wildcard subscription, beside one that panics on every hundredth and
/// one that takes 20 ms over each: the fast one gets every event, in order; the others are counted.
#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_and_a_slow_subscriber_cost_a_fast_one_nothing() {
    let server = TestServer::start(&["eventsink"]).await;
    server.wait_state("eventsink", "loaded").await;
    const N: u64 = 10_000;
    // Published from PostgreSQL in batches of 500, alternating two topics.
    let sql = server.sql().await;
    for batch in 0..(N / 500) {
        let from = batch * 500;
        sql.execute(
            "SELECT pg_notify('kiln_events', json_build_object('topic', 'load.' || (n % 2), 'data', json_build_object('n', n / 2))::text)
             FROM generate_series($1::bigint, $2::bigint) AS n",
            &[&(from as i64), &((from + 499) as i64)],
        )
        .await
        .unwrap();
        // Paced like a busy application: the fast subscriber keeps up, the slow one cannot.
        // The next batch waits while the fast one is more than half its queue behind, so that a
        // machine busy with other work cannot make it drop events: what counts is that the
        // panicking and the slow subscriber do not hold it back (then it never catches up).
        tokio::time::sleep(Duration::from_millis(50)).await;
        let sent = from + 500;
        server
            .wait_until("the fast subscriber keeps up", Duration::from_secs(30), || async {
                subscriptions(&server).await.0["delivered"].as_u64().unwrap_or(0) + 512 >= sent
            })
            .await;
    }
    server
        .wait_until("every event is accounted for at every subscriber", Duration::from_secs(60), || async {
            let (fast, panics, slow) = subscriptions(&server).await;
            let total = |s: &Value| {
                ["delivered", "failed", "timed_out", "dropped"].iter().map(|k| s[k].as_u64().unwrap_or(0)).sum::<u64>()
            };
            total(&fast) == N && total(&panics) == N && total(&slow) == N
        })
        .await;
    let (fast, panics, slow) = subscriptions(&server).await;
    assert_eq!(fast["delivered"], N, "{fast}");
    assert_eq!(server.get("/eventsink/fast").await.1, json!({ "count": N, "in_order": true }));
    // One event in a hundred panics. Panics are slow (a backtrace is printed for each), so this
    // subscriber's queue may overflow too: what counts is that each event is accounted for.
    assert!(panics["failed"].as_u64().unwrap() > 0, "{panics}");
    assert!(panics["delivered"].as_u64().unwrap() > 0, "{panics}");
    assert!(slow["dropped"].as_u64().unwrap() > 0, "the slow subscriber's queue overflowed: {slow}");
    assert!(slow["timed_out"].as_u64().unwrap() > 0, "past its own timeout of 10 ms: {slow}");
    let (_, lines) = server.get("/plugins/eventsink/logs?level=warn").await;
    let lines = lines.as_array().unwrap();
    assert!(
        lines.iter().any(|l| l["kind"] == "panic" && l["message"].as_str().unwrap().contains("this subscriber panics")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l["message"].as_str().unwrap().contains("queue of subscription load.* → slow is full")),
        "{lines:?}"
    );
}

/// A subscriber reloaded again and again while events flow gets each event once.
#[tokio::test(flavor = "multi_thread")]
async fn a_subscriber_reloaded_while_events_flow_loses_none() {
    let server = std::sync::Arc::new(TestServer::start(&["eventsink"]).await);
    server.wait_state("eventsink", "loaded").await;
    const N: u64 = 1_000;
    let publisher = {
        let server = server.clone();
        tokio::spawn(async move {
            for n in 0..N {
                let (status, body) = server.post("/events/count.up", Some(json!({ "n": n }))).await;
                assert_eq!(status, 202, "{body}");
            }
        })
    };
    let mut reloads = 0;
    while !publisher.is_finished() {
        let (status, body) = server.post("/plugins/eventsink/reload", None).await;
        assert_eq!(status, 200, "{body}");
        reloads += 1;
    }
    publisher.await.unwrap();
    assert!(reloads >= 2, "the events flowed across reloads ({reloads})");
    server
        .wait_until("every event is counted", EDIT_DEADLINE, || async {
            server.get("/eventsink/count").await.1["seen"] == N
        })
        .await;
    assert_eq!(server.get("/eventsink/count").await.1, json!({ "seen": N, "twice": 0 }));
    let plugin = server.plugin("eventsink").await;
    let count = plugin["events"].as_array().unwrap().iter().find(|s| s["handler"] == "count").unwrap().clone();
    assert_eq!((count["delivered"].as_u64(), count["dropped"].as_u64()), (Some(N), Some(0)), "{count}");
}

/// Subscriptions made at runtime: `on` until `off`, `once` for one event, and a reloaded
/// instance makes its own again.
#[tokio::test(flavor = "multi_thread")]
async fn runtime_subscriptions_follow_on_once_and_off() {
    let server = TestServer::start(&["eventsink"]).await;
    server.wait_state("eventsink", "loaded").await;
    for topic in ["rt.a", "rt.once", "rt.once", "rt.b"] {
        assert_eq!(server.post(&format!("/events/{topic}"), Some(json!({}))).await.0, 202);
    }
    server
        .wait_until("the runtime subscriptions got their events", EDIT_DEADLINE, || async {
            server.get("/eventsink/runtime").await.1 == json!({ "on": 4, "once": 1 })
        })
        .await;
    let plugin = server.plugin("eventsink").await;
    let handlers: Vec<&str> =
        plugin["events"].as_array().unwrap().iter().filter_map(|s| s["handler"].as_str()).collect();
    assert_eq!(
        handlers.iter().filter(|h| h.starts_with("runtime#")).count(),
        1,
        "the once subscription ended: {handlers:?}"
    );

    let (_, event) = server.post("/events/rt.a", Some(json!({}))).await;
    assert_eq!(event["subscribers"], 1, "rt.* matches: {event}");
    server
        .wait_until("the event is handled", EDIT_DEADLINE, || async {
            server.get("/eventsink/runtime").await.1 == json!({ "on": 5, "once": 1 })
        })
        .await;
    // `off` ends the subscription at once (what it still had queued is dropped).
    assert_eq!(server.post("/eventsink/off", None).await, (200, json!({ "removed": true })));
    let (_, event) = server.post("/events/rt.a", Some(json!({}))).await;
    assert_eq!(event["subscribers"], 0, "off ended it: {event}");

    // A new instance subscribes again in its init.
    assert_eq!(server.post("/plugins/eventsink/reload", None).await.0, 200);
    assert_eq!(server.post("/events/rt.c", Some(json!({}))).await.0, 202);
    server
        .wait_until("the new instance's subscription gets events", EDIT_DEADLINE, || async {
            server.get("/eventsink/runtime").await.1 == json!({ "on": 1, "once": 0 })
        })
        .await;
}

/// A handler that answers its own topic would loop for ever: kiln refuses the emit that would
/// make a chain deeper than 16 (each event emitted by a handler of the one before), tells the
/// plugin why, and the bus goes quiet.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_loop_ends_at_the_depth_limit() {
    let server = TestServer::start(&["eventsink"]).await;
    server.wait_state("eventsink", "loaded").await;
    assert_eq!(server.post("/events/loop.start", Some(json!({ "n": 0 }))).await.0, 202);
    let looped = server
        .wait_until("the loop is refused", EDIT_DEADLINE, || async {
            !server.get("/eventsink/loop").await.1["refused"].is_null()
        })
        .await;
    let _ = looped;
    let (_, state) = server.get("/eventsink/loop").await;
    assert_eq!(state["last"], 16, "events 0 (from the API) to 16 were delivered: {state}");
    let refused = state["refused"].as_str().unwrap();
    assert!(refused.contains("chain of 17 events") && refused.contains("a loop?"), "{refused}");
    let (_, events) = server.get("/events?topic=loop.*&limit=100").await;
    let depths: Vec<u64> = events.as_array().unwrap().iter().map(|e| e["depth"].as_u64().unwrap()).collect();
    assert_eq!(depths, (0..=16).rev().collect::<Vec<u64>>(), "one event per step, newest first");
    // An event emitted outside a handler starts a chain of its own.
    assert_eq!(server.post("/events/loop.again", Some(json!({ "n": 100 }))).await.0, 202);
    server
        .wait_until("the second loop runs to its end and is refused too", EDIT_DEADLINE, || async {
            let state = server.get("/eventsink/loop").await.1;
            state["last"] == 116 && !state["refused"].is_null()
        })
        .await;
    let (_, events) = server.get("/events?topic=loop.*&limit=17").await;
    let depths: Vec<u64> = events.as_array().unwrap().iter().map(|e| e["depth"].as_u64().unwrap()).collect();
    assert_eq!(depths, (0..=16).rev().collect::<Vec<u64>>(), "the second chain, 0 to 16");
}

/// Durable events: rows of the `events` table are delivered once their transaction commits
/// (any size), retried while a subscriber fails, and end `dead` with the error kept.
#[tokio::test(flavor = "multi_thread")]
async fn durable_events_are_delivered_retried_and_dead_lettered() {
    let server = TestServer::start_with(crate::support::cluster().await, &["eventsink"], |c| {
        c.event_retry_ms = 50;
        c.event_attempts = 3;
    })
    .await;
    server.wait_state("eventsink", "loaded").await;
    let sql = server.sql().await;
    // Over NOTIFY's 8,000 bytes: the table takes it.
    let big = "x".repeat(20_000);
    let ids: Vec<i64> = sql
        .query(
            "INSERT INTO events (topic, data) VALUES
                 ('count.durable', '{\"n\": 5}'),
                 ('count.big', jsonb_build_object('n', 6, 'text', $1::text)),
                 ('load.1', '{\"n\": 100}')
             RETURNING id",
            &[&big],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let state = |id: i64| {
        let sql = &sql;
        async move {
            let row = sql
                .query_one("SELECT state, attempts, last_error, subscribers FROM events WHERE id = $1", &[&id])
                .await
                .unwrap();
            (
                row.get::<_, String>(0),
                row.get::<_, i32>(1),
                row.get::<_, Option<String>>(2),
                row.get::<_, Option<i32>>(3),
            )
        }
    };
    server
        .wait_until("every row has its final state", Duration::from_secs(30), || async {
            state(ids[0]).await.0 == "delivered"
                && state(ids[1]).await.0 == "delivered"
                && state(ids[2]).await.0 == "dead"
        })
        .await;
    assert_eq!(server.get("/eventsink/count").await.1["seen"], 2, "both count.* rows reached the plugin");
    let (_, attempts, error, subscribers) = state(ids[0]).await;
    assert_eq!((attempts, error, subscribers), (1, None, Some(1)));
    // load.* has three subscriptions; the one that panics on n = 100 fails every attempt.
    let (_, attempts, error, subscribers) = state(ids[2]).await;
    assert_eq!((attempts, subscribers), (3, Some(3)));
    let error = error.unwrap();
    assert!(error.contains("eventsink (panics)") && error.contains("this subscriber panics"), "{error}");
    // kiln's topics are not for the table either.
    let refused = sql.execute("INSERT INTO events (topic) VALUES ('kiln.plugin.loaded')", &[]).await;
    let refused = refused.unwrap_err();
    assert_eq!(refused.code(), Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION), "{refused:?}");
}

/// A new version whose recording fails is unpublished again, and was never news: kiln
/// announces `kiln.plugin.loaded` for what it recorded, not for each route table it showed.
#[tokio::test(flavor = "multi_thread")]
async fn a_publish_undone_is_not_announced() {
    let server = TestServer::start(&["audit", "notes", "hello"]).await;
    for plugin in ["audit", "notes", "hello"] {
        server.wait_state(plugin, "loaded").await;
    }
    let loads = |events: &[(String, Value)]| {
        events.iter().filter(|(t, d)| t == "kiln.plugin.loaded" && d["name"] == "hello").count()
    };
    assert_eq!(server.post("/plugins/hello/reload", None).await.0, 200);
    server
        .wait_until("audit hears hello reloaded", EDIT_DEADLINE, || async { loads(&heard(&server).await) >= 1 })
        .await;
    let before = loads(&heard(&server).await);
    let loaded_at = server.plugin("hello").await["loaded_at"].clone();

    // Recording hello's next version fails: a trigger refuses the write of what it loaded.
    let sql = server.sql().await;
    sql.batch_execute(
        "CREATE FUNCTION refuse_hello() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.plugin_id = (SELECT id FROM plugins WHERE name = 'hello')
                AND NEW.loaded_at IS NOT NULL
                AND (TG_OP = 'INSERT' OR NEW.loaded_at IS DISTINCT FROM OLD.loaded_at) THEN
                 RAISE EXCEPTION 'refused by the test';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_hello BEFORE INSERT OR UPDATE ON plugin_replicas
             FOR EACH ROW EXECUTE FUNCTION refuse_hello();",
    )
    .await
    .unwrap();
    let (status, body) = server.post("/plugins/hello/reload", None).await;
    assert_ne!(status, 200, "{body}");
    assert!(body.to_string().contains("refused by the test"), "{body}");
    assert_eq!(server.get("/hello").await.0, 200, "the version that served serves on");

    // Then a reload that is recorded: heard once, after nothing from the undone one.
    sql.batch_execute("DROP TRIGGER refuse_hello ON plugin_replicas").await.unwrap();
    assert_eq!(server.post("/plugins/hello/reload", None).await.0, 200);
    assert_ne!(server.plugin("hello").await["loaded_at"], loaded_at);
    server
        .wait_until("audit hears the recorded reload", EDIT_DEADLINE, || async {
            loads(&heard(&server).await) > before
        })
        .await;
    assert_eq!(loads(&heard(&server).await), before + 1, "only the recorded reload was announced");
}
