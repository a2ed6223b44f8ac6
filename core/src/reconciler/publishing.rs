//! Publishing loaded versions, in batches: one transaction, one route table and one
//! announcement for every pass that reached its publish at the same time.
//!
//! A pass that loaded its plugin's wanted version hands it to one task (`recorder`) and waits.
//! The task takes every version handed over meanwhile (up to `MAX_BATCH`) and, in one
//! transaction: locks their rows (`FOR KEY SHARE SKIP LOCKED`), drops each version
//! its row no longer wants, puts the others in the served set (oldest row first, so that a path
//! claimed twice in a batch goes to its owner by the ownership rule), waits for one route table
//! that shows them all, records them with a handful of statements, and commits. A bulk edit of
//! 1,000 rows is then a few transactions, not 1,000 that each held a pooled connection for the
//! time of a route table.
//!
//! Why it stays correct: each version is checked against its row as locked, as a pass alone
//! did, and endpoint rows equal what is served. If recording fails, every publish of the batch
//! is undone, and its versions are tried again one by one, so one bad version costs only itself.
//! The task never waits long for a lock: rows are locked `SKIP LOCKED`, and its statements give
//! up on a lock after 200 ms (`lock_timeout`, below PostgreSQL's deadlock check). A version whose
//! row another transaction holds (a user's `DELETE` not yet committed) is handed over again after
//! a pause (20 ms, doubling to 1 s), until the row is free or gone. Waiting in the batch would
//! hold every other publish behind a user's open transaction, and holding some rows while
//! waiting for another could deadlock with a statement that takes the same rows in another
//! order.

use super::ownership::Displaced;
use super::{Inner, ReconcileError};
use crate::loader::LoadedPlugin;
use crate::manifest::Manifest;
use crate::repo::{Loaded, NewEndpoint, PluginRow};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// The most versions one transaction records (their statements' arrays stay small).
const MAX_BATCH: usize = 512;

/// A loaded version to publish and record, and where its pass waits for the outcome.
pub(super) struct Publish {
    pub row: PluginRow,
    pub manifest: Manifest,
    pub hash: String,
    pub config: serde_json::Value,
    pub plugin: Arc<LoadedPlugin>,
    pub reply: oneshot::Sender<Result<(), ReconcileError>>,
    /// How often its row was found held by another transaction.
    pub held: u32,
}

/// The task that publishes and records what passes hand over (see the module docs). It ends
/// when the reconciler is dropped.
pub(super) async fn recorder(inner: Weak<Inner>, mut handed: mpsc::UnboundedReceiver<Publish>) {
    while let Some(first) = handed.recv().await {
        // Passes woken with this one (one statement's rows) hand theirs over first.
        tokio::task::yield_now().await;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH
            && let Ok(more) = handed.try_recv()
        {
            batch.push(more);
        }
        let Some(inner) = inner.upgrade() else { return };
        // A panic must not end this task (every later pass would wait for ever): the batch's
        // passes see their replies dropped, and fail.
        let run = std::panic::AssertUnwindSafe(inner.publish_batch(batch));
        if futures_util::FutureExt::catch_unwind(run).await.is_err() {
            tracing::error!("publishing a batch of plugin versions panicked");
        }
    }
}

impl Inner {
    /// Publishes a loaded version and records it, as one step (see the module docs): with its
    /// row locked (a delete waits; an edit does not, and its notification brings another pass),
    /// checks that the row still wants this version (active, the same sources), publishes,
    /// writes the endpoint rows and commits. If it does not, nothing is published (the pass
    /// starts over); if recording fails, the publish is undone.
    pub(super) async fn publish_and_record(
        &self,
        row: &PluginRow,
        manifest: &Manifest,
        hash: &str,
        config: serde_json::Value,
        plugin: Arc<LoadedPlugin>,
    ) -> Result<(), ReconcileError> {
        let (reply, outcome) = oneshot::channel();
        let publish = Publish {
            row: row.clone(),
            manifest: manifest.clone(),
            hash: hash.to_string(),
            config,
            plugin,
            reply,
            held: 0,
        };
        if self.to_publish.send(publish).is_err() {
            return Err(ReconcileError::ShuttingDown);
        }
        outcome
            .await
            .unwrap_or_else(|_| Err(ReconcileError::Internal("publishing the version failed (see the log)".into())))
    }

    /// Publishes and records `batch`, answering each of its passes, or handing a version over
    /// again later when its row is held by another transaction.
    async fn publish_batch(&self, mut batch: Vec<Publish>) {
        batch.sort_by_key(|p| p.row.id);
        let mut later = Vec::new();
        match self.publish_together(&batch).await {
            Ok(outcomes) => {
                for (publish, outcome) in batch.into_iter().zip(outcomes) {
                    answer(publish, outcome, &mut later);
                }
            }
            Err(e) if batch.len() == 1 => answer(batch.pop().expect("one"), Some(Err(e)), &mut later),
            Err(e) => {
                tracing::warn!(
                    versions = batch.len(),
                    "recording a batch of plugin versions failed ({e}); each is tried alone"
                );
                for publish in batch {
                    let outcome = match self.publish_together(std::slice::from_ref(&publish)).await {
                        Ok(mut outcomes) => outcomes.pop().flatten(),
                        Err(e) => Some(Err(e)),
                    };
                    answer(publish, outcome, &mut later);
                }
            }
        }
        for publish in later {
            self.hand_over_later(publish);
        }
    }

    /// Hands `publish` over again after a pause (its row was held), unless the server is
    /// shutting down.
    fn hand_over_later(&self, mut publish: Publish) {
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = publish.reply.send(Err(ReconcileError::ShuttingDown));
            return;
        }
        if publish.held == 0 {
            tracing::info!(plugin = %publish.row.name, "its row is held by another transaction: published once it is free");
        }
        publish.held += 1;
        let pause = Duration::from_millis(10 << publish.held.min(7)).min(Duration::from_secs(1));
        let again = self.to_publish.clone();
        tokio::spawn(async move {
            tokio::time::sleep(pause).await;
            // Not sent only once the reconciler is gone: the pass then fails (`Internal`).
            let _ = again.send(publish);
        });
    }

    /// One transaction for `batch` (sorted by id): the outcome of each version, or the error
    /// that ended the transaction (every publish of the batch undone). A version whose row
    /// another transaction holds has no outcome (`None`): it is to be handed over again.
    async fn publish_together(
        &self,
        batch: &[Publish],
    ) -> Result<Vec<Option<Result<(), ReconcileError>>>, ReconcileError> {
        let ids: Vec<i64> = batch.iter().map(|p| p.row.id).collect();
        let (mut lock, rows) = self.repo.lock_rows(&ids, true).await?;
        self.metrics.publish_transactions.inc();
        let now: HashMap<i64, PluginRow> = rows.into_iter().map(|r| (r.id, r)).collect();
        // A row not locked is gone, or held by another transaction (it exists, unlocked).
        let missing: Vec<i64> = ids.iter().copied().filter(|id| !now.contains_key(id)).collect();
        let held: HashSet<i64> = match missing.is_empty() {
            true => HashSet::new(),
            false => lock.existing(&missing).await?.into_iter().collect(),
        };
        let mut outcomes = Vec::with_capacity(batch.len());
        // Which versions went into the served set, with what they displaced.
        let mut taken: Vec<(&Publish, Displaced)> = Vec::new();
        let mut change = None;
        for p in batch {
            // Turned off or pointed at other sources meanwhile: this version is not wanted. A
            // new config is not a reason to start over: the version serves with the config it
            // was started with, and the edit's notification brings the pass that applies the new
            // one (in place, usually). Starting over instead never finished while a row changed
            // faster than a load took (an edit storm).
            let Some(now) = now.get(&p.row.id) else {
                outcomes.push((!held.contains(&p.row.id)).then_some(Err(ReconcileError::Superseded)));
                continue;
            };
            if !(now.wants_active() && now.source_path == p.row.source_path) {
                outcomes.push(Some(Err(ReconcileError::Superseded)));
                continue;
            }
            // Announced (`kiln.plugin.loaded`) once recorded: a publish undone was never news.
            self.events.hold(&p.plugin);
            match self.take_paths(&p.row, &p.hash, p.config.clone(), p.plugin.clone()) {
                Ok((displaced, changed)) => {
                    change = Some(changed);
                    taken.push((p, displaced));
                    outcomes.push(Some(Ok(())));
                }
                Err(e) => {
                    self.events.release(&[&p.plugin]);
                    outcomes.push(Some(Err(e)));
                }
            }
        }
        let Some(change) = change else {
            lock.rollback().await;
            return Ok(outcomes);
        };
        self.show(change).await;
        let recorded = match record(&mut lock, &now, &taken).await {
            Ok(()) => lock.commit().await.map_err(ReconcileError::from),
            Err(e) => {
                lock.rollback().await;
                Err(e)
            }
        };
        let plugins: Vec<&Arc<LoadedPlugin>> = taken.iter().map(|(p, _)| &p.plugin).collect();
        match recorded {
            Ok(()) => {
                let ids: Vec<i64> = taken.iter().map(|(p, _)| p.row.id).collect();
                self.published(&ids, taken.into_iter().map(|(_, displaced)| displaced).collect());
                self.events.release(&plugins);
                Ok(outcomes)
            }
            Err(e) => {
                for (p, displaced) in taken.into_iter().rev() {
                    self.unpublish(p.row.id, &p.plugin, displaced).await;
                }
                self.events.release(&plugins);
                Err(e)
            }
        }
    }
}

/// Answers a pass, or keeps its version to be handed over again (`None`: its row was held; or
/// a statement gave up waiting for a lock).
fn answer(publish: Publish, outcome: Option<Result<(), ReconcileError>>, later: &mut Vec<Publish>) {
    match outcome {
        Some(Err(ReconcileError::Database(e))) if e.is_lock_timeout() => later.push(publish),
        Some(outcome) => drop(publish.reply.send(outcome)),
        None => later.push(publish),
    }
}

/// The rows of a batch's publishes, in its transaction: each new version's, and those of plugins
/// that gave way to one.
async fn record(
    lock: &mut crate::repo::RowLock,
    now: &HashMap<i64, PluginRow>,
    taken: &[(&Publish, Displaced)],
) -> Result<(), ReconcileError> {
    for (_, displaced) in taken {
        for (other, _, why) in &displaced.evicted {
            lock.record_not_serving(*other, "waiting", why).await?;
        }
    }
    let endpoints: Vec<Vec<NewEndpoint>> = taken.iter().map(|(p, _)| endpoints_of(&p.plugin)).collect();
    let records: Vec<(i64, Loaded<'_>)> = taken
        .iter()
        .zip(&endpoints)
        .map(|((p, displaced), endpoints)| {
            let mut record = loaded(&p.manifest, &p.hash, &p.plugin, endpoints);
            record.fresh = true;
            // The endpoint rows are the replaced version's (endpoint rows equal what is served):
            // when the new version's are the same, they stay as they are (a reload for a config
            // change rewrote every endpoint row).
            record.keep_endpoints = now[&p.row.id].kind == p.manifest.kind
                && displaced.previous.as_ref().is_some_and(|previous| endpoints_of(&previous.plugin) == *endpoints);
            (p.row.id, record)
        })
        .collect();
    let all: Vec<(i64, &Loaded<'_>)> = records.iter().map(|(id, record)| (*id, record)).collect();
    lock.record_loaded_many(&all).await?;
    Ok(())
}

pub(super) fn endpoints_of(plugin: &LoadedPlugin) -> Vec<NewEndpoint> {
    let d = plugin.description();
    d.routes
        .iter()
        .map(|r| NewEndpoint { method: r.method.clone(), path: r.path.clone(), handler: r.handler.clone() })
        .collect()
}

pub(super) fn loaded<'a>(
    manifest: &'a Manifest,
    hash: &'a str,
    plugin: &'a LoadedPlugin,
    endpoints: &'a [NewEndpoint],
) -> Loaded<'a> {
    let d = plugin.description();
    Loaded {
        manifest_path: manifest.manifest_path.to_string_lossy(),
        binary_path: plugin.binary_path().to_string_lossy(),
        hash,
        description: &d.description,
        version: &d.version,
        author: &d.author,
        kind: &manifest.kind,
        endpoints,
        keep_endpoints: false,
        fresh: false,
    }
}
