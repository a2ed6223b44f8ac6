//! Dependencies between plugins: a plugin loads after the plugins its manifest names, waits for
//! one that is missing and loads by itself when it comes, and a cycle fails with itself named.
//! A dependent calls its dependencies' services, and only theirs.

use crate::support::{BUILD_DEADLINE, TestServer, repo_root};
use serde_json::Value;
use std::path::Path;

/// Writes plugin crate `name` into `plugins`: it serves `GET /<name>` and depends on `deps`
/// (TOML entries, e.g. `"a"` or `{ name = "a", version = "^2" }`).
fn write_plugin(plugins: &Path, name: &str, deps: &[&str]) {
    let dir = plugins.join(name);
    std::fs::create_dir_all(dir.join("src")).unwrap();
    let manifest = format!(
        "[package]\nname = \"{name}\"\nversion = \"1.0.0\"\nedition = \"2024\"\npublish = false\n\n\
         [package.metadata.kiln]\ndependencies = [{}]\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n\
         [dependencies]\nkiln-types = \"0.1\"\n",
        deps.join(", ")
    );
    std::fs::write(dir.join("Cargo.toml"), manifest).unwrap();
    let lock = std::fs::read_to_string(repo_root().join("tests/fixtures/lifecycle/Cargo.lock")).unwrap();
    std::fs::write(dir.join("Cargo.lock"), kiln::staging::renamed_lock(&lock, "lifecycle", name)).unwrap();
    // It offers a service `whoami`, and `GET /<name>/call/{other}` calls other's `whoami`.
    let code = format!(
        "use kiln_types::serde_json::json;\n\
         use kiln_types::{{HostError, InitContext, Plugin, Request, Response, Route, Service, plugins}};\n\
         pub struct P;\n\
         impl Plugin for P {{\n\
         \x20   fn init(_: &InitContext) -> Result<Self, String> {{ Ok(P) }}\n\
         \x20   fn routes() -> Vec<Route<Self>> {{\n\
         \x20       vec![Route::get(\"/{name}\", Self::get), Route::get(\"/{name}/call/{{other}}\", Self::call)]\n\
         \x20   }}\n\
         \x20   fn services() -> Vec<Service<Self>> {{ vec![Service::new(\"whoami\", |_, _| Ok(json!({{ \"name\": \"{name}\" }})))] }}\n\
         }}\n\
         impl P {{\n\
         \x20   fn get(&self, _: &Request) -> Response {{ Response::text(200, \"{name}\") }}\n\
         \x20   fn call(&self, req: &Request) -> Response {{\n\
         \x20       match plugins::call(req.param(\"other\").unwrap_or(\"\"), \"whoami\", &json!({{}})) {{\n\
         \x20           Ok(answer) => Response::json(200, &answer),\n\
         \x20           Err(HostError::Service {{ code, message }}) => Response::json(409, &json!({{ \"code\": code, \"message\": message }})),\n\
         \x20           Err(e) => Response::error(500, &e.to_string()),\n\
         \x20       }}\n\
         \x20   }}\n\
         }}\n\
         kiln_types::export_plugin!(P);\n"
    );
    std::fs::write(dir.join("src/lib.rs"), code).unwrap();
}

/// `loaded_at` of each plugin, in the order given.
async fn loaded_at(server: &TestServer, names: &[&str]) -> Vec<String> {
    let mut at = Vec::new();
    for name in names {
        let plugin: Value = server.plugin(name).await;
        at.push(plugin["loaded_at"].as_str().unwrap_or_default().to_string());
    }
    at
}

#[tokio::test(flavor = "multi_thread")]
async fn dependencies_load_in_order_wait_for_what_is_missing_and_refuse_cycles() {
    // Built optimized at once: with drafts, a dependency's optimized swap comes after its
    // dependents loaded, and `loaded_at` (the order this test reads) shows the latest instance.
    let server = TestServer::start_with(crate::support::cluster().await, &[], |c| {
        c.build_profile = kiln::compiler::BuildProfile::Optimized;
    })
    .await;
    let plugins = server.plugin_dir("x").parent().unwrap().to_path_buf();
    // A chain, written dependents first; a cycle; one waiting for a plugin that is not there;
    // one asking for a version that does not serve.
    write_plugin(&plugins, "chain-c", &["\"chain-b\""]);
    write_plugin(&plugins, "chain-b", &["{ name = \"chain-a\", version = \"^1\" }"]);
    write_plugin(&plugins, "chain-a", &[]);
    write_plugin(&plugins, "cycle-x", &["\"cycle-y\""]);
    write_plugin(&plugins, "cycle-y", &["\"cycle-x\""]);
    write_plugin(&plugins, "lonely", &["\"later\""]);
    write_plugin(&plugins, "picky", &["{ name = \"chain-a\", version = \"^2\" }"]);
    assert_eq!(server.post("/plugins/discover", None).await.0, 200);

    for name in ["chain-a", "chain-b", "chain-c"] {
        server.wait_state(name, "loaded").await;
    }
    let at = loaded_at(&server, &["chain-a", "chain-b", "chain-c"]).await;
    assert!(at[0] < at[1] && at[1] < at[2], "each loaded after what it depends on: {at:?}");
    assert_eq!(server.get("/chain-c").await.1, "chain-c");

    for (x, y) in [("cycle-x", "cycle-y"), ("cycle-y", "cycle-x")] {
        let failed = server.wait_state(x, "failed").await;
        assert_eq!(failed["error"], format!("DependencyCycle: {x} → {y} → {x}"), "{failed}");
    }
    let waiting = server.wait_state("lonely", "waiting").await;
    assert_eq!(waiting["error"], "DependencyMissing: later");
    let picky = server.wait_state("picky", "waiting").await;
    assert_eq!(picky["error"], "DependencyMissing: chain-a ^2 (version 1.0.0 serves)");

    // A dependent calls its dependency's service, and only a dependency's.
    assert_eq!(server.get("/chain-c/call/chain-b").await, (200, serde_json::json!({ "name": "chain-b" })));
    let (status, refused) = server.get("/chain-c/call/chain-a").await;
    assert_eq!((status, refused["code"].as_str()), (409, Some("DependencyNotDeclared")), "{refused}");
    // A dependency that stops serving: its dependents keep serving, and their calls say why.
    let sql = server.sql().await;
    sql.execute("UPDATE plugins SET status = 'inactive' WHERE name = 'chain-b'", &[]).await.unwrap();
    server.wait_state("chain-b", "inactive").await;
    let (status, unavailable) = server.get("/chain-c/call/chain-b").await;
    assert_eq!((status, unavailable["code"].as_str()), (409, Some("DependencyUnavailable")), "{unavailable}");
    assert_eq!(server.get("/chain-c").await.1, "chain-c", "the dependent still serves");
    sql.execute("UPDATE plugins SET status = 'active' WHERE name = 'chain-b'", &[]).await.unwrap();
    server.wait_state("chain-b", "loaded").await;
    assert_eq!(server.get("/chain-c/call/chain-b").await.0, 200);

    // The missing one comes: the waiting one loads by itself.
    write_plugin(&plugins, "later", &[]);
    assert_eq!(server.post("/plugins/discover", None).await.0, 200);
    server.wait_state("later", "loaded").await;
    server
        .wait_until("lonely loads once later serves", BUILD_DEADLINE, || async {
            server.plugin("lonely").await["state"] == "loaded"
        })
        .await;
    assert_eq!(server.get("/lonely").await.1, "lonely");

    // A warm restart keeps the order.
    let (cluster, root, url) = server.stop().await;
    let server = TestServer::start_in(cluster, root, url).await;
    for name in ["chain-a", "chain-b", "chain-c"] {
        server.wait_state(name, "loaded").await;
    }
    let at = loaded_at(&server, &["chain-a", "chain-b", "chain-c"]).await;
    assert!(at[0] < at[1] && at[1] < at[2], "after a restart too: {at:?}");
}
