//! Durable events: the `events` table, a transactional outbox. A row inserted in any transaction
//! is delivered once that transaction commits, through the bus, to every subscription matching
//! its topic, and its outcome is written back: `delivered`, or `pending` again with a doubling
//! pause and the error, or `dead` after the last attempt. Delivery is at least once: an attempt
//! that failed at one subscriber is made again to all of them.
//!
//! The worker claims due rows with `FOR UPDATE SKIP LOCKED` and leases them (their next attempt
//! moves 5 minutes ahead until the outcome is written), so several servers on one database share
//! the table without delivering a row at the same time. It wakes on `NOTIFY kiln_outbox` (one
//! per inserting statement) and polls every second for retries that came due.

use super::{EventBus, Outcome, Source};
use crate::repo::{DueEvent, Repo};
use std::sync::Arc;
use std::time::Duration;

/// How often the worker looks for rows without being woken (retries come due by time).
const POLL: Duration = Duration::from_secs(1);
/// Rows claimed at once.
const BATCH: i64 = 64;
/// The longest pause between attempts.
const MAX_PAUSE: Duration = Duration::from_secs(600);

/// How failed deliveries are retried.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// The pause after the first failed attempt; it doubles after each.
    pub first_pause: Duration,
    /// Attempts in all; after the last one fails, the row is `dead`.
    pub attempts: i32,
}

/// Delivers the table's rows until the task is dropped.
pub async fn run(repo: Repo, bus: Arc<EventBus>, retry: Retry) {
    loop {
        match repo.claim_events(BATCH).await {
            Ok(rows) if !rows.is_empty() => deliver(&repo, &bus, retry, rows).await,
            Ok(_) => {
                let _ = tokio::time::timeout(POLL, bus.outbox_wake.notified()).await;
            }
            Err(e) => {
                tracing::warn!("events table: {e}");
                tokio::time::sleep(POLL).await;
            }
        }
    }
}

/// Publishes the claimed rows in order, waits for their outcomes, and writes them back.
async fn deliver(repo: &Repo, bus: &EventBus, retry: Retry, rows: Vec<DueEvent>) {
    let mut published = Vec::new();
    for row in rows {
        let data = serde_json::from_str(&row.data).unwrap_or(serde_json::Value::Null);
        let event = bus.publish(&row.topic, data, Source::Outbox(row.id));
        published.push((row, event));
    }
    let patience = bus.timeout() + Duration::from_secs(5);
    for (row, event) in published {
        let (state, error, subscribers) = match event {
            Err(e) => ("dead", Some(e), 0),
            Ok(event) => {
                let settled = event.settled(patience).await;
                let deliveries = event.deliveries();
                let subscribers = event.subscribers.load(std::sync::atomic::Ordering::Relaxed);
                let mut errors: Vec<String> = deliveries
                    .iter()
                    .filter(|d| d.outcome != Outcome::Delivered)
                    .map(|d| {
                        format!("{} ({}): {}", d.plugin, d.handler, d.error.as_deref().unwrap_or(d.outcome.as_str()))
                    })
                    .collect();
                if !settled {
                    errors.push(format!("not every subscriber was done within {patience:?}"));
                }
                match errors.is_empty() {
                    true => ("delivered", None, subscribers),
                    false if row.attempts >= retry.attempts => ("dead", Some(errors.join("; ")), subscribers),
                    false => ("pending", Some(errors.join("; ")), subscribers),
                }
            }
        };
        let pause = retry.first_pause.saturating_mul(1 << (row.attempts - 1).clamp(0, 20)).min(MAX_PAUSE);
        if let Err(e) = repo.record_event(row.id, state, error.as_deref(), subscribers as i32, pause).await {
            // The lease runs out and the row is delivered again: at least once.
            tracing::warn!(event = row.id, "events table: could not record the outcome: {e}");
        }
        if state == "dead" {
            tracing::warn!(event = row.id, topic = %row.topic, "event is dead after {} attempts: {}", row.attempts, error.unwrap_or_default());
        }
    }
}
