//! Section 7: the event bus. Events through it in-process (the audit example loaded into this
//! process, no HTTP, no database), publish-to-handler latency, and events from PostgreSQL
//! (`pg_notify` in batches) through a running server.

use crate::load::quantile;
use crate::setup::Kiln;
use crate::{Row, row};
use kiln::events::{EventBus, Source};
use kiln::loader::LoadedPlugin;
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Events delivered to audit's `orders.*` subscription so far, in-process.
fn delivered(bus: &EventBus) -> u64 {
    bus.stats("audit").iter().filter(|s| s.pattern == "orders.*").map(|s| s.delivered).sum()
}

/// Events delivered to audit's `orders.*` subscription so far, by the server's count.
async fn served(server: &Kiln) -> Option<u64> {
    let plugin = server.json("/plugins/audit").await.ok()?;
    let subs = plugin["events"].as_array()?;
    subs.iter().find(|s| s["pattern"] == "orders.*").and_then(|s| s["delivered"].as_u64())
}

/// Waits (spinning: this measures microseconds) until `bus` has delivered `n` events.
fn wait_delivered(bus: &EventBus, n: u64, patience: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while delivered(bus) < n {
        anyhow::ensure!(start.elapsed() < patience, "only {} of {n} events were delivered", delivered(bus));
        std::hint::spin_loop();
        std::thread::yield_now();
    }
    Ok(())
}

pub async fn run(server: &Kiln, quick: bool, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let library = server.json("/plugins/audit").await?["binary_path"].as_str().unwrap_or_default().to_string();
    let (n, batch, samples) = if quick { (20_000u64, 500u64, 200) } else { (200_000, 500, 2_000) };

    // In-process: batches of `batch` (the queue holds 1,024), each awaited before the next.
    let plugin = Arc::new(LoadedPlugin::load(Path::new(&library), b"{}")?);
    let bus = EventBus::new(Default::default(), kiln::events::DEFAULT_TIMEOUT);
    bus.serve(std::slice::from_ref(&plugin));
    let b = bus.clone();
    let (rate, latencies) = tokio::task::spawn_blocking(move || -> anyhow::Result<(f64, Vec<f64>)> {
        let start = Instant::now();
        let mut sent = 0;
        while sent < n {
            for _ in 0..batch {
                b.publish("orders.created", json!({ "id": sent }), Source::Api).map_err(anyhow::Error::msg)?;
                sent += 1;
            }
            wait_delivered(&b, sent, Duration::from_secs(60))?;
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        let mut latencies = Vec::new();
        for i in 0..samples {
            let t = Instant::now();
            b.publish("orders.created", json!({ "id": i }), Source::Api).map_err(anyhow::Error::msg)?;
            wait_delivered(&b, n + i as u64 + 1, Duration::from_secs(10))?;
            latencies.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok((rate, latencies))
    })
    .await??;
    bus.serve(&[]);
    let mut latencies = latencies;
    rows.push(row(
        format!("events through the bus, in-process, to one subscriber (audit; {n} in batches of {batch})"),
        format!("{rate:.0} events/s"),
        "",
        "",
    ));
    rows.push(row(
        format!("event publish → handler returned, in-process, p50 / p99 of {samples}"),
        format!("{:.0} / {:.0} µs", quantile(&mut latencies, 0.5), quantile(&mut latencies, 0.99)),
        "",
        "",
    ));

    // From PostgreSQL, through the server's listener: one statement notifies a batch.
    let sql = server.sql().await?;
    let before = served(server).await.unwrap_or(0);
    let total = if quick { 5_000 } else { 50_000 };
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        sql.execute(
            "SELECT pg_notify('kiln_events', json_build_object('topic', 'orders.created', 'data', json_build_object('id', n))::text)
             FROM generate_series(1, $1::int) AS n",
            &[&(batch as i32)],
        )
        .await?;
        sent += batch;
        let deadline = Instant::now() + Duration::from_secs(60);
        while served(server).await.unwrap_or(0) < before + sent {
            anyhow::ensure!(Instant::now() < deadline, "the events from pg_notify were not all delivered");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let rate = total as f64 / start.elapsed().as_secs_f64();
    rows.push(row(
        format!("events from pg_notify through a server to one subscriber ({total} in statements of {batch})"),
        format!("{rate:.0} events/s"),
        "",
        "",
    ));
    Ok(())
}
