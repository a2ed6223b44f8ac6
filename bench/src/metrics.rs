//! Section `metrics`: what counting every request for `GET /metrics` costs. The same plugin
//! route on two kiln servers, one with `--metrics true` (the default) and one with `false`, under
//! wrk in alternating rounds: throughput and server CPU per request, as ratios.

use crate::load::quantile;
use crate::setup::{self, Db, Kiln};
use crate::{Row, cpu, row, wrk};
use std::path::Path;
use std::time::Duration;

pub async fn run(
    counted: &Kiln,
    db: &Db,
    work: &Path,
    plugins: &Path,
    quick: bool,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let url = db.fresh("bench_metrics_off").await?;
    let bare =
        Kiln::start_with(&work.join("metrics-off"), vec![plugins.to_path_buf()], &url, |c| c.metrics = false).await?;
    bare.wait_serving(4, Duration::from_secs(600)).await?;
    let (rounds, secs, conns) = if quick { (3, 1, 16) } else { (11, 2, 16) };
    let (mut rps, mut cpu) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Both servers' threads are named alike; the idle one adds only its timers.
        let run = |addr| async move {
            let before = cpu::threads_ns(setup::KILN_THREADS);
            let stats = wrk::run(addr, "/powertable", conns, Duration::from_secs(secs)).await?;
            let per_request = (cpu::threads_ns(setup::KILN_THREADS) - before) as f64 / stats.ok.max(1) as f64 / 1e3;
            anyhow::ensure!(stats.failed == 0, "requests failed");
            anyhow::Ok((stats.rps, per_request))
        };
        let (on, off) = if round % 2 == 0 {
            let on = run(counted.addr).await?;
            (on, run(bare.addr).await?)
        } else {
            let off = run(bare.addr).await?;
            (run(counted.addr).await?, off)
        };
        eprintln!(
            "  round {round}: counted {:.0} req/s {:.1} µs; uncounted {:.0} req/s {:.1} µs",
            on.0, on.1, off.0, off.1
        );
        rps.push(on.0 / off.0);
        cpu.push(on.1 / off.1);
    }
    let (lo, hi) = rps.iter().fold((f64::MAX, 0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    rows.push(row(
        format!("GET /powertable throughput with requests counted for /metrics ({rounds} alternating rounds)"),
        format!("{:.3}× uncounted (median of the rounds' ratios, {lo:.2}–{hi:.2})", quantile(&mut rps, 0.5)),
        "the same server with --metrics false",
        "≥ 0.98×",
    ));
    rows.push(row(
        "GET /powertable server CPU per request with requests counted",
        format!("{:.3}× uncounted (median of the rounds' ratios)", quantile(&mut cpu, 0.5)),
        "",
        "",
    ));
    bare.stop();
    Ok(())
}
