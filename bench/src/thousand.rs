//! Section `thousand`: kiln with many plugins (`KILN_BENCH_PLUGINS`, default 1,000; 50 with
//! `KILN_BENCH_QUICK`), each of 10 routes. The crates are generated and their libraries built
//! once into `target/kiln-bench-cache/` (the first run builds them all, ~0.5 s each); later runs
//! find every library there and take minutes.
//!
//! Measured: a warm start (all serving, nothing built), a bulk `UPDATE` of every row off and on,
//! a one-row toggle with all of them served, routing with all of them against one, and the
//! memory each plugin costs a `kiln serve` process beyond its library's own mapping.

use crate::load::{Conn, quantile};
use crate::setup::{Db, Kiln, generate_plugin, kib_field, repo_root, rss_kib_of};
use crate::{Row, ms, row, wrk};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const ROUTES: usize = 10;

pub fn name(i: usize) -> String {
    format!("t{i:04}")
}

/// `n` generated plugin crates (`t0000`, … of 10 routes each) and the kiln root whose library
/// directory keeps what was built of them between runs: (plugin directory, root).
pub fn cached_plugins(n: usize) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cache = repo_root().join("target/kiln-bench-cache").join(format!("plugins-{n}"));
    let plugins = cache.join("plugins");
    for i in 0..n {
        if !plugins.join(name(i)).join("src/lib.rs").exists() {
            generate_plugin(&plugins.join(name(i)), &name(i), ROUTES)?;
        }
    }
    Ok((plugins, cache.join("root")))
}

pub async fn run(db: &Db, quick: bool, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let n: usize = match std::env::var("KILN_BENCH_PLUGINS") {
        Ok(v) => v.parse()?,
        Err(_) if quick => 50,
        Err(_) => 1000,
    };
    let cores = std::thread::available_parallelism()?;
    let (plugins, root) = cached_plugins(n)?;
    let url = db.fresh(&format!("bench_thousand_{n}")).await?;

    // Builds what the cache lacks (everything, the first time).
    let first = Kiln::start(&root, vec![plugins.clone()], &url).await?;
    first.wait_serving(n as u64, Duration::from_secs(6 * 3600)).await?;
    let built = first.json("/health").await?["builds_run"].as_u64().unwrap_or(0);
    eprintln!("kiln-bench: {n} plugins serving ({built} built now, the rest cached)");
    first.stop();

    // Warm starts: every library exists.
    let mut starts = Vec::new();
    let mut server = None;
    for _ in 0..3 {
        drop(server.take());
        let start = Instant::now();
        let s = Kiln::start(&root, vec![plugins.clone()], &url).await?;
        s.wait_serving(n as u64, Duration::from_secs(600)).await?;
        starts.push(start.elapsed().as_secs_f64());
        let h = s.json("/health").await?;
        anyhow::ensure!(h["builds_run"] == 0, "a warm start built: {h}");
        server = Some(s);
    }
    let server = server.expect("started");
    let h = server.json("/health").await?;
    rows.push(row(
        format!("warm start, {n} unchanged plugins ({} routes) → all serving, median of 3 ({cores} cores)", n * ROUTES),
        format!("{} (0 builds, {} route tables)", ms(quantile(&mut starts, 0.5)), h["route_tables_built"]),
        "",
        "≤ 100 ms for 50, ≤ 1 s for 1,000",
    ));

    bulk(&server, n, rows).await?;
    toggles_at_scale(&server, n, rows).await?;
    routing(&server, n, rows).await?;
    server.stop();
    memory(db, &root, &plugins, n, rows).await?;
    Ok(())
}

/// `UPDATE plugins SET status = …` over every row: from its commit to every route gone (404),
/// and back to all serving.
async fn bulk(server: &Kiln, n: usize, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let sql = server.sql().await?;
    let first = format!("/{}/r0", name(0));
    let last = format!("/{}/r{}", name(n - 1), ROUTES - 1);
    let (mut a, mut b) = (Conn::open(server.addr, &first).await?, Conn::open(server.addr, &last).await?);
    let tables = |h: &serde_json::Value| h["route_tables_built"].as_u64().unwrap_or(0);
    let mut off = Vec::new();
    let mut on = Vec::new();
    let (mut off_tables, mut on_tables) = (0, 0);
    for _ in 0..3 {
        let before = tables(&server.json("/health").await?);
        sql.execute("UPDATE plugins SET status = 'inactive'", &[]).await?;
        let committed = Instant::now();
        while a.get().await? != 404 || b.get().await? != 404 {
            anyhow::ensure!(committed.elapsed() < Duration::from_secs(60), "the routes did not go");
        }
        off.push(committed.elapsed().as_secs_f64());
        server.wait_serving(0, Duration::from_secs(60)).await?;
        let middle = tables(&server.json("/health").await?);
        off_tables = middle - before;

        sql.execute("UPDATE plugins SET status = 'active'", &[]).await?;
        let committed = Instant::now();
        server.wait_serving(n as u64, Duration::from_secs(600)).await?;
        on.push(committed.elapsed().as_secs_f64());
        let h = server.json("/health").await?;
        anyhow::ensure!(h["builds_run"] == 0, "turning plugins on built: {h}");
        on_tables = tables(&h) - middle;
    }
    rows.push(row(
        format!("one UPDATE turns {n} plugins off → every route gone (from commit), median of 3"),
        format!("{} ({off_tables} route tables)", ms(quantile(&mut off, 0.5))),
        "",
        "≤ 100 ms",
    ));
    rows.push(row(
        format!("one UPDATE turns {n} plugins on → all serving (from commit), median of 3"),
        format!("{} (0 builds, {on_tables} route tables)", ms(quantile(&mut on, 0.5))),
        "",
        "",
    ));
    Ok(())
}

/// A one-row toggle → route changed, with every other plugin served.
async fn toggles_at_scale(server: &Kiln, n: usize, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let sql = server.sql().await?;
    let target = name(n / 2);
    let mut conn = Conn::open(server.addr, &format!("/{target}/r0")).await?;
    let mut times = Vec::new();
    for i in 0..100 {
        let (status, want) = if i % 2 == 0 { ("inactive", 404) } else { ("active", 200) };
        let start = Instant::now();
        sql.execute("UPDATE plugins SET status = $1 WHERE name = $2", &[&status, &target]).await?;
        while conn.get().await? != want {
            anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "the route did not change");
        }
        times.push(start.elapsed().as_secs_f64());
    }
    rows.push(row(
        format!("row UPDATE status → route changed with {n} plugins / {} routes, p50 / p99 of 100", n * ROUTES),
        format!("{} / {}", ms(quantile(&mut times, 0.5)), ms(quantile(&mut times, 0.99))),
        "",
        "p50 ≤ 2 ms, p99 ≤ 5 ms",
    ));
    Ok(())
}

/// Requests per second (wrk) to one route with every plugin served, then with only its own.
async fn routing(server: &Kiln, n: usize, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let path = format!("/{}/r{}", name(n - 1), ROUTES - 1);
    let mut many = Vec::new();
    for _ in 0..3 {
        many.push(wrk::run(server.addr, &path, 16, Duration::from_secs(3)).await?.rps);
    }
    let sql = server.sql().await?;
    sql.execute("UPDATE plugins SET status = 'inactive' WHERE name <> $1", &[&name(n - 1)]).await?;
    server.wait_serving(1, Duration::from_secs(60)).await?;
    let mut one = Vec::new();
    for _ in 0..3 {
        one.push(wrk::run(server.addr, &path, 16, Duration::from_secs(3)).await?.rps);
    }
    let (m, o) = (quantile(&mut many, 0.5), quantile(&mut one, 0.5));
    rows.push(row(
        format!("routing with {n} plugins / {} routes (GET {path}, wrk, median of 3)", n * ROUTES),
        format!("{m:.0} req/s ({:.2}× of 1 plugin)", m / o),
        format!("{o:.0} req/s with 1 plugin"),
        "≥ 0.95×",
    ));
    sql.execute("UPDATE plugins SET status = 'active'", &[]).await?;
    server.wait_serving(n as u64, Duration::from_secs(600)).await?;
    Ok(())
}

/// Resident memory of a `kiln serve` process with `n` plugins, against one with none, less
/// the resident part of the plugins' own library mappings.
async fn memory(db: &Db, root: &Path, plugins: &Path, n: usize, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let empty = root.parent().expect("cache dir").join("empty");
    std::fs::create_dir_all(&empty)?;
    let (none_rss, _) = process_rss(db, root, &empty, "bench_memory_none", 0).await?;
    let (all_rss, libs) = process_rss(db, root, plugins, "bench_memory_all", n).await?;
    let per = (all_rss.saturating_sub(none_rss).saturating_sub(libs)) as f64 / n as f64;
    rows.push(row(
        format!("memory per plugin beyond its library, {n} plugins in a `kiln serve` process (RSS)"),
        format!("{per:.0} KiB (libraries: {:.0} KiB each)", libs as f64 / n as f64),
        format!("{} MiB with none, {} MiB with {n}", none_rss / 1024, all_rss / 1024),
        "≤ 256 KiB",
    ));
    Ok(())
}

/// Starts `kiln serve` (the release binary) on `plugin_dir` and a fresh database, waits until
/// `n` plugins serve, and returns its RSS and the RSS of the mappings of its plugin libraries
/// (KiB).
async fn process_rss(db: &Db, root: &Path, plugin_dir: &Path, database: &str, n: usize) -> anyhow::Result<(u64, u64)> {
    let kiln = repo_root().join("target/release/kiln");
    anyhow::ensure!(kiln.exists(), "{} is missing: bench/run builds it", kiln.display());
    let url = db.fresh(database).await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let data = root.join(format!("data-{database}"));
    let mut child = tokio::process::Command::new(&kiln)
        .arg("serve")
        .env("DATABASE_URL", &url)
        .env("KILN_ADDR", format!("127.0.0.1:{port}"))
        .env("KILN_PLUGIN_DIRS", plugin_dir)
        .env("KILN_BIN_DIR", root.join("bin"))
        .env("KILN_BUILD_DIR", repo_root().join("target/kiln-bench-build"))
        .env("KILN_DATA_DIR", &data)
        .env("KILN_INSTALL_DIR", data.join("installed"))
        .env("KILN_SUPERVISE", "false")
        .env("KILN_WATCH", "off")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let pid = child.id().expect("running");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let start = Instant::now();
    loop {
        if let Ok((200, body)) = crate::setup::http(addr, "GET", "/health").await
            && let Ok(h) = serde_json::from_str::<serde_json::Value>(&body)
            && h["plugins_served"] == n as u64
            && h["reconciling"] == 0
        {
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(600), "kiln serve did not serve {n} plugins");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rss = rss_kib_of(&pid.to_string());
    let libs = library_rss(pid, &root.join("bin"))?;
    child.kill().await?;
    Ok((rss, libs))
}

/// The RSS (KiB) of every mapping of a file under `dir` in process `pid` (from smaps).
fn library_rss(pid: u32, dir: &Path) -> anyhow::Result<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let dir = dir.canonicalize().unwrap_or_else(|_| PathBuf::from(dir));
    let mut total = 0;
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            inside = line.split_whitespace().nth(5).is_some_and(|path| Path::new(path).starts_with(&dir));
        } else if inside && line.starts_with("Rss:") {
            total += kib_field(line, "Rss:");
        }
    }
    Ok(total)
}
