//! The `events` table (durable events, see `events::outbox`): claiming due rows and recording
//! what became of them.

use super::{Repo, Result};
use std::time::Duration;

/// A claimed row of the `events` table.
#[derive(Debug)]
pub struct DueEvent {
    pub id: i64,
    pub topic: String,
    /// The data, as JSON text.
    pub data: String,
    /// Attempts so far, this one included.
    pub attempts: i32,
}

impl Repo {
    /// Claims at most `limit` due rows, oldest first: counts the attempt and leases them for 5
    /// minutes (their next attempt moves that far ahead until the outcome is recorded), skipping
    /// rows another server holds.
    pub async fn claim_events(&self, limit: i64) -> Result<Vec<DueEvent>> {
        let c = self.pool.get().await?;
        let rows = c
            .query(
                "UPDATE events SET attempts = attempts + 1, next_attempt_at = now() + interval '5 minutes'
                 WHERE id IN (SELECT id FROM events WHERE state = 'pending' AND next_attempt_at <= now()
                              ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
                 RETURNING id, topic, data::text, attempts",
                &[&limit],
            )
            .await?;
        let mut due: Vec<DueEvent> = rows
            .iter()
            .map(|r| DueEvent { id: r.get(0), topic: r.get(1), data: r.get(2), attempts: r.get(3) })
            .collect();
        due.sort_by_key(|d| d.id);
        Ok(due)
    }

    /// Records an attempt's outcome: `state` (`delivered`, `pending` again after `pause`, or
    /// `dead`), the error, and how many subscriptions matched.
    pub async fn record_event(
        &self,
        id: i64,
        state: &str,
        error: Option<&str>,
        subscribers: i32,
        pause: Duration,
    ) -> Result<()> {
        let c = self.pool.get().await?;
        c.execute(
            "UPDATE events SET state = $2, last_error = $3, subscribers = $4,
                 delivered_at = CASE WHEN $2 = 'delivered' THEN now() END,
                 next_attempt_at = now() + make_interval(secs => $5)
             WHERE id = $1",
            &[&id, &state, &error, &subscribers, &pause.as_secs_f64()],
        )
        .await?;
        Ok(())
    }
}
