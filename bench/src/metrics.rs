//! Section `metrics`: what counting every request for `GET /metrics` costs. The same plugin
//! route on two kiln servers, one with `--metrics true` (the default) and one with `false`, under
//! wrk in alternating rounds: throughput and server CPU per request, as ratios. And the counting
//! alone, on two threads as two busy workers count: kiln's route counts against prometheus's
//! gauge, counter and histogram (what kiln counted with before).

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
    counting(quick, rows);
    Ok(())
}

/// Requests each thread counts in a round.
const COUNTED: u32 = 200_000;

/// Two threads each count [`COUNTED`] requests, between which they work about a microsecond
/// (so a cache line another core wrote meanwhile is fetched, as when serving); nanoseconds per
/// request beyond the work alone.
fn counting(quick: bool, rows: &mut Vec<Row>) {
    use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts};
    let metrics = std::sync::Arc::new(kiln::metrics::Metrics::new());
    let route = metrics.route("bench", "GET", "/bench");
    let requests = IntCounterVec::new(Opts::new("r", "r"), &["plugin", "route", "class"]).expect("metric");
    let in_flight = IntGaugeVec::new(Opts::new("f", "f"), &["plugin"]).expect("metric");
    let seconds = HistogramVec::new(HistogramOpts::new("s", "s"), &["plugin", "route"]).expect("metric");
    let (counter, gauge) =
        (requests.with_label_values(&["bench", "GET /bench", "2xx"]), in_flight.with_label_values(&["bench"]));
    let histogram = seconds.with_label_values(&["bench", "GET /bench"]);
    let took = Duration::from_micros(140);
    let kiln_counts = || {
        let _in = route.enter();
        route.answered(200, took);
    };
    let prometheus_counts = || {
        // As kiln did: the gauge's handle cloned into the request's guard.
        let g = gauge.clone();
        g.inc();
        counter.inc();
        histogram.observe(took.as_secs_f64());
        g.dec();
    };
    let rounds = if quick { 3 } else { 9 };
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let work = per_request_ns(|| {});
        ours.push(per_request_ns(kiln_counts) - work);
        theirs.push(per_request_ns(prometheus_counts) - work);
    }
    let (ours, theirs) = (quantile(&mut ours, 0.5), quantile(&mut theirs, 0.5));
    rows.push(row(
        format!("counting one request, two threads counting at once, median of {rounds} rounds"),
        format!("**{ours:.0} ns** (kiln's route counts, one shard per thread)"),
        format!("{theirs:.0} ns with prometheus's gauge, counter and histogram"),
        "",
    ));
}

/// Wall nanoseconds per request of two threads each running `count` after a microsecond's work,
/// [`COUNTED`] times.
fn per_request_ns(count: impl Fn() + Sync) -> f64 {
    let start = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for i in 0..COUNTED {
                    let mut x = std::hint::black_box(i as u64);
                    for _ in 0..300 {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    }
                    std::hint::black_box(x);
                    count();
                }
            });
        }
    });
    start.elapsed().as_nanos() as f64 / COUNTED as f64
}
