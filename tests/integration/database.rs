//! Scoped database access: each plugin's own schema and role, its migrations, the grants of its
//! row's `resources`, and the deadline its statements carry. Against a real PostgreSQL, through
//! real plugins over HTTP.

use crate::support::{EDIT_DEADLINE, TestServer};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// The example: notes in the plugin's own table, a counter in its storage, a refused read of
/// kiln's table, its log lines; its data outlives a reload, a config change and a restart.
#[tokio::test(flavor = "multi_thread")]
async fn the_notes_example_keeps_its_notes_and_is_refused_kilns_tables() {
    let server = TestServer::start(&["notes"]).await;
    server.wait_state("notes", "loaded").await;

    let (status, note) = server.post("/notes", Some(json!({ "text": "buy milk" }))).await;
    assert_eq!((status, &note), (201, &json!({ "id": 1, "text": "buy milk" })));
    assert_eq!(server.post("/notes", Some(json!({ "text": "" }))).await.0, 400);
    assert_eq!(server.get("/notes/1").await, (200, note.clone()));
    assert_eq!(server.get("/notes/2").await.0, 404);
    assert_eq!(server.get("/notes/stats").await.1, json!({ "created": 1 }));

    // Typed handlers: inputs that do not fit their types are refused before the handler runs,
    // naming the place and the field; the schemas in the docs come from the same types.
    let (status, wrong) = server.post("/notes", Some(json!({ "text": 7 }))).await;
    assert_eq!((status, wrong["error"].as_str()), (400, Some("BadRequest")), "{wrong}");
    assert_eq!(wrong["details"], json!({ "in": "body", "field": "text" }), "{wrong}");
    let (status, wrong) = server.get("/notes/first").await;
    assert_eq!((status, &wrong["details"]), (400, &json!({ "in": "path", "field": "id" })), "{wrong}");
    let (status, wrong) = server.get("/notes?limit=many").await;
    assert_eq!((status, &wrong["details"]), (400, &json!({ "in": "query", "field": "limit" })), "{wrong}");
    assert_eq!(server.get("/notes?limit=1").await, (200, json!([note.clone()])));
    let (_, spec) = server.get("/openapi.json").await;
    let create = &spec["paths"]["/notes"]["post"];
    let body = &create["requestBody"]["content"]["application/json"]["schema"];
    assert_eq!((&body["required"], &body["properties"]["text"]["maxLength"]), (&json!(["text"]), &json!(10000)));
    let created = &create["responses"]["201"]["content"]["application/json"]["schema"];
    assert_eq!(created["properties"]["id"]["type"], "integer", "numbers are numbers: {create}");
    assert!(create["responses"]["400"].is_object(), "the refusal is documented: {create}");
    let one = &spec["paths"]["/notes/{id}"]["get"];
    assert_eq!(one["parameters"][0]["schema"]["type"], "integer", "{one}");
    let list = &spec["paths"]["/notes"]["get"];
    let limit = json!({ "name": "limit", "in": "query", "required": false });
    assert!(list["parameters"][0].as_object().unwrap().iter().all(|(k, v)| limit.get(k).is_none_or(|l| l == v)));
    assert_eq!(list["parameters"][0]["schema"]["maximum"], 1000, "{list}");

    let (status, refused) = server.get("/notes/forbidden").await;
    assert_eq!((status, refused["error"].as_str()), (403, Some("TableAccessDenied")), "{refused}");
    assert!(refused["message"].as_str().unwrap().contains("permission denied for table plugins"), "{refused}");

    let (_, lines) = server.get("/plugins/notes/logs").await;
    let line = lines.as_array().unwrap().iter().find(|l| l["message"] == "note created").expect("logged");
    assert_eq!((line["fields"]["id"].as_i64(), line["route"].as_str()), (Some(1), Some("POST /notes")));

    // A reload, a config change and a restart keep the notes and the count.
    assert_eq!(server.post("/plugins/notes/reload", None).await.0, 200);
    assert_eq!(server.post("/notes", Some(json!({ "text": "call mum" }))).await.0, 201);
    let (status, body) = server.put("/plugins/notes/config", json!({ "greeting": "hi" })).await;
    assert_eq!(status, 200, "{body}");
    let (cluster, root, url) = server.stop().await;
    let server = TestServer::start_in(cluster, root, url).await;
    server.wait_state("notes", "loaded").await;
    let (_, notes) = server.get("/notes").await;
    assert_eq!(notes, json!([{ "id": 1, "text": "buy milk" }, { "id": 2, "text": "call mum" }]));
    assert_eq!(server.get("/notes/stats").await.1, json!({ "created": 2 }));

    // The migration ran once, in the plugin's schema, under its role.
    let db = server.sql().await;
    let owner: String = db
        .query_one(
            "SELECT tableowner::text FROM pg_tables WHERE schemaname = 'plugin_notes' AND tablename = 'notes'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(owner.starts_with("kiln") && owner.ends_with("_notes"), "{owner}");
    let ran: i64 =
        db.query_one("SELECT count(*) FROM plugin_migrations WHERE plugin = 'notes'", &[]).await.unwrap().get(0);
    assert_eq!(ran, 1);
}

async fn sql(server: &TestServer, op: &str, sql: &str, params: Value) -> Value {
    let (status, body) = server.post(&format!("/sqlrun/{op}"), Some(json!({ "sql": sql, "params": params }))).await;
    assert_eq!(status, 200, "{sql}: {body}");
    body
}

/// A plugin reaches its own schema and nothing else; the row's `resources` grants a shared
/// table (and a name for it) on the next pass, and taking the grant back takes it back.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_reaches_its_schema_and_what_its_row_grants() {
    let server = TestServer::start(&["sqlrun", "notes"]).await;
    server.wait_state("sqlrun", "loaded").await;
    server.wait_state("notes", "loaded").await;
    let db = server.sql().await;

    // Its own table, with JSON parameters of several types, and rows back as JSON.
    let inserted = sql(
        &server,
        "query",
        "INSERT INTO items (id, doc, at) VALUES ($1, $2, $3) RETURNING *",
        json!([7, { "tags": ["a", "b"] }, "2026-11-23"]),
    )
    .await;
    assert_eq!(inserted, json!([{ "id": 7, "doc": { "tags": ["a", "b"] }, "at": "2026-11-23" }]));
    assert_eq!(
        sql(&server, "execute", "UPDATE items SET at = NULL WHERE id = ANY($1)", json!([[7, 8]])).await,
        json!(1)
    );
    assert_eq!(sql(&server, "query", "SELECT id, at FROM items;", json!([])).await, json!([{ "id": 7, "at": null }]));
    // Inline handlers reach it too (the worker steps out of the async pool meanwhile).
    assert_eq!(sql(&server, "inline", "SELECT count(*) AS n FROM items", json!([])).await, json!([{ "n": 1 }]));

    // kiln's tables, another plugin's schema, escaping the role: all refused by PostgreSQL.
    for (statement, code) in [
        ("SELECT * FROM public.plugins", "TableAccessDenied"),
        ("SELECT * FROM plugin_notes.notes", "TableAccessDenied"),
        ("SELECT * FROM plugin_storage", "QueryFailed"), // not on its search path at all
    ] {
        let got = sql(&server, "query", statement, json!([])).await;
        assert_eq!(got["error"], code, "{statement}: {got}");
    }
    let escaped = sql(&server, "execute", "SET ROLE postgres", json!([])).await;
    assert_eq!(escaped["error"], "TableAccessDenied", "{escaped}");
    assert!(escaped["message"].as_str().unwrap().contains("permission denied to set role"), "{escaped}");
    let bad_sql = sql(&server, "query", "SELEC 1", json!([])).await;
    assert!(bad_sql["message"].as_str().unwrap().contains("SQLSTATE 42601"), "{bad_sql}");

    // The operator shares a table through the row: granted on the next pass, under a name.
    db.batch_execute("CREATE TABLE public.shared (k TEXT); INSERT INTO public.shared VALUES ('hello')").await.unwrap();
    db.execute(
        "UPDATE plugins SET resources = $1 WHERE name = 'sqlrun'",
        &[&json!({ "tables": { "public.shared": "read" }, "names": { "shared": "public.shared" } })],
    )
    .await
    .unwrap();
    server
        .wait_until("the grant applies", EDIT_DEADLINE, || async {
            sql(&server, "query", "SELECT k FROM shared", json!([])).await == json!([{ "k": "hello" }])
        })
        .await;
    let write = sql(&server, "execute", "INSERT INTO public.shared VALUES ('no')", json!([])).await;
    assert_eq!(write["error"], "TableAccessDenied", "read is not write: {write}");

    // A grant kiln cannot apply is the row's error; the plugin keeps serving.
    db.execute("UPDATE plugins SET resources = '{\"tables\": {\"public.nope\": \"read\"}}' WHERE name = 'sqlrun'", &[])
        .await
        .unwrap();
    server
        .wait_until("the row tells why", EDIT_DEADLINE, || async {
            let row = server.plugin("sqlrun").await;
            row["error"].as_str().is_some_and(|e| e.starts_with("InvalidResources: resources.tables.public.nope"))
        })
        .await;
    assert_eq!(server.plugin("sqlrun").await["state"], "loaded", "the serving version keeps serving");
    assert_eq!(sql(&server, "query", "SELECT 1 AS one", json!([])).await, json!([{ "one": 1 }]));

    // Taking the grant back takes the table and the name away.
    db.execute("UPDATE plugins SET resources = '{}' WHERE name = 'sqlrun'", &[]).await.unwrap();
    server
        .wait_until("the row is clear again", EDIT_DEADLINE, || async {
            server.plugin("sqlrun").await["error"].is_null()
        })
        .await;
    let gone = sql(&server, "query", "SELECT * FROM public.shared", json!([])).await;
    assert_eq!(gone["error"], "TableAccessDenied", "{gone}");
    assert_eq!(sql(&server, "query", "SELECT k FROM shared", json!([])).await["error"], "QueryFailed");

    // Uninstalling takes the schema, its data and the role with it.
    assert_eq!(server.send_delete("/plugins/sqlrun").await.0, 200);
    server
        .wait_until("the schema and role go with the plugin", EDIT_DEADLINE, || async {
            let left = db
                .query_one(
                    "SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = 'plugin_sqlrun')
                          + (SELECT count(*) FROM pg_roles, pg_database d
                              WHERE d.datname = current_database() AND rolname = 'kiln' || d.oid || '_sqlrun')
                          + (SELECT count(*) FROM plugin_migrations WHERE plugin = 'sqlrun')",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0);
            left == 0
        })
        .await;
}

/// A migration runs once (this one fails if run twice) and a changed one is refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_migration_runs_once_and_a_changed_one_is_refused() {
    let server = TestServer::start(&["sqlrun"]).await;
    server.wait_state("sqlrun", "loaded").await;
    sql(&server, "execute", "INSERT INTO items (id) VALUES (1)", json!([])).await;
    assert_eq!(server.post("/plugins/sqlrun/reload", None).await.0, 200);
    let (cluster, root, url) = server.stop().await;
    let server = TestServer::start_in(cluster, root, url).await;
    server.wait_state("sqlrun", "loaded").await;
    assert_eq!(sql(&server, "query", "SELECT id FROM items", json!([])).await, json!([{ "id": 1 }]));

    let migration = server.plugin_dir("sqlrun").join("migrations/001_items.sql");
    std::fs::write(&migration, "CREATE TABLE items (id BIGINT PRIMARY KEY);").unwrap();
    let (status, body) = server.post("/plugins/sqlrun/reload", None).await;
    assert_eq!((status, body["error"].as_str()), (422, Some("MigrationFailed")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("changed after it was applied"), "{body}");
    std::fs::remove_file(&migration).unwrap();
    std::fs::write(migration.with_file_name("002_broken.sql"), "CREATE TABLE items (id INT);").unwrap();
    let (status, body) = server.post("/plugins/sqlrun/reload", None).await;
    assert_eq!((status, body["error"].as_str()), (422, Some("MigrationFailed")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("relation \"items\" already exists"), "{body}");
    // The version that serves kept serving throughout.
    assert_eq!(sql(&server, "query", "SELECT id FROM items", json!([])).await, json!([{ "id": 1 }]));
}

/// The row's `deadline_ms` bounds the plugin's routes; a statement carries what is left of the
/// deadline, so PostgreSQL cancels it there; the server answers others meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn the_rows_deadline_bounds_handlers_and_their_statements() {
    let server = TestServer::start(&["sqlrun", "hello"]).await;
    server.wait_state("sqlrun", "loaded").await;
    server.wait_state("hello", "loaded").await;
    let db = server.sql().await;
    db.execute("UPDATE plugins SET deadline_ms = 300 WHERE name = 'sqlrun'", &[]).await.unwrap();
    server
        .wait_until("the deadline applies", Duration::from_secs(30), || async {
            let (status, _) =
                server.post("/sqlrun/query", Some(json!({ "sql": "SELECT pg_sleep(2)", "params": [] }))).await;
            status == 504
        })
        .await;
    // The statement was cancelled by PostgreSQL at the deadline, not left running.
    server
        .wait_until("no statement of the plugin still runs", EDIT_DEADLINE, || async {
            let n: i64 = db
                .query_one("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%pg_sleep(2)%' AND usename LIKE 'kiln%'", &[])
                .await
                .unwrap()
                .get(0);
            n == 0
        })
        .await;
    let t = Instant::now();
    assert_eq!(server.get("/hello").await.0, 200);
    assert!(t.elapsed() < Duration::from_secs(1), "the server stayed responsive");
    let short = sql(&server, "query", "SELECT 1 AS one FROM pg_sleep(0.01)", json!([])).await;
    assert_eq!(short, json!([{ "one": 1 }]), "short statements still run");
}

/// Every call gets a clean connection (a transaction, a setting or an advisory lock a previous
/// call left is undone), and a schema kiln did not make is neither adopted nor dropped.
#[tokio::test(flavor = "multi_thread")]
async fn calls_start_clean_and_foreign_schemas_are_left_alone() {
    // One connection from the start (set in the row that installs it), so that every call below
    // reuses the one before's.
    let server = TestServer::start(&[]).await;
    let dir = server.plugin_dir("sqlrun");
    crate::support::copy_crate(&crate::support::crate_source("sqlrun"), &dir);
    let db = server.sql().await;
    db.execute(
        "INSERT INTO plugins (name, source_path, resources) VALUES ('sqlrun', $1, '{\"connections\": 1}')",
        &[&dir.to_string_lossy().as_ref()],
    )
    .await
    .unwrap();
    server.wait_state("sqlrun", "loaded").await;
    assert_eq!(sql(&server, "execute", "BEGIN", json!([])).await, json!(0));
    assert_eq!(sql(&server, "execute", "SET search_path = public", json!([])).await, json!(0));
    assert_eq!(
        sql(&server, "query", "SELECT 1 AS one FROM pg_advisory_lock(4242)", json!([])).await,
        json!([{ "one": 1 }])
    );
    let open = sql(&server, "query", "SELECT count(*) AS n FROM items", json!([])).await;
    assert_eq!(open, json!([{ "n": 0 }]), "its own search path again, outside any transaction: {open}");
    let free: bool = db.query_one("SELECT pg_try_advisory_lock(4242)", &[]).await.unwrap().get(0);
    assert!(free, "the advisory lock a call left was released");

    // An operator's schema of the plugin's name is refused, not adopted, and survives uninstall.
    db.batch_execute(
        "ALTER SCHEMA plugin_sqlrun OWNER TO CURRENT_USER; COMMENT ON SCHEMA plugin_sqlrun IS 'the operator''s now'",
    )
    .await
    .unwrap();
    db.execute("UPDATE plugins SET resources = '{}' WHERE name = 'sqlrun'", &[]).await.unwrap();
    server
        .wait_until("the row says why", EDIT_DEADLINE, || async {
            let e = server.plugin("sqlrun").await["error"].as_str().unwrap_or_default().to_string();
            e.contains("a schema named plugin_sqlrun exists that kiln did not make")
        })
        .await;
    assert_eq!(server.send_delete("/plugins/sqlrun").await.0, 200);
    let kept = db.query_opt("SELECT 1 FROM pg_namespace WHERE nspname = 'plugin_sqlrun'", &[]).await.unwrap();
    assert!(kept.is_some(), "a schema kiln did not make is not dropped");
}

/// A plugin's statements can `NOTIFY kiln_events` (no privilege governs NOTIFY), but kiln does
/// not publish what a plugin's session sends there: plugins publish with `events::emit`. The
/// same notification from another session is published.
#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_session_cannot_publish_events_through_notify() {
    let server = TestServer::start(&["sqlrun"]).await;
    server.wait_state("sqlrun", "loaded").await;
    let forged =
        sql(&server, "query", "SELECT pg_notify('kiln_events', '{\"topic\": \"forged.by.plugin\"}')", json!([])).await;
    assert!(forged.get("error").is_none(), "the plugin could send it: {forged}");
    // Another session's notification, committed after the plugin's, arrives after it.
    let db = server.sql().await;
    db.execute("SELECT pg_notify('kiln_events', '{\"topic\": \"sent.by.operator\"}')", &[]).await.unwrap();
    server
        .wait_until("the operator's event is published", EDIT_DEADLINE, || async {
            server.get("/events?topic=sent.by.*").await.1.as_array().is_some_and(|e| !e.is_empty())
        })
        .await;
    let (_, refused) = server.get("/events?topic=forged.by.*").await;
    assert_eq!(refused, json!([]), "the plugin's notification was not published");
}
