//! Uploads and sources as users make them: archives made by `tar`, racing uploads, crates that
//! lie inside somebody's Cargo workspace.

use crate::support::{TestServer, cluster, copy_crate, crate_source, install, raw_archive};
use std::path::Path;

/// A `.tar.gz` of the crate in `dir` (without build output) made the usual way:
/// `tar -czf p.tar.gz -C crate .` (entries `./…`).
fn tar_of(dir: &Path) -> Vec<u8> {
    let out = tempfile::tempdir().unwrap();
    let file = out.path().join("p.tar.gz");
    let src = out.path().join("crate");
    copy_crate(dir, &src);
    let status = std::process::Command::new("tar").arg("-czf").arg(&file).arg("-C").arg(&src).arg(".").status();
    assert!(status.expect("run tar").success());
    std::fs::read(file).unwrap()
}

/// A Cargo workspace at `dir` with one member, as a user's monorepo would be.
fn monorepo(dir: &Path) {
    std::fs::create_dir_all(dir.join("app/src")).unwrap();
    std::fs::write(dir.join("Cargo.toml"), "[workspace]\nmembers = [\"app\"]\nresolver = \"3\"\n").unwrap();
    std::fs::write(dir.join("app/Cargo.toml"), "[package]\nname = \"app\"\nversion = \"0.1.0\"\nedition = \"2024\"\n")
        .unwrap();
    std::fs::write(dir.join("app/src/main.rs"), "fn main() {}\n").unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_archive_made_with_tar_dash_c_dot_installs() {
    let server = TestServer::start(&[]).await;
    let (status, body) = install(&server, tar_of(&crate_source("hello"))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(server.get("/hello").await.0, 200);
    // Still refused: a `./` that is a file, and paths that climb out after `./`.
    let (status, body) = install(&server, raw_archive("./../x", tar::EntryType::Regular, b"x", None)).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("InvalidArchive")), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_uploads_of_one_name_get_one_success_and_conflicts() {
    let server = TestServer::start(&[]).await;
    let archive = tar_of(&crate_source("hello"));
    let uploads = (0..6).map(|_| install(&server, archive.clone()));
    let mut statuses: Vec<u16> = futures_util::future::join_all(uploads).await.into_iter().map(|(s, _)| s).collect();
    statuses.sort();
    assert_eq!(statuses, vec![200, 409, 409, 409, 409, 409]);
    assert_eq!(server.get("/hello").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn plugins_inside_a_foreign_workspace_build_as_they_are() {
    let root = tempfile::tempdir().unwrap();
    let repo = root.path().join("monorepo");
    monorepo(&repo);
    let install_dir = repo.join("kiln-installed");
    let server = TestServer::start_with(cluster().await, &[], |c| c.install_dir = install_dir.clone()).await;
    // An upload unpacked inside the workspace (as into a checkout's .kiln/installed).
    let (status, body) = install(&server, tar_of(&crate_source("hello"))).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["source_path"].as_str().unwrap().starts_with(&*install_dir.to_string_lossy()), "{body}");
    // A row pointing into the workspace.
    let dir = repo.join("plugins/powertable");
    copy_crate(&crate_source("powertable"), &dir);
    let sql = server.sql().await;
    sql.execute(
        "INSERT INTO plugins (name, source_path) VALUES ('powertable', $1)",
        &[&dir.to_string_lossy().as_ref()],
    )
    .await
    .unwrap();
    let row = server.wait_state("powertable", "loaded").await;
    assert!(row["error"].is_null(), "{row}");
    assert_eq!(server.get("/powertable").await.0, 200);
    // The author's files are as they were: no [workspace] table was added to them.
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    assert!(!manifest.contains("[workspace]"), "{manifest}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_manifest_in_an_upload_is_422() {
    let server = TestServer::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    copy_crate(&crate_source("hello"), dir.path());
    let manifest = std::fs::read_to_string(dir.path().join("Cargo.toml")).unwrap();
    std::fs::write(dir.path().join("Cargo.toml"), manifest.replace("name = \"hello\"", "name = \"a..b\"")).unwrap();
    let (status, body) = install(&server, tar_of(dir.path())).await;
    assert_eq!((status, body["error"].as_str()), (422, Some("InvalidManifest")), "{body}");
}
