//! The listener: a dedicated PostgreSQL connection LISTENing on `plugin_changes`, turning each
//! notification into a reconciler hint, and on `kiln_events`, publishing each notification's
//! `{"topic": …, "data": …}` on the event bus (so a trigger on any table can drive plugins).
//!
//! Not a pooled connection: a pool may recycle it (running `UNLISTEN *`) and nobody polls an idle
//! pooled connection for notifications. Notifications sent while the connection is down are lost
//! for good, so after every (re)connect the listener LISTENs first, then asks for a full resync.

use crate::events::{EventBus, Source};
use crate::reconciler::Reconciler;
use crate::storm::StormGate;
use futures_util::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

/// The channel the `plugins` triggers notify.
pub const CHANNEL: &str = "plugin_changes";

/// Most plugin ids read in one query (the notifications that arrived together).
const MAX_BATCH: usize = 1000;
/// The channel any transaction may notify to publish an event.
pub const EVENTS_CHANNEL: &str = "kiln_events";
/// The channel the `events` table notifies on insert (the outbox worker wakes).
pub const OUTBOX_CHANNEL: &str = "kiln_outbox";

/// Reconnect attempts start at this pause and double up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// At most this long between reconnect attempts: a database that comes back is listened to
/// again (and resynced) within this pause plus one connect. A refused attempt costs the database
/// nothing (a refused TCP connection) or one short-lived backend: 2.5 attempts a second is not
/// a load.
const MAX_BACKOFF: Duration = Duration::from_millis(400);

/// Listens forever, reconnecting with backoff. `up` tells whether the connection is live.
pub async fn run(mut pg: tokio_postgres::Config, reconciler: Reconciler, events: Arc<EventBus>, up: Arc<AtomicBool>) {
    pg.keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        .connect_timeout(Duration::from_secs(5));
    let mut backoff = MIN_BACKOFF;
    loop {
        match listen(&pg, &reconciler, &events, &up, &mut backoff).await {
            Ok(()) => tracing::warn!("listener connection closed; reconnecting"),
            Err(e) => tracing::warn!("listener: {e:#}; reconnecting in {backoff:?}"),
        }
        up.store(false, Ordering::Relaxed);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection's life: connect, LISTEN, resync, forward notifications until it ends.
async fn listen(
    pg: &tokio_postgres::Config,
    reconciler: &Reconciler,
    events: &EventBus,
    up: &AtomicBool,
    backoff: &mut Duration,
) -> anyhow::Result<()> {
    let (client, mut connection) = pg.connect(NoTls).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    // The connection makes progress only while polled; this task polls it and forwards messages.
    let driver = tokio::spawn(async move {
        while let Some(msg) = poll_fn(|cx| connection.poll_message(cx)).await {
            match msg {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(Ok(n)).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(e));
                    break;
                }
            }
        }
    });
    let result = async {
        client.batch_execute(&format!("LISTEN {CHANNEL}; LISTEN {EVENTS_CHANNEL}; LISTEN {OUTBOX_CHANNEL}")).await?;
        // Rows inserted while the connection was down: look now.
        events.outbox_wake.notify_one();
        up.store(true, Ordering::Relaxed);
        reconciler.metrics().listener_connects.inc();
        *backoff = MIN_BACKOFF;
        let n = reconciler.resync_all().await?;
        tracing::info!(plugins = n, "listening on {CHANNEL}; resync requested");
        let mut senders = Senders::default();
        let mut gate = StormGate::new(Instant::now());
        loop {
            let wake = gate.next_release();
            // Notifications waiting are read first: a timer that fires while they queue (a
            // busy runtime) must not take the storm for over.
            let msg = tokio::select! {
                biased;
                msg = rx.recv() => msg,
                () = sleep_until(wake), if wake.is_some() => {
                    let was_storming = gate.storming();
                    let_go(reconciler, &mut gate, Instant::now(), was_storming, Vec::new()).await;
                    continue;
                }
            };
            let Some(msg) = msg else { break };
            // Every notification that has arrived is handled at once: the plugin ids of all of
            // them go to the reconciler as one batch (one query reads their rows), so a burst
            // of single-row commits costs kiln a query per batch, not per commit.
            // Ids of one-row statements (a storm is made of those), and of statements over
            // several rows (never held: a bulk edit is one batch whatever goes on).
            let mut ids: Vec<i64> = Vec::new();
            let mut bulk: Vec<i64> = Vec::new();
            let mut notes = 0;
            let mut next = Some(msg);
            while let Some(msg) = next.take() {
                let note = msg?;
                if note.channel() == EVENTS_CHANNEL {
                    if senders.is_plugin(&client, note.process_id()).await {
                        tracing::warn!(
                            payload = note.payload(),
                            "a {EVENTS_CHANNEL} notification from a plugin's database session was refused: plugins publish with events::emit"
                        );
                    } else {
                        publish(events, note.payload());
                    }
                } else if note.channel() == OUTBOX_CHANNEL {
                    events.outbox_wake.notify_one();
                } else {
                    notes += 1;
                    match parse_ids(note.payload()) {
                        Some(Ids::One(id)) => ids.push(id),
                        Some(Ids::Many(many)) => bulk.extend(many),
                        None => {
                            tracing::warn!(payload = note.payload(), "unreadable notification; resyncing everything");
                            reconciler.resync_all().await?;
                        }
                    }
                }
                if ids.len() + bulk.len() < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            // A storm of notifications is held and coalesced (`crate::storm`).
            let now = Instant::now();
            let was_storming = gate.storming();
            let mut ids = gate.admit(now, notes, ids);
            ids.extend(bulk);
            let_go(reconciler, &mut gate, now, was_storming, ids).await;
        }
        Ok(())
    }
    .await;
    driver.abort();
    drop(client);
    // Held hints go with the connection: the next one resyncs everything.
    reconciler.set_held(0);
    result
}

/// Hints `ids` and what the gate lets go at `now`, and reports a storm that started or ended
/// (`was_storming`: whether one was on before the notifications just admitted).
async fn let_go(reconciler: &Reconciler, gate: &mut StormGate, now: Instant, was_storming: bool, mut ids: Vec<i64>) {
    let released = gate.release(now);
    report(reconciler, was_storming, gate, released.len());
    ids.extend(released);
    hint(reconciler, ids).await;
    // Counted as held until queued (then as busy): /health never reads 0 between.
    reconciler.set_held(gate.held());
}

/// Counts and logs a storm's start and end (`released`: the ids let go at once at its end).
fn report(reconciler: &Reconciler, was_storming: bool, gate: &StormGate, released: usize) {
    match (was_storming, gate.storming()) {
        (false, true) => {
            reconciler.metrics().notify_storms.inc();
            tracing::info!(
                "a storm of notifications (over {} in {:?}): the plugins they name pass {} a second, the longest waiting first, until it calms down",
                crate::storm::STORM_NOTES,
                crate::storm::WINDOW,
                crate::storm::STORM_PASSES
            );
        }
        (true, false) => tracing::info!(plugins = released, "the notification storm is over: its plugins pass now"),
        _ => {}
    }
}

/// Hints the plugins `ids`: several at once read their rows in one query.
async fn hint(reconciler: &Reconciler, mut ids: Vec<i64>) {
    ids.sort_unstable();
    ids.dedup();
    match ids[..] {
        [] => {}
        [id] => reconciler.hint(id),
        _ => reconciler.hint_rows(&ids).await,
    }
}

/// Sleeps until `at`; forever when `None` (the branch is disabled then).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Which database sessions are plugins' (a plugin's own role, marked `kiln: plugin …`), by
/// backend pid, remembered for a while: a plugin's statements may `NOTIFY kiln_events` (no
/// privilege governs NOTIFY), but an event from a plugin goes through `events::emit`, which names
/// the plugin and keeps its checks. kiln's plugin sessions are pooled, so the session that sent a
/// notification is still there when it arrives; a session already gone is taken as not a
/// plugin's.
#[derive(Default)]
struct Senders {
    known: std::collections::HashMap<i32, (bool, std::time::Instant)>,
}

impl Senders {
    const REMEMBERED: Duration = Duration::from_secs(10);

    async fn is_plugin(&mut self, client: &tokio_postgres::Client, pid: i32) -> bool {
        if let Some((plugin, at)) = self.known.get(&pid)
            && at.elapsed() < Self::REMEMBERED
        {
            return *plugin;
        }
        let plugin = client
            .query_opt(
                "SELECT coalesce(shobj_description(r.oid, 'pg_authid') LIKE 'kiln: plugin %', false)
                 FROM pg_stat_activity a JOIN pg_roles r ON r.rolname = a.usename WHERE a.pid = $1",
                &[&pid],
            )
            .await
            .ok()
            .flatten()
            .is_some_and(|r| r.get::<_, bool>(0));
        if self.known.len() > 1000 {
            self.known.clear();
        }
        self.known.insert(pid, (plugin, std::time::Instant::now()));
        plugin
    }
}

/// Publishes the event of a `kiln_events` notification; one kiln cannot read is logged.
fn publish(events: &EventBus, payload: &str) {
    let parsed = serde_json::from_str::<serde_json::Value>(payload).map_err(|e| e.to_string()).and_then(|mut v| {
        let topic = v.get("topic").and_then(|t| t.as_str()).ok_or("it has no \"topic\" string")?.to_string();
        let data = v.get_mut("data").map(serde_json::Value::take).unwrap_or(serde_json::Value::Null);
        events.publish(&topic, data, Source::Postgres)
    });
    if let Err(e) = parsed {
        tracing::warn!(payload, "a {EVENTS_CHANNEL} notification was not published: {e}");
    }
}

/// The plugin ids a notification names: one statement's rows (`sql/010_statement_notify.sql`).
#[derive(Debug, PartialEq, Eq)]
enum Ids {
    /// `{"operation":…,"id":…,"name":…}`: a statement that touched one row.
    One(i64),
    /// `{"operation":…,"ids":[…]}`: a statement that touched several (up to 300 a notification).
    Many(Vec<i64>),
}

fn parse_ids(payload: &str) -> Option<Ids> {
    let v = serde_json::from_str::<serde_json::Value>(payload).ok()?;
    if let Some(id) = v.get("id") {
        return id.as_i64().map(Ids::One);
    }
    let ids: Option<Vec<i64>> = v.get("ids")?.as_array()?.iter().map(|id| id.as_i64()).collect();
    ids.map(Ids::Many)
}

#[cfg(test)]
mod tests {
    use super::{Ids, parse_ids};

    #[test]
    fn reads_the_ids_of_a_payload() {
        let one = r#"{"operation":"DELETE","table":"plugins","id":7,"name":"x"}"#;
        assert_eq!(parse_ids(one), Some(Ids::One(7)));
        let many = r#"{"operation":"UPDATE","table":"plugins","ids":[7,8,9]}"#;
        assert_eq!(parse_ids(many), Some(Ids::Many(vec![7, 8, 9])));
        for bad in ["junk", r#"{"id":"7"}"#, r#"{"ids":[7,"8"]}"#, r#"{"ids":7}"#, "{}"] {
            assert_eq!(parse_ids(bad), None, "{bad}");
        }
    }
}
