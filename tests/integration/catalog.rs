//! Plugin catalogs: a catalog served over HTTP by the test lists versions of `hello` and some
//! entries that must not install. A periodic sync finds them; tampered, unsigned, badly signed
//! and mislabelled archives are refused and leave nothing behind; a verified archive installs;
//! an upgrade under load drops nothing, and an upgrade that does not build rolls back.

use crate::support::{
    BUILD_DEADLINE, EDIT_DEADLINE, Load, TestServer, cluster, copy_crate, crate_archive, crate_source,
};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signer, SigningKey};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Serves the files of `dir` over HTTP (a catalog host): its base URL.
async fn serve_dir(dir: PathBuf) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/", listener.local_addr().unwrap());
    let files = poem::endpoint::make(move |req: poem::Request| {
        let path = dir.join(req.uri().path().trim_start_matches('/'));
        async move {
            match tokio::fs::read(&path).await {
                Ok(bytes) => poem::Response::builder().body(bytes),
                Err(_) => poem::Response::builder().status(poem::http::StatusCode::NOT_FOUND).finish(),
            }
        }
    });
    let acceptor = poem::listener::TcpAcceptor::from_tokio(listener).unwrap();
    tokio::spawn(poem::Server::new_with_acceptor(acceptor).run(files));
    base
}

/// `hello` at `version`, greeting with `greeting` (a word that does not compile breaks it);
/// `prebuilt`: with the library `kiln check --write-prebuilt` leaves in the crate.
fn hello_archive(version: &str, greeting: &str, prebuilt: bool) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    copy_crate(&crate_source("hello"), dir.path());
    let edit = |file: &str, from: &str, to: &str| {
        let path = dir.path().join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{file} holds {from:?}");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    };
    edit("Cargo.toml", "version = \"0.1.0\"", &format!("version = \"{version}\""));
    edit("Cargo.lock", "name = \"hello\"\nversion = \"0.1.0\"", &format!("name = \"hello\"\nversion = \"{version}\""));
    edit("src/lib.rs", "format!(\"hello, {who}\")", &format!("format!(\"{greeting}, {{who}}\")"));
    if prebuilt {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["check", "--write-prebuilt"])
            .current_dir(dir.path())
            .env("KILN_BUILD_DIR", Path::new(env!("CARGO_TARGET_TMPDIR")).join("kiln-plugin-build"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    crate_archive(dir.path(), "hello")
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes))
}

/// A catalog entry for `file` in `dir` holding `bytes`, listed with `listed_sha` (the bytes' own
/// unless given) and signed by `key` (if any) over that sha.
fn entry(
    dir: &Path,
    name: &str,
    version: &str,
    bytes: &[u8],
    listed_sha: Option<String>,
    key: Option<&SigningKey>,
) -> Value {
    let file = format!("{name}-{version}.tar.gz");
    std::fs::write(dir.join(&file), bytes).unwrap();
    let sha = listed_sha.unwrap_or_else(|| sha256(bytes));
    let mut e = json!({ "name": name, "version": version, "description": format!("{name} {version}"), "url": file, "sha256": sha });
    if let Some(key) = key {
        e["signature"] = STANDARD.encode(key.sign(sha.as_bytes()).to_bytes()).into();
    }
    e
}

fn write_catalog(dir: &Path, entries: &[Value]) {
    let doc = json!({ "plugins": entries });
    // Written whole, then renamed: a sync never reads half a file.
    std::fs::write(dir.join("catalog.json.new"), doc.to_string()).unwrap();
    std::fs::rename(dir.join("catalog.json.new"), dir.join("catalog.json")).unwrap();
}

async fn catalog_of(server: &TestServer, name: &str) -> Option<Value> {
    let (status, list) = server.get("/catalog").await;
    assert_eq!(status, 200, "{list}");
    list.as_array().unwrap().iter().find(|p| p["name"] == name).cloned()
}

async fn install_from_catalog(server: &TestServer, name: &str, version: Option<&str>) -> (u16, Value) {
    let query = version.map(|v| format!("?version={v}")).unwrap_or_default();
    server.post(&format!("/catalog/{name}/install{query}"), None).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_verified_catalog_installs_and_upgrades_under_load_and_refuses_what_does_not_check_out() {
    let (trusted, other) = (SigningKey::from_bytes(&[7; 32]), SigningKey::from_bytes(&[8; 32]));
    let files = tempfile::tempdir().unwrap();
    let dir = files.path();
    let v1 = hello_archive("0.1.0", "hello", true);
    let mut entries = vec![
        entry(dir, "hello", "0.1.0", &v1, None, Some(&trusted)),
        // Listed with the sha256 of other bytes than those served.
        entry(dir, "tampered", "1.0.0", &v1, Some(sha256(b"what was published")), Some(&trusted)),
        entry(dir, "forged", "1.0.0", &v1, None, Some(&other)),
        entry(dir, "unsigned", "1.0.0", &v1, None, None),
        // A trusted archive of hello 0.1.0, listed as another plugin.
        entry(dir, "relabelled", "1.0.0", &v1, None, Some(&trusted)),
        json!({ "name": "bad", "version": "1.0.0", "url": "x.tar.gz", "sha256": "not hex" }),
    ];
    write_catalog(dir, &entries);
    let base = serve_dir(dir.to_path_buf()).await;
    let key = STANDARD.encode(trusted.verifying_key().to_bytes());
    let server = Arc::new(
        TestServer::start_with(cluster().await, &[], |c| {
            c.catalogs = vec![base.clone()];
            c.catalog_trusted_keys = vec![key];
            c.catalog_sync_secs = 1;
        })
        .await,
    );

    // The periodic sync finds it, with no request.
    server
        .wait_until("the catalog is synced", EDIT_DEADLINE, || async { catalog_of(&server, "hello").await.is_some() })
        .await;
    let hello = catalog_of(&server, "hello").await.unwrap();
    assert_eq!(
        (hello["latest"].as_str(), &hello["installed"], &hello["upgrade"]),
        (Some("0.1.0"), &Value::Null, &json!(false))
    );
    assert_eq!(hello["versions"][0]["trusted"], true, "{hello}");
    assert_eq!(catalog_of(&server, "forged").await.unwrap()["versions"][0]["trusted"], false);
    assert_eq!(catalog_of(&server, "unsigned").await.unwrap()["versions"][0]["signed"], false);
    let (_, sources) = server.get("/catalog/sources").await;
    assert_eq!(sources[0]["url"], base, "{sources}");
    assert_eq!(sources[0]["entries"], 5, "{sources}");
    assert_eq!(sources[0]["refused"][0]["entry"], "bad@1.0.0", "{sources}");

    // What does not check out is refused, and leaves nothing behind.
    for (name, status, code) in [
        ("tampered", 422, "ChecksumMismatch"),
        ("forged", 422, "SignatureInvalid"),
        ("unsigned", 422, "SignatureInvalid"),
        ("relabelled", 422, "CatalogMismatch"),
        ("nothing", 404, "NotInCatalog"),
    ] {
        let (got, body) = install_from_catalog(&server, name, None).await;
        assert_eq!((got, body["error"].as_str()), (status, Some(code)), "{name}: {body}");
    }
    let (got, body) = install_from_catalog(&server, "hello", Some("9.9.9")).await;
    assert_eq!((got, body["error"].as_str()), (404, Some("NotInCatalog")), "{body}");
    assert_eq!(server.get("/plugins").await.1, json!([]));
    let installed = server.root.path().join("installed");
    let left: Vec<_> =
        std::fs::read_dir(&installed).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "refused installs left {left:?} in {}", installed.display());

    // A plugin kiln did not install from an archive is never replaced.
    let sql = server.sql().await;
    sql.execute("INSERT INTO plugins (name, source_path, status) VALUES ('hello', '/nowhere', 'inactive')", &[])
        .await
        .unwrap();
    let (status, body) = install_from_catalog(&server, "hello", None).await;
    assert_eq!((status, body["error"].as_str()), (409, Some("PluginExists")), "{body}");
    sql.execute("DELETE FROM plugins WHERE name = 'hello'", &[]).await.unwrap();

    // A verified archive installs and serves: with the prebuilt library it carries, no build.
    let (status, plugin) = install_from_catalog(&server, "hello", None).await;
    assert_eq!(status, 200, "{plugin}");
    assert_eq!((plugin["version"].as_str(), plugin["origin"].as_str()), (Some("0.1.0"), Some("catalog")), "{plugin}");
    assert_eq!(server.get("/hello/kiln").await.1["message"], "hello, kiln");
    assert_eq!(server.get("/plugins/hello/builds").await.1, json!([]), "the prebuilt library served");

    // A second replica on the same database serves it too.
    let replica_root = tempfile::Builder::new().prefix("kiln-replica-").tempdir().unwrap();
    std::fs::create_dir_all(replica_root.path().join("plugins")).unwrap();
    let replica = TestServer::start_in_with(server.cluster.clone(), replica_root, server.db_url.clone(), |c| {
        c.replica_id = Some("second".into())
    })
    .await;
    replica
        .wait_until("the second replica serves hello", BUILD_DEADLINE, || async {
            replica.get("/hello/kiln").await.1["message"] == "hello, kiln"
        })
        .await;

    // Newer versions are published; the periodic sync sees them.
    let v2 = hello_archive("0.2.0", "hi", false);
    entries.push(entry(dir, "hello", "0.2.0", &v2, None, Some(&trusted)));
    entries.push(entry(
        dir,
        "hello",
        "0.3.0",
        &hello_archive("0.3.0", "does not compile\"", false),
        None,
        Some(&trusted),
    ));
    write_catalog(dir, &entries);
    server
        .wait_until("the new versions are synced", EDIT_DEADLINE, || async {
            catalog_of(&server, "hello").await.is_some_and(|h| h["latest"] == "0.3.0")
        })
        .await;
    let hello = catalog_of(&server, "hello").await.unwrap();
    assert_eq!((hello["installed"].as_str(), &hello["upgrade"]), (Some("0.1.0"), &json!(true)), "{hello}");
    let listed: Vec<&str> =
        hello["versions"].as_array().unwrap().iter().map(|v| v["version"].as_str().unwrap()).collect();
    assert_eq!(listed, ["0.3.0", "0.2.0", "0.1.0"]);

    // Upgrades under load: a good one serves the new code, a broken one rolls back; no request fails.
    let load = Load::start(&server, "/hello/load", 3);
    let (status, plugin) = install_from_catalog(&server, "hello", Some("0.2.0")).await;
    assert_eq!((status, plugin["version"].as_str()), (200, Some("0.2.0")), "{plugin}");
    assert_eq!(server.get("/hello/kiln").await.1["message"], "hi, kiln");
    // The replaced archive reached the other replica (a trigger notified it).
    replica
        .wait_until("the second replica serves 0.2.0", BUILD_DEADLINE, || async {
            replica.get("/hello/kiln").await.1["message"] == "hi, kiln"
        })
        .await;
    let (status, body) = install_from_catalog(&server, "hello", None).await;
    assert_eq!((status, body["error"].as_str()), (422, Some("BuildFailed")), "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("the upgrade to 0.3.0 failed and was rolled back to 0.2.0"), "{message}");
    assert!(message.contains("src/lib.rs"), "the compiler's diagnostics: {message}");
    // The stored archive is 0.2.0's again, and every replica is back on it, with no error.
    let stored: String = sql
        .query_one(
            "SELECT a.sha256 FROM plugin_archives a JOIN plugins p ON p.id = a.plugin_id WHERE p.name = 'hello'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, sha256(&v2), "the old archive was put back");
    server
        .wait_until("every replica is back on 0.2.0 with no error", BUILD_DEADLINE, || async {
            let p = server.plugin("hello").await;
            p["rollout"] == "converged"
                && p["replicas"].as_array().is_some_and(|r| r.len() == 2 && r.iter().all(|r| r["error"].is_null()))
        })
        .await;
    assert_eq!(server.get("/hello/kiln").await.1["message"], "hi, kiln");
    assert_eq!(replica.get("/hello/kiln").await.1["message"], "hi, kiln");
    let (ok, failed) = load.end().await;
    assert!(ok > 0, "the load ran");
    assert_eq!(failed, 0, "requests failed during the upgrades");
    // The builds are in the history, the failed one with its diagnostics.
    let (_, builds) = server.get("/plugins/hello/builds").await;
    assert!(builds.as_array().unwrap().iter().any(|b| b["success"] == false), "{builds}");

    // Installing what is installed changes nothing (once the upgrade's optimized library has
    // replaced its draft).
    server.wait_optimized("hello").await;
    let before = server.plugin("hello").await["loaded_at"].clone();
    let (status, plugin) = install_from_catalog(&server, "hello", Some("0.2.0")).await;
    assert_eq!((status, &plugin["loaded_at"]), (200, &before), "{plugin}");

    // A second source, a directory, beside one that cannot be read: a sync says which is which.
    sql.execute(
        "INSERT INTO catalog_repositories (url) VALUES ($1), ('http://127.0.0.1:9/nothing')",
        &[&dir.to_string_lossy().as_ref()],
    )
    .await
    .unwrap();
    let (status, sources) = server.post("/catalog/sync", None).await;
    assert_eq!(status, 200, "{sources}");
    let sources = sources.as_array().unwrap();
    assert_eq!(sources.len(), 3, "{sources:?}");
    assert!(sources[0]["error"].is_null() && sources[1]["error"].is_null(), "{sources:?}");
    assert_eq!(sources[1]["entries"], 7, "the directory lists what the URL does: {sources:?}");
    assert!(sources[2]["error"].as_str().is_some_and(|e| e.contains("127.0.0.1:9")), "{sources:?}");
}
