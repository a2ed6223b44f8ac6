//! Section `replicas`: three kiln servers on one database. How long a committed row edit takes
//! to reach all three; how long new code takes to serve on all three, against the time of the
//! one build it needs; and what fetching a stored library (read, sha256 check, write) costs.

use crate::load::{Conn, quantile};
use crate::setup::{Db, Kiln, generate_plugin, http};
use crate::{Row, ms, row};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::time::{Duration, Instant};

const NAME: &str = "replicated";

pub async fn run(db: &Db, work: &Path, quick: bool, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let url = db.fresh("bench_replicas").await?;
    let plugins = work.join("replicas-plugins");
    generate_plugin(&plugins.join(NAME), NAME, 3)?;
    let replica = |id: &'static str| move |c: &mut kiln::Config| c.replica_id = Some(id.into());
    // `a` finds the plugin in its directory; `b` and `c` have none and follow the row.
    let a = Kiln::start_with(&work.join("replica-a"), vec![plugins.clone()], &url, replica("a")).await?;
    a.wait_serving(1, Duration::from_secs(600)).await?;
    let b = Kiln::start_with(&work.join("replica-b"), vec![], &url, replica("b")).await?;
    let c = Kiln::start_with(&work.join("replica-c"), vec![], &url, replica("c")).await?;
    let all = [&a, &b, &c];
    for s in all {
        s.wait_serving(1, Duration::from_secs(120)).await?;
    }

    // 1. A committed toggle → the route changed on all three.
    let sql = a.sql().await?;
    let route = format!("/{NAME}/r0");
    let mut conns = Vec::new();
    for s in all {
        conns.push(Conn::open(s.addr, &route).await?);
    }
    let mut times = Vec::new();
    for i in 0..(if quick { 10 } else { 60 }) {
        let (status, want) = if i % 2 == 0 { ("inactive", 404) } else { ("active", 200) };
        let start = Instant::now();
        sql.execute("UPDATE plugins SET status = $1 WHERE name = $2", &[&status, &NAME]).await?;
        for conn in &mut conns {
            while conn.get().await? != want {
                anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "a replica did not follow the row");
            }
        }
        times.push(start.elapsed().as_secs_f64());
    }
    let n = times.len();
    rows.push(row(
        format!("3 replicas: row UPDATE status → route changed on all three, p50 / p99 of {n}"),
        format!("{} / {}", ms(quantile(&mut times, 0.5)), ms(quantile(&mut times, 0.99))),
        "",
        "p99 ≤ 100 ms",
    ));

    // 2. New code, reloaded through `a`: built once, fetched by `b` and `c`, served by all.
    let lib = plugins.join(NAME).join("src/lib.rs");
    let original = std::fs::read_to_string(&lib)?;
    let (mut extra, mut all_serving, mut builds) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..(if quick { 3 } else { 10 }) {
        let marker = format!("{NAME} v{i}");
        std::fs::write(
            &lib,
            original
                .replace(&format!("Response::text(200, \"{NAME}\")"), &format!("Response::text(200, \"{marker}\")")),
        )?;
        let start = Instant::now();
        let (status, body) = http(a.addr, "POST", &format!("/plugins/{NAME}/reload")).await?;
        anyhow::ensure!(status == 200, "reload failed: {body}");
        for s in all {
            while http(s.addr, "GET", &route).await?.1 != marker {
                anyhow::ensure!(start.elapsed() < Duration::from_secs(120), "a replica did not serve the new code");
            }
        }
        let took = start.elapsed().as_secs_f64();
        let hash = a.json(&format!("/plugins/{NAME}")).await?["loaded_hash"].as_str().unwrap_or_default().to_string();
        let history = a.json(&format!("/plugins/{NAME}/builds")).await?;
        let of_new: Vec<&serde_json::Value> =
            history.as_array().into_iter().flatten().filter(|x| x["source_hash"] == hash.as_str()).collect();
        anyhow::ensure!(of_new.len() == 1, "one build of the new version, not {}: {history}", of_new.len());
        let build = of_new[0]["duration_ms"].as_f64().unwrap_or_default() / 1000.0;
        all_serving.push(took);
        builds.push(build);
        extra.push(took - build);
    }
    let n = all_serving.len();
    rows.push(row(
        format!("3 replicas: new code (POST reload) → all three serve it, built once, p50 / p99 of {n}"),
        format!("{} / {}", ms(quantile(&mut all_serving, 0.5)), ms(quantile(&mut all_serving, 0.99))),
        format!("its one build: {} / {}", ms(quantile(&mut builds, 0.5)), ms(quantile(&mut builds, 0.99))),
        "",
    ));
    rows.push(row(
        format!("3 replicas: new code → all serving, minus its build time, p50 / p99 of {n}"),
        format!("{} / {}", ms(quantile(&mut extra, 0.5)), ms(quantile(&mut extra, 0.99))),
        "",
        "≤ 300 ms",
    ));

    // 3. Fetching a stored library as a replica does: read it, check its sha256, write it.
    let stored = sql.query_one("SELECT build_key FROM plugin_libraries ORDER BY built_at DESC LIMIT 1", &[]).await?;
    let key: String = stored.get(0);
    let repo = kiln::repo::Repo::new(kiln_pool(&url)?, "bench");
    let (mut times, mut size) = (Vec::new(), 0);
    let out = work.join("fetched.so");
    for _ in 0..(if quick { 5 } else { 30 }) {
        let start = Instant::now();
        let library = repo.stored_library(&key).await?.ok_or_else(|| anyhow::anyhow!("no stored library"))?;
        anyhow::ensure!(hex::encode(Sha256::digest(&library.bytes)) == library.sha256, "sha256 mismatch");
        tokio::fs::write(&out, &library.bytes).await?;
        times.push(start.elapsed().as_secs_f64());
        size = library.bytes.len();
    }
    let n = times.len();
    rows.push(row(
        format!("library fetch: read from PostgreSQL + sha256 + write, {} KiB, p50 / p99 of {n}", size / 1024),
        format!("{} / {}", ms(quantile(&mut times, 0.5)), ms(quantile(&mut times, 0.99))),
        "",
        "",
    ));
    for s in [c, b, a] {
        s.stop();
    }
    Ok(())
}

fn kiln_pool(url: &str) -> anyhow::Result<deadpool_postgres::Pool> {
    let config: tokio_postgres::Config = url.parse()?;
    let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
    Ok(deadpool_postgres::Pool::builder(manager).max_size(2).build()?)
}
