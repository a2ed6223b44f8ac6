//! The unload policy, measured: libraries stay mapped (RTLD_NODELETE), one mapping per distinct
//! version; the same version loaded again, even after its handlers panicked, reuses its mapping.

use crate::support::TestServer;
use std::collections::BTreeSet;
use std::path::Path;

/// The plugin libraries under `bin` that this process has mapped now.
fn mapped_libraries(bin: &Path) -> BTreeSet<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    let bin = bin.to_string_lossy();
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.starts_with(&*bin))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn reloads_that_panicked_keep_one_mapping_per_version() {
    let server = TestServer::start(&["panicky"]).await;
    server.wait_state("panicky", "loaded").await;
    let bin = server.root.path().join("bin").canonicalize().unwrap();
    for _ in 0..100 {
        assert_eq!(server.get("/panicky/boom").await.0, 500);
        let (status, body) = server.post("/plugins/panicky/reload", None).await;
        assert_eq!(status, 200, "{body}");
    }
    let mapped = mapped_libraries(&bin);
    assert_eq!(mapped.len(), 1, "100 reloads of one version, each after a panic: one mapping: {mapped:?}");

    // New code each time: each version keeps its mapping (the cost of never unmapping).
    let src = server.plugin_dir("panicky").join("src/lib.rs");
    let code = std::fs::read_to_string(&src).unwrap();
    for i in 0..3 {
        std::fs::write(&src, code.replace("still fine", &format!("still fine {i}"))).unwrap();
        let (status, body) = server.post("/plugins/panicky/reload", None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(server.get("/panicky/boom").await.0, 500);
    }
    let mapped = mapped_libraries(&bin);
    assert_eq!(mapped.len(), 4, "one mapping per distinct version: {mapped:?}");
    assert_eq!(server.get("/panicky/ok").await.1, "still fine 2");
}
