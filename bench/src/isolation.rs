//! Section `isolation`: what a process of its own costs a plugin. The same route of the same
//! library (`GET /powertable`) on two kiln servers, one serving it in process and one from a
//! `kiln plugin-host` child (`isolation = 'process'` in its row), under wrk in alternating
//! rounds: throughput as a ratio, and the added latency per call at one connection (p50
//! difference). Then the restart after a crash: from the crashed request's 502 to the first 200
//! from the new process (the `isolated` fixture; a reload between samples, so each is a first
//! crash, which restarts without a backoff).

use crate::load::quantile;
use crate::setup::{self, Db, Kiln, http};
use crate::{Row, cpu, row, wrk};
use std::path::Path;
use std::time::{Duration, Instant};

pub async fn run(
    in_process: &Kiln,
    db: &Db,
    work: &Path,
    plugins: &Path,
    quick: bool,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let host_exe = setup::repo_root().join("target/release/kiln");
    anyhow::ensure!(host_exe.exists(), "{} is missing: bench/run builds it", host_exe.display());
    let fixture = work.join("isolation-plugins");
    setup::copy_crate(&setup::repo_root().join("tests/fixtures/isolated"), &fixture.join("isolated"))?;
    let url = db.fresh("bench_isolated").await?;
    let isolated = Kiln::start_with(&work.join("isolated"), vec![plugins.to_path_buf(), fixture], &url, |c| {
        c.plugin_host_exe = Some(host_exe.clone());
    })
    .await?;
    isolated.wait_serving(5, Duration::from_secs(600)).await?;
    let sql = isolated.sql().await?;
    sql.execute("UPDATE plugins SET isolation = 'process' WHERE name = 'powertable'", &[]).await?;
    // Served from a process of its own once kiln's own process no longer answers it: wait for
    // the row to show the fresh instance (no error, loaded) and a child to exist.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let row = isolated.json("/plugins/powertable").await?;
        if row["state"] == "loaded" && row["isolation"] == "process" && children("powertable") > 0 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "powertable did not move to a process of its own: {row}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (rounds, secs) = if quick { (3, 1) } else { (9, 2) };
    let (mut ratios, mut added, mut rps) = (Vec::new(), Vec::new(), (Vec::new(), Vec::new()));
    // CPU per request at one connection: kiln's threads (both servers' are named alike; the
    // idle one adds only its timers), plus the plugin's process for the isolated one.
    let mut cpu_1 = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let pair = |conns| async move {
            let run = |addr| async move {
                let stats = wrk::run(addr, "/powertable", conns, Duration::from_secs(secs)).await?;
                anyhow::ensure!(stats.failed == 0, "requests failed");
                anyhow::Ok(stats)
            };
            if round % 2 == 0 {
                let a = run(in_process.addr).await?;
                anyhow::Ok((a, run(isolated.addr).await?))
            } else {
                let b = run(isolated.addr).await?;
                anyhow::Ok((run(in_process.addr).await?, b))
            }
        };
        let (a, b) = pair(16).await?;
        ratios.push(b.rps / a.rps);
        rps.0.push(a.rps);
        rps.1.push(b.rps);
        let cpu_of = |addr, isolated: bool| async move {
            let ns = || cpu::threads_ns(setup::KILN_THREADS) + if isolated { children_ns("powertable") } else { 0 };
            let before = ns();
            let stats = wrk::run(addr, "/powertable", 1, Duration::from_secs(secs)).await?;
            anyhow::ensure!(stats.failed == 0, "requests failed");
            anyhow::Ok((stats, (ns() - before) as f64 / stats.ok.max(1) as f64 / 1e3))
        };
        let ((a1, a_cpu), (b1, b_cpu)) = if round % 2 == 0 {
            let a = cpu_of(in_process.addr, false).await?;
            (a, cpu_of(isolated.addr, true).await?)
        } else {
            let b = cpu_of(isolated.addr, true).await?;
            (cpu_of(in_process.addr, false).await?, b)
        };
        cpu_1.0.push(a_cpu);
        cpu_1.1.push(b_cpu);
        added.push(b1.p50_us - a1.p50_us);
        eprintln!(
            "  round {round}: in process {:.0} req/s, p50 {:.0} µs at 1 conn; own process {:.0} req/s, p50 {:.0} µs",
            a.rps, a1.p50_us, b.rps, b1.p50_us
        );
    }
    let (lo, hi) = ratios.iter().fold((f64::MAX, 0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    rows.push(row(
        format!("GET /powertable throughput from its own process (wrk, 16 conns, {rounds} alternating rounds)"),
        format!(
            "{:.0} req/s; {:.2}× in process (median of the rounds' ratios, {lo:.2}–{hi:.2})",
            quantile(&mut rps.1, 0.5),
            quantile(&mut ratios, 0.5)
        ),
        format!("{:.0} req/s in process", quantile(&mut rps.0, 0.5)),
        "≥ 0.7× in process",
    ));
    rows.push(row(
        "GET /powertable added latency per call from its own process (wrk p50 at 1 conn, difference)",
        format!("{:.0} µs (median of the rounds)", quantile(&mut added, 0.5)),
        "the same route in process",
        "≤ 20 µs",
    ));
    let (a, b) = (quantile(&mut cpu_1.0, 0.5), quantile(&mut cpu_1.1, 0.5));
    rows.push(row(
        "CPU per request at 1 conn, kiln and the plugin's process (the price of polling while alone)",
        format!("{b:.1} µs ({:.1}× in process)", b / a),
        format!("{a:.1} µs in process"),
        "",
    ));

    // Restarts after a crash.
    let samples = if quick { 3 } else { 7 };
    let mut restart = Vec::new();
    for _ in 0..samples {
        let (status, _) = http(isolated.addr, "POST", "/plugins/isolated/reload").await?;
        anyhow::ensure!(status == 200, "reload answered {status}");
        let (status, _) = http(isolated.addr, "GET", "/isolated/abort").await?;
        anyhow::ensure!(status == 502, "a crash answered {status}");
        let crashed = Instant::now();
        loop {
            if http(isolated.addr, "GET", "/isolated/ok").await?.0 == 200 {
                break;
            }
            anyhow::ensure!(crashed.elapsed() < Duration::from_secs(10), "no restart within 10 s");
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        restart.push(crashed.elapsed().as_secs_f64());
    }
    let max = restart.iter().cloned().fold(0f64, f64::max);
    rows.push(row(
        format!("Isolated plugin serving again after a crash (abort → first 200; {samples} samples)"),
        format!("p50 {} (max {})", crate::ms(quantile(&mut restart, 0.5)), crate::ms(max)),
        "",
        "≤ 50 ms",
    ));
    isolated.stop();
    Ok(())
}

/// Processes whose command line is `kiln plugin-host --library …<name>-…` (the bench's own
/// children).
fn children(name: &str) -> usize {
    child_dirs(name).len()
}

fn child_dirs(name: &str) -> Vec<std::path::PathBuf> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            std::fs::read(p.join("cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c).replace('\0', " ");
                c.contains("plugin-host") && c.contains(&format!("/{name}-"))
            })
        })
        .collect()
}

/// Nanoseconds on a CPU of the live threads of those processes (`/proc/<pid>/task/*/schedstat`).
fn children_ns(name: &str) -> u64 {
    child_dirs(name)
        .iter()
        .filter_map(|p| std::fs::read_dir(p.join("task")).ok())
        .flat_map(|tasks| tasks.flatten())
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}
